"""A failing MQTT handler and a failing work item are counted where an operator sees them: a real agent
against a real broker reports `handler_errors` and `worker_errors` in its telemetry and as
`edge_agent_handler_errors_total` / `edge_agent_worker_errors_total` in /metrics, and keeps running."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from agent_helpers import inprocess_agent
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import Agent

pytestmark = pytest.mark.mqtt


def _agent(tmp_path, broker) -> Agent:
    return inprocess_agent(tmp_path, "err1", broker=broker, telemetry={"period_s": 0.2, "use_jtop": False})


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


def test_handler_and_worker_failures_reach_telemetry_and_metrics(tmp_path, broker):
    agent = _agent(tmp_path, broker)
    calls = []

    def broken_handler(msg):
        calls.append(msg.topic)
        raise KeyError("a bug in a handler")

    agent.session.subscribe("test/broken", broken_handler, qos=1)
    got, lock = [], threading.Lock()
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="err-watch", protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    watcher.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edge/v1/devices/err1/telemetry", qos=1)
    watcher.on_subscribe = lambda *a: subscribed.set()

    def on_message(c, u, msg):
        with lock:
            got.append(json.loads(msg.payload))

    watcher.on_message = on_message
    watcher.connect(broker.host, broker.port)
    watcher.loop_start()
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        assert subscribed.wait(10)
        _wait(agent.session.connected.is_set, 30, "the agent's broker connection")
        first = _wait(lambda: list(got), 30, "telemetry")[0]
        assert (first["handler_errors"], first["worker_errors"]) == (0, 0)
        for n in (1, 2):  # the agent subscribes on connect: a message sent before that reaches no one
            deadline = time.monotonic() + 30
            while len(calls) < n and time.monotonic() < deadline:
                watcher.publish("test/broken", b"x", qos=1)
                retry_at = time.monotonic() + 1.5
                while len(calls) < n and time.monotonic() < retry_at:
                    time.sleep(0.02)
            assert len(calls) >= n, "the broken handler never ran"
        agent._work.put(("call", lambda: 1 // 0))

        def counted():
            with lock:
                return [m for m in got if m["handler_errors"] == len(calls) and m["worker_errors"] == 1]

        _wait(counted, 30, "telemetry counting every failed handler call and the failed work item")
        assert runner.is_alive() and not agent.worker_failed
        text = agent.metrics_text()
        lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
        assert 'edge_agent_worker_errors_total{device_id="err1"} 1' in lines
        handler = [ln for ln in lines if ln.startswith("edge_agent_handler_errors_total{")]
        assert len(handler) == 1 and int(handler[0].rsplit(" ", 1)[1]) >= 2
    finally:
        agent.stop_event.set()
        runner.join(30)
        watcher.loop_stop()
        watcher.disconnect()
