"""The controller's registry: devices, rollouts and their history, in SQLite (the embedded default, one
controller) or PostgreSQL (several controllers sharing one fleet), through `fleet.registry_db`.

SQLite runs in WAL mode, so readers (the CLI's RPC handlers, a second process with the file open
read-only, a backup) never block the writer; PostgreSQL is reached through a connection pool. Writes
are short transactions. The schema is the same for both and versioned in ``schema_migrations``;
opening an older database applies the missing migrations in order (on PostgreSQL under an advisory
lock, so controllers starting together migrate once), opening a newer one is refused (it belongs to
a newer controller).
The tables and their migrations are in `fleet.registry_schema`; the rollout tables' reads and writes
in `fleet.registry_rollouts`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from fleet.registry_db import (
    PostgresDb,
    RegistryError,
    SqliteDb,
    Tx,
    dumps_json,
    is_postgres_url,
    loads_json,
    redact_url,
)
from fleet.registry_rollouts import RolloutTables
from fleet.registry_schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)


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


class Registry(RolloutTables):
    """Devices, rollouts and rollout history in one database.

    `target`: a SQLite file path (``":memory:"`` for tests) or a ``postgresql://`` URL."""

    def __init__(self, target: Union[str, Path], *, busy_timeout_s: float = 10.0, pool_min: int = 1,
                 pool_max: int = 8, reconnect_s: float = 30.0) -> None:
        target = str(target)
        if is_postgres_url(target):
            self._db: Any = PostgresDb(target, pool_min=pool_min, pool_max=pool_max, reconnect_s=reconnect_s,
                                       connect_timeout_s=busy_timeout_s)
            self.path = redact_url(target)
        else:
            self._db = SqliteDb(target, busy_timeout_s=busy_timeout_s)
            self.path = target
        self.engine = self._db.dialect.name
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------------------------ plumbing

    @property
    def shared(self) -> bool:
        """True when other controllers may use the same database (PostgreSQL)."""
        return self.engine == "postgresql"

    @property
    def dialect(self) -> Any:
        """How this registry's engine spells things (`fleet.registry_db.Dialect`; `.now` is its clock)."""
        return self._db.dialect

    def close(self) -> None:
        """Close the database connection(s)."""
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _migrate(self) -> None:
        d = self._db.dialect
        try:
            ddl = d.schema("CREATE TABLE IF NOT EXISTS schema_migrations "
                           "(version INTEGER PRIMARY KEY, applied_at {float} NOT NULL)")
            self._db.write(lambda tx: tx.execute(ddl), migration_lock=True)
        except RegistryError as e:
            raise RegistryError("cannot open registry %s: %s" % (self.path, str(e).split(": ", 1)[-1]))
        for version in range(1, SCHEMA_VERSION + 1):
            if not self._db.write(lambda tx, v=version: self._apply_migration(tx, v), migration_lock=True):
                continue
            log.info("registry %s migrated to schema version %d", self.path, version)

    def _apply_migration(self, tx: Tx, version: int) -> bool:
        """Apply migration `version` unless it is there (False); refuses a newer database."""
        current = tx.fetchall("SELECT MAX(version) AS v FROM schema_migrations")[0]["v"] or 0
        if current > SCHEMA_VERSION:
            raise RegistryError(
                "registry %s has schema version %d, this controller knows up to %d; upgrade the controller"
                % (self.path, current, SCHEMA_VERSION)
            )
        if current >= version:
            return False
        for stmt in tx.dialect.schema(MIGRATIONS[version - 1]).split(";"):
            if stmt.strip():
                tx.execute(stmt)
        tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, time.time()))
        return True

    def schema_version(self) -> int:
        """The schema version of the open database."""
        return int(self._read("SELECT MAX(version) AS v FROM schema_migrations")[0]["v"] or 0)

    def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(tx, *args)` in one transaction."""
        return self._db.write(lambda tx: fn(tx, *args))

    def _read(self, sql: str, params: Sequence[Any] = ()) -> List[Any]:
        return self._db.read(sql, params)

    #: For the modules that keep their own tables here (fleet/bundle_store_db.py, fleet/leases.py):
    #: `write(fn)` runs fn(tx) in one transaction, `read(sql, params)` returns rows by column name.
    write = _write
    read = _read

    # -------------------------------------------------------------------------------- controllers

    def controller_heartbeat(self, owner: str, client_id: str, started: float, stats: Dict[str, Any]) -> None:
        """Record that controller `owner` is alive (at the database's clock), with its own counters."""
        self._write(lambda db: db.execute(
            "INSERT INTO controllers (owner, client_id, started, heartbeat, stats) VALUES (?, ?, ?, %s, ?) "
            "ON CONFLICT(owner) DO UPDATE SET heartbeat = excluded.heartbeat, stats = excluded.stats"
            % db.dialect.now, (owner, client_id, started, dumps_json(stats))))

    def list_controllers(self, *, within_s: float) -> List[Dict[str, Any]]:
        """Controllers whose last heartbeat is at most `within_s` old (the database's clock, so every
        controller lists the same ones), with their counters."""
        rows = self._read("SELECT owner, client_id, started, heartbeat, stats FROM controllers WHERE heartbeat >= "
                          "%s - ? ORDER BY owner" % self.dialect.now, (float(within_s),))
        return [{"owner": r["owner"], "client_id": r["client_id"], "started": r["started"],
                 "heartbeat": r["heartbeat"], "stats": loads_json(r["stats"])} for r in rows]

    # --------------------------------------------------------------------------- command sequence

    def next_command_seq(self, device_id: str, *, floor: int) -> int:
        """The next command sequence number for `device_id`: above every number handed out for it by
        any controller sharing this database, and at least `floor` (the clock in ms, so a registry
        that replaced an older counter still starts above what devices have seen)."""
        upsert = (
            "INSERT INTO command_seq (device_id, last_seq) VALUES (?, ?) ON CONFLICT(device_id) DO UPDATE "
            "SET last_seq = GREATEST(command_seq.last_seq + 1, excluded.last_seq)"
        )

        def write(tx: Tx) -> int:
            if tx.dialect.name == "postgresql":  # one round trip; the row lock orders concurrent callers
                return int(tx.fetchall(upsert + " RETURNING last_seq", (device_id, int(floor)))[0]["last_seq"])
            tx.execute(upsert, (device_id, int(floor)))
            return int(tx.fetchall("SELECT last_seq FROM command_seq WHERE device_id = ?", (device_id,))[0][0])

        return int(self._write(write))

    # ------------------------------------------------------------------------------------- fetch rights

    def grant_fetch(self, device_id: str, name: str, version: int, *, now: float) -> None:
        """Let `device_id` fetch bundle `name` v`version` (a deploy command for it is being sent)."""
        self._write(lambda tx: tx.execute(
            "INSERT INTO fetch_entitlements (device_id, name, version, granted_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id, name, version) DO NOTHING", (device_id, name, int(version), now)))

    def fetch_allowed(self, device_id: str, name: str, version: int) -> bool:
        """True when some controller sharing this registry sent `device_id` a deploy of this bundle."""
        return bool(self._read("SELECT 1 FROM fetch_entitlements WHERE device_id = ? AND name = ? AND version = ?",
                               (device_id, name, int(version))))

    # ------------------------------------------------------------------------------------- devices

    def record_status(self, status: Dict[str, Any], *, now: float) -> None:
        """Store a device's status (a `Status.to_dict()`); creates the device on first sight."""
        self._write(_upsert_status, status, now)

    def record_telemetry(self, items: Iterable[Sequence[Any]], *, now: float) -> int:
        """Store the latest telemetry summary of many devices in one transaction.

        `items`: (device_id, telemetry ts, summary dict or its JSON text, health[, accounting]); `accounting` is
        (boot time, lowest seq, highest seq, messages) of what this controller received from the device
        since its last flush (see `telemetry_loss`). A summary older than the stored one (another
        controller flushed a newer one first) does not replace it. Returns the number of rows written.
        """
        rows = []
        for item in items:
            acct = tuple(item[4]) if len(item) > 4 and item[4] is not None else (None, None, None, None)
            text = item[2] if isinstance(item[2], str) else dumps_json(item[2])  # str: JSON text already
            rows.append((item[0], now, now, item[1], text, item[3], *acct))
        if not rows:
            return 0

        def write(db: Tx) -> int:
            cols = "(device_id, first_seen, last_seen, telemetry_ts, telemetry, health, tel_boot, tel_seq_min, " \
                   "tel_seq_max, tel_received, online)"
            if db.dialect.name == "postgresql":
                # One statement for the whole batch (arrays unnested server-side), not one per row.
                db.execute(
                    "INSERT INTO devices " + cols + " SELECT *, 1 FROM unnest(?::text[], ?::float8[], ?::float8[], "
                    "?::float8[], ?::text[], ?::text[], ?::float8[], ?::int8[], ?::int8[], ?::int8[]) "
                    + _TELEMETRY_UPSERT,
                    [list(c) for c in zip(*rows)],
                )
                return len(rows)
            db.executemany("INSERT INTO devices " + cols + " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
                           + _TELEMETRY_UPSERT, rows)
            return len(rows)

        return int(self._write(write))

    def telemetry_loss(self) -> Dict[str, int]:
        """Telemetry the devices sent that reached no controller (device spool, network, broker), from
        the gaps in each device's sequence numbers within each run of its agent, summed over the
        controllers: {"received", "lost"}. Messages lost after the newest one received are counted once
        a later one arrives."""
        rows = self._read(
            "SELECT SUM(tel_received) AS received, SUM(tel_lost_prior + GREATEST(0, tel_seq_max - tel_seq_min + 1 "
            "- tel_received)) AS lost FROM devices WHERE tel_boot IS NOT NULL"
        )
        return {"received": int(rows[0]["received"] or 0), "lost": int(rows[0]["lost"] or 0)}

    def record_history(self, points: Sequence[Tuple[str, int, float, Dict[str, Any]]]) -> int:
        """Keep telemetry history points (device, interval number, ts, summary); the first point of an
        interval stays, later ones for the same interval are ignored."""
        if not points:
            return 0
        rows = [(d, int(b), ts, summary if isinstance(summary, str) else dumps_json(summary))
                for d, b, ts, summary in points]

        def write(db: Tx) -> int:
            sql = "INSERT INTO telemetry_history (device_id, bucket, ts, summary) "
            if db.dialect.name == "postgresql":
                cols = [list(c) for c in zip(*rows)]
                db.execute(sql + "SELECT * FROM unnest(?::text[], ?::int8[], ?::float8[], ?::text[]) "
                           "ON CONFLICT DO NOTHING", cols)
            else:
                db.executemany(sql + "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
            return len(rows)

        return int(self._write(write))

    def prune_history(self, before_bucket: int) -> int:
        """Remove history points of intervals before `before_bucket`; returns how many."""
        return int(self._write(lambda db: db.execute(
            "DELETE FROM telemetry_history WHERE bucket < ?", (int(before_bucket),)).rowcount))

    def telemetry_history(self, device_id: str, *, since: float = 0.0, limit: int = 1000) -> List[Dict[str, Any]]:
        """A device's telemetry history points since `since` (unix time), oldest first."""
        rows = self._read(
            "SELECT ts, summary FROM telemetry_history WHERE device_id = ? AND ts >= ? ORDER BY bucket DESC LIMIT ?",
            (device_id, float(since), int(limit)),
        )
        return [{"ts": r["ts"], **(loads_json(r["summary"]) or {})} for r in reversed(rows)]

    def record_event(self, device_id: str, event: Dict[str, Any], *, now: float) -> None:
        """Remember a device's last event and that it was seen."""

        def write(db: Tx) -> None:
            db.execute(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_event) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET last_seen=GREATEST(devices.last_seen, excluded.last_seen), "
                "last_event=excluded.last_event",
                (device_id, now, now, dumps_json(event)),
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
        return int(self._read("SELECT COUNT(*) AS n FROM devices")[0]["n"])

    def forget_device(self, device_id: str) -> bool:
        """Remove a decommissioned device; True when it existed."""

        def write(db: Tx) -> bool:
            return db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0

        return bool(self._write(write))



#: A device run is told apart by its boot time (telemetry ts - uptime); runs closer than this are one.
BOOT_SLACK_S = 5.0
_NEW_RUN = "(devices.tel_boot IS NULL OR excluded.tel_boot > devices.tel_boot + %g)" % BOOT_SLACK_S
_STALE = "(excluded.tel_boot IS NULL OR excluded.tel_boot < devices.tel_boot - %g)" % BOOT_SLACK_S
_NEWER = "(devices.telemetry_ts IS NULL OR excluded.telemetry_ts >= devices.telemetry_ts)"
_TELEMETRY_UPSERT = (
    "ON CONFLICT(device_id) DO UPDATE SET last_seen=GREATEST(devices.last_seen, excluded.last_seen), "
    "telemetry_ts=CASE WHEN {new} THEN excluded.telemetry_ts ELSE devices.telemetry_ts END, "
    "telemetry=CASE WHEN {new} THEN excluded.telemetry ELSE devices.telemetry END, "
    "health=CASE WHEN {new} THEN excluded.health ELSE devices.health END, "
    "tel_lost_prior=CASE WHEN devices.tel_boot IS NOT NULL AND excluded.tel_boot > devices.tel_boot + {slack} "
    "THEN devices.tel_lost_prior + GREATEST(0, devices.tel_seq_max - devices.tel_seq_min + 1 - devices.tel_received) "
    "ELSE devices.tel_lost_prior END, "
    "tel_seq_min=CASE WHEN {stale} THEN devices.tel_seq_min WHEN {run} THEN excluded.tel_seq_min "
    "ELSE LEAST(devices.tel_seq_min, excluded.tel_seq_min) END, "
    "tel_seq_max=CASE WHEN {stale} THEN devices.tel_seq_max WHEN {run} THEN excluded.tel_seq_max "
    "ELSE GREATEST(devices.tel_seq_max, excluded.tel_seq_max) END, "
    "tel_received=CASE WHEN {stale} THEN devices.tel_received WHEN {run} THEN excluded.tel_received "
    "ELSE devices.tel_received + excluded.tel_received END, "
    "tel_boot=CASE WHEN {stale} THEN devices.tel_boot WHEN {run} THEN excluded.tel_boot ELSE devices.tel_boot END"
).format(new=_NEWER, stale=_STALE, run=_NEW_RUN, slack="%g" % BOOT_SLACK_S)


def _upsert_status(db: Tx, s: Dict[str, Any], now: float) -> None:
    active = s.get("active") or {}
    deploy = s.get("deploy")
    db.execute(
        "INSERT INTO devices (device_id, first_seen, last_seen, online, status_ts, agent_version, platform, "
        "active_name, active_version, previous, deploy_state, deploy, ready) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(device_id) DO UPDATE SET last_seen=GREATEST(devices.last_seen, excluded.last_seen), "
        "online=excluded.online, status_ts=excluded.status_ts, "
        "agent_version=COALESCE(excluded.agent_version, devices.agent_version), "
        "platform=COALESCE(excluded.platform, devices.platform), "
        # An offline status that names no bundle is the Last Will (the broker's, after a crash or kill -9):
        # the device still holds its bundle, so the registry keeps the last one it knew.
        "active_name=CASE WHEN excluded.online = 0 AND excluded.active_name IS NULL THEN devices.active_name "
        "ELSE excluded.active_name END, "
        "active_version=CASE WHEN excluded.online = 0 AND excluded.active_name IS NULL THEN devices.active_version "
        "ELSE excluded.active_version END, "
        "previous=CASE WHEN excluded.online = 0 AND excluded.active_name IS NULL THEN devices.previous "
        "ELSE excluded.previous END, "
        "deploy_state=COALESCE(excluded.deploy_state, devices.deploy_state), "
        "deploy=COALESCE(excluded.deploy, devices.deploy), "
        "ready=excluded.ready, health=CASE WHEN excluded.online = 0 THEN 'offline' "
        "WHEN devices.health = 'offline' THEN 'unknown' ELSE devices.health END",
        (
            s["device_id"],
            now,
            now,
            1 if s.get("online") else 0,
            s.get("ts"),
            s.get("agent_version"),
            dumps_json(s.get("platform")),
            active.get("name"),
            active.get("version"),
            dumps_json(s.get("previous")),
            (deploy or {}).get("state"),
            dumps_json(deploy),
            1 if s.get("ready") else 0,
        ),
    )


def _device_row(r: Any) -> Dict[str, Any]:
    d = {k: r[k] for k in _DEVICE_COLUMNS}
    for k in _JSON_COLUMNS:
        if k in d:
            d[k] = loads_json(d[k])
    d["online"] = bool(d["online"])
    d["ready"] = bool(d["ready"])
    name, version = d.pop("active_name"), d.pop("active_version")
    d["active"] = {"name": name, "version": version} if name is not None else None
    return d
