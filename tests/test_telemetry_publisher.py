"""The telemetry publisher: spools while the broker is away, flushes in order after, counts drops honestly.

Unit tests drive it with a recording `publish` callable (the agent-facing interface); the `mqtt` tests
use a real mosquitto that is stopped and restarted.
"""

from __future__ import annotations

import json
import threading
import time
from typing import List, Tuple

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import TelemetryConfig
from edge_agent.protocol import topics
from edge_agent.protocol.messages import Event, Telemetry
from edge_agent.telemetry.builder import TelemetryBuilder
from edge_agent.telemetry.publisher import TelemetryPublisher, create_publisher
from edge_agent.telemetry.spool import Spool
from edge_agent.telemetry.system_parsers import empty_system

TOPIC = topics.telemetry("edge/v1", "dev-1")
EVENTS = topics.events("edge/v1", "dev-1")


class Link:
    """A publish callable that can be 'down'; records what got through."""

    def __init__(self) -> None:
        self.up = True
        self.sent: List[Tuple[str, bytes, int]] = []
        self.fail_after = None  # deliver this many more, then go down
        self.raise_error = False

    def __call__(self, topic: str, payload: bytes, qos: int) -> bool:
        if self.raise_error:
            raise OSError("socket closed")
        if self.fail_after is not None:
            if self.fail_after == 0:
                self.up = False
                self.fail_after = None
            else:
                self.fail_after -= 1
        if not self.up:
            return False
        self.sent.append((topic, payload, qos))
        return True

    def seqs(self, topic=TOPIC) -> List[int]:
        return [json.loads(p)["seq"] for t, p, _ in self.sent if t == topic]


def _publisher(tmp_path, link, *, max_messages=100, **kw):
    spool = Spool(tmp_path / "spool", max_messages)
    holder = []
    builder = TelemetryBuilder("dev-1", system=empty_system,
                               spool_dropped=lambda: holder[0].dropped() if holder else 0)
    pub = TelemetryPublisher(builder=builder, get_stats=lambda: {"requests": 1, "errors": 0, "refused": 0},
                             publish=link, spool=spool, telemetry_topic=TOPIC, period_s=kw.pop("period_s", 60.0),
                             **kw)
    holder.append(pub)
    return pub


def test_online_messages_go_straight_out_in_order(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link)
    for _ in range(3):
        pub.tick()
    assert link.seqs() == [0, 1, 2]
    assert len(pub.spool) == 0 and pub.counters.get("published") == 3
    assert all(q == 0 for _, _, q in link.sent)


def test_offline_messages_are_spooled_then_flushed_in_order_before_new_ones(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link)
    pub.tick()
    link.up = False
    for _ in range(4):
        pub.tick()
    assert len(pub.spool) == 4 and link.seqs() == [0]
    link.up = True
    pub.notify_connected()
    pub.tick()
    assert link.seqs() == [0, 1, 2, 3, 4, 5]
    assert len(pub.spool) == 0 and pub.counters.get("flushed") == 4
    assert pub.dropped() == 0


def test_full_spool_drops_oldest_and_later_telemetry_reports_the_count(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link, max_messages=3)
    pub.tick()  # seq 0 delivered
    link.up = False
    for _ in range(8):  # seqs 1..8; only 6, 7, 8 fit
        pub.tick()
    assert pub.dropped() == 5
    link.up = True
    pub.notify_connected()
    t = pub.tick()  # seq 9
    assert link.seqs() == [0, 6, 7, 8, 9]
    assert t.spool_dropped == 5
    got = [json.loads(p) for _, p, _ in link.sent]
    assert got[-1]["spool_dropped"] == 5
    # honest: the counter equals exactly the number of missing sequence numbers
    assert got[-1]["spool_dropped"] == (got[-1]["seq"] + 1) - len(got)


def test_events_share_the_ordered_path_with_telemetry(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link)
    link.up = False
    pub.tick()
    ev = Event(device_id="dev-1", ts=1.0, seq=0, kind="activated", message="digits v2 active")
    pub.submit_message(EVENTS, ev, qos=1)
    pub.pump()
    pub.tick()
    link.up = True
    pub.notify_connected()
    pub.pump()
    assert [(t, q) for t, _, q in link.sent] == [(TOPIC, 0), (EVENTS, 1), (TOPIC, 0)]
    assert json.loads(link.sent[1][1])["kind"] == "activated"


def test_broker_lost_in_the_middle_of_a_flush_keeps_the_rest_in_order(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link, flush_batch=3)
    link.up = False
    for _ in range(10):
        pub.tick()
    link.up = True
    link.fail_after = 4  # four get through, then the link drops again
    pub.notify_connected()
    pub.pump()
    assert link.seqs() == [0, 1, 2, 3]
    assert [m.seq for m in pub.spool] == list(range(4, 10))
    link.up = True
    pub.notify_connected()
    pub.tick()
    assert link.seqs() == list(range(11)) and pub.dropped() == 0


def test_publish_that_raises_counts_as_not_delivered(tmp_path):
    link = Link()
    link.raise_error = True
    pub = _publisher(tmp_path, link)
    pub.tick()
    assert len(pub.spool) == 1 and pub.counters.get("publish_failures") == 1
    link.raise_error = False
    pub.notify_connected()
    pub.pump()
    assert link.seqs() == [0]


def test_spool_left_by_a_previous_run_is_flushed_first(tmp_path):
    link = Link()
    link.up = False
    pub = _publisher(tmp_path, link)
    for _ in range(3):
        pub.tick()
    pub.stop()
    link.up = True
    pub2 = _publisher(tmp_path, link)  # agent restart: fresh builder, same spool dir
    pub2.tick()
    # the old run's seqs 0..2, then the new run's seq 0
    assert link.seqs() == [0, 1, 2, 0]
    assert [json.loads(p)["uptime_s"] for _, p, _ in link.sent][-1] < 5


def test_full_in_memory_queue_drops_are_counted(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link, max_pending=2)
    for i in range(5):
        pub.submit(EVENTS, b'{"i": %d}' % i, 1)
    assert pub.counters.get("queue_dropped") == 3 and pub.dropped() == 3
    pub.pump()
    assert [json.loads(p)["i"] for _, p, _ in link.sent] == [0, 1]


def test_loop_thread_publishes_every_period_and_stops(tmp_path):
    link = Link()
    pub = _publisher(tmp_path, link, period_s=0.05)
    pub.start()
    ev_thread = threading.Thread(target=lambda: [pub.submit(EVENTS, b'{"n": %d}' % i, 1) for i in range(20)])
    ev_thread.start()
    ev_thread.join()
    deadline = time.monotonic() + 10  # wait for the events and four telemetry periods, not a fixed time
    while time.monotonic() < deadline and (len(link.seqs()) < 4 or sum(t == EVENTS for t, _, _ in link.sent) < 20):
        time.sleep(0.02)
    pub.stop()
    seqs = link.seqs()
    assert len(seqs) >= 4 and seqs == list(range(len(seqs)))
    assert [json.loads(p)["n"] for t, p, _ in link.sent if t == EVENTS] == list(range(20))
    n = len(link.sent)
    time.sleep(0.15)
    assert len(link.sent) == n  # stopped means stopped
    assert "edge_agent_uptime_seconds" in pub.metrics_text()


def test_stats_listeners_see_the_same_period_stats_as_telemetry(tmp_path):
    from edge_agent.bundle.manifest import HealthGates
    from edge_agent.config import ProbationConfig
    from edge_agent.lifecycle.probation import Probation

    link = Link()
    pub = _publisher(tmp_path, link)
    prob = Probation(HealthGates(probation_s=0), ProbationConfig(window_s=0))
    seen = []
    pub.add_stats_listener(prob.observe)
    pub.add_stats_listener(lambda st: 1 / 0)  # a broken listener does not stop telemetry
    pub.add_stats_listener(seen.append)
    for _ in range(3):
        pub.tick()
    assert prob.requests == 3 and len(seen) == 3
    assert sum(json.loads(p)["requests"] for _, p, _ in link.sent) == 3
    pub.remove_stats_listener(seen.append)
    pub.tick()
    assert len(seen) == 3 and prob.requests == 4


# ------------------------------------------------------------------------------------- real broker


class PahoLink:
    """The agent-facing publish callable over a real paho MQTT 5 client (False while disconnected)."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connects = 0
        self.on_up = lambda: None
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        self.c.connect_async(host, port, keepalive=5)
        self.c.loop_start()

    def _on_connect(self, client, userdata, flags, rc, props=None):
        if not rc.is_failure:
            self.connects += 1
            self.disconnected.clear()
            self.connected.set()
            self.on_up()

    def _on_disconnect(self, client, userdata, flags, rc, props=None):
        self.connected.clear()
        self.disconnected.set()

    def __call__(self, topic: str, payload: bytes, qos: int) -> bool:
        if not self.connected.is_set():
            return False
        info = self.c.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        if qos > 0:
            info.wait_for_publish(timeout=5)
            return info.is_published()
        return True

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class Subscriber:
    """Collects every telemetry message; re-subscribes after the broker comes back."""

    def __init__(self, host: str, port: int) -> None:
        self.got: List[dict] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edge/v1/devices/+/#", qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subscribed.set()
        self.c.on_disconnect = lambda c, u, f, rc, p=None: self.subscribed.clear()
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        self.c.connect_async(host, port, keepalive=5)
        self.c.loop_start()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.got.append(dict(json.loads(msg.payload), _topic=msg.topic))

    def wait_for(self, pred, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if pred(list(self.got)):
                    return list(self.got)
            time.sleep(0.02)
        with self.lock:
            raise AssertionError("timed out; got %r" % [(m["_topic"], m.get("seq")) for m in self.got])

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.mqtt
def test_broker_outage_spools_and_flushes_in_order_with_honest_drop_count(broker, tmp_path):
    sub = Subscriber(broker.host, broker.port)
    link = PahoLink(broker.host, broker.port, "dev-1")
    cfg = TelemetryConfig(period_s=3600, spool_max_messages=5, use_jtop=False)
    pub = create_publisher(cfg, device_id="dev-1", prefix="edge/v1", spool_dir=tmp_path / "spool", publish=link,
                           get_stats=lambda: {"requests": 3, "errors": 0, "refused": 0})
    link.on_up = pub.notify_connected
    try:
        assert sub.subscribed.wait(10) and link.connected.wait(10)
        for _ in range(3):
            pub.tick()
        sub.wait_for(lambda g: len(g) == 3)

        broker.stop()
        assert link.disconnected.wait(10)
        for _ in range(9):  # seqs 3..11 while the broker is down; the spool keeps the last 5
            pub.tick()
        pub.submit(EVENTS, Event(device_id="dev-1", ts=time.time(), seq=0, kind="error",
                                 message="offline event").to_json(), 1)
        pub.pump()  # the event is the newest: it pushes out seq 7 as well
        assert len(pub.spool) == 5 and pub.dropped() == 5

        broker.start()
        assert sub.subscribed.wait(10) and link.connected.wait(10)
        pub.tick()  # flush first, then seq 12
        got = sub.wait_for(lambda g: any(m.get("seq") == 12 and m["_topic"] == TOPIC for m in g))
    finally:
        pub.stop()
        link.close()
        sub.close()
    tele = [m for m in got if m["_topic"] == TOPIC]
    for m in tele:
        Telemetry.from_obj({k: v for k, v in m.items() if k != "_topic"})
    assert [m["seq"] for m in tele] == [0, 1, 2, 8, 9, 10, 11, 12]
    assert [m["_topic"] for m in got].index(EVENTS) == 7  # after seq 11, before seq 12
    assert tele[-1]["spool_dropped"] == 5
    assert tele[-1]["spool_dropped"] == 13 - len(tele)  # exactly the telemetry that never arrived
    assert all(m["spool_dropped"] == 0 for m in tele[:3])
    assert len(pub.spool) == 0


@pytest.mark.mqtt
def test_agent_mqtt_session_through_a_broker_crash_loses_nothing_with_qos1(broker, tmp_path):
    from edge_agent.config import MqttConfig
    from edge_agent.mqtt.session import MqttSession
    from edge_agent.telemetry.publisher import session_publish

    sub = Subscriber(broker.host, broker.port)
    session = MqttSession(MqttConfig(host=broker.host, port=broker.port, keepalive_s=5, reconnect_min_s=0.05,
                                     reconnect_max_s=0.2), client_id="dev-1")
    cfg = TelemetryConfig(period_s=3600, qos=1, spool_max_messages=100, use_jtop=False)
    pub = create_publisher(cfg, device_id="dev-1", prefix="edge/v1", spool_dir=tmp_path / "spool",
                           publish=session_publish(session, timeout_s=2.0), get_stats=lambda: None)
    session.on_connect(pub.notify_connected)
    session.start()
    try:
        assert sub.subscribed.wait(10) and session.wait_connected(10)
        for _ in range(2):
            pub.tick()
        sub.wait_for(lambda g: len(g) == 2)
        broker.kill()  # SIGKILL: no goodbye
        deadline = time.monotonic() + 10
        while session.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(4):
            pub.tick()
        assert len(pub.spool) == 4
        broker.start()
        assert sub.subscribed.wait(10) and session.wait_connected(10)
        pub.tick()
        got = sub.wait_for(lambda g: any(m.get("seq") == 6 for m in g))
    finally:
        pub.stop()
        session.stop()
        sub.close()
    assert [m["seq"] for m in got] == list(range(7))
    assert got[-1]["spool_dropped"] == 0 and pub.dropped() == 0
