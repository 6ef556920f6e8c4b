"""The registry on both engines (SQLite file and a real PostgreSQL): schema migrations, devices,
telemetry summaries, rollouts, concurrent readers. Engine-specific checks are marked by their names."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from fleet.registry import Registry, RegistryError
from fleet.registry_schema import SCHEMA_VERSION


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a registry lives: a SQLite file, or a fresh database in the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("pg_url")


def status(device_id="dev-1", online=True, active=None, state="idle", seq=0, **kw):
    d = {
        "schema": "edge-agent/status/1",
        "device_id": device_id,
        "online": online,
        "ts": 100.0,
        "agent_version": "0.1.0",
        "platform": {"machine": "aarch64", "python": "3.8.10", "jetpack": "5.1.2"},
        "active": active,
        "previous": None,
        "deploy": {"state": state, "bundle": active, "since": 1.0},
        "ready": True,
        "last_command_seq": seq,
    }
    d.update(kw)
    return d


def test_sqlite_new_file_is_migrated_to_the_current_schema_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "fleet.db"
    with Registry(path) as reg:
        assert reg.schema_version() == SCHEMA_VERSION
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == list(range(1, SCHEMA_VERSION + 1))
    db.close()
    # Re-opening applies nothing twice.
    with Registry(path) as reg:
        assert reg.schema_version() == SCHEMA_VERSION


def test_sqlite_file_from_a_newer_controller_is_refused_untouched(tmp_path):
    path = tmp_path / "fleet.db"
    Registry(path).close()
    db = sqlite3.connect(str(path))
    db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="upgrade the controller"):
        Registry(path)
    db = sqlite3.connect(str(path))
    assert db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


def test_sqlite_garbage_file_is_a_clear_registry_error(tmp_path):
    path = tmp_path / "fleet.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="cannot open registry"):
        Registry(path)
    assert path.read_bytes().startswith(b"this is not a database")


def test_status_creates_and_updates_a_device(target):
    reg = Registry(target)
    reg.record_status(status(), now=10.0)
    d = reg.get_device("dev-1")
    assert d["online"] is True and d["first_seen"] == 10.0 and d["platform"]["jetpack"] == "5.1.2"
    assert d["active"] is None and d["deploy_state"] == "idle"
    v2 = {"name": "digits", "version": 2}
    reg.record_status(status(active=v2, state="active"), now=20.0)
    d = reg.get_device("dev-1")
    assert d["active"] == v2 and d["deploy_state"] == "active" and d["last_seen"] == 20.0 and d["first_seen"] == 10.0
    # The Last Will (offline) keeps what we knew and marks health offline.
    reg.record_status(status(online=False, active=v2, state="active", platform=None, agent_version=None), now=30.0)
    d = reg.get_device("dev-1")
    assert d["online"] is False and d["health"] == "offline" and d["platform"]["machine"] == "aarch64"
    assert [x["device_id"] for x in reg.list_devices(online=False)] == ["dev-1"]
    assert reg.list_devices(online=True) == []


def test_the_last_will_after_a_crash_keeps_the_last_known_bundle(target):
    """The agent's Last Will is the status it builds at start: offline, no bundle (tests the real payload).
    After kill -9 the broker publishes it; `fleet devices` must still show what the device holds."""
    import json
    import time

    from edge_agent.protocol.messages import Status

    reg = Registry(target)
    v3, v2 = {"name": "digits", "version": 3}, {"name": "digits", "version": 2}
    reg.record_status(status(active=v3, state="active", previous=v2), now=10.0)
    will = json.loads(Status(device_id="dev-1", online=False, ts=time.time(), agent_version="0.1.0").to_json())
    assert will["active"] is None
    reg.record_status(will, now=20.0)
    d = reg.get_device("dev-1")
    assert d["online"] is False and d["health"] == "offline"
    assert d["active"] == v3 and d["previous"] == v2 and d["deploy_state"] == "active"
    # Back online with an explicit state: that state wins, even "no bundle" (an online status is the truth).
    reg.record_status(status(active=None, state="idle"), now=30.0)
    assert reg.get_device("dev-1")["active"] is None


def test_telemetry_batch_updates_summaries_in_one_write(target):
    reg = Registry(target)
    items = [("dev-%03d" % i, 5.0, {"qps": float(i)}, "ok") for i in range(500)]
    assert reg.record_telemetry(items, now=6.0) == 500
    assert reg.device_count() == 500
    d = reg.get_device("dev-007")
    assert d["telemetry"] == {"qps": 7.0} and d["health"] == "ok" and d["telemetry_ts"] == 5.0
    assert reg.record_telemetry([], now=7.0) == 0


def test_rollout_save_load_and_history(target):
    reg = Registry(target)
    body = {
        "rollout_id": "r1",
        "bundle": {"name": "digits", "version": 2},
        "manifest_sha256": "a" * 64,
        "manifest_size": 10,
        "waves": [["a"], ["b"]],
        "params": {},
        "mode": "normal",
        "ab_split": None,
        "state": "running",
        "current_wave": 0,
        "created": 1.0,
        "updated": 1.0,
        "reason": "",
        "devices": [
            {
                "device_id": "a",
                "wave": 0,
                "state": "sent",
                "prior": None,
                "sent_at": 1.0,
                "updated": 1.0,
                "detail": "",
                "rollback_attempts": 0,
            },
            {
                "device_id": "b",
                "wave": 1,
                "state": "pending",
                "prior": {"name": "digits", "version": 1},
                "sent_at": None,
                "updated": 1.0,
                "detail": "",
                "rollback_attempts": 0,
            },
        ],
    }
    reg.save_rollout(body, [(1.0, "started", None, "go"), (1.0, "sent", "a", "deploy")])
    body["state"] = "halted"
    body["devices"][0]["state"] = "failed"
    reg.save_rollout(body, [(2.0, "halted", None, "boom")])
    loaded = reg.load_rollout("r1")
    assert loaded == body
    assert [h["kind"] for h in reg.rollout_history("r1")] == ["started", "sent", "halted"]
    assert reg.list_rollouts(states=["running"]) == []
    assert reg.list_rollouts()[0]["state"] == "halted"
    assert reg.device_rollouts("a")[0]["state"] == "failed"
    assert reg.load_rollout("nope") is None


def test_readers_in_another_connection_are_not_blocked_by_a_writer(target):
    """WAL (SQLite) / MVCC (PostgreSQL): a second connection reads while the controller writes."""
    path = target
    reg = Registry(path)
    reg.record_telemetry([("d%d" % i, 1.0, {"n": 0}, "ok") for i in range(100)], now=1.0)
    errors = []
    stop = threading.Event()

    def reader():
        other = Registry(path)
        try:
            while not stop.is_set():
                n = len(other.list_devices())
                if n != 100:
                    errors.append(n)
        except Exception as e:  # pragma: no cover - the failure we look for
            errors.append(e)
        finally:
            other.close()

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for k in range(50):
        reg.record_telemetry([("d%d" % i, 1.0, {"n": k}, "ok") for i in range(100)], now=2.0 + k)
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert reg.get_device("d5")["telemetry"] == {"n": 49}


def test_postgresql_database_is_migrated_once_and_a_newer_one_refused(pg_url):
    import psycopg

    with Registry(pg_url) as reg:
        assert reg.schema_version() == SCHEMA_VERSION and reg.shared and reg.engine == "postgresql"
    with Registry(pg_url) as reg:  # re-opening applies nothing twice
        assert reg.schema_version() == SCHEMA_VERSION
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        # Floats are 8-byte there (PostgreSQL's REAL would round timestamps to ~2 minutes).
        kind = conn.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name='devices' AND column_name='last_seen'"
        ).fetchone()[0]
        assert kind == "double precision"
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(RegistryError, match="upgrade the controller"):
        Registry(pg_url)


def test_controllers_opening_one_postgresql_database_together_migrate_it_once(pg_url):
    regs, errors = [], []

    def open_one():
        try:
            regs.append(Registry(pg_url))
        except Exception as e:  # pragma: no cover - the failure we look for
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(regs) == 4
    assert all(r.schema_version() == SCHEMA_VERSION for r in regs)
    for r in regs:
        r.close()


def test_unreachable_postgresql_is_a_clear_registry_error():
    from mqtt_broker import free_port

    with pytest.raises(RegistryError, match="cannot open registry postgresql://fleet:\\*\\*\\*@"):
        Registry("postgresql://fleet:secret@127.0.0.1:%d/fleet" % free_port(), busy_timeout_s=1)


def test_telemetry_accounting_sums_controllers_and_counts_gaps_per_device_run(target):
    reg = Registry(target)
    # Two controllers each received part of dev-1's run booted at t=1000: seqs 1,3,5 and 2,6 (4 is lost).
    reg.record_telemetry([("dev-1", 1005.0, {"seq": 5}, "ok", (1000.0, 1, 5, 3))], now=1.0)
    reg.record_telemetry([("dev-1", 1006.0, {"seq": 6}, "ok", (1000.4, 2, 6, 2))], now=2.0)
    assert reg.telemetry_loss() == {"received": 5, "lost": 1}
    # A controller flushing late an older summary does not replace the newer one.
    reg.record_telemetry([("dev-1", 1004.0, {"seq": 4}, "ok", None)], now=3.0)
    assert reg.get_device("dev-1")["telemetry"] == {"seq": 6}
    # The agent restarted (boot 2000): seq starts again; the first run's loss is kept.
    reg.record_telemetry([("dev-1", 2003.0, {"seq": 3}, "ok", (2000.0, 0, 3, 4))], now=4.0)
    assert reg.telemetry_loss() == {"received": 4, "lost": 1}
    # A late flush from the old run is ignored for the accounting.
    reg.record_telemetry([("dev-1", 1007.0, {"seq": 7}, "ok", (1000.0, 7, 7, 1))], now=5.0)
    assert reg.telemetry_loss() == {"received": 4, "lost": 1}
    reg.record_telemetry([("dev-2", 10.0, {}, "ok", (0.0, 0, 9, 7))], now=6.0)
    assert reg.telemetry_loss() == {"received": 11, "lost": 4}
    reg.close()
