"""Controller ingest without a broker: parsing, refusals, the bounded hand-over, batched telemetry writes."""

from __future__ import annotations

import json

from edge_agent.protocol.messages import BundleRef, DeployState, Event, Status, Telemetry
from fleet.ingest import Ingest
from fleet.registry import Registry
from fleet.telemetry_view import HealthPolicy

P = "edge/v1"


def telemetry(dev, seq=1, errors=0, requests=100):
    return Telemetry(
        device_id=dev,
        ts=10.0 + seq,
        seq=seq,
        period_s=1.0,
        uptime_s=5.0 + seq,  # one run of the agent: ts - uptime stays the same
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


def test_telemetry_refusals_of_the_one_pass_validator_are_counted(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    ing = Ingest(reg, prefix=P, max_telemetry_bytes=4096)
    good = telemetry("a")
    ing.handle(P + "/devices/a/telemetry", good.replace(b'"period_s":1.0', b'"period_s":NaN'))
    ing.handle(P + "/devices/a/telemetry", good.replace(b'"period_s":1.0', b'"period_s":Infinity'))
    ing.handle(P + "/devices/a/telemetry", good[:-1] + b',"engine":' + b"[" * 1000 + b"]" * 1000 + b"}")
    ing.handle(P + "/devices/a/telemetry", good.replace(b'"seq":1', b'"seq":' + b"9" * 3000))
    ing.handle(P + "/devices/a/telemetry", good[:-1] + b',"source":"' + b"x" * 5000 + b'"}')  # over 4096
    ing.handle(P + "/devices/a/telemetry", good.replace(b'"seq":1', b'"seq":-1'))
    ing.handle(P + "/devices/a/telemetry", b"[1, 2]")
    assert ing.malformed["telemetry"] == 7 and ing.listener_errors == 0
    assert ing.flush() == 0
    ing.handle(P + "/devices/a/telemetry", good)
    assert ing.flush() == 1 and reg.get_device("a")["telemetry"]["seq"] == 1


def test_worker_batches_keep_the_newest_telemetry_per_device(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    ing = Ingest(reg, prefix=P, max_backlog=10000)
    for seq in range(1, 6):
        for i in range(300):
            ing.submit(P + "/devices/d%03d/telemetry" % i, telemetry("d%03d" % i, seq=seq))
    ing.start()
    try:
        assert ing.drain(10)
    finally:
        ing.stop()
    assert ing.received["telemetry"] == 1500 and ing.flush() == 300
    assert {d["telemetry"]["seq"] for d in reg.list_devices()} == {5}


def test_history_keeps_one_point_per_device_per_interval_and_prunes_by_retention(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    now = {"t": 1000.0}
    ing = Ingest(reg, prefix=P, history_interval_s=10.0, history_retention_s=25.0, clock=lambda: now["t"])
    for seq in range(0, 40, 2):  # telemetry ts = 10 + seq: intervals 1..4, two flushes per interval
        now["t"] = 10.0 + seq
        ing.handle(P + "/devices/a/telemetry", telemetry("a", seq=seq))
        ing.flush()
    points = reg.telemetry_history("a")
    assert [p["ts"] for p in points] == [10.0, 20.0, 30.0, 40.0]  # the first point of each interval
    assert points[0]["health"] == "ok" and points[0]["p99_ms"] == 9.5
    now["t"] = 1000.0
    ing._next_prune = 0.0
    ing.handle(P + "/devices/a/telemetry", telemetry("a", seq=1000 - 10))
    ing.flush()
    # Retention 25 s at t=1000: only the interval of the new point is left.
    assert [p["ts"] for p in reg.telemetry_history("a")] == [1000.0]


def test_telemetry_that_reached_no_controller_is_counted_from_sequence_gaps(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    ing = Ingest(reg, prefix=P)
    for seq in (1, 2, 4, 5, 9):  # 3, 6, 7 and 8 never arrived
        ing.handle(P + "/devices/a/telemetry", telemetry("a", seq=seq))
    ing.flush()
    assert reg.telemetry_loss() == {"received": 5, "lost": 4}
    ing.handle(P + "/devices/a/telemetry", telemetry("a", seq=10))
    ing.flush()
    assert reg.telemetry_loss() == {"received": 6, "lost": 4}


def test_telemetry_shed_here_is_not_counted_as_lost_upstream(tmp_path):
    """Rate-limited or backlog-dropped telemetry reached this controller: it is counted as shed
    (`rate_limited`, `dropped`), and the registry's upstream loss counts only what reached no controller."""
    from fleet.ratelimit import KeyedRate

    reg = Registry(tmp_path / "r.sqlite")
    now = {"t": 0.0}
    ing = Ingest(reg, prefix=P, max_backlog=3)
    ing._rate = KeyedRate(1.0, 5, clock=lambda: now["t"])
    topic = P + "/devices/a/telemetry"
    for seq in range(1, 11):  # 6..10 over the device's rate; of 1..5, 4 and 5 over the backlog of 3
        ing.submit(topic, telemetry("a", seq=seq))
    assert ing.rate_limited == 5 and ing.dropped["telemetry"] == 2
    ing.start()
    try:
        assert ing.drain(10)
        now["t"] = 100.0
        for seq in (11, 13):  # 12 never arrived
            ing.submit(topic, telemetry("a", seq=seq))
        assert ing.drain(10)
    finally:
        ing.stop()
    ing.flush()
    assert ing.received["telemetry"] == 5
    assert reg.telemetry_loss()["lost"] == 1  # only seq 12: the 7 shed here are counted as shed instead
    assert reg.get_device("a")["telemetry"]["seq"] == 13


def test_a_batch_from_the_report_connection_is_checked_exactly_as_one_message_at_a_time(tmp_path):
    """`submit_batch` (one network read) and `submit` (one message) shed and queue the same messages."""
    from fleet.ratelimit import KeyedRate

    msgs = []
    for i in range(60):
        dev = "d%d" % (i % 3)
        body = b"x" * 5000 if i % 11 == 0 else telemetry(dev, seq=i)
        msgs.append((P + "/devices/%s/%s" % (dev, "events" if i % 7 == 0 else "telemetry"), body))
    results = []
    for batched in (False, True):
        ing = Ingest(Registry(tmp_path / ("r%d.sqlite" % batched)), prefix=P, max_payload_bytes=4096, max_backlog=100)
        ing._rate = KeyedRate(1.0, 12, clock=lambda: 5.0)
        if batched:
            ing.submit_batch(msgs)
        else:
            for t, p in msgs:
                ing.submit(t, p)
        results.append((ing.oversize, ing.rate_limited, dict(ing.dropped), list(ing._q_telemetry),
                        list(ing._q_control), dict(ing._shed_dev)))
    assert results[0] == results[1]
    assert results[0][0] == 6 and results[0][1] > 0 and results[0][3]
