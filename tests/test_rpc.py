"""CLI ↔ controller RPC over a real mosquitto: answers, errors, timeouts, shared subscriptions."""

from __future__ import annotations

import threading
import time

import pytest

from edge_agent.config import MqttConfig
from edge_agent.mqtt.session import MqttSession, require_connected
from edge_agent.protocol.messages import RpcResponse
from fleet.rollouts.states import RolloutError
from fleet.rpc import RpcClient, RpcError, RpcServer, RpcTimeout

pytestmark = pytest.mark.mqtt


def mqtt_cfg(broker) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, prefix="test/v1", keepalive_s=5)


def server_session(broker, name):
    s = MqttSession(mqtt_cfg(broker), client_id=name, name=name)
    return s


@pytest.fixture
def server(broker):
    session = server_session(broker, "ctl-1")
    srv = RpcServer(session, prefix="test/v1")
    srv.register("echo", lambda p: {"got": p})
    srv.register("fail", lambda p: (_ for _ in ()).throw(RolloutError("no rollout r-nope")))
    srv.register("crash", lambda p: 1 / 0)
    srv.start()
    session.start()
    require_connected(session, 5)
    time.sleep(0.2)  # let the SUBSCRIBE reach the broker
    yield srv
    srv.stop()
    session.stop()


def test_call_returns_the_handler_result(broker, server):
    with RpcClient.connect(mqtt_cfg(broker)) as c:
        assert c.call("echo", {"a": [1, 2]}, timeout_s=5) == {"got": {"a": [1, 2]}}
        assert c.call("echo", timeout_s=5) == {"got": {}}
    assert server.stats["requests"] == 2


def test_handler_error_comes_back_as_one_line_rpc_error(broker, server):
    with RpcClient.connect(mqtt_cfg(broker)) as c:
        with pytest.raises(RpcError, match="no rollout r-nope"):
            c.call("fail", timeout_s=5)
        with pytest.raises(RpcError, match=r"unknown method 'nope'.*echo"):
            c.call("nope", timeout_s=5)
        with pytest.raises(RpcError, match="internal error in crash: ZeroDivisionError"):
            c.call("crash", timeout_s=5)
        # The server survived all of it.
        assert c.call("echo", {"x": 1}, timeout_s=5) == {"got": {"x": 1}}
    assert server.stats["errors"] == 1


def test_no_controller_is_a_clear_timeout(broker):
    with RpcClient.connect(mqtt_cfg(broker)) as c:
        t0 = time.monotonic()
        with pytest.raises(RpcTimeout, match=r"no controller answered devices\.list.*fleet serve"):
            c.call("devices.list", timeout_s=1.0)
        assert time.monotonic() - t0 < 3.0


def test_unreachable_broker_is_a_transport_error_naming_it():
    from mqtt_broker import free_port

    from edge_agent.errors import TransportError

    cfg = MqttConfig(host="127.0.0.1", port=free_port(), prefix="test/v1", reconnect_min_s=0.1, reconnect_max_s=0.2)
    with pytest.raises(TransportError, match=r"could not connect to the MQTT broker at 127\.0\.0\.1"):
        RpcClient.connect(cfg, connect_timeout_s=1.0)


def test_requests_without_or_with_a_foreign_response_topic_are_ignored(broker, server):
    rogue = MqttSession(mqtt_cfg(broker), client_id="rogue")
    got = []
    rogue.subscribe("test/v1/devices/+/commands", got.append)
    rogue.start()
    require_connected(rogue, 5)
    body = b'{"schema":"edge-agent/rpc-request/1","method":"echo","params":{}}'
    rogue.publish("test/v1/fleet/rpc", body, qos=1).wait(5)
    rogue.publish("test/v1/fleet/rpc", body, qos=1, response_topic="test/v1/devices/d1/commands").wait(5)
    deadline = time.monotonic() + 3
    while server.stats["malformed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    rogue.stop()
    assert server.stats["malformed"] == 2
    assert server.stats["requests"] == 0
    assert got == [], "the server never publishes onto a device topic"


def test_malformed_request_gets_an_error_answer(broker, server):
    with RpcClient.connect(mqtt_cfg(broker)) as c:
        done = threading.Event()
        answers = []

        def on_reply(msg):
            answers.append(RpcResponse.from_json(msg.payload))
            done.set()

        c.session.subscribe(c.reply_topic + "x", on_reply)
        time.sleep(0.2)
        c.session.publish(
            "test/v1/fleet/rpc", b'{"method": 5}', qos=1, response_topic=c.reply_topic + "x", correlation_data=b"k"
        ).wait(5)
        assert done.wait(5)
    assert answers[0].ok is False and "malformed request" in answers[0].error


def test_two_controllers_on_a_shared_subscription_answer_each_request_once(broker, server):
    s2 = server_session(broker, "ctl-2")
    srv2 = RpcServer(s2, prefix="test/v1")
    srv2.register("echo", lambda p: {"got": p, "by": 2})
    srv2.start()
    s2.start()
    require_connected(s2, 5)
    time.sleep(0.2)
    try:
        with RpcClient.connect(mqtt_cfg(broker)) as c:
            for i in range(20):
                assert c.call("echo", {"i": i}, timeout_s=5)["got"] == {"i": i}
        assert server.stats["requests"] + srv2.stats["requests"] == 20
        assert srv2.stats["requests"] > 0 and server.stats["requests"] > 0, "mosquitto spreads shared-sub messages"
    finally:
        srv2.stop()
        s2.stop()
