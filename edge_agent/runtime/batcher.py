"""The dynamic batcher: one bounded queue and one worker thread per model.

Batches form while the engine is busy: when the worker comes back for work it takes everything queued
(up to the tuned batch size) and runs it at once if the engine is idle, so a lone request pays no
batching delay. With `inline_when_idle` (the service's setting) a request that finds the queue empty
and the engine idle runs in its caller's thread, sparing two thread hand-offs. Only while the engine is
running a batch (such an inline one) does a partial batch wait for more, until it is full or its first
request has waited `max_queue_delay_ms`, whichever comes first. One `infer` runs at a time per batcher. A full
queue refuses at once with `OverloadedError` (counted); nothing builds an unbounded backlog. Latency
is measured from arrival to answer.

The hand-offs are kept cheap because they run for every request: the queue is a deque guarded by the
same lock as its item count (one lock round trip per submit, one per batch collected), the worker sleeps
on a plain lock that a submit releases, and each `Ticket` is answered by releasing one lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Callable, Deque, Dict, List, Optional

import numpy as np

from edge_agent.engines.base import Engine
from edge_agent.errors import EdgeAgentError, InferenceError
from edge_agent.runtime.errors import OverloadedError, ServiceClosedError
from edge_agent.runtime.stats import LatencyRecorder

log = logging.getLogger(__name__)

#: How often an idle worker wakes up on its own (close also wakes it at once).
_IDLE_POLL_S = 0.5
# Ticket states.
_PENDING, _RUNNING, _CANCELLED, _FINISHED = range(4)


class BatchItemResult:
    """What a ticket resolves to: the outputs of one entry (one item without a batch axis, or a chunk
    with one) and the size of the batch it ran in."""

    __slots__ = ("batch_size", "latency_ms", "outputs")

    def __init__(self, outputs: Dict[str, np.ndarray], batch_size: int, latency_ms: float) -> None:
        self.outputs = outputs
        self.batch_size = batch_size
        self.latency_ms = latency_ms


class Ticket:
    """One queued entry and its pending answer.

    It offers the part of `concurrent.futures.Future` that callers use -- `result(timeout)`, `cancel()`,
    `cancelled()`, `done()` -- with the same exceptions (`concurrent.futures.TimeoutError`,
    `CancelledError`), but the answer is handed over by releasing a single lock rather than through a
    Condition. A ticket is cancelled only while it waits in the queue; once its batch runs it is answered.
    """

    __slots__ = ("_done", "_error", "_result", "_state", "_state_lock", "arrival", "item", "n", "single")

    def __init__(self, item: Dict[str, np.ndarray], arrival: float, n: int, single: bool,
                 state_lock: threading.Lock) -> None:
        self.item = item
        self.arrival = arrival
        self.n = n
        self.single = single
        self._state = _PENDING
        self._state_lock = state_lock  # the batcher's lock: guards PENDING -> RUNNING / CANCELLED
        self._result: Optional[BatchItemResult] = None
        self._error: Optional[BaseException] = None
        self._done = threading.Lock()
        self._done.acquire()  # released once, when the ticket is answered or cancelled

    def result(self, timeout: Optional[float] = None) -> BatchItemResult:
        """The answer; waits up to `timeout` seconds (forever when None). Raises the batch's error,
        `concurrent.futures.TimeoutError` or `concurrent.futures.CancelledError`."""
        if self._state < _CANCELLED:
            wait = -1.0 if timeout is None else min(max(0.0, float(timeout)), threading.TIMEOUT_MAX)
            if not self._done.acquire(True, wait):
                raise concurrent.futures.TimeoutError()
            self._done.release()  # let any other waiter through too
        if self._state == _CANCELLED:
            raise concurrent.futures.CancelledError()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> bool:
        """Withdraw the entry if its batch has not started; True when it is (or already was) cancelled."""
        with self._state_lock:
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._done.release()
                return True
            return self._state == _CANCELLED

    def cancelled(self) -> bool:
        """Whether the entry was withdrawn before running."""
        return self._state == _CANCELLED

    def done(self) -> bool:
        """Whether the ticket is answered or cancelled."""
        return self._state >= _CANCELLED

    def _finish(self, result: Optional[BatchItemResult], error: Optional[BaseException]) -> None:
        self._result = result
        self._error = error
        self._state = _FINISHED
        self._done.release()


class DynamicBatcher:
    """Batches queued items for one engine; `submit`/`submit_chunk` return `Ticket`s of `BatchItemResult`.

    The queue bound counts items, not requests: a chunk of 32 items takes 32 places.
    """

    def __init__(self, engine: Engine, *, name: str, max_batch: int, max_queue_delay_ms: float, max_queue: int,
                 clock: Callable[[], float] = time.monotonic, inline_when_idle: bool = False) -> None:
        if max_batch < 1 or max_queue < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_queue_delay_ms >= 0")
        self.engine = engine
        self.name = name
        self.max_batch = min(int(max_batch), engine.max_batch)
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue = int(max_queue)
        self._clock = clock
        # A lone item on an idle engine runs in the submitting thread (no hand-off to the worker and back:
        # two thread switches less per request); `submit` then returns an answered ticket.
        self.inline_when_idle = bool(inline_when_idle)
        # Held while a batch runs (the worker's, or one run inline): one `infer` at a time per engine, as
        # engines such as TensorRT's (one execution context, fixed buffers) require.
        self._engine_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the queue, its item count, the counters, ticket states
        self._queue: Deque[Ticket] = collections.deque()
        self._depth = 0  # items in `_queue` (bounded by max_queue)
        self._closed = False
        self._accepting = True  # False once close() starts: queued requests are still answered
        self._sleeping = False  # the worker waits on `_wake`; a submit or close releases it
        self._wake = threading.Lock()
        self._wake.acquire()
        self.latency = LatencyRecorder()
        self._batches = 0
        self._items = 0
        self._refused = 0
        self._errors = 0
        self._total_refused = 0
        self._busy_s = 0.0
        self._call_started: Optional[float] = None  # when the engine call in progress began (None: idle)
        self._thread = threading.Thread(target=self._run, name="batcher-%s" % name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, item: Dict[str, np.ndarray]) -> Ticket:
        """Queue one item (arrays without the batch axis). Raises OverloadedError when the queue is full."""
        t = Ticket(item, self._clock(), 1, True, self._lock)
        if self.inline_when_idle and self._run_inline(t):
            return t
        self._admit([t], 1)
        return t

    def _run_inline(self, t: Ticket) -> bool:
        """Run `t` alone in this thread when the queue is empty and nothing runs on the engine; False
        (nothing done) otherwise."""
        with self._lock:
            if self._closed or not self._accepting:
                raise ServiceClosedError("the %s model is not serving any more" % self.name)
            # `_depth` counts queued entries and those the worker holds for its next batch
            if self._depth or not self._engine_lock.acquire(blocking=False):
                return False
            t._state = _RUNNING
        try:
            self._run_batch([t])
        finally:
            self._engine_lock.release()
            with self._lock:  # what queued meanwhile waited for the engine: the worker runs it now
                if self._depth and self._sleeping:
                    self._sleeping = False
                    self._wake.release()
        return True

    def submit_chunk(self, items: Dict[str, np.ndarray]) -> List[Ticket]:
        """Queue several items at once (arrays with a batch axis), split into pieces of at most the max
        batch; all are admitted or none (OverloadedError)."""
        n = len(next(iter(items.values())))
        now = self._clock()
        mb = self.max_batch
        tickets = [
            Ticket({k: v[s : s + mb] for k, v in items.items()}, now, min(mb, n - s), False, self._lock)
            for s in range(0, n, mb)
        ]
        self._admit(tickets, n)
        return tickets

    def _admit(self, tickets: List[Ticket], n: int) -> None:
        with self._lock:
            if self._closed or not self._accepting:
                raise ServiceClosedError("the %s model is not serving any more" % self.name)
            depth = self._depth
            if depth + n > self.max_queue:
                self._refused += 1
                self._total_refused += 1
            else:
                self._depth = depth + n
                self._queue.extend(tickets)
                if self._sleeping:
                    self._sleeping = False
                    self._wake.release()
                return
        raise OverloadedError(
            "the %s model's queue is full (%d items waiting, limit %d); retry later"
            % (self.name, depth, self.max_queue),
            retry_after_s=max(0.1, self.max_queue_delay_s * 4),
        )

    def engine_call_age_s(self) -> float:
        """Seconds the engine call in progress has been running (0.0 when the engine is idle). A call that
        never returns (a hung driver) cannot be cut short from Python; the agent's watchdog check uses
        this to stop the systemd pings so the service is restarted."""
        started = self._call_started
        return 0.0 if started is None else max(0.0, self._clock() - started)

    def queue_depth(self) -> int:
        """Items waiting (not counting the batch running now)."""
        return self._depth

    @property
    def total_refused(self) -> int:
        """Refusals since start (never reset)."""
        return self._total_refused

    # ------------------------------------------------------------------------------------------ worker
    def _wait(self, timeout: float) -> bool:
        """True at once when entries are queued; otherwise sleep up to `timeout` s for a submit. False
        when closed or still empty."""
        with self._lock:
            if self._closed:
                return False
            if self._queue:
                return True
            self._sleeping = True
        woken = self._wake.acquire(True, timeout)
        with self._lock:
            if not woken:
                if self._sleeping:
                    self._sleeping = False
                else:  # a submit released `_wake` just after the timeout: take it back
                    self._wake.acquire()
            return bool(self._queue) and not self._closed

    def _collect(self) -> Optional[List[Ticket]]:
        """The next batch: queued entries in order until the max batch is reached (an entry that does not
        fit stays queued for the next one). A partial batch runs at once on an idle engine; on a busy one
        it waits for more until its first entry has waited the max queue delay."""
        if not self._wait(_IDLE_POLL_S):
            return None
        batch: List[Ticket] = []
        size = 0
        deadline = None
        q = self._queue
        max_batch = self.max_batch
        while True:
            with self._lock:
                while q and size + q[0].n <= max_batch:
                    t = q.popleft()
                    batch.append(t)
                    size += t.n
                stop = size >= max_batch or bool(q) or self._closed
            if not batch:
                return None
            if stop or not self._engine_lock.locked():
                break
            if deadline is None:
                deadline = batch[0].arrival + self.max_queue_delay_s
            remaining = deadline - self._clock()
            if remaining <= 0 or not self._wait(remaining):
                break
        return batch

    def _run(self) -> None:
        while not self._closed:
            batch = self._collect()
            if batch:
                self._start(batch)
        self._fail_waiting()

    def _start(self, batch: List[Ticket]) -> None:
        """Run a collected batch once the engine is free. Its entries count against max_queue until then;
        entries cancelled while they waited are dropped, the rest cannot be cancelled any more."""
        with self._engine_lock:
            with self._lock:
                self._depth -= sum(t.n for t in batch)
                live = [t for t in batch if t._state == _PENDING]
                for t in live:
                    t._state = _RUNNING
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: List[Ticket]) -> None:
        """Run one batch and answer its tickets (the caller holds the engine lock)."""
        n = sum(t.n for t in batch)
        t0 = self._clock()
        try:
            if len(batch) == 1 and not batch[0].single:
                feed = batch[0].item
            elif all(t.single for t in batch):
                # np.array stacks same-shape arrays like np.stack (and refuses ragged ones), at a third of the cost
                feed = {k: np.array([t.item[k] for t in batch]) for k in batch[0].item}
            else:
                feed = {
                    k: np.concatenate([t.item[k][None] if t.single else t.item[k] for t in batch])
                    for k in batch[0].item
                }
            self._call_started = t0
            try:
                out = self.engine.infer(feed)
            finally:
                self._call_started = None
        except Exception as e:  # one bad batch must not stop the worker
            err = e if isinstance(e, EdgeAgentError) else InferenceError("%s model failed: %s" % (self.name, e))
            if not isinstance(e, EdgeAgentError):
                log.exception("%s batch of %d failed", self.name, n)
            with self._lock:
                self._errors += n
            for t in batch:
                t._finish(None, err)
            return
        done = self._clock()
        with self._lock:
            self._batches += 1
            self._items += n
            self._busy_s += done - t0
        lats = [(done - t.arrival) * 1000.0 for t in batch]
        self.latency.add_each(lats, done)
        named = list(out.items())
        off = 0
        for t, lat in zip(batch, lats):
            if t.single:
                outs = {k: v[off] for k, v in named}
            else:
                outs = {k: v[off : off + t.n] for k, v in named}
            off += t.n
            t._finish(BatchItemResult(outs, n, lat), None)

    def _fail_waiting(self) -> None:
        with self._lock:
            pending = list(self._queue)
            self._queue.clear()
            self._depth = 0
            live = [t for t in pending if t._state == _PENDING]
            for t in live:
                t._state = _RUNNING
        for t in live:
            t._finish(None, ServiceClosedError("the %s model stopped serving" % self.name))

    # ------------------------------------------------------------------------------------------- stats
    def snapshot(self, reset: bool = True) -> dict:
        """Counters of the period: batches, items, mean_batch, refused, errors, busy_s, latency samples."""
        lat = self.latency.snapshot(reset)
        with self._lock:
            snap = {
                "batches": self._batches,
                "items": self._items,
                "mean_batch": (self._items / self._batches) if self._batches else None,
                "refused": self._refused,
                "errors": self._errors,
                "busy_s": self._busy_s,
                "queue_depth": self._depth,
                "latency_samples_ms": lat,
            }
            if reset:
                self._batches = self._items = self._refused = self._errors = 0
                self._busy_s = 0.0
        return snap

    def close(self, timeout_s: float = 5.0, *, drain: bool = True) -> None:
        """Stop taking requests; with `drain`, answer the queued ones first (within `timeout_s`), so a
        model swap loses no request. Then stop the worker; whatever still waits fails with
        ServiceClosedError."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._accepting = False
        while drain and time.monotonic() < deadline and self._thread.is_alive():
            with self._lock:
                if not self._queue:
                    break
            time.sleep(0.002)
        with self._lock:
            self._closed = True
            if self._sleeping:
                self._sleeping = False
                self._wake.release()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        self._fail_waiting()
