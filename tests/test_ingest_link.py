"""The controller's own report receiver (fleet/ingest_link.py, fleet/mqtt_wire.py): against a real
mosquitto (QoS 0 and 1, skipped oversize packets still acknowledged), a username/password login, and a
scripted hostile broker (malformed packets close the connection and are counted, the link reconnects;
keep-alive pings, a silent broker is left)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_broker import Broker, free_port

from edge_agent.config import MqttConfig
from edge_agent.mqtt.session import MqttSession
from fleet import mqtt_wire as wire
from fleet.ingest_link import IngestLink

pytestmark = pytest.mark.mqtt


def _wait(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 1, props: bytes = b"\x00") -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + (struct.pack("!H", pid) if qos else b"") + props + payload
    return bytes([0x30 | (qos << 1)]) + wire.varint(len(body)) + body


class Collector:
    def __init__(self) -> None:
        self.items: List[Tuple[str, bytes]] = []
        self.batches = 0

    def __call__(self, batch) -> None:
        self.batches += 1
        self.items.extend(batch)


def test_messages_from_mosquitto_all_arrive_and_oversize_qos1_is_skipped_but_acknowledged(tmp_path):
    with Broker(tmp_path / "b") as broker:
        cfg = MqttConfig(host=broker.host, port=broker.port, prefix="t")
        got = Collector()
        link = IngestLink(cfg, client_id="link", on_batch=got, max_packet_bytes=4096)
        link.subscribe("t/devices/+/telemetry")
        link.subscribe("$share/g/t/devices/+/events")
        pub = MqttSession(cfg, client_id="pub", outgoing_queue=5000, name="pub")
        link.start()
        pub.start()
        try:
            assert link.wait_connected(10) and pub.wait_connected(10), link.last_error
            sent = []
            for i in range(300):
                topic = "t/devices/d%d/telemetry" % (i % 7)
                sent.append((topic, b"m%d" % i))
                pub.publish(topic, b"m%d" % i, qos=i % 2)
            # 40 QoS 1 messages over the link's bound: skipped unread, yet acknowledged — mosquitto sends
            # no more QoS 1 messages after 20 unacknowledged ones, so the later ones prove the acks.
            for _ in range(40):
                pub.publish("t/devices/big/events", b"x" * 10000, qos=1)
            for i in range(30):
                sent.append(("t/devices/after/events", b"a%d" % i))
                pub.publish("t/devices/after/events", b"a%d" % i, qos=1)
            assert _wait(lambda: len(got.items) >= len(sent)), (len(got.items), link.stats)
            # Each QoS keeps its order (mosquitto may interleave the two).
            assert sorted(got.items) == sorted(sent)
            for q in (0, 1):
                assert [m for m in got.items if m in sent[q::2]] == [m for m in sent if m in sent[q::2]]
            assert link.stats["oversize_dropped"] == 40 and link.stats["protocol_errors"] == 0
            assert got.batches < len(sent)  # handed over per read, not per message
        finally:
            pub.stop()
            link.stop()
        assert link.stats["received"] == len(sent) and not link.connected.is_set()


def test_tls_and_password_login_to_the_shipped_broker_config_and_a_refused_one(tmp_path):
    """configs/mosquitto/edge-agent-password.conf (TLS, passwords, dynamic-security ACL): the controller's
    identity receives a device's telemetry through the shared subscription; a wrong password is refused."""
    import subprocess
    import sys

    from secure_broker import CONTROLLER, REPO, start_secure_broker

    from edge_agent.config import TlsConfig

    pki = tmp_path / "pki"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_test_pki.py"), str(pki), "--device", "dev-a",
                    "--controller", CONTROLLER], check=True, stdout=subprocess.DEVNULL, timeout=60)
    broker = start_secure_broker("password", pki, passwords={"dev-a": "pw-a", CONTROLLER: "pw-ctl"})
    try:
        tls = TlsConfig(ca_file=pki / "ca.crt")
        (tmp_path / "good").write_text("pw-ctl\n")
        (tmp_path / "bad").write_text("nope\n")
        got = Collector()
        ok = IngestLink(MqttConfig(host=broker.host, port=broker.port, tls=tls, username=CONTROLLER,
                                   password_file=tmp_path / "good"), client_id=CONTROLLER + "-ingest", on_batch=got)
        no = IngestLink(MqttConfig(host=broker.host, port=broker.port, tls=tls, username=CONTROLLER,
                                   password_file=tmp_path / "bad", reconnect_min_s=0.1, reconnect_max_s=0.2),
                        client_id=CONTROLLER + "-x", on_batch=Collector())
        for link in (ok, no):
            link.subscribe("$share/fleet/edge/v1/devices/+/telemetry")
            link.start()
        (tmp_path / "dev").write_text("pw-a\n")
        dev = MqttSession(MqttConfig(host=broker.host, port=broker.port, tls=tls, username="dev-a",
                                     password_file=tmp_path / "dev"), client_id="dev-a", name="dev")
        dev.start()
        try:
            assert ok.wait_connected(10), ok.last_error
            assert dev.wait_connected(10), dev.last_error
            assert _wait(lambda: no.stats["connect_failures"] >= 2)
            assert not no.connected.is_set() and "refused" in (no.last_error or "")
            assert _wait(lambda: (dev.publish("edge/v1/devices/dev-a/telemetry", b"{}", qos=1).wait(5) and False)
                         or got.items, 10)
            assert got.items[0] == ("edge/v1/devices/dev-a/telemetry", b"{}")
        finally:
            dev.stop()
            ok.stop()
            no.stop()
    finally:
        broker.close()


class ScriptedBroker:
    """A TCP server speaking just enough MQTT: CONNACK (optionally a Server Keep Alive), SUBACK, then the
    bytes the test scripts for that connection."""

    def __init__(self, scripts: List[bytes], server_keepalive: int = 0) -> None:
        self.scripts = list(scripts)
        self.server_keepalive = server_keepalive
        self.port = free_port()
        self.srv = socket.create_server(("127.0.0.1", self.port))
        self.srv.settimeout(0.2)
        self.connections = 0
        self.received = bytearray()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(0.2)
                self._session(conn)

    def _session(self, conn) -> None:
        self._read_some(conn)  # CONNECT
        props = b"\x13" + struct.pack("!H", self.server_keepalive) if self.server_keepalive else b""
        conn.sendall(b"\x20" + wire.varint(3 + len(props)) + b"\x00\x00" + wire.varint(len(props)) + props)
        self._read_some(conn)  # SUBSCRIBE
        conn.sendall(b"\x90\x04\x00\x01\x00\x01")
        if self.scripts:
            conn.sendall(self.scripts.pop(0))
        while not self._stop.is_set():  # keep reading until the client closes
            data = self._read_some(conn)
            if data is None:
                return

    def _read_some(self, conn):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not data:
                return None
            self.received += data
            return data
        return b""

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.srv.close()


HOSTILE = [
    b"\x30\x05\x00\x09abc",  # topic length past the packet
    b"\x30\xff\xff\xff\xff\x7f",  # a five-byte Remaining Length
    _publish_packet("t/a", b"x", qos=2),  # QoS 2 on a QoS 1 subscription
    b"\x00\x00",  # packet type 0 (reserved)
    _publish_packet("t/a", b"x", props=b"\x40"),  # properties past the packet
    _publish_packet("", b"x"),  # no topic (and no alias allowed)
    b"\x30\x06\x00\x02\xff\xfe\x00x",  # topic not UTF-8
    b"\x90\x03\x00\x01\x09",  # SUBACK whose properties run past it
]


def test_a_hostile_broker_packet_closes_the_connection_is_counted_and_the_link_reconnects():
    good = _publish_packet("t/devices/a/telemetry", b"fine", qos=1, pid=7)
    broker = ScriptedBroker([good + h for h in HOSTILE] + [good])
    got = Collector()
    link = IngestLink(MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.1),
                      client_id="victim", on_batch=got)
    link.subscribe("t/#")
    link.start()
    try:
        assert _wait(lambda: link.stats["protocol_errors"] == len(HOSTILE) and len(got.items) == len(HOSTILE) + 1,
                     30), (link.stats, got.items)
        assert link.wait_connected(5) and link._thread.is_alive()
        # Every good message before a hostile one was still handed over and acknowledged.
        assert got.items == [("t/devices/a/telemetry", b"fine")] * (len(HOSTILE) + 1)
        assert bytes(broker.received).count(b"\x40\x02\x00\x07") == len(HOSTILE) + 1
    finally:
        link.stop()
        broker.close()


def test_keepalive_pings_and_a_silent_broker_is_left():
    broker = ScriptedBroker([], server_keepalive=1)  # never answers a PINGREQ
    link = IngestLink(MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.1),
                      client_id="pinger", on_batch=Collector())
    link.subscribe("t/#")
    link.start()
    try:
        assert _wait(lambda: wire.PINGREQ_BYTES in bytes(broker.received), 5)
        assert _wait(lambda: broker.connections >= 2, 10)  # 1.5 keep-alives of silence: reconnected
        assert link.stats["disconnects"] >= 1
    finally:
        link.stop()
        broker.close()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=300))
def test_the_reader_takes_any_bytes_split_anywhere_and_fails_only_with_wire_error(data, cut):
    """Random bytes: only WireError; a valid stream split at any point gives the same messages."""
    try:
        wire.PacketReader(64).feed(memoryview(data), 0, len(data), [], [], [])
    except wire.WireError:
        pass
    stream = _publish_packet("a/b", data[:50], qos=1, pid=3) + _publish_packet("c", data[50:120]) + b"\xd0\x00"
    cut = min(cut, len(stream))
    reader, out, acks, control = wire.PacketReader(4096), [], [], []
    buf = bytearray(stream)
    rest = reader.feed(memoryview(buf), 0, cut, out, acks, control)
    rest = reader.feed(memoryview(buf), rest, len(buf), out, acks, control)
    assert rest == len(buf)
    assert out == [("a/b", data[:50]), ("c", data[50:120])] and acks == [3] and control == [(13, 0, b"")]


@pytest.mark.parametrize("receiver", ["native", "paho"])
def test_the_controller_takes_reports_with_either_receiver(tmp_path, receiver):
    """`[ingest] receiver`: the controller's own client or paho on the reports connection, same result."""
    from edge_agent.protocol.messages import Telemetry
    from edge_agent.signing import PrivateKey
    from fleet.config import ControllerSection, FleetConfig, IngestSection
    from fleet.controller import Controller

    with Broker(tmp_path / "b") as broker:
        mqtt = MqttConfig(host=broker.host, port=broker.port, prefix="t")
        cfg = FleetConfig(mqtt=mqtt, controller=ControllerSection(client_id="ctl", state_dir=tmp_path / "state"),
                          ingest=IngestSection(receiver=receiver))
        ctl = Controller(cfg, key=PrivateKey.generate("controller"))
        dev = MqttSession(mqtt, client_id="dev", name="dev")
        ctl.start()
        dev.start()
        try:
            assert ctl.wait_connected(10) and dev.wait_connected(10)
            assert isinstance(ctl.ingest_session, IngestLink) == (receiver == "native")
            body = Telemetry(device_id="cam-1", ts=time.time(), seq=3, period_s=1.0, uptime_s=9.0).to_json()

            def landed() -> bool:
                dev.publish("t/devices/cam-1/telemetry", body, qos=1)
                ctl.control.ingest.flush()
                d = ctl.registry.get_device("cam-1")
                return bool(d and d["telemetry"] and d["telemetry"]["seq"] == 3)

            assert _wait(landed, 10), ctl.control.ingest.stats()
        finally:
            dev.stop()
            ctl.stop()
