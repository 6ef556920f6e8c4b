"""Ingest into a real PostgreSQL that crashes (immediate stop) and comes back mid-ingest.

The stated policy (docs/operations.md): status and events are retried on a fresh connection for
`[registry] reconnect_s` while the ingest worker holds them (telemetry queues behind them up to the
bounded backlog, shed and counted beyond it); the newest telemetry summary of each device stays in
memory until a flush succeeds. Within `reconnect_s`, nothing is lost: every status, every event and
every device's newest telemetry reach the registry once the server is back."""

from __future__ import annotations

import time

from test_ingest import P, status, telemetry

from edge_agent.protocol.messages import Event
from fleet.ingest import Ingest
from fleet.registry import Registry


def wait(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


def test_postgresql_restarted_mid_ingest_loses_nothing_within_the_reconnect_window(pg_server):
    reg = Registry(pg_server.create_db(), reconnect_s=60)
    ing = Ingest(reg, prefix=P, max_backlog=100000)
    ing.start()
    devices = ["d%03d" % i for i in range(60)]
    try:
        for d in devices:
            ing.submit(P + "/devices/%s/status" % d, status(d))
            ing.submit(P + "/devices/%s/telemetry" % d, telemetry(d, seq=1))
        assert ing.drain(20) and ing.flush() == 60
        pg_server.stop("immediate")  # a crash: no shutdown checkpoint
        try:
            for i, d in enumerate(devices):
                ing.submit(P + "/devices/%s/telemetry" % d, telemetry(d, seq=2))
                if i < 20:
                    ing.submit(P + "/devices/%s/status" % d, status(d, online=False))
                elif i < 40:
                    ev = Event(device_id=d, ts=3.0, seq=1, kind="activated", message="during the outage")
                    ing.submit(P + "/devices/%s/events" % d, ev.to_json())
            # The worker is stuck on the first status write, retrying.
            wait(lambda: reg._db.reconnects > 0, 20, "the registry retrying")
        finally:
            pg_server.start()
        assert ing.drain(60)
        assert ing.flush() == 60
    finally:
        ing.stop()
    rows = {r["device_id"]: r for r in reg.list_devices()}
    assert len(rows) == 60
    assert all(rows[d]["telemetry"]["seq"] == 2 for d in devices)
    assert [d for d in devices if not rows[d]["online"]] == devices[:20]
    assert all((rows[d]["last_event"] or {}).get("message") == "during the outage" for d in devices[20:40])
    assert ing.listener_errors == 0 and sum(ing.dropped.values()) == 0 and sum(ing.malformed.values()) == 0
    reg.close()
