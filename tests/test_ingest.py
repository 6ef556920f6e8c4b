"""Controller ingest without a broker: parsing, refusals, the bounded hand-over, batched telemetry writes."""

from __future__ import annotations

import json

from edge_agent.protocol.messages import BundleRef, DeployState, Event, Status, Telemetry
from fleet.ingest import HealthPolicy, Ingest
from fleet.registry import Registry

P = "edge/v1"


def telemetry(dev, seq=1, errors=0, requests=100):
    return Telemetry(
        device_id=dev,
        ts=10.0 + seq,
        seq=seq,
        period_s=1.0,
        uptime_s=5.0,
        requests=requests,
        errors=errors,
        latency_ms={"p99": 9.5},
        temperatures_c={"gpu": 51.0},
        bundle=BundleRef(name="digits", version=2),
    ).to_json()


def status(dev, online=True):
    return Status(
        device_id=dev,
        online=online,
        ts=1.0,
        active=BundleRef(name="digits", version=2),
        deploy=DeployState(state="active", bundle=BundleRef(name="digits", version=2)),
    ).to_json()


def test_status_event_and_telemetry_reach_registry_and_listeners(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    seen = []
    ing = Ingest(
        reg,
        prefix=P,
        on_status=lambda s: seen.append(("status", s.device_id)),
        on_event=lambda e: seen.append(("event", e.kind)),
        health=HealthPolicy(max_error_rate=0.05),
    )
    ing.handle(P + "/devices/a/status", status("a"))
    ev = Event(device_id="a", ts=2.0, seq=1, kind="activated", message="ok").to_json()
    ing.handle(P + "/devices/a/events", ev)
    ing.handle(P + "/devices/a/telemetry", telemetry("a", errors=10))
    ing.handle(P + "/devices/b/telemetry", telemetry("b"))
    assert seen == [("status", "a"), ("event", "activated")]
    assert reg.get_device("b") is None, "telemetry waits for the batched flush"
    assert ing.flush() == 2
    a, b = reg.get_device("a"), reg.get_device("b")
    assert a["health"] == "unhealthy" and a["telemetry"]["p99_ms"] == 9.5 and a["telemetry"]["temp_max_c"] == 51.0
    assert b["health"] == "ok" and a["last_event"]["kind"] == "activated"


def test_malformed_spoofed_and_oversize_payloads_are_counted_and_change_nothing(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    ing = Ingest(reg, prefix=P, max_payload_bytes=2000)
    ing.handle(P + "/devices/a/telemetry", b"\xff\xfe")
    ing.handle(P + "/devices/a/status", b'{"schema": "edge-agent/status/9"}')
    ing.handle(P + "/devices/b/status", status("a"))  # a's status on b's topic
    ing.handle(P + "/devices/a/events", b"x" * 5000)
    ing.handle("elsewhere/devices/a/status", status("a"))
    assert ing.malformed == {"status": 2, "telemetry": 1, "events": 1, "topic": 1}
    assert ing.flush() == 0 and reg.device_count() == 0


def test_full_telemetry_queue_drops_and_counts_but_keeps_status(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    ing = Ingest(reg, prefix=P, max_backlog=100)
    for i in range(150):
        ing.submit(P + "/devices/d%03d/telemetry" % i, telemetry("d%03d" % i))
    for i in range(20):
        ing.submit(P + "/devices/s%03d/status" % i, status("s%03d" % i))
    assert ing.dropped["telemetry"] == 50 and ing.dropped["status"] == 0
    ing.start()
    try:
        assert ing.drain(10)
    finally:
        ing.stop()
    assert ing.received["telemetry"] == 100 and ing.received["status"] == 20
    ing.flush()
    assert reg.device_count() == 120
    assert json.loads(json.dumps(ing.stats()))["dropped"]["telemetry"] == 50
