"""The chunk server: answers devices' fetch requests with raw bytes from the controller's bundle store.

A device's `ChunkRequest` on ``{p}/bundles/fetch`` names a bundle, a hash (the manifest's or one of its
files') and a range. The server answers only for bundles it stores and hashes that bundle names, only on
the requesting device's own chunks topic, and never more than `max_chunk_bytes` at a time. The answer is
the raw bytes with ``sha256``/``offset``/``length``/``total`` user properties; a refusal carries an
``error`` property and no bytes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Dict, Optional

from edge_agent.errors import BundleError
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import ChunkRequest, MessageError
from fleet.bundle_store import ControllerStore
from fleet.ratelimit import RateLimit

log = logging.getLogger(__name__)


class ChunkServer:
    """Answers fetch requests from the store. Requests are queued by the network thread and served by
    one worker thread (file reads never block the MQTT loop)."""

    def __init__(self, session: MqttSession, store: ControllerStore, *, prefix: str, cfg) -> None:
        self.session = session
        self.store = store
        self.prefix = prefix
        self.cfg = cfg
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rate = RateLimit(cfg.max_bytes_per_s)
        self._fds: Dict[str, int] = {}
        self.stats: Dict[str, int] = {"requests": 0, "served_bytes": 0, "refused": 0, "dropped": 0, "malformed": 0}

    def set_rate(self, bytes_per_s: Optional[int]) -> None:
        """Change the serving rate cap (None: unlimited)."""
        self._rate = RateLimit(bytes_per_s)

    def on_request(self, msg: Inbound) -> None:
        """Network-thread handler for ``{p}/bundles/fetch``."""
        try:
            self._q.put_nowait(msg)
        except queue.Full:
            self.stats["dropped"] += 1  # the device times out and asks again

    def start(self) -> None:
        """Start the worker."""
        self._thread = threading.Thread(target=self._run, name="chunk-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker and close open files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._q.get(timeout=0.2)
            except queue.Empty:
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
        expected_topic = topics.chunks(self.prefix, req.device_id)
        if msg.response_topic != expected_topic:
            # Never send bundle bytes anywhere but the requesting device's own chunks topic.
            self.stats["refused"] += 1
            log.warning("chunk request from %s with response topic %r refused", req.device_id, msg.response_topic)
            return
        props = {"sha256": req.sha256, "offset": str(req.offset), "length": str(req.length)}
        error = None
        total = 0
        try:
            allowed = self.store.allowed(req.bundle.name, req.bundle.version)
            if req.sha256 not in allowed:
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
        self._rate.take(req.length, self._stop)
        data = os.pread(self._fd(req.sha256), req.length, req.offset)
        props["total"] = str(total)
        props["length"] = str(len(data))
        self.session.publish(
            expected_topic, data, qos=1, user_properties=props, correlation_data=msg.correlation_data, block_s=5.0
        )
        self.stats["served_bytes"] += len(data)

    def _fd(self, sha256: str) -> int:
        fd = self._fds.get(sha256)
        if fd is None:
            if len(self._fds) > 64:
                for old in list(self._fds.values()):
                    os.close(old)
                self._fds.clear()
            fd = os.open(str(self.store.object_path(sha256)), os.O_RDONLY)
            self._fds[sha256] = fd
        return fd
