"""The MQTT session on a real mosquitto: Last Will, reconnect with bounded back-off, size limits,
bounded queues, MQTT 5 metadata."""

from __future__ import annotations

import random
import threading
import time

import pytest

from edge_agent.config import MqttConfig
from edge_agent.errors import TransportError
from edge_agent.mqtt.backoff import Backoff
from edge_agent.mqtt.packets import Will
from edge_agent.mqtt.session import MqttSession, require_connected


def _cfg(broker, **kw):
    base = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    base.update(kw)
    return MqttConfig(**base)


def test_backoff_grows_and_stays_bounded():
    b = Backoff(0.5, 30.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(40)]
    assert all(0.25 <= d <= 30.0 for d in delays)
    assert max(delays[:3]) <= 2.0 and max(delays[-10:]) > 5.0
    b.reset()
    assert b.next_delay() <= 0.5


def _wait_until(pred, timeout_s: float) -> bool:
    """Poll `pred` until it is true or `timeout_s` passed; its last answer."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.mqtt
def test_last_will_published_when_the_client_dies_and_not_on_clean_stop(broker):
    got = []
    watcher = MqttSession(_cfg(broker), client_id="watcher")
    watcher.subscribe("t/status", lambda m: got.append(m.payload))
    watcher.start()
    assert watcher.wait_connected(10)
    clean = MqttSession(_cfg(broker), client_id="clean", will=Will("t/status", b"clean-died", retain=False))
    clean.start()
    assert clean.wait_connected(10)
    clean.stop()
    # A dead socket (the process vanished) makes the broker publish the will. The broker handled the clean
    # client's DISCONNECT before this connection, so a will of the clean one would arrive before this one.
    dying = MqttSession(_cfg(broker), client_id="dying", will=Will("t/status", b"offline", retain=False))
    dying.start()
    assert dying.wait_connected(10)
    dying._client.socket().close()
    deadline = time.time() + 10
    while b"offline" not in got and time.time() < deadline:
        time.sleep(0.05)
    dying.stop()
    watcher.stop()
    assert b"offline" in got
    assert b"clean-died" not in got


@pytest.mark.mqtt
def test_reconnects_and_resubscribes_after_broker_restart(broker):
    got = []
    ev = threading.Event()
    sub = MqttSession(_cfg(broker), client_id="sub")
    sub.subscribe("t/x", lambda m: (got.append(m), ev.set()))
    pub = MqttSession(_cfg(broker), client_id="pub")
    sub.start()
    pub.start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        broker.stop()
        assert _wait_until(lambda: not sub.connected.is_set(), 10), "the session did not notice the broker stop"
        broker.start()
        assert sub.wait_connected(10) and pub.wait_connected(10)
        # the subscription is made again in the connect callback; its SUBACK says when it is in place
        assert sub.wait_subscribed(10), sub.last_error
        d = pub.publish("t/x", b"after", qos=1, user_properties={"k": "v"}, correlation_data=b"c1",
                        response_topic="t/reply")
        assert d.wait(10)
        assert ev.wait(10)
        m = got[-1]
        assert (m.payload, m.user_properties, m.correlation_data, m.response_topic) == (
            b"after", {"k": "v"}, b"c1", "t/reply")
        assert sub.stats["connects"] >= 2
    finally:
        sub.stop()
        pub.stop()


@pytest.mark.mqtt
def test_oversize_message_never_reaches_the_client(broker):
    """The session tells the broker its maximum packet size, so an oversize message is dropped by the
    broker instead of being allocated by the client; the client stays connected."""
    got = []
    small = MqttSession(_cfg(broker, max_payload_bytes=64 * 1024), client_id="small")
    small.subscribe("t/big", got.append)
    pub = MqttSession(_cfg(broker), client_id="pub")
    small.start()
    pub.start()
    try:
        assert small.wait_connected(10) and pub.wait_connected(10)
        assert small.wait_subscribed(10, "t/big"), small.last_error
        assert pub.publish("t/big", b"x" * (200 * 1024), qos=1).wait(10)
        assert pub.publish("t/big", b"ok", qos=1).wait(10)
        assert _wait_until(lambda: any(m.payload == b"ok" for m in got), 5)
        assert [m.payload for m in got] == [b"ok"]
        assert small.connected.is_set() and small.stats["disconnects"] == 0
        # And the session refuses to send one over its own limit, without touching the network.
        d = small.publish("t/out", b"y" * (65 * 1024), qos=1)
        assert d.done and not d.ok and "max_payload_bytes" in d.error
    finally:
        small.stop()
        pub.stop()


@pytest.mark.mqtt
def test_wait_subscribed_follows_each_connection_suback(broker):
    """wait_subscribed is True only after the broker's SUBACK on the current connection: a subscription
    added after connecting is waited for by name, and after a broker restart the wait is for the new one."""
    sub = MqttSession(_cfg(broker), client_id="waiter")
    sub.subscribe("t/a", lambda m: None)
    assert not sub.wait_subscribed(0.2)  # not started: no SUBACK can have come
    sub.start()
    try:
        assert sub.wait_connected(10) and sub.wait_subscribed(10)
        sub.subscribe("t/b/#", lambda m: None)
        assert sub.wait_subscribed(10, "t/b/#") and sub.wait_subscribed(0.0)
        broker.stop()
        assert _wait_until(lambda: not sub.connected.is_set(), 10)
        assert not sub.wait_subscribed(0.0)  # the old connection's grants are gone with it
        broker.start()
        assert sub.wait_connected(10) and sub.wait_subscribed(10)
        assert sub.stats["subscribe_refused"] == 0
    finally:
        sub.stop()


def test_outgoing_queue_is_bounded_while_not_started(tmp_path):
    s = MqttSession(MqttConfig(port=1), client_id="x", outgoing_queue=2)
    assert not s.publish("t", b"1").done
    assert not s.publish("t", b"2").done
    d = s.publish("t", b"3")
    assert d.done and not d.ok and "queue full" in d.error
    assert s.stats["queue_full"] == 1


def test_unreachable_broker_is_a_one_line_transport_error():
    from mqtt_broker import free_port

    s = MqttSession(MqttConfig(port=free_port(), reconnect_min_s=0.1, reconnect_max_s=0.2), client_id="x")
    s.start()
    try:
        with pytest.raises(TransportError, match="could not connect to the MQTT broker"):
            require_connected(s, 1.0)
    finally:
        s.stop()
