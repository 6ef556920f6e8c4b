"""`fleet devices`, `fleet rollback`, `fleet telemetry` against a real controller and mosquitto, and the
controller's ingest under malformed and spoofed device messages."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fleet_helpers import PREFIX, FleetRig, mqtt_cfg

from edge_agent.mqtt.session import MqttSession, require_connected
from edge_agent.protocol import topics
from edge_agent.protocol.messages import BundleRef

pytestmark = pytest.mark.mqtt


@pytest.fixture
def rig(broker, tmp_path):
    r = FleetRig(broker, tmp_path, devices=5).start()
    yield r
    r.stop()


def publisher(broker, name="pub"):
    s = MqttSession(mqtt_cfg(broker), client_id=name, name=name)
    s.start()
    require_connected(s, 5)
    return s


def test_devices_table_and_json(rig, capsys):
    rc, out, err = rig.cli(capsys, "devices")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["DEVICE", "ONLINE", "HEALTH", "BUNDLE"]
    assert sum(1 for ln in lines if ln.startswith("dev-")) == 5
    assert "digits v1" in out and "5 devices, 5 online, 0 unhealthy" in out
    rc, out, _ = rig.cli(capsys, "devices", "--json", "--device", "dev-01,dev-03")
    rows = json.loads(out)
    assert [r["device_id"] for r in rows] == ["dev-01", "dev-03"]
    assert rows[0]["platform"]["backend"] == "sim" and rows[0]["online"] is True


def test_offline_device_shows_offline(rig, capsys):
    d = rig.fleet.devices["dev-02"]
    d.online = False
    rig.fleet.publish_status(d)
    rig.wait(lambda: not rig.controller.registry.get_device("dev-02")["online"], 5, "offline recorded")
    _rc, out, _ = rig.cli(capsys, "devices", "--offline", "--json")
    rows = json.loads(out)
    assert [r["device_id"] for r in rows] == ["dev-02"] and rows[0]["health"] == "offline"


def test_rollback_sends_signed_commands_the_devices_accept(rig, capsys):
    # Give two devices something to roll back from.
    for dev in ("dev-00", "dev-01"):
        sd = rig.fleet.devices[dev]
        sd.previous = sd.active
        sd.active = BundleRef(name="digits", version=2)
    rc, out, err = rig.cli(capsys, "rollback", "--devices", "dev-00,dev-01", "--reason", "bad night")
    assert rc == 0, err
    assert "rollback sent to dev-00" in out and "rollback sent to dev-01" in out
    rig.wait(lambda: all(rig.fleet.devices[d].active.version == 1 for d in ("dev-00", "dev-01")), 5, "rolled back")
    assert rig.commands_of("dev-02") == []
    assert rig.fleet.devices["dev-00"].refused == [], "the device verified the controller's signature"
    rc, out, err = rig.cli(capsys, "rollback", "--devices", "ghost")
    assert rc == 1 and err.strip() == "fleet: error: unknown device(s): ghost"


def test_router_set_sends_a_signed_set_router_the_devices_accept(rig, capsys):
    rc, out, err = rig.cli(capsys, "router", "set", "--devices", "dev-00,dev-03", "--gate", "large-only")
    assert rc == 0, err
    assert "set-router sent to dev-00" in out and "set-router sent to dev-03" in out
    rig.wait(lambda: all("set-router" in rig.commands_of(d) for d in ("dev-00", "dev-03")), 5, "delivered")
    for d in ("dev-00", "dev-03"):
        (args,) = [a for a in rig.fleet.devices[d].command_args if a.kind == "set-router"]
        assert args.gate == "large-only" and args.tau is None
        assert rig.fleet.devices[d].refused == [], "the device verified the controller's signature"
    assert "set-router" not in rig.commands_of("dev-01")
    rc, out, err = rig.cli(capsys, "router", "set", "--devices", "dev-01", "--gate", "small-only", "--tau", "0.75",
                           "--json")
    assert rc == 0 and json.loads(out)["sent"] == ["dev-01"]
    rig.wait(lambda: "set-router" in rig.commands_of("dev-01"), 5, "delivered")
    args = rig.fleet.devices["dev-01"].command_args[-1]
    assert (args.gate, args.tau) == ("small-only", "0.75")
    rc, _, err = rig.cli(capsys, "router", "set", "--devices", "dev-01")
    assert rc != 0 and "give at least one of" in err
    rc, _, err = rig.cli(capsys, "router", "set", "--devices", "dev-01", "--tau", "abc")
    assert rc != 0 and "not a decimal" in err
    rc, _, err = rig.cli(capsys, "router", "set", "--devices", "ghost", "--gate", "large-only")
    assert rc == 1 and "unknown device(s): ghost" in err


def test_telemetry_snapshot_and_follow(rig, broker, capsys):
    pub = publisher(broker)
    stop = threading.Event()

    def send():
        seq = 0
        while not stop.is_set():
            seq += 1
            for d in rig.device_ids:
                pub.publish(
                    topics.telemetry(PREFIX, d),
                    rig.fleet.telemetry_payload(d, seq, error_rate=0.1 if d == "dev-04" else 0.0),
                )
            time.sleep(0.1)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        rc, out, err = rig.cli(capsys, "telemetry", "--follow", "--json", "--count", "10", "--duration", "10")
        assert rc == 0, err
        msgs = [json.loads(x) for x in out.splitlines()]
        assert len(msgs) == 10 and all(m["schema"] == "edge-agent/telemetry/1" for m in msgs)
        rc, out, _ = rig.cli(capsys, "telemetry", "--follow", "--device", "dev-03", "--json", "--count", "3")
        assert {json.loads(x)["device_id"] for x in out.splitlines()} == {"dev-03"}
        rc, out, _ = rig.cli(capsys, "telemetry", "--follow", "--duration", "1.0", "--interval", "0.3")
        assert "P99 MS" in out and "dev-00" in out and "7.90" in out
        # The controller's registry got the summaries too (flushed once per tick).
        rig.wait(
            lambda: (rig.controller.registry.get_device("dev-04") or {}).get("health") == "unhealthy",
            5,
            "unhealthy health from telemetry",
        )
    finally:
        stop.set()
        t.join()
        pub.stop()
    rc, out, _ = rig.cli(capsys, "telemetry")
    assert "dev-04" in out and "10.0%" in out
    rc, out, _ = rig.cli(capsys, "devices")
    assert "5 devices, 5 online, 1 unhealthy" in out
    # The downsampled history (one point per device per history interval) reads back.
    rc, out, err = rig.cli(capsys, "telemetry", "--device", "dev-04", "--history", "1", "--json")
    assert rc == 0, err
    points = [json.loads(x) for x in out.splitlines()]
    # Telemetry flowed for a few seconds: one point, or two when the run crossed an interval boundary
    # (intervals are aligned to the clock), never one per message.
    step = rig.controller.control.ingest.history_interval_s
    buckets = [int(p["ts"] // step) for p in points]
    assert 1 <= len(points) <= 2 and len(set(buckets)) == len(points), points
    assert all(p["health"] == "unhealthy" and p["error_rate"] == 0.1 for p in points), points
    rc, out, _ = rig.cli(capsys, "telemetry", "--device", "dev-04", "--history", "1")
    assert rc == 0 and "TIME" in out and "10.0%" in out
    rc, _out, err = rig.cli(capsys, "telemetry", "--history", "1")
    assert rc != 0 and "--device" in err


def test_malformed_and_spoofed_device_messages_are_counted_not_fatal(rig, broker, capsys):
    pub = publisher(broker, "rogue")
    good = rig.fleet.telemetry_payload("dev-00", 1)
    pub.publish(topics.telemetry(PREFIX, "dev-00"), b"{not json", qos=1).wait(5)
    pub.publish(topics.events(PREFIX, "dev-00"), b'{"schema": "edge-agent/event/1"}', qos=1).wait(5)
    pub.publish(topics.status(PREFIX, "dev-00"), b"[1, 2]", qos=1).wait(5)
    ingest = rig.controller.control.ingest
    rig.wait(lambda: sum(ingest.malformed.values()) == 3, 5, "malformed counted")
    # dev-01 pretending to be dev-00 (payload and topic disagree).
    pub.publish(topics.telemetry(PREFIX, "dev-01"), good, qos=1).wait(5)
    pub.stop()
    rig.wait(lambda: sum(ingest.malformed.values()) == 4, 5, "spoof counted")
    assert ingest.malformed["telemetry"] == 2 and ingest.malformed["events"] == 1 and ingest.malformed["status"] == 1
    assert "names device 'dev-00' but came on the topic of 'dev-01'" in ingest.stats()["last_error"]
    # The controller still answers and its registry is intact.
    rc, out, err = rig.cli(capsys, "devices", "--json")
    assert rc == 0, err
    rows = {r["device_id"]: r for r in json.loads(out)}
    assert rows["dev-00"]["online"] is True and rows["dev-01"]["telemetry"] is None


def test_no_controller_is_a_one_line_error(broker, capsys):
    from fleet.cli import main

    rc = main(["devices", "--broker", "%s:%d" % (broker.host, broker.port), "--timeout", "1"])
    _, err = capsys.readouterr()
    assert rc == 1
    assert err.startswith("fleet: error: no controller answered devices.list") and err.count("\n") == 1


def test_bad_broker_option_is_a_usage_error(capsys):
    from fleet.cli import main

    rc = main(["devices", "--broker", "host:notaport"])
    _, err = capsys.readouterr()
    assert rc == 1 and "port 'notaport' is not a number" in err


def test_controller_started_after_the_devices_learns_them_from_retained_status(broker, tmp_path, capsys):
    rig = FleetRig(broker, tmp_path, devices=3)
    rig.fleet.start()
    try:
        rig.start_controller()
        rig.wait(lambda: rig.controller.registry.device_count() == 3, 5, "retained statuses ingested")
        rc, out, _ = rig.cli(capsys, "devices", "--json")
        assert rc == 0 and {r["device_id"] for r in json.loads(out)} == set(rig.device_ids)
    finally:
        rig.stop()


def test_status_is_subscribed_unshared_so_retained_statuses_reach_every_controller():
    from fleet.ingest import Ingest

    subs = Ingest(registry=None, prefix="edge/v1").subscriptions("fleet")
    assert subs == (
        "edge/v1/devices/+/status",
        "$share/fleet/edge/v1/devices/+/telemetry",
        "$share/fleet/edge/v1/devices/+/events",
    )
