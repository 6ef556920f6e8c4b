"""The registry's rollout tables: a rollout's row, its device entries and its history, saved in one
transaction (with several controllers, only by the lease holder) and read back to resume or show it.

`RolloutTables` is a mixin of `fleet.registry.Registry` (it uses the registry's `_write`/`_read`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from edge_agent.errors import EdgeAgentError
from fleet.registry_db import Tx, dumps_json, loads_json

#: `save_rollout(claims=...)`: claim every device of the rollout (its first save) or release them.
TAKE_CLAIMS = "take"
RELEASE_CLAIMS = "release"


class DevicesClaimed(EdgeAgentError):
    """Some of a new rollout's devices are claimed by another rollout (nothing was saved)."""

    def __init__(self, rollout_id: str, devices: Sequence[str]) -> None:
        self.rollout_id = rollout_id
        self.devices = list(devices)
        super().__init__("device(s) %s are already in rollout %s" % (", ".join(self.devices[:5]), rollout_id))


def _write_row(db: Tx, rollout: Dict[str, Any]) -> None:
    """The rollout's row with its whole body (everything but the device entries)."""
    body = {k: v for k, v in rollout.items() if k != "devices"}
    db.execute(
        "INSERT INTO rollouts (rollout_id, bundle_name, bundle_version, mode, state, created, updated, reason, "
        "body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(rollout_id) DO UPDATE SET state=excluded.state, "
        "updated=excluded.updated, reason=excluded.reason, body=excluded.body",
        (
            rollout["rollout_id"],
            rollout["bundle"]["name"],
            int(rollout["bundle"]["version"]),
            rollout["mode"],
            rollout["state"],
            rollout["created"],
            rollout["updated"],
            rollout["reason"],
            dumps_json(body),
        ),
    )


class RolloutTables:
    """Rollout persistence of the registry (mixin of `Registry`)."""

    def save_rollout(
        self,
        rollout: Dict[str, Any],
        history: Sequence[Tuple[float, str, Optional[str], str]] = (),
        devices: Optional[Sequence[Dict[str, Any]]] = None,
        *,
        owner: Optional[str] = None,
        claims: Optional[str] = None,
    ) -> None:
        """Store a rollout (a `Rollout.to_dict()`) and append `history` (ts, kind, device, message) atomically.

        `devices`: only these device entries are written (the ones that changed); default: the rollout's
        own ``devices`` list. `owner`: with several controllers, the lease holder this save is made for;
        when another controller holds the lease now, nothing is written and `LeaseLost` is raised.
        `claims`: `TAKE_CLAIMS` claims every device of the rollout's waves in the same transaction (when
        another rollout holds one, nothing is written and `DevicesClaimed` is raised); `RELEASE_CLAIMS`
        frees them (the rollout will send nothing more)."""
        entries = rollout.get("devices", []) if devices is None else devices
        rid = rollout["rollout_id"]
        # The body (with the waves: every device id) is rewritten only when more than `updated` changed
        # since this process last saved it; a step of a 10,000-device rollout otherwise rewrites ~200 KB.
        cache: Dict[str, str] = self.__dict__.setdefault("_rollout_bodies", {})
        small = dumps_json({k: v for k, v in rollout.items() if k not in ("devices", "waves", "updated")})
        unchanged = cache.get(rid) == small

        def write(db: Tx) -> None:
            if owner is not None:
                _check_lease(db, rid, owner)
            if claims == TAKE_CLAIMS:
                _take_claims(db, rid, [d for w in rollout["waves"] for d in w], rollout["created"])
            elif claims == RELEASE_CLAIMS:
                db.execute("DELETE FROM rollout_claims WHERE rollout_id = ?", (rid,))
            if unchanged:
                db.execute("UPDATE rollouts SET updated = ? WHERE rollout_id = ?", (rollout["updated"], rid))
            else:
                _write_row(db, rollout)
            db.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, prior, sent_at, updated, detail, "
                "rollback_attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(rollout_id, device_id) DO UPDATE "
                "SET state=excluded.state, prior=excluded.prior, sent_at=excluded.sent_at, updated=excluded.updated, "
                "detail=excluded.detail, rollback_attempts=excluded.rollback_attempts",
                [
                    (
                        rollout["rollout_id"],
                        e["device_id"],
                        e["wave"],
                        e["state"],
                        dumps_json(e.get("prior")),
                        e.get("sent_at"),
                        e["updated"],
                        e.get("detail") or "",
                        e.get("rollback_attempts") or 0,
                    )
                    for e in entries
                ],
            )
            db.executemany(
                "INSERT INTO rollout_history (rollout_id, ts, kind, device_id, message) VALUES (?, ?, ?, ?, ?)",
                [(rollout["rollout_id"], ts, kind, dev, msg) for ts, kind, dev, msg in history],
            )

        self._write(write)
        if len(cache) > 1000:
            cache.clear()
        cache[rid] = small  # only once committed

    def load_rollout(self, rollout_id: str) -> Optional[Dict[str, Any]]:
        """A rollout as saved (the `Rollout.to_dict()` form), or None."""
        # Whoever loads a rollout may save it next from another state than ours: write its body in full.
        self.__dict__.setdefault("_rollout_bodies", {}).pop(rollout_id, None)
        rows = self._read("SELECT body, updated FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            return None
        body = loads_json(rows[0]["body"]) or {}
        body["updated"] = rows[0]["updated"]  # kept current by every save, the body only on changes
        devs = self._read("SELECT * FROM rollout_devices WHERE rollout_id = ?", (rollout_id,))
        # In wave order, each wave in the order the rollout lists its devices.
        pos = {d: i for w in body.get("waves") or [] for i, d in enumerate(w)}
        devs = sorted(devs, key=lambda r: (r["wave"], pos.get(r["device_id"], len(pos)), r["device_id"]))
        body["devices"] = [
            {
                "device_id": r["device_id"],
                "wave": r["wave"],
                "state": r["state"],
                "prior": loads_json(r["prior"]),
                "sent_at": r["sent_at"],
                "updated": r["updated"],
                "detail": r["detail"],
                "rollback_attempts": r["rollback_attempts"],
            }
            for r in devs
        ]
        return body

    def list_rollouts(self, *, states: Optional[Sequence[str]] = None, limit: int = 50) -> List[Dict[str, Any]]:
        """Rollouts, newest first: id, bundle, mode, state, reason, created, updated."""
        sql = "SELECT rollout_id, bundle_name, bundle_version, mode, state, created, updated, reason FROM rollouts"
        params: List[Any] = []
        if states:
            sql += " WHERE state IN (%s)" % ",".join("?" * len(states))
            params.extend(states)
        sql += " ORDER BY created DESC, rollout_id DESC LIMIT ?"
        params.append(int(limit))
        return [
            {
                "rollout_id": r["rollout_id"],
                "bundle": {"name": r["bundle_name"], "version": r["bundle_version"]},
                "mode": r["mode"],
                "state": r["state"],
                "created": r["created"],
                "updated": r["updated"],
                "reason": r["reason"],
            }
            for r in self._read(sql, params)
        ]

    def rollout_history(self, rollout_id: str, *, limit: int = 200) -> List[Dict[str, Any]]:
        """The newest `limit` history lines of a rollout, oldest first."""
        rows = self._read(
            "SELECT ts, kind, device_id, message FROM rollout_history WHERE rollout_id = ? ORDER BY id DESC LIMIT ?",
            (rollout_id, int(limit)),
        )
        return [dict(r) for r in reversed(rows)]

    def device_rollouts(self, device_id: str, *, limit: int = 20) -> List[Dict[str, Any]]:
        """A device's part in recent rollouts (its rollout history), newest first."""
        rows = self._read(
            "SELECT d.rollout_id, d.wave, d.state, d.detail, d.updated, r.bundle_name, r.bundle_version "
            "FROM rollout_devices d JOIN rollouts r ON r.rollout_id = d.rollout_id "
            "WHERE d.device_id = ? ORDER BY r.created DESC LIMIT ?",
            (device_id, int(limit)),
        )
        return [dict(r) for r in rows]


def _take_claims(db: Tx, rollout_id: str, devices: Sequence[str], now: float) -> None:
    """Claim `devices` for the rollout, or raise `DevicesClaimed` (rolling the transaction back).

    The device id is the claims table's primary key: of two transactions claiming one device at once,
    PostgreSQL makes the second wait for the first and then skip the row (SQLite runs one writer at a
    time), so exactly one rollout gets each device."""
    wanted = sorted(set(devices))  # one lock order for every transaction: no deadlock between two
    db.executemany(
        "INSERT INTO rollout_claims (device_id, rollout_id, claimed_at) VALUES (?, ?, ?) "
        "ON CONFLICT(device_id) DO NOTHING",
        [(d, rollout_id, now) for d in wanted],
    )
    got = db.fetchall("SELECT COUNT(*) AS n FROM rollout_claims WHERE rollout_id = ?", (rollout_id,))[0]["n"]
    if int(got) == len(wanted):
        return
    held: Dict[str, List[str]] = {}
    for i in range(0, len(wanted), 500):
        part = wanted[i:i + 500]
        rows = db.fetchall(
            "SELECT device_id, rollout_id FROM rollout_claims WHERE rollout_id <> ? AND device_id IN (%s)"
            % ",".join("?" * len(part)), (rollout_id, *part))
        for r in rows:
            held.setdefault(r["rollout_id"], []).append(r["device_id"])
    other = sorted(held)[0] if held else "(unknown)"
    raise DevicesClaimed(other, sorted(held.get(other, [])))


def release_claims(registry: Any, rollout_id: str) -> None:
    """Free the devices of a rollout that will send nothing more (see `save_rollout(claims=...)`)."""
    registry.write(lambda db: db.execute("DELETE FROM rollout_claims WHERE rollout_id = ?", (rollout_id,)))


def _check_lease(db: Tx, rollout_id: str, owner: str) -> None:
    from fleet.leases import LeaseLost

    lock = " FOR UPDATE" if db.dialect.name == "postgresql" else ""
    rows = db.fetchall("SELECT owner FROM rollout_leases WHERE rollout_id = ?" + lock, (rollout_id,))
    if not rows or rows[0]["owner"] != owner:
        raise LeaseLost("rollout %s is owned by %s now" % (rollout_id, rows[0]["owner"] if rows else "nobody"))
