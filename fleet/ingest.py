"""Ingest of device status, telemetry and events into the registry (and on to the rollout runner).

`Ingest.handle(topic, payload)` processes one message from the device subscriptions. It never raises:
a payload that does not parse, names another device than its topic, or arrives on an unknown topic is
logged (rate-limited) and counted. Status and events are
written at once (they are rare and drive rollouts); telemetry is kept per device in memory and
written in one batch by `flush()` (the controller calls it every few seconds), so a large fleet's
telemetry costs one transaction per interval, not one per message.

The MQTT network thread only hands messages over (`submit`: a deque append, no lock, a wake-up only
when the worker sleeps): parsing runs on the ingest worker thread, in batches, so the network thread
keeps reading (RPC requests stay answerable) however busy ingest is. The hand-over is bounded: status
and events (which drive rollouts) have their own queue and are taken first; when the telemetry queue is
full, new telemetry is shed and counted (`dropped`, in `controller.status`), never buffered without
limit and never lost without a count. Before that, per message and before anything is parsed: a
message over `max_payload_bytes` is dropped (`oversize`), each device has a message rate over all its
channels (`device_rate_per_s`, burst `device_burst`; over it: `rate_limited`), and the queues together
hold at most `max_backlog_bytes`.

Telemetry, the bulk of the traffic, is validated by pydantic's JSON validator (`parse_telemetry`:
one pass in pydantic-core, about five times cheaper than decoding to Python objects and validating
those), bounded first: at most `max_telemetry_bytes`, no NaN/Infinity tokens; pydantic-core limits
nesting depth and integer length itself. Duplicate keys are not refused there (the last one counts) — telemetry is
informational and unsigned; status and events, which drive rollouts, keep the strict loader.

Telemetry history: every flush also keeps one point per device per `history_interval_s` (the first
summary of each interval) in ``telemetry_history``, and removes points older than
`history_retention_s`; `fleet telemetry --history` and the ``telemetry.history`` RPC read it.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.protocol import topics
from edge_agent.protocol.messages import Event, MessageError, Status, Telemetry
from fleet.ratelimit import KeyedRate
from fleet.registry import BOOT_SLACK_S, Registry
from fleet.telemetry_fast import summary_json
from fleet.telemetry_view import HealthPolicy, health_of, parse_telemetry, telemetry_summary

log = logging.getLogger(__name__)

CHANNELS = ("status", "telemetry", "events")
# A device id in a topic, as edge_agent.protocol.topics.parse_device_topic checks it.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Devices whose shed telemetry is noted one by one (beyond: counted in the totals only).
MAX_SHED_DEVICES = 200000


def _merge_run(acct: Dict[str, List[Any]], device_id: str, run: List[Any]) -> None:
    """Fold one device's [boot, seq min, seq max, count] into `acct`: a later run replaces an earlier
    one, an earlier run's late messages are ignored, the same run is combined."""
    a = acct.get(device_id)
    if a is None or run[0] > a[0] + BOOT_SLACK_S:
        acct[device_id] = list(run)
    elif run[0] >= a[0] - BOOT_SLACK_S:
        a[1] = min(a[1], run[1])
        a[2] = max(a[2], run[2])
        a[3] += run[3]


class Ingest:
    """Parses device messages, updates the registry, and hands status/events to a listener."""

    def __init__(
        self,
        registry: Registry,
        *,
        prefix: str = topics.DEFAULT_PREFIX,
        on_status: Optional[Callable[[Status], None]] = None,
        on_event: Optional[Callable[[Event], None]] = None,
        health: Optional[HealthPolicy] = None,
        max_payload_bytes: int = 1 << 20,
        max_telemetry_bytes: int = 64 << 10,
        max_backlog: int = 20000,
        max_backlog_bytes: int = 32 << 20,
        device_rate_per_s: float = 20.0,
        device_burst: int = 200,
        history_interval_s: float = 300.0,
        history_retention_s: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.on_status = on_status
        self.on_event = on_event
        self.health = health if health is not None else HealthPolicy()
        self.max_payload_bytes = max_payload_bytes
        self.max_telemetry_bytes = min(max_telemetry_bytes, max_payload_bytes)
        self.history_interval_s = history_interval_s
        self.history_retention_s = history_retention_s
        self._history_bucket: Dict[str, int] = {}
        self._next_prune = 0.0
        self.clock = clock
        self._lock = threading.Lock()
        # Newest validated telemetry per device since the last flush; summarised only when written.
        self._pending: Dict[str, Telemetry] = {}
        # Per device since the last flush: [boot time, lowest seq, highest seq, messages] of its current
        # run (the registry sums these over controllers to count telemetry that reached none).
        self._acct: Dict[str, List[Any]] = {}
        self._batch_acct: Dict[str, List[Any]] = {}
        self.received: Dict[str, int] = {c: 0 for c in CHANNELS}
        self.malformed: Dict[str, int] = {c: 0 for c in (*CHANNELS, "topic")}
        self.listener_errors = 0
        self.last_error = ""
        self.last_message_at: Optional[float] = None
        self._last_log = 0.0
        self.max_backlog = max_backlog
        self._cv = threading.Condition()
        self._q_control: collections.deque = collections.deque()
        self.oversize = 0
        self.rate_limited = 0
        self.max_backlog_bytes = max_backlog_bytes
        # Queued bytes = _bytes_in - _bytes_out; each counter is written by one thread only (network thread,
        # worker), so the lock-free hand-over stays race-free.
        self._bytes_in = 0
        self._bytes_out = 0
        self._rate = KeyedRate(device_rate_per_s, device_burst)
        # Telemetry shed here per device (network thread only), so the registry's count of telemetry lost
        # before any controller does not include what this controller received and shed (counted apart).
        self._shed_dev: Dict[str, int] = {}
        self._shed_flushed: Dict[str, int] = {}
        self._dev_head = prefix + "/devices/"
        self._q_telemetry: collections.deque = collections.deque()
        self.dropped: Dict[str, int] = {c: 0 for c in CHANNELS}
        self._stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._busy = False
        self._idle = False
        #: The report connection's counters (`fleet.ingest_link.IngestLink.stats`), when it has its own.
        self.link_stats: Optional[Dict[str, int]] = None
        #: Largest batch the worker takes from a queue at once.
        self.batch = 256

    # ---------------------------------------------------------------------------------- worker

    def start(self) -> None:
        """Start the worker thread that processes what `submit` queues."""
        if self._worker is not None:
            return
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="fleet-ingest", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Process what is queued (up to `timeout_s`), then stop the worker."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout_s)
            self._worker = None

    def submit(self, topic: str, payload: bytes) -> None:
        """Queue one message for the worker (called from the MQTT network thread; never blocks).

        deque appends are atomic, so the network thread takes no lock per message; it wakes the worker
        only when the worker is idle (the worker sets `_idle` under the condition before it re-checks
        the queues and waits, so no wake-up is lost). Size, the sending device's rate and the byte bound
        are checked first, before anything is parsed."""
        if len(payload) > self.max_payload_bytes:
            self.oversize += 1
            self._shed(topic)
            return
        # One budget per device for all its channels (the topic names the device; the broker lets a
        # device publish only under its own id).
        if not self._rate.allow(topic.rsplit("/", 1)[0]):
            self.rate_limited += 1
            self._shed(topic)
            return
        self._enqueue(topic, payload)
        self._wake()

    def submit_batch(self, items: List[Tuple[str, bytes]]) -> None:
        """`submit` for each (topic, payload) of one read of the report connection (`fleet.ingest_link`):
        the same checks in the same order, the rate limit taken for the whole batch at once."""
        limit = self.max_payload_bytes
        allowed = self._rate.allow_batch([t.rsplit("/", 1)[0] if len(p) <= limit else None for t, p in items])
        enqueue = self._enqueue
        for (topic, payload), ok in zip(items, allowed):
            if ok:
                enqueue(topic, payload)
                continue
            if len(payload) > limit:
                self.oversize += 1
            else:
                self.rate_limited += 1
            self._shed(topic)
        self._wake()

    def _wake(self) -> None:
        """Wake the worker if it sleeps (it sets `_idle` under the condition, then looks at the queues
        once more before waiting, so a wake-up after the appends is never lost)."""
        if self._idle:
            with self._cv:
                self._cv.notify()

    def _enqueue(self, topic: str, payload: bytes) -> None:
        """Queue one message that passed the size and rate checks (bounded: shed and counted beyond)."""
        channel = "telemetry" if topic.endswith("/telemetry") else "events" if topic.endswith("/events") else "status"
        if self._bytes_in - self._bytes_out + len(payload) > self.max_backlog_bytes:
            self.dropped[channel] += 1
            self._shed(topic)
            return
        if channel == "telemetry":
            if len(self._q_telemetry) >= self.max_backlog:
                self.dropped["telemetry"] += 1
                self._shed(topic)
                return
            self._q_telemetry.append((topic, payload))
        else:
            # Status and events drive rollouts: a much larger bound, and taken first.
            if len(self._q_control) >= 10 * self.max_backlog:
                self.dropped[channel] += 1
                return
            self._q_control.append((topic, payload))
        self._bytes_in += len(payload)

    def _shed(self, topic: str) -> None:
        """Note a shed telemetry message against its device (when the topic names one)."""
        if topic.endswith("/telemetry") and topic.startswith(self._dev_head):
            device_id = topic[len(self._dev_head):-10]
            shed = self._shed_dev
            if device_id in shed or len(shed) < MAX_SHED_DEVICES:
                shed[device_id] = shed.get(device_id, 0) + 1

    def _shed_since_flush(self, acct: Dict[str, List[Any]]) -> None:
        """Add each device's telemetry shed here since the last flush to its run's message count, so the
        registry counts as lost upstream only what reached no controller (devices without a run in
        `acct` keep theirs for a later flush)."""
        for device_id, n in list(self._shed_dev.items()):
            a = acct.get(device_id)
            done = self._shed_flushed.get(device_id, 0)
            if a is not None and n > done:
                a[3] += n - done
                self._shed_flushed[device_id] = n

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything submitted so far was processed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._q_control or self._q_telemetry or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._q_control and not self._q_telemetry:
                    self._busy = False
                    self._cv.notify_all()
                    if self._stop.is_set():
                        return
                    self._idle = True
                    if not self._q_control and not self._q_telemetry:
                        self._cv.wait(0.2)
                    self._idle = False
                self._busy = True
            self._work_batch()

    def _work_batch(self) -> None:
        """Handle up to `batch` messages, status and events first; telemetry reaches `_pending` in one
        locked update per batch."""
        q = self._q_control if self._q_control else self._q_telemetry
        items = []
        for _ in range(self.batch):
            try:
                items.append(q.popleft())
            except IndexError:
                break
        self._bytes_out += sum(len(p) for _, p in items)
        if q is self._q_control:
            for item in items:
                self.handle(*item)
            return
        # Straight into what `flush` takes (the lock is contended only by a flush swapping them out).
        with self._lock:
            self._telemetry_batch(items, self._pending, self._acct)
            if self._batch_acct:  # messages that went through `handle`
                acct, self._batch_acct = self._batch_acct, {}
                for d, a in acct.items():
                    _merge_run(self._acct, d, a)

    # ---------------------------------------------------------------------------------- handling

    def _telemetry_batch(self, items: List[Tuple[str, bytes]], latest: Dict[str, Any],
                         acct: Dict[str, List[Any]]) -> None:
        """`handle` for a batch of telemetry, with the per-message work kept to the parse and the run
        accounting (the same checks and counters; anything unusual goes through `handle`)."""
        head, cut = self._dev_head, len(self._dev_head)
        max_bytes, valid_id = self.max_telemetry_bytes, _DEVICE_ID.match
        taken = 0
        for topic, payload in items:
            device_id = topic[cut:-10]
            if not (topic.startswith(head) and topic.endswith("/telemetry")) or "/" in device_id \
                    or not valid_id(device_id):
                self.handle(topic, payload, into=latest)
                continue
            taken += 1
            try:
                t = parse_telemetry(payload, max_bytes=max_bytes)
                if t.device_id != device_id:
                    self._check_sender(device_id, t.device_id, "telemetry")
            except MessageError as e:
                self._bad("telemetry", "telemetry from %s: %s" % (device_id, e))
                continue
            except Exception as e:  # one message's failure must not end the worker
                self.listener_errors += 1
                self.last_error = "telemetry from %s: %s" % (device_id, e)
                log.exception("handling telemetry from %s failed", device_id)
                continue
            latest[device_id] = t
            seq, boot = t.seq, t.ts - t.uptime_s
            a = acct.get(device_id)
            if a is None or boot > a[0] + BOOT_SLACK_S:
                acct[device_id] = [boot, seq, seq, 1]
            elif boot >= a[0] - BOOT_SLACK_S:
                if seq < a[1]:
                    a[1] = seq
                elif seq > a[2]:
                    a[2] = seq
                a[3] += 1
        if taken:
            self.received["telemetry"] += taken
            self.last_message_at = time.time()

    def subscriptions(self, share_group: Optional[str] = "fleet") -> Tuple[str, ...]:
        """Topic filters to subscribe. Telemetry and events go through MQTT 5 shared subscriptions when
        `share_group` is set (each message to one controller of the group). Status stays a plain
        subscription: MQTT 5 says a server does not send *retained* messages to shared subscriptions
        (mosquitto 2.0 does anyway; EMQX and HiveMQ follow the spec), and the retained status is how a
        (re)started controller learns every device's state. Status is low-rate and idempotent."""
        out = [topics.all_devices(self.prefix, "status")]
        for c in ("telemetry", "events"):
            f = topics.all_devices(self.prefix, c)
            out.append("$share/%s/%s" % (share_group, f) if share_group else f)
        return tuple(out)

    def handle(self, topic: str, payload: bytes, *, into: Optional[Dict[str, Telemetry]] = None) -> None:
        """Process one message; never raises. `into`: where the worker gathers a batch's telemetry."""
        parsed = topics.parse_device_topic(self.prefix, topic)
        if parsed is None or parsed[1] not in CHANNELS:
            self._bad("topic", "unexpected topic %r" % topic)
            return
        device_id, channel = parsed
        self.received[channel] += 1
        self.last_message_at = time.time()
        if channel == "status" and not payload:
            return  # a retained status being cleared (device decommissioned)
        try:
            if channel == "telemetry":
                self._telemetry(device_id, payload, into)
            elif channel == "status":
                self._status(device_id, payload)
            else:
                self._event(device_id, payload)
        except MessageError as e:
            self._bad(channel, "%s from %s: %s" % (channel, device_id, e))
        except Exception as e:  # a registry or listener failure must not kill the MQTT thread
            self.listener_errors += 1
            self.last_error = "%s from %s: %s" % (channel, device_id, e)
            log.exception("handling %s from %s failed", channel, device_id)

    def _bad(self, channel: str, reason: str) -> None:
        self.malformed[channel] += 1
        self.last_error = reason
        now = time.monotonic()
        if now - self._last_log > 5.0:
            self._last_log = now
            log.warning("malformed message (%d so far): %s", sum(self.malformed.values()), reason)

    def _check_sender(self, device_id: str, claimed: str, channel: str) -> None:
        if claimed != device_id:
            raise MessageError("%s payload names device %r but came on the topic of %r" % (channel, claimed, device_id))

    def _telemetry(self, device_id: str, payload: bytes, into: Optional[Dict[str, Telemetry]] = None) -> None:
        t = parse_telemetry(payload, max_bytes=self.max_telemetry_bytes)
        self._check_sender(device_id, t.device_id, "telemetry")
        run = [t.ts - t.uptime_s, t.seq, t.seq, 1]
        if into is not None:
            into[device_id] = t
            _merge_run(self._batch_acct, device_id, run)
            return
        with self._lock:
            self._pending[device_id] = t
            _merge_run(self._acct, device_id, run)

    def _status(self, device_id: str, payload: bytes) -> None:
        s = Status.from_json(payload, max_bytes=self.max_payload_bytes)
        self._check_sender(device_id, s.device_id, "status")
        now = self.clock()
        self.registry.record_status(s.to_dict(), now=now)
        if self.on_status is not None:
            self.on_status(s)

    def _event(self, device_id: str, payload: bytes) -> None:
        ev = Event.from_json(payload, max_bytes=self.max_payload_bytes)
        self._check_sender(device_id, ev.device_id, "events")
        self.registry.record_event(
            device_id,
            {
                "kind": ev.kind,
                "level": ev.level,
                "message": ev.message,
                "ts": ev.ts,
                "bundle": ev.bundle.model_dump() if ev.bundle else None,
                "rollout_id": ev.rollout_id,
            },
            now=self.clock(),
        )
        if self.on_event is not None:
            self.on_event(ev)

    # ------------------------------------------------------------------------------------ flushing

    def flush(self) -> int:
        """Write the telemetry summaries gathered since the last flush; returns how many devices."""
        with self._lock:
            batch, self._pending = self._pending, {}
            acct, self._acct = self._acct, {}
        if not batch:
            return 0
        self._shed_since_flush(acct)
        try:
            rows = [(d, t.ts, telemetry_summary(t), health_of(t, self.health), acct.get(d)) for d, t in batch.items()]
            # The summaries' JSON text made here in one fast pass (the registry takes text as it is).
            n = self.registry.record_telemetry([(r[0], r[1], summary_json(r[2]), r[3], r[4]) for r in rows],
                                               now=self.clock())
        except Exception as e:
            # Keep the newest summaries (and the counts) for the next try rather than lose them.
            with self._lock:
                for k, v in batch.items():
                    self._pending.setdefault(k, v)
                for k, a in acct.items():
                    _merge_run(self._acct, k, a)
            self.last_error = "telemetry flush failed: %s" % e
            log.error("telemetry flush failed: %s", e)
            return 0
        self._keep_history(rows)
        return n

    def _keep_history(self, rows) -> None:
        """One history point per device per interval (the first of each), and old points removed."""
        if self.history_retention_s <= 0:
            return
        step = self.history_interval_s
        points = []
        for d, ts, summary, health, _acct in rows:
            bucket = int((ts or 0.0) // step)
            if self._history_bucket.get(d) != bucket:
                points.append((d, bucket, ts, summary_json(dict(summary, health=health))))
        try:
            self.registry.record_history(points)
            for d, bucket, _ts, _s in points:
                self._history_bucket[d] = bucket
            now = self.clock()
            if now >= self._next_prune:
                self._next_prune = now + min(3600.0, max(step, 60.0))
                self.registry.prune_history(int((now - self.history_retention_s) // step))
        except Exception as e:  # history is best effort; the latest summaries are written already
            self.last_error = "telemetry history failed: %s" % e
            log.warning("telemetry history not written: %s", e)

    def stats(self) -> Dict[str, Any]:
        """Counters for the controller's own status."""
        return {
            "received": dict(self.received),
            "malformed": dict(self.malformed),
            "listener_errors": self.listener_errors,
            "pending_telemetry": len(self._pending),
            "queued": len(self._q_control) + len(self._q_telemetry),
            "dropped": dict(self.dropped),
            # Dropped for their size: here, and unread by the report connection (`link`).
            "oversize": self.oversize + int((self.link_stats or {}).get("oversize_dropped", 0)),
            "link": dict(self.link_stats) if self.link_stats is not None else None,
            "rate_limited": self.rate_limited,
            "queued_bytes": self._bytes_in - self._bytes_out,
            "last_message_at": self.last_message_at,
            "last_error": self.last_error,
        }
