"""The chunk server: answers devices' fetch requests with raw bytes from the controller's bundle store.

A device's `ChunkRequest` on its own ``{p}/devices/{id}/fetch`` names a bundle, a hash (the manifest's or
one of its files') and a range. The broker lets only device `{id}` publish on that topic, so the requester
is the topic's id: a request whose payload names another device is refused (`impersonation`, logged once
per sender every `IMPERSONATION_LOG_INTERVAL_S`). The server answers only for bundles it stores and hashes
that bundle names, only for a bundle a deploy command was sent to that device for
(`fleet/entitlements.py`), only on the requesting device's own chunks topic, and never more than
`max_chunk_bytes` at a time. The answer is the raw bytes
with ``sha256``/``offset``/``length``/``total`` user properties; a refusal carries an ``error`` property
and no bytes.

Bounded against a flood from one device: requests over `max_request_bytes` are dropped before parsing;
each device (named by the topic it published on) has a request rate
(`device_requests_per_s`) and its own share of the queue (`device_queue`), served in turn with the other
devices' (`FairQueue`); and at most `max_inflight_bytes` of chunks wait for the broker's acknowledgement
(back-pressure: the worker waits, then drops the request; the device asks again).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Callable, Deque, Dict, Optional, Tuple

from edge_agent.errors import BundleError
from edge_agent.mqtt.packets import Delivery, Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import ChunkRequest, MessageError
from fleet.bundle_store import ControllerStore
from fleet.fairqueue import FairQueue
from fleet.ratelimit import KeyedRate, RateLimit

#: (device id, bundle name, version) -> may this device fetch this bundle?
Entitled = Callable[[str, str, int], bool]

#: Seconds between two log lines about one device naming another in its fetch requests (each is counted).
IMPERSONATION_LOG_INTERVAL_S = 60.0
#: At most this many senders remembered for that log throttle (the oldest is forgotten first).
IMPERSONATION_LOG_DEVICES = 4096

log = logging.getLogger(__name__)


class ChunkServer:
    """Answers fetch requests from the store. Requests are queued by the network thread and served by
    one worker thread (file reads never block the MQTT loop)."""

    def __init__(self, session: MqttSession, store: ControllerStore, *, prefix: str, cfg, entitled: Entitled) -> None:
        self.session = session
        self.store = store
        self.prefix = prefix
        self.cfg = cfg
        self.entitled = entitled
        self._q = FairQueue(per_key=cfg.device_queue, total=cfg.queue)
        self._device_rate = KeyedRate(cfg.device_requests_per_s, cfg.device_request_burst)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rate = RateLimit(cfg.max_bytes_per_s)
        self._fds: Dict[str, int] = {}
        self._inflight: Deque[Tuple[Delivery, int]] = collections.deque()
        self._inflight_bytes = 0
        self.stats: Dict[str, int] = {
            "requests": 0, "served_bytes": 0, "refused": 0, "dropped": 0, "malformed": 0, "oversize": 0,
            "rate_limited": 0, "not_entitled": 0, "busy_dropped": 0, "impersonation": 0,
        }
        self._impersonation_logged: collections.OrderedDict[str, float] = collections.OrderedDict()

    def set_rate(self, bytes_per_s: Optional[int]) -> None:
        """Change the serving rate cap (None: unlimited)."""
        self._rate = RateLimit(bytes_per_s)

    def on_request(self, msg: Inbound) -> None:
        """Network-thread handler for ``{p}/devices/+/fetch``: size, rate and queue share (of the device the
        topic names: the broker lets only that device publish there) are checked here, before parsing."""
        if len(msg.payload) > self.cfg.max_request_bytes:
            self.stats["oversize"] += 1
            return
        sender = self.sender(msg.topic)
        if sender is None or not msg.response_topic:
            self.stats["malformed"] += 1
            return
        if not self._device_rate.allow(sender):
            self.stats["rate_limited"] += 1
            return
        if not self._q.put(sender, msg):
            self.stats["dropped"] += 1  # the device times out and asks again

    def sender(self, topic: str) -> Optional[str]:
        """The device id of a ``{p}/devices/{id}/fetch`` topic (None for any other topic)."""
        parsed = topics.parse_device_topic(self.prefix, topic)
        if parsed is None or parsed[1] != "fetch":
            return None
        return parsed[0]

    def _impersonation(self, sender: str, named: str) -> None:
        """Count a request from `sender` naming `named`; log it at most once per sender per interval."""
        self.stats["impersonation"] += 1
        now = time.monotonic()
        last = self._impersonation_logged.get(sender)
        if last is not None and now - last < IMPERSONATION_LOG_INTERVAL_S:
            return
        self._impersonation_logged[sender] = now
        self._impersonation_logged.move_to_end(sender)
        while len(self._impersonation_logged) > IMPERSONATION_LOG_DEVICES:
            self._impersonation_logged.popitem(last=False)
        log.warning("device %s sent fetch requests naming device %s; refused (%d such requests so far)",
                    sender, named, self.stats["impersonation"])

    def start(self) -> None:
        """Start the worker."""
        self._thread = threading.Thread(target=self._run, name="chunk-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker and close open files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._close_fds()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._q.get(timeout_s=0.2)
            if msg is None:
                self._close_fds()  # nothing waiting: a bounded store may evict what we served
                continue
            try:
                self.serve(msg)
            except Exception:  # one bad request must not stop the server
                log.exception("chunk request failed")

    def serve(self, msg: Inbound) -> None:
        """Answer one request (or drop it when it cannot be answered safely)."""
        self.stats["requests"] += 1
        try:
            req = ChunkRequest.from_json(msg.payload, max_bytes=4096)
        except MessageError as e:
            self.stats["malformed"] += 1
            log.warning("malformed chunk request: %s", e)
            return
        sender = self.sender(msg.topic)
        if sender is None:
            self.stats["malformed"] += 1
            return
        if req.device_id != sender:
            # The payload names another device: its entitlements and rate share are not the sender's to use.
            self._impersonation(sender, req.device_id)
            return
        expected_topic = topics.chunks(self.prefix, sender)
        if msg.response_topic != expected_topic:
            # Never send bundle bytes anywhere but the requesting device's own chunks topic.
            self.stats["refused"] += 1
            log.warning("chunk request from %s with response topic %r refused", sender, msg.response_topic)
            return
        props = {"sha256": req.sha256, "offset": str(req.offset), "length": str(req.length)}
        error = None
        total = 0
        try:
            allowed = self.store.allowed(req.bundle.name, req.bundle.version)
            if not self.entitled(req.device_id, req.bundle.name, req.bundle.version):
                # The same answer as for a bundle the controller does not hold: nothing learnt by asking.
                self.stats["not_entitled"] += 1
                error = "bundle %s v%d is not available to %s" % (req.bundle.name, req.bundle.version, req.device_id)
            elif req.sha256 not in allowed:
                error = "bundle %s v%d has no file %s" % (req.bundle.name, req.bundle.version, req.sha256[:12])
            else:
                total = allowed[req.sha256]
                if req.length > self.cfg.max_chunk_bytes:
                    error = "chunk of %d bytes is over the server's %d" % (req.length, self.cfg.max_chunk_bytes)
                elif req.offset + req.length > total:
                    error = "range %d+%d is past the end (%d)" % (req.offset, req.length, total)
        except (BundleError, OSError) as e:
            error = str(e)
        if error is not None:
            self.stats["refused"] += 1
            props["error"] = error
            self.session.publish(
                expected_topic, b"", qos=1, user_properties=props, correlation_data=msg.correlation_data
            )
            return
        if not self._make_room(req.length):
            self.stats["busy_dropped"] += 1  # the device times out and asks again
            return
        self._rate.take(req.length, self._stop)
        data = os.pread(self._fd(req.sha256), req.length, req.offset)
        self.store.touch(req.sha256)
        props["total"] = str(total)
        props["length"] = str(len(data))
        d = self.session.publish(
            expected_topic, data, qos=1, user_properties=props, correlation_data=msg.correlation_data, block_s=5.0
        )
        self._inflight.append((d, len(data)))
        self._inflight_bytes += len(data)
        self.stats["served_bytes"] += len(data)

    def _make_room(self, n: int) -> bool:
        """Wait (at most `send_timeout_s`) until `n` more bytes fit under `max_inflight_bytes` of chunks not
        yet acknowledged by the broker; False when they do not."""
        deadline = time.monotonic() + self.cfg.send_timeout_s
        while True:
            while self._inflight and self._inflight[0][0].done:
                self._inflight_bytes -= self._inflight.popleft()[1]
            if not self._inflight or self._inflight_bytes + n <= self.cfg.max_inflight_bytes:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                return False
            self._inflight[0][0].wait(min(left, 0.2))

    def _fd(self, sha256: str) -> int:
        fd = self._fds.get(sha256)
        if fd is None:
            if len(self._fds) > 64:
                self._close_fds()
            fd = self.store.open_object(sha256)
            self._fds[sha256] = fd
        return fd

    def _close_fds(self) -> None:
        """Give back every open object (the worker's; it keeps them open while requests keep coming)."""
        for sha256, fd in list(self._fds.items()):
            self.store.release_object(sha256, fd)
        self._fds.clear()
