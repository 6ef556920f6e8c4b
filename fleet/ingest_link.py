"""The controller's device-report connection: a small MQTT 5 receiver of its own for the ingest
subscriptions only (status, telemetry, events), instead of paho.

At fleet scale the reports are almost all the controller receives (20,000 devices at 1 Hz is 20,000
PUBLISHes a second), and paho's per-message Python work (packet objects, properties, callbacks) cost
more than the controller's whole handling of a message. This link reads the socket in bulk into one
bounded buffer, splits it with `fleet.mqtt_wire.PacketReader` (every length checked before use), and
hands each read's messages to `on_batch` as one list of (topic, payload) pairs — on its own thread, which
must not block (`Ingest.submit_batch` only queues).

What it does of MQTT: CONNECT (client id, username/password from `[mqtt]`, TLS with the same CA and client
certificate as the other connections, clean start, no session), one SUBSCRIBE of every filter at QoS 1,
PUBACK for QoS 1 messages, PINGREQ when it sent nothing for half the keep-alive, and a reconnect with
bounded exponential back-off when the broker closes, goes silent for 1.5 keep-alives, or sends something
malformed (counted in `stats["protocol_errors"]`; the process goes on). It never publishes.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable, List, Optional, Tuple

from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError
from edge_agent.mqtt.backoff import Backoff
from edge_agent.mqtt.client import PACKET_OVERHEAD_BYTES
from fleet import mqtt_wire as wire

log = logging.getLogger(__name__)

OnBatch = Callable[[List[Tuple[str, bytes]]], None]


def tls_context(cfg: MqttConfig) -> Optional[ssl.SSLContext]:
    """The TLS context of `[mqtt.tls]` (None without it); ConfigError when its files cannot be loaded."""
    if cfg.tls is None:
        return None
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(cfg.tls.ca_file))
        if cfg.tls.cert_file:
            ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file) if cfg.tls.key_file else None)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ConfigError("mqtt.tls: cannot load certificates: %s" % e)
    ctx.check_hostname = not cfg.tls.insecure_skip_hostname_check
    return ctx


def password_of(cfg: MqttConfig) -> Optional[str]:
    """The `[mqtt] password_file`'s password (None without one)."""
    if not cfg.username or cfg.password_file is None:
        return None
    try:
        return cfg.password_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError("mqtt.password_file %s cannot be read: %s" % (cfg.password_file, e.strerror))


class IngestLink:
    """One MQTT 5 connection that only receives, owned by its own thread."""

    def __init__(self, cfg: MqttConfig, *, client_id: str, on_batch: Optional[OnBatch] = None,
                 max_packet_bytes: int = 256 * 1024, buffer_bytes: int = 4 << 20,
                 name: str = "controller-ingest") -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.on_batch = on_batch
        self.name = name
        #: Larger packets are skipped unread and counted (`stats["oversize_dropped"]`).
        self.max_packet_bytes = max_packet_bytes
        self._buf = bytearray(max(buffer_bytes, 2 * (max_packet_bytes + 8)))
        self._filters: List[Tuple[str, int]] = []
        self._tls = tls_context(cfg)
        self._password = password_of(cfg)
        self.connected = threading.Event()
        self._running = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[socket.socket] = None
        self._send_lock = threading.Lock()
        self._last_sent = 0.0
        self.last_error: Optional[str] = None
        self.stats = {"connects": 0, "disconnects": 0, "connect_failures": 0, "received": 0,
                      "oversize_dropped": 0, "handler_errors": 0, "protocol_errors": 0, "subscribe_refused": 0}

    # ------------------------------------------------------------------------------------ public API

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Add a filter (before `start`; it is subscribed on every connect)."""
        if self._thread is not None:
            raise RuntimeError("subscribe before start()")
        self._filters.append((topic_filter, min(1, max(0, qos))))

    def start(self) -> None:
        """Start the thread (it connects, and keeps reconnecting, by itself)."""
        if self._thread is not None:
            return
        self._running.set()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected and subscribed (within `timeout_s`)."""
        return self.connected.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly and join the thread."""
        if self._thread is None:
            return
        self._running.clear()
        sock = self._sock
        if sock is not None:
            try:
                self._send(wire.DISCONNECT_BYTES)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout_s)
        self._thread = None

    # ------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while self._running.is_set():
            try:
                self._connect()
                backoff.reset()
                self._receive()
            except wire.WireError as e:
                self.stats["protocol_errors"] += 1
                self.last_error = "%s: %s" % (self.name, e)
                log.warning("%s: closing the connection: %s", self.name, e)
            except (OSError, ssl.SSLError, ConnectionError) as e:
                if self._running.is_set():
                    self.last_error = "%s:%d: %s" % (self.cfg.host, self.cfg.port, e)
                    if not self.connected.is_set():
                        self.stats["connect_failures"] += 1
                    log.warning("%s: %s", self.name, self.last_error)
            finally:
                if self.connected.is_set():
                    self.stats["disconnects"] += 1
                self.connected.clear()
                self._close()
            if self._running.is_set():
                delay = backoff.next_delay()
                deadline = time.monotonic() + delay
                while self._running.is_set() and time.monotonic() < deadline:
                    time.sleep(min(0.1, delay))

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _connect(self) -> None:
        """TCP (+TLS), CONNECT, CONNACK, SUBSCRIBE; the SUBACK is read by the receive loop."""
        ka = self.cfg.keepalive_s
        sock = socket.create_connection((self.cfg.host, self.cfg.port), timeout=10.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.cfg.host)
        self._sock = sock
        self._send(wire.connect(self.client_id, keepalive_s=ka, username=self.cfg.username, password=self._password,
                                max_packet_bytes=self.cfg.max_payload_bytes + PACKET_OVERHEAD_BYTES))
        body = self._read_packet(wire.CONNACK)
        if len(body) < 2:
            raise wire.WireError("CONNACK too short")
        if body[1] >= 0x80:
            raise ConnectionError("broker refused the connection (reason 0x%02x)" % body[1])
        props, _ = wire.properties(body, 2)
        self.keepalive_s = int(props.get(0x13, ka)) or ka  # Server Keep Alive overrides ours
        sock.settimeout(max(0.05, min(1.0, self.keepalive_s / 4.0)))
        self._send(wire.subscribe(1, self._filters))

    def _read_packet(self, kind: int) -> bytes:
        """Read one whole control packet of type `kind` (during connect, before any PUBLISH can come)."""
        head = self._recv_exact(2)
        length, n = head[1] & 0x7F, 1
        b = head[1]
        while b & 0x80:
            if n >= 4:
                raise wire.WireError("variable byte integer longer than 4 bytes")
            b = self._recv_exact(1)[0]
            length |= (b & 0x7F) << (7 * n)
            n += 1
        if head[0] >> 4 != kind or length > 65536:
            raise wire.WireError("expected packet type %d, got %d (%d bytes)" % (kind, head[0] >> 4, length))
        return self._recv_exact(length)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self._sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("connection closed by the broker")
            out += chunk
        return out

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            sock = self._sock
            if sock is None:
                raise ConnectionError("not connected")
            sock.sendall(data)
            self._last_sent = time.monotonic()

    def _receive(self) -> None:
        """Read, split and hand over until the connection ends."""
        sock = self._sock
        buf = self._buf
        view = memoryview(buf)
        size = len(buf)
        reader = wire.PacketReader(self.max_packet_bytes)
        start = end = 0
        ka = self.keepalive_s
        last_recv = time.monotonic()
        while self._running.is_set():
            if size - end < self.max_packet_bytes + 8:  # room for one more whole packet
                buf[0:end - start] = buf[start:end]
                start, end = 0, end - start
            try:
                n = sock.recv_into(view[end:], size - end)
            except socket.timeout:
                n = -1
            now = time.monotonic()
            if n == 0:
                raise ConnectionError("connection closed by the broker")
            if n > 0:
                last_recv = now
                end += n
                start = self._take(reader, view, start, end)
                if start == end:
                    start = end = 0
            elif now - last_recv > 1.5 * ka:
                raise ConnectionError("broker silent for %.0f s" % (now - last_recv))
            if now - self._last_sent >= ka / 2.0:
                self._send(wire.PINGREQ_BYTES)

    def _take(self, reader: wire.PacketReader, view, start: int, end: int) -> int:
        out: List[Tuple[str, bytes]] = []
        acks: List[int] = []
        control: list = []
        before = reader.oversize
        try:
            start = reader.feed(view, start, end, out, acks, control)
        finally:
            self.stats["oversize_dropped"] += reader.oversize - before
            if acks:
                self._send(b"".join(wire.puback(a) for a in acks))
            if out:
                self.stats["received"] += len(out)
                self._hand_over(out)
        for kind, _flags, body in control:
            self._control(kind, body)
        return start

    def _hand_over(self, out: List[Tuple[str, bytes]]) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(out)
        except Exception:  # a failing handler must not end the connection
            self.stats["handler_errors"] += 1
            log.exception("%s: report handler failed", self.name)

    def _control(self, kind: int, body: bytes) -> None:
        if kind == wire.SUBACK:
            if len(body) < 3:
                raise wire.WireError("SUBACK too short")
            _props, pos = wire.properties(body, 2)
            refused = [c for c in body[pos:] if c >= 0x80]
            if refused:
                self.stats["subscribe_refused"] += len(refused)
                self.last_error = "broker refused %d subscription(s): %s" % (
                    len(refused), ", ".join("0x%02x" % c for c in refused))
                log.error("%s: %s", self.name, self.last_error)
            if not self.connected.is_set():
                self.stats["connects"] += 1
                self.last_error = None if not refused else self.last_error
                self.connected.set()
                log.info("%s connected to %s:%d as %s", self.name, self.cfg.host, self.cfg.port, self.client_id)
        elif kind == wire.DISCONNECT:
            raise ConnectionError("broker disconnected us (reason 0x%02x)" % (body[0] if body else 0))
        elif kind not in (wire.PINGRESP, wire.PUBACK):
            raise wire.WireError("unexpected packet type %d" % kind)

