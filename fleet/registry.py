"""The controller's registry: devices, rollouts and their history in SQLite (stdlib ``sqlite3``).

The database runs in WAL mode, so readers (the CLI's RPC handlers, a second process with the file
open read-only, a backup) never block the writer. One connection is shared by the controller's
threads behind a lock; writes are short transactions. The schema is versioned in
``schema_migrations``; opening an older file applies the missing migrations in order, opening a
newer one is refused (the file belongs to a newer controller).

Tables:

* ``devices``: one row per device id: platform, agent version, active/previous bundle, deploy state,
  online flag, last seen, health, the last telemetry summary.
* ``rollouts`` + ``rollout_devices``: the state of every rollout and of each of its devices, enough
  to resume after a controller restart.
* ``rollout_history``: an append-only log of what happened in each rollout.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from edge_agent.errors import ResourceError

log = logging.getLogger(__name__)


class RegistryError(ResourceError):
    """The registry database cannot be opened, migrated or written."""


#: Migrations in order; the index + 1 is the schema version.
MIGRATIONS: Tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device_id       TEXT PRIMARY KEY,
        first_seen      REAL NOT NULL,
        last_seen       REAL NOT NULL,
        online          INTEGER NOT NULL DEFAULT 0,
        status_ts       REAL,
        agent_version   TEXT,
        platform        TEXT,
        active_name     TEXT,
        active_version  INTEGER,
        previous        TEXT,
        deploy_state    TEXT,
        deploy          TEXT,
        ready           INTEGER NOT NULL DEFAULT 0,
        health          TEXT NOT NULL DEFAULT 'unknown',
        telemetry_ts    REAL,
        telemetry       TEXT,
        last_event      TEXT
    );
    CREATE TABLE rollouts (
        rollout_id     TEXT PRIMARY KEY,
        bundle_name    TEXT NOT NULL,
        bundle_version INTEGER NOT NULL,
        mode           TEXT NOT NULL,
        state          TEXT NOT NULL,
        created        REAL NOT NULL,
        updated        REAL NOT NULL,
        reason         TEXT NOT NULL DEFAULT '',
        body           TEXT NOT NULL
    );
    CREATE INDEX rollouts_state ON rollouts(state);
    CREATE TABLE rollout_devices (
        rollout_id TEXT NOT NULL REFERENCES rollouts(rollout_id) ON DELETE CASCADE,
        device_id  TEXT NOT NULL,
        wave       INTEGER NOT NULL,
        state      TEXT NOT NULL,
        prior      TEXT,
        sent_at    REAL,
        updated    REAL NOT NULL,
        detail     TEXT NOT NULL DEFAULT '',
        rollback_attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout_id, device_id)
    );
    CREATE INDEX rollout_devices_device ON rollout_devices(device_id);
    CREATE TABLE rollout_history (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        rollout_id TEXT NOT NULL,
        ts         REAL NOT NULL,
        kind       TEXT NOT NULL,
        device_id  TEXT,
        message    TEXT NOT NULL
    );
    CREATE INDEX rollout_history_rollout ON rollout_history(rollout_id, id);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

_DEVICE_COLUMNS = (
    "device_id",
    "first_seen",
    "last_seen",
    "online",
    "status_ts",
    "agent_version",
    "platform",
    "active_name",
    "active_version",
    "previous",
    "deploy_state",
    "deploy",
    "ready",
    "health",
    "telemetry_ts",
    "telemetry",
    "last_event",
)
_JSON_COLUMNS = ("platform", "previous", "deploy", "telemetry", "last_event", "prior")


def _dumps(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _loads(text: Optional[str]) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class Registry:
    """Devices, rollouts and rollout history in one SQLite file (``":memory:"`` for tests)."""

    def __init__(self, path: Union[str, Path], *, busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RegistryError("cannot create the registry folder for %s: %s" % (self.path, e.strerror))
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys=ON")
            if self.path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("registry %s: journal mode is %s, not WAL", self.path, mode)
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise RegistryError("cannot open registry %s: %s" % (self.path, e))

    # ------------------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise RegistryError(
                    "registry %s has schema version %d, this controller knows up to %d; upgrade the controller"
                    % (self.path, current, SCHEMA_VERSION)
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[version - 1].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, time.time())
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                log.info("registry %s migrated to schema version %d", self.path, version)

    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._lock:
            return int(self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0)

    def _write(self, fn, *args: Any) -> Any:
        """Run `fn(db, *args)` in one IMMEDIATE transaction."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._db, *args)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as e:
                raise RegistryError("registry %s: write failed: %s" % (self.path, e))
            return out

    def _read(self, sql: str, params: Sequence[Any] = ()) -> List[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise RegistryError("registry %s: read failed: %s" % (self.path, e))

    # ------------------------------------------------------------------------------------- devices

    def record_status(self, status: Dict[str, Any], *, now: float) -> None:
        """Store a device's status (a `Status.to_dict()`); creates the device on first sight."""
        self._write(_upsert_status, status, now)

    def record_telemetry(self, items: Iterable[Tuple[str, float, Dict[str, Any], str]], *, now: float) -> int:
        """Store the latest telemetry summary of many devices in one transaction.

        `items`: (device_id, telemetry ts, summary dict, health). Returns the number of rows written.
        """
        rows = [(d, now, ts, _dumps(summary), health) for d, ts, summary, health in items]
        if not rows:
            return 0

        def write(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO devices (device_id, first_seen, last_seen, telemetry_ts, telemetry, health, online) "
                "VALUES (?1, ?2, ?2, ?3, ?4, ?5, 1) "
                "ON CONFLICT(device_id) DO UPDATE SET last_seen=MAX(last_seen, excluded.last_seen), "
                "telemetry_ts=excluded.telemetry_ts, telemetry=excluded.telemetry, health=excluded.health",
                rows,
            )
            return len(rows)

        return int(self._write(write))

    def record_event(self, device_id: str, event: Dict[str, Any], *, now: float) -> None:
        """Remember a device's last event and that it was seen."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_event) VALUES (?1, ?2, ?2, ?3) "
                "ON CONFLICT(device_id) DO UPDATE SET last_seen=MAX(last_seen, excluded.last_seen), "
                "last_event=excluded.last_event",
                (device_id, now, _dumps(event)),
            )

        self._write(write)

    def list_devices(self, *, online: Optional[bool] = None) -> List[Dict[str, Any]]:
        """Every device, sorted by id (optionally only online or offline ones)."""
        sql = "SELECT * FROM devices"
        params: List[Any] = []
        if online is not None:
            sql += " WHERE online = ?"
            params.append(1 if online else 0)
        return [_device_row(r) for r in self._read(sql + " ORDER BY device_id", params)]

    def get_device(self, device_id: str) -> Optional[Dict[str, Any]]:
        """One device, or None."""
        rows = self._read("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return _device_row(rows[0]) if rows else None

    def device_count(self) -> int:
        """How many devices the registry knows."""
        return int(self._read("SELECT COUNT(*) FROM devices")[0][0])

    def forget_device(self, device_id: str) -> bool:
        """Remove a decommissioned device; True when it existed."""

        def write(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0

        return bool(self._write(write))

    # ------------------------------------------------------------------------------------ rollouts

    def save_rollout(
        self,
        rollout: Dict[str, Any],
        history: Sequence[Tuple[float, str, Optional[str], str]] = (),
        devices: Optional[Sequence[Dict[str, Any]]] = None,
    ) -> None:
        """Store a rollout (a `Rollout.to_dict()`) and append `history` (ts, kind, device, message) atomically.

        `devices`: only these device entries are written (the ones that changed); default: the rollout's
        own ``devices`` list."""
        entries = rollout.get("devices", []) if devices is None else devices

        def write(db: sqlite3.Connection) -> None:
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
                    _dumps(body),
                ),
            )
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
                        _dumps(e.get("prior")),
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

    def load_rollout(self, rollout_id: str) -> Optional[Dict[str, Any]]:
        """A rollout as saved (the `Rollout.to_dict()` form), or None."""
        rows = self._read("SELECT body FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            return None
        body = _loads(rows[0]["body"]) or {}
        devs = self._read("SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, rowid", (rollout_id,))
        body["devices"] = [
            {
                "device_id": r["device_id"],
                "wave": r["wave"],
                "state": r["state"],
                "prior": _loads(r["prior"]),
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


def _upsert_status(db: sqlite3.Connection, s: Dict[str, Any], now: float) -> None:
    active = s.get("active") or {}
    deploy = s.get("deploy")
    db.execute(
        "INSERT INTO devices (device_id, first_seen, last_seen, online, status_ts, agent_version, platform, "
        "active_name, active_version, previous, deploy_state, deploy, ready) "
        "VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) "
        "ON CONFLICT(device_id) DO UPDATE SET last_seen=MAX(last_seen, excluded.last_seen), "
        "online=excluded.online, status_ts=excluded.status_ts, "
        "agent_version=COALESCE(excluded.agent_version, agent_version), "
        "platform=COALESCE(excluded.platform, platform), active_name=excluded.active_name, "
        "active_version=excluded.active_version, previous=excluded.previous, "
        "deploy_state=COALESCE(excluded.deploy_state, deploy_state), deploy=COALESCE(excluded.deploy, deploy), "
        "ready=excluded.ready, health=CASE WHEN excluded.online = 0 THEN 'offline' "
        "WHEN health = 'offline' THEN 'unknown' ELSE health END",
        (
            s["device_id"],
            now,
            1 if s.get("online") else 0,
            s.get("ts"),
            s.get("agent_version"),
            _dumps(s.get("platform")),
            active.get("name"),
            active.get("version"),
            _dumps(s.get("previous")),
            (deploy or {}).get("state"),
            _dumps(deploy),
            1 if s.get("ready") else 0,
        ),
    )


def _device_row(r: sqlite3.Row) -> Dict[str, Any]:
    d = {k: r[k] for k in _DEVICE_COLUMNS}
    for k in _JSON_COLUMNS:
        if k in d:
            d[k] = _loads(d[k])
    d["online"] = bool(d["online"])
    d["ready"] = bool(d["ready"])
    name, version = d.pop("active_name"), d.pop("active_version")
    d["active"] = {"name": name, "version": version} if name is not None else None
    return d
