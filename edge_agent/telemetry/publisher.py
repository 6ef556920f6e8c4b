"""The periodic telemetry loop and the one outgoing path for telemetry and events.

One thread owns the path: every `period_s` it builds a `Telemetry` and hands it, with any events
submitted meanwhile, to the agent's `publish(topic, payload, qos) -> bool` (False: not connected or
not delivered). What cannot be published goes to the disk `Spool`; while the spool holds anything,
new messages queue behind it, so after a reconnect everything leaves in the order it was made.

`submit()` never blocks the caller (deploy thread, HTTP handlers): messages wait in a bounded
in-memory queue; if the publishing thread is stuck long enough to fill it, further messages are
dropped and counted in the same `spool_dropped` figure that telemetry reports.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from edge_agent.config import TelemetryConfig
from edge_agent.errors import ResourceError
from edge_agent.protocol import topics
from edge_agent.protocol.messages import Message, Telemetry
from edge_agent.telemetry.builder import TelemetryBuilder
from edge_agent.telemetry.metrics import Counters
from edge_agent.telemetry.prometheus import render_prometheus
from edge_agent.telemetry.spool import Spool
from edge_agent.telemetry.system_collector import SystemCollector

logger = logging.getLogger(__name__)

PublishFn = Callable[[str, bytes, int], bool]
COUNTERS = ("published", "spooled", "flushed", "publish_failures", "queue_dropped", "telemetry_built")


class TelemetryPublisher:
    """Builds telemetry every period and publishes it and submitted events, spooling while offline."""

    def __init__(
        self,
        *,
        builder: TelemetryBuilder,
        get_stats: Callable[[], Optional[Dict[str, Any]]],
        publish: PublishFn,
        spool: Spool,
        telemetry_topic: str,
        period_s: float,
        qos: int = 0,
        flush_batch: int = 50,
        retry_s: Optional[float] = None,
        max_pending: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        self.builder = builder
        self._get_stats = get_stats
        self._publish = publish
        self.spool = spool
        self.topic = telemetry_topic
        self.period_s = period_s
        self.qos = qos
        self._flush_batch = max(1, flush_batch)
        self._retry_s = retry_s if retry_s is not None else min(period_s, 5.0)
        self._max_pending = max(1, max_pending)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: Deque[Tuple[str, bytes, int]] = collections.deque()
        self._io_lock = threading.Lock()  # one pump at a time (loop thread, tick(), stop())
        self._stop = False
        self._wake = False
        self._retry_at = 0.0
        self._thread: Optional[threading.Thread] = None
        self.counters = Counters(COUNTERS)
        self.latest: Optional[Telemetry] = None
        self.collector: Optional[SystemCollector] = None  # closed by stop() when set
        self._listeners: List[Callable[[Dict[str, Any]], None]] = []

    # ------------------------------------------------------------------------------------------ public

    def dropped(self) -> int:
        """Messages lost so far: dropped by the full spool plus by the full in-memory queue."""
        return self.spool.dropped + self.counters.get("queue_dropped")

    def submit(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Queue any message (events) for the same ordered path; never blocks."""
        with self._cond:
            if len(self._pending) >= self._max_pending:
                self.counters.inc("queue_dropped")
                logger.warning("outgoing queue full (%d); dropped a message for %s", self._max_pending, topic)
                return
            self._pending.append((topic, bytes(payload), qos))
            self._cond.notify()

    def submit_message(self, topic: str, msg: Message, qos: int = 1) -> None:
        """`submit()` a wire message as JSON."""
        self.submit(topic, msg.to_json(), qos)

    def add_stats_listener(self, fn: Callable[[Dict[str, Any]], None]) -> None:
        """Also hand each period's runtime stats to `fn` (e.g. `Probation.observe`), so the runtime's
        period counters are read, and reset, by one consumer only."""
        self._listeners.append(fn)

    def remove_stats_listener(self, fn: Callable[[Dict[str, Any]], None]) -> None:
        """Stop handing stats to `fn` (no error if it was not added)."""
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    def notify_connected(self) -> None:
        """The broker is reachable again: flush the spool now instead of at the next retry."""
        with self._cond:
            self._retry_at = 0.0
            self._wake = True
            self._cond.notify()

    def start(self) -> None:
        """Start the loop thread; the first telemetry goes out at once, then every period."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop; whatever is still queued is published if possible, else spooled."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("telemetry thread did not stop within %.1f s", timeout_s)
            self._thread = None
        with self._io_lock:
            self._drain_pending(allow_publish=True)
        self.spool.close()
        if self.collector is not None:
            self.collector.close()

    def metrics_text(self) -> str:
        """Prometheus text of the latest telemetry (with running totals), for the local /metrics endpoint."""
        t = self.latest
        if t is None:
            return ""
        return render_prometheus(t, totals=self.builder.totals())

    def tick(self) -> Telemetry:
        """Build one telemetry message now and run one publish/flush pass (the loop does this every period)."""
        t = self._build()
        self.pump()
        return t

    def pump(self) -> None:
        """Flush the spool (if it is time) and then the queued messages, in order."""
        with self._io_lock:
            self._flush_spool()
            self._drain_pending(allow_publish=True)

    # ------------------------------------------------------------------------------------------ internals

    def _build(self) -> Telemetry:
        try:
            stats = self._get_stats()
        except Exception as e:
            logger.warning("runtime statistics failed: %s", e)
            stats = None
        if stats:
            for fn in list(self._listeners):
                try:
                    fn(stats)
                except Exception as e:
                    logger.warning("stats listener %r failed: %s", fn, e)
        t = self.builder.build(stats)
        self.latest = t
        self.counters.inc("telemetry_built")
        with self._cond:
            if len(self._pending) >= self._max_pending:
                self.counters.inc("queue_dropped")
            else:
                self._pending.append((self.topic, t.to_json(), self.qos))
        return t

    def _run(self) -> None:
        next_due = self._clock()
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self._wake:
                    timeout = next_due - self._clock()
                    if len(self.spool) and self._retry_at:
                        timeout = min(timeout, self._retry_at - self._clock())
                    if timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stop:
                    return
                self._wake = False
            try:
                now = self._clock()
                if now >= next_due:
                    self._build()
                    next_due += self.period_s
                    if next_due <= now:  # fell behind (suspend, slow flush): do not burst
                        next_due = now + self.period_s
                self.pump()
            except Exception:  # the loop must outlive any bug in one pass
                logger.exception("telemetry loop pass failed")
                time.sleep(min(1.0, self.period_s))

    def _send(self, topic: str, payload: bytes, qos: int) -> bool:
        try:
            ok = bool(self._publish(topic, payload, qos))
        except Exception as e:
            logger.warning("publish to %s failed: %s", topic, e)
            ok = False
        if not ok:
            self.counters.inc("publish_failures")
            self._retry_at = self._clock() + self._retry_s
        return ok

    def _flush_spool(self) -> None:
        if not len(self.spool) or self._clock() < self._retry_at:
            return
        sent = 0
        while not self._stop:
            batch = self.spool.peek(self._flush_batch)
            if not batch:
                break
            last = None
            for m in batch:
                if not self._send(m.topic, m.payload, m.qos):
                    break
                last = m.seq
            if last is not None:
                sent += self.spool.ack(last)
            if last is None or last != batch[-1].seq:
                break
        if sent:
            self.counters.inc("flushed", sent)
            logger.info("flushed %d spooled message(s); %d left, %d dropped while offline",
                        sent, len(self.spool), self.dropped())

    def _drain_pending(self, *, allow_publish: bool) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    return
                topic, payload, qos = self._pending.popleft()
            if allow_publish and not len(self.spool) and self._clock() >= self._retry_at:
                if self._send(topic, payload, qos):
                    self.counters.inc("published")
                    continue
            self._to_spool(topic, payload, qos)

    def _to_spool(self, topic: str, payload: bytes, qos: int) -> None:
        try:
            self.spool.append(topic, payload, qos)
            self.counters.inc("spooled")
        except ResourceError as e:
            self.counters.inc("queue_dropped")
            logger.warning("%s; message for %s dropped", e, topic)


def create_publisher(
    cfg: TelemetryConfig,
    *,
    device_id: str,
    prefix: str,
    spool_dir: Path,
    publish: PublishFn,
    get_stats: Callable[[], Optional[Dict[str, Any]]],
    bundle: Callable[[], Any] = lambda: None,
    engine: Callable[[], Optional[Dict[str, Any]]] = lambda: None,
    malformed: Callable[[], int] = lambda: 0,
    handler_errors: Callable[[], int] = lambda: 0,
    worker_errors: Callable[[], int] = lambda: 0,
    started_at: Optional[float] = None,
) -> TelemetryPublisher:
    """Wire collector, builder, spool and publisher from the `[telemetry]` config section.

    Raises ResourceError when the spool directory cannot be used.
    """
    collector = SystemCollector(use_jtop=cfg.use_jtop, jtop_interval_s=cfg.jtop_interval_s,
                                jtop_retry_s=cfg.jtop_retry_s, nvidia_smi_timeout_s=cfg.nvidia_smi_timeout_s)
    spool = Spool(spool_dir, cfg.spool_max_messages, max_bytes=cfg.spool_max_bytes)
    holder: List[TelemetryPublisher] = []
    builder = TelemetryBuilder(
        device_id, system=collector.collect, bundle=bundle, engine=engine, malformed=malformed,
        handler_errors=handler_errors, worker_errors=worker_errors,
        spool_dropped=lambda: holder[0].dropped() if holder else spool.dropped, started_at=started_at,
    )
    pub = TelemetryPublisher(
        builder=builder, get_stats=get_stats, publish=publish, spool=spool,
        telemetry_topic=topics.telemetry(prefix, device_id), period_s=cfg.period_s, qos=cfg.qos,
        flush_batch=cfg.flush_batch, max_pending=cfg.max_pending,
    )
    pub.collector = collector
    holder.append(pub)
    return pub


def session_publish(session: Any, *, timeout_s: float = 5.0) -> PublishFn:
    """Adapt the agent's `MqttSession` to `publish(topic, payload, qos) -> bool`.

    False while the session is not connected (so the message is spooled rather than left in paho's
    offline queue), and False when the write (QoS 0) or the PUBACK (QoS 1) does not come in `timeout_s`.
    """

    def publish(topic: str, payload: bytes, qos: int) -> bool:
        if not session.connected.is_set():
            return False
        return bool(session.publish(topic, payload, qos=qos).wait(timeout_s))

    return publish
