"""Telemetry from a real `edge-agent run` process through a broker outage: spooled, then delivered in
order after it, with the drop counter equal to what never arrived."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from agent_helpers import FleetRig
from paho.mqtt.enums import CallbackAPIVersion

pytestmark = pytest.mark.mqtt


class TelemetryWatcher:
    """Collects one device's telemetry; re-subscribes whenever the broker comes back."""

    def __init__(self, host: str, port: int, device_id: str) -> None:
        self.got = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        topic = "edge/v1/devices/%s/telemetry" % device_id
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tele-watch-%d" % os.getpid(),
                             protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_disconnect = lambda *a: self.subscribed.clear()
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        self.c.connect_async(host, port, keepalive=5)
        self.c.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.got.append(json.loads(msg.payload))

    def snapshot(self):
        with self.lock:
            return list(self.got)

    def wait_for(self, pred, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.snapshot()
            if pred(got):
                return got
            time.sleep(0.05)
        raise AssertionError("timed out waiting for %s; seqs %s" % (what, [m["seq"] for m in self.snapshot()]))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_agent_telemetry_spooled_in_a_broker_outage_arrives_in_order_with_honest_drops(broker, tmp_path):
    rig = FleetRig(broker, tmp_path)
    watch = TelemetryWatcher(broker.host, broker.port, "dev-t")
    try:
        assert watch.subscribed.wait(10)
        cfg = rig.agent_config("dev-t")
        text = cfg.read_text()
        assert "period_s = 1.0\n" in text
        cfg.write_text(text.replace("period_s = 1.0\n", "period_s = 0.2\nqos = 1\nspool_max_messages = 5\n"))
        agent = rig.start_agent("dev-t")
        watch.wait_for(lambda g: len(g) >= 3, 30, "telemetry before the outage")

        broker.kill()  # a crash: no goodbye to the clients
        time.sleep(2.5)  # ~12 periods: the spool keeps the newest 5
        os.kill(agent.pid, signal.SIGSTOP)  # hold the agent until the watcher is subscribed again
        try:
            broker.start()
            assert watch.subscribed.wait(10)
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        before = max(m["seq"] for m in watch.snapshot())
        # the 5 spooled messages, then 3 built after the reconnect (a message counts the drops made
        # before it was built, so only those carry the outage's final count)
        got = watch.wait_for(lambda g: len({m["seq"] for m in g if m["seq"] > before}) >= 8, 30,
                             "telemetry after the outage")
    finally:
        watch.close()
        rig.close()
    firsts, seen = [], set()
    for m in got:
        if m["seq"] not in seen:  # QoS 1 may redeliver; a duplicate is not a reordering
            seen.add(m["seq"])
            firsts.append(m["seq"])
    assert firsts == sorted(firsts), firsts
    last = max(got, key=lambda m: m["seq"])
    missing = (last["seq"] + 1) - len(seen)
    assert missing > 0, "the outage was long enough to overflow a 5-message spool"
    assert last["spool_dropped"] == missing, [(m["seq"], m["spool_dropped"]) for m in got]
