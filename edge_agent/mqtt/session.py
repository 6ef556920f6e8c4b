"""The MQTT 5 session: one thread owns the paho client, everyone else hands it work through a queue.

paho-mqtt is not thread-safe in practice, so `MqttSession` runs its own network loop (``select`` on
paho's socket plus a wake-up socket pair, then ``loop_read`` / ``loop_write`` / ``loop_misc``) and is the
only thread that ever touches the client. Other threads call `MqttSession.publish`, which puts the work
on a bounded queue and returns a `Delivery` that completes when the broker acknowledged it (QoS 1) or
when paho wrote it (QoS 0). Reconnects use bounded exponential back-off with jitter; subscriptions are
re-made on every connect (the session is clean, so a restarted broker that forgot us still works).

Handlers registered with `subscribe` run in the network thread: they must be quick and must not block
(hand real work to another thread). They may call `publish`. A message finds its handlers through a
`TopicRouter` (exact filters hashed, wildcard filters compiled once, the result cached per topic).

This module stays over 400 lines: one class owning one thread and its loop; the paho client and
property conversions (`client`), the values it passes (`packets`) and back-off (`backoff`) are apart.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from edge_agent.config import MqttConfig
from edge_agent.errors import TransportError
from edge_agent.mqtt.backoff import Backoff
from edge_agent.mqtt.client import inbound_from, make_client, publish_properties
from edge_agent.mqtt.packets import Delivery, Handler, Outgoing, Will
from edge_agent.mqtt.routing import TopicRouter

log = logging.getLogger(__name__)


class MqttSession:
    """An MQTT 5 session owned by one network thread."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        will: Optional[Will] = None,
        outgoing_queue: int = 1000,
        clean_start: bool = True,
        name: str = "mqtt",
        max_inbound_bytes: Optional[int] = None,
    ) -> None:
        self.cfg = cfg
        # The largest payload handed to a handler (default: mqtt.max_payload_bytes); bigger ones are
        # dropped before any handler sees them. Not announced to the broker: mosquitto 2.0.11 drops a QoS 1
        # message over the client's maximum packet size without returning its send-quota slot
        # (src/database.c, db__message_write_inflight_out_single), so 64 such drops stall the connection.
        self.max_inbound_bytes = min(max_inbound_bytes or cfg.max_payload_bytes, cfg.max_payload_bytes)
        self.client_id = client_id
        self.will = will
        self.clean_start = clean_start
        self.name = name
        self._out: queue.Queue = queue.Queue(maxsize=max(1, outgoing_queue))
        self._subs: List[Tuple[str, Tuple[int, bool], Handler]] = []
        self._subs_lock = threading.Lock()
        self._router = TopicRouter()
        # SUBACKs of the current connection: filter -> granted (True) or refused (False); mids in flight.
        self._suback_cond = threading.Condition()
        self._subacks: Dict[str, bool] = {}
        self._sub_mids: Dict[int, str] = {}
        self._on_connect_hooks: List[Callable[[], None]] = []
        self._pending: Dict[int, Delivery] = {}
        self._running = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.connected = threading.Event()
        self._loop_ident: Optional[int] = None
        self._calls: queue.Queue = queue.Queue()
        self._final: Optional[Outgoing] = None
        self._stop_deadline = 0.0
        self.stats: Dict[str, int] = {
            "connects": 0, "disconnects": 0, "connect_failures": 0, "published": 0, "publish_failures": 0,
            "received": 0, "oversize_dropped": 0, "handler_errors": 0, "queue_full": 0,
            "subscribe_refused": 0,
        }
        self.last_error: Optional[str] = None

    # ------------------------------------------------------------------------------------ public API

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *,
                  retain_as_published: bool = False) -> None:
        """Register a handler; the subscription is (re)made on every connect. With `retain_as_published`
        (MQTT 5) a message published retained keeps its retain flag also when delivered live, so the
        handler can tell it apart."""
        how = (qos, retain_as_published)
        with self._subs_lock:
            self._subs.append((topic_filter, how, handler))
            self._router.add(topic_filter, handler)
        if self.connected.is_set():
            self._call_in_loop(lambda: self._send_subscribe(self._client, topic_filter, how))

    def wait_subscribed(self, timeout_s: float, topic_filter: Optional[str] = None) -> bool:
        """True once the broker granted `topic_filter` (default: every registered filter) on the current
        connection, within `timeout_s`. False on timeout or when the broker refused one (``last_error``
        says which): a publish that must reach a handler is only safe to send after this."""
        with self._subs_lock:
            wanted = [topic_filter] if topic_filter is not None else [f for f, _, _ in self._subs]
        deadline = time.monotonic() + timeout_s
        with self._suback_cond:
            while True:
                states = [self._subacks.get(f) for f in wanted]
                if False in states:
                    return False
                if all(states):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._suback_cond.wait(left)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` in the network thread after every successful connect (e.g. publish status)."""
        self._on_connect_hooks.append(hook)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        user_properties: Optional[Dict[str, str]] = None,
        response_topic: Optional[str] = None,
        correlation_data: Optional[bytes] = None,
        block_s: float = 0.0,
        expiry_s: Optional[int] = None,
    ) -> Delivery:
        """Queue one message for the network thread. A full queue fails the delivery at once
        (``block_s=0``) or after waiting `block_s` seconds for room. `expiry_s` sets the MQTT 5 message
        expiry: the broker discards the message when it could not deliver it within that time."""
        d = Delivery()
        if len(payload) > self.cfg.max_payload_bytes:
            d._finish(False, "payload of %d bytes is over mqtt.max_payload_bytes" % len(payload))
            return d
        item = Outgoing(topic, bytes(payload), qos, retain, user_properties, response_topic, correlation_data, d,
                        expiry_s)
        try:
            if block_s > 0:
                self._out.put(item, timeout=block_s)
            else:
                self._out.put_nowait(item)
        except queue.Full:
            self.stats["queue_full"] += 1
            d._finish(False, "outgoing queue full (%d messages)" % self._out.maxsize)
            return d
        self._wake()
        return d

    def start(self) -> None:
        """Start the network thread (it connects, and keeps reconnecting, by itself)."""
        if self._thread is not None:
            return
        self._client = self._make_client()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (within `timeout_s`)."""
        return self.connected.wait(timeout_s)

    def stop(self, *, final: Optional[Tuple[str, bytes, int, bool]] = None, timeout_s: float = 5.0) -> None:
        """Publish `final` (topic, payload, qos, retain) if connected, flush, disconnect cleanly and
        join the thread. A clean disconnect means the broker does NOT publish the Last Will."""
        if self._thread is None:
            return
        if final is not None:
            self._final = Outgoing(final[0], final[1], final[2], final[3], None, None, None, Delivery())
        self._stop_deadline = time.monotonic() + timeout_s
        self._running.clear()
        self._wake()
        self._thread.join(timeout_s + 1.0)
        self._thread = None
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    # ------------------------------------------------------------------------------------ paho setup

    def _make_client(self):
        client, self._connect_props = make_client(self.cfg, client_id=self.client_id, will=self.will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    # ------------------------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closed

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_ident:
            fn()
        else:
            self._calls.put(fn)
            self._wake()

    def _run(self) -> None:
        import paho.mqtt.client as mqtt

        self._loop_ident = threading.get_ident()
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        client = self._client
        next_attempt = 0.0
        connect_started = 0.0
        while self._running.is_set():
            sock = client.socket()
            if sock is None:
                self.connected.clear()
                now = time.monotonic()
                if now < next_attempt:
                    self._idle(min(next_attempt - now, 0.2))
                    continue
                try:
                    client.connect(
                        self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                        clean_start=self.clean_start, properties=self._connect_props,
                    )
                    connect_started = time.monotonic()
                    _set_nodelay(client.socket())
                except (OSError, ssl.SSLError, ValueError) as e:
                    self.stats["connect_failures"] += 1
                    self.last_error = "cannot connect to %s:%d: %s" % (self.cfg.host, self.cfg.port, e)
                    delay = backoff.next_delay()
                    log.warning("%s; retrying in %.1f s", self.last_error, delay)
                    next_attempt = time.monotonic() + delay
                continue
            if not self.connected.is_set() and time.monotonic() - connect_started > max(10.0, self.cfg.keepalive_s):
                log.warning("no CONNACK from %s:%d; reconnecting", self.cfg.host, self.cfg.port)
                client.disconnect()
                next_attempt = time.monotonic() + backoff.next_delay()
                continue
            if self.connected.is_set():
                backoff.reset()
                self._drain_outgoing(client)
            self._drain_calls()
            wlist = [sock] if client.want_write() else []
            # TLS: bytes already decrypted into the SSL object's buffer do not make the socket readable.
            # loop_read stops after 100 packets; waiting in select then would stall the broker, which sends
            # nothing more until we acknowledge what is sitting in that buffer (a one-second stall per turn
            # under a flood of small messages).
            buffered = _tls_pending(sock)
            try:
                r, w, _ = select.select([sock, self._wake_r], wlist, [], 0.0 if buffered else 1.0)
            except (OSError, ValueError):
                r, w = [], []
            if self._wake_r in r:
                self._drain_wake()
            rc = mqtt.MQTT_ERR_SUCCESS
            if sock in r or buffered:
                rc = client.loop_read(100)
            if rc == mqtt.MQTT_ERR_SUCCESS and client.socket() is not None and (sock in w or client.want_write()):
                rc = client.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS and client.socket() is not None:
                rc = client.loop_misc()
            if rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                self.connected.clear()
                next_attempt = time.monotonic() + backoff.next_delay()
        self._shutdown(client)

    def _idle(self, seconds: float) -> None:
        try:
            r, _, _ = select.select([self._wake_r], [], [], seconds)
        except (OSError, ValueError):
            r = []
        if r:
            self._drain_wake()
        self._drain_calls()
        # While disconnected, publishes still queue (bounded); they fail only when the queue is full.

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _drain_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:  # a bad call must not kill the network thread
                log.exception("%s: deferred call failed", self.name)

    def _drain_outgoing(self, client, limit: int = 256) -> None:
        for _ in range(limit):
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            self._publish_now(client, item)

    def _publish_now(self, client, item: Outgoing) -> None:
        import paho.mqtt.client as mqtt

        try:
            info = client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain,
                                  properties=publish_properties(item))
        except (ValueError, TypeError) as e:
            self.stats["publish_failures"] += 1
            item.delivery._finish(False, str(e))
            return
        item.delivery.mid = info.mid
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.stats["publish_failures"] += 1
            item.delivery._finish(False, "paho queue full (max_queued_messages)")
            return
        self.stats["published"] += 1
        if item.qos == 0:
            ok = info.rc == mqtt.MQTT_ERR_SUCCESS
            item.delivery._finish(ok, None if ok else "not connected")
        else:
            # QoS 1, or queued by paho while the link is down: done when the PUBACK arrives.
            self._pending[info.mid] = item.delivery

    def _shutdown(self, client) -> None:
        deadline = self._stop_deadline or time.monotonic() + 5.0
        if client.socket() is not None and self.connected.is_set():
            self._drain_outgoing(client, limit=10000)
            if self._final is not None:
                self._publish_now(client, self._final)
            # Flush until everything QoS 1 is acknowledged or the deadline passes.
            while time.monotonic() < deadline and client.socket() is not None:
                if not self._pending and not client.want_write():
                    break
                sock = client.socket()
                wlist = [sock] if client.want_write() else []
                try:
                    r, _, _ = select.select([sock], wlist, [], 0.1)
                except (OSError, ValueError):
                    break
                if r:
                    client.loop_read(100)
                if client.socket() is not None and client.want_write():
                    client.loop_write()
            try:
                client.disconnect()
                if client.socket() is not None:
                    client.loop_write()
            except Exception:
                pass
        self.connected.clear()
        for d in list(self._pending.values()):
            d._finish(False, "session stopped")
        self._pending.clear()

    # ------------------------------------------------------------------------------------ callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if getattr(reason_code, "is_failure", False):
            self.stats["connect_failures"] += 1
            self.last_error = "broker refused the connection: %s" % reason_code
            log.warning("%s", self.last_error)
            return
        self.stats["connects"] += 1
        self.last_error = None
        with self._subs_lock:
            subs = list(self._subs)
        with self._suback_cond:
            self._subacks.clear()
            self._sub_mids.clear()
        for topic_filter, how, _ in subs:
            self._send_subscribe(client, topic_filter, how)
        self.connected.set()
        log.info("%s connected to %s:%d as %s", self.name, self.cfg.host, self.cfg.port, self.client_id)
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:  # a hook must not kill the network thread
                log.exception("%s: on-connect hook failed", self.name)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            self.stats["disconnects"] += 1
            # Our own clean stop is routine; anything else is worth a warning.
            (log.warning if self._running.is_set() else log.info)(
                "%s disconnected from %s:%d (%s)", self.name, self.cfg.host, self.cfg.port, reason_code)
        self.connected.clear()
        with self._suback_cond:
            self._subacks.clear()
            self._sub_mids.clear()

    def _send_subscribe(self, client, topic_filter: str, how: Tuple[int, bool]) -> None:
        mid = _subscribe(client, topic_filter, how)
        if mid is not None:
            with self._suback_cond:
                self._sub_mids[mid] = topic_filter

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._suback_cond:
            topic_filter = self._sub_mids.pop(mid, None)
            if topic_filter is None:
                return
            codes = list(reason_code_list or [])
            granted = bool(codes) and not any(getattr(rc, "is_failure", False) for rc in codes)
            self._subacks[topic_filter] = granted
            self._suback_cond.notify_all()
        if not granted:
            # An ACL that forbids a filter is silent otherwise: the handler simply never runs.
            self.stats["subscribe_refused"] += 1
            self.last_error = "broker refused the subscription to %s: %s" % (
                topic_filter, ", ".join(str(rc) for rc in codes) or "no reason code")
            log.warning("%s: %s", self.name, self.last_error)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        d = self._pending.pop(mid, None)
        if d is None:
            return
        if getattr(reason_code, "is_failure", False):
            self.stats["publish_failures"] += 1
            d._finish(False, "broker refused the publish: %s" % reason_code)
        else:
            d._finish(True)

    def _on_message(self, client, userdata, msg) -> None:
        self.stats["received"] += 1
        payload = msg.payload
        if len(payload) > self.max_inbound_bytes:
            self.stats["oversize_dropped"] += 1
            log.warning("dropped %d-byte message on %s (over %d bytes)", len(payload), msg.topic,
                        self.max_inbound_bytes)
            return
        inbound = inbound_from(msg)
        for topic_filter, handler in self._router.routes(msg.topic):
            try:
                handler(inbound)
            except Exception:  # a bad message must never crash the network thread
                self.stats["handler_errors"] += 1
                log.exception("%s: handler for %s failed", self.name, topic_filter)


def _tls_pending(sock) -> int:
    """Decrypted bytes waiting in an SSL socket's buffer (0 for a plain socket)."""
    pending = getattr(sock, "pending", None)
    try:
        return pending() if pending is not None else 0
    except (OSError, ValueError):
        return 0


def _subscribe(client, topic_filter: str, how: Tuple[int, bool]) -> Optional[int]:
    """Send SUBSCRIBE; the message id its SUBACK will carry (None when paho could not send it)."""
    qos, retain_as_published = how
    if retain_as_published:
        from paho.mqtt.subscribeoptions import SubscribeOptions

        rc, mid = client.subscribe(topic_filter, options=SubscribeOptions(qos=qos, retainAsPublished=True))
    else:
        rc, mid = client.subscribe(topic_filter, qos)
    return mid if rc == 0 else None


def _set_nodelay(sock) -> None:
    """Small messages (chunk requests, acks) must not wait for Nagle's algorithm."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass  # not a TCP socket (e.g. a unix socket) or already closed


def require_connected(session: MqttSession, timeout_s: float) -> None:
    """Wait for the first connection; a TransportError naming the broker and the reason otherwise."""
    if not session.wait_connected(timeout_s):
        raise TransportError(
            "could not connect to the MQTT broker at %s:%d within %.0f s%s"
            % (session.cfg.host, session.cfg.port, timeout_s, (": " + session.last_error) if session.last_error else "")
        )
