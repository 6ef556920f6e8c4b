"""The dynamic batcher: one bounded queue and one worker thread per model.

A request waits until the batch is full (the tuned batch size) or the first request of the batch has
waited `max_queue_delay_ms`, whichever comes first. A full queue refuses at once with `OverloadedError`
(counted); nothing builds an unbounded backlog. Latency is measured from arrival to answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Dict, List, Optional

import numpy as np

from edge_agent.engines.base import Engine
from edge_agent.errors import EdgeAgentError, InferenceError
from edge_agent.runtime.errors import OverloadedError, ServiceClosedError
from edge_agent.runtime.stats import LatencyRecorder

log = logging.getLogger(__name__)

#: How often an idle worker wakes to notice `close()` (close also wakes it with `_STOP`).
_IDLE_POLL_S = 0.5
_STOP = object()


class BatchItemResult:
    """What a batcher future resolves to: the outputs of one entry (one item without a batch axis, or a
    chunk with one) and the size of the batch it ran in."""

    __slots__ = ("batch_size", "latency_ms", "outputs")

    def __init__(self, outputs: Dict[str, np.ndarray], batch_size: int, latency_ms: float) -> None:
        self.outputs = outputs
        self.batch_size = batch_size
        self.latency_ms = latency_ms


class _Pending:
    __slots__ = ("arrival", "future", "item", "n", "single")

    def __init__(self, item: Dict[str, np.ndarray], arrival: float, n: int, single: bool) -> None:
        self.item = item
        self.arrival = arrival
        self.n = n
        self.single = single
        self.future: Future = Future()


class DynamicBatcher:
    """Batches queued items for one engine; `submit`/`submit_chunk` return Futures of `BatchItemResult`.

    The queue bound counts items, not requests: a chunk of 32 items takes 32 places.
    """

    def __init__(self, engine: Engine, *, name: str, max_batch: int, max_queue_delay_ms: float, max_queue: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1 or max_queue < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_queue_delay_ms >= 0")
        self.engine = engine
        self.name = name
        self.max_batch = min(int(max_batch), engine.max_batch)
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue = int(max_queue)
        self._clock = clock
        self._q: queue.Queue = queue.Queue()  # bounded by `_depth` (items), checked in `_admit`
        self._depth = 0
        self._carry: Optional[_Pending] = None  # an entry that did not fit the previous batch
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.latency = LatencyRecorder()
        self._batches = 0
        self._items = 0
        self._refused = 0
        self._errors = 0
        self._total_refused = 0
        self._busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="batcher-%s" % name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, item: Dict[str, np.ndarray]) -> Future:
        """Queue one item (arrays without the batch axis). Raises OverloadedError when the queue is full."""
        p = _Pending(item, self._clock(), 1, True)
        self._admit([p])
        return p.future

    def submit_chunk(self, items: Dict[str, np.ndarray]) -> List[Future]:
        """Queue several items at once (arrays with a batch axis), split into pieces of at most the max
        batch; all are admitted or none (OverloadedError)."""
        n = len(next(iter(items.values())))
        now = self._clock()
        pending = [
            _Pending({k: v[s : s + self.max_batch] for k, v in items.items()}, now, min(self.max_batch, n - s), False)
            for s in range(0, n, self.max_batch)
        ]
        self._admit(pending)
        return [p.future for p in pending]

    def _admit(self, pending: List[_Pending]) -> None:
        if self._closed.is_set():
            raise ServiceClosedError("the %s model is not serving any more" % self.name)
        n = sum(p.n for p in pending)
        with self._lock:
            if self._depth + n > self.max_queue:
                self._refused += 1
                self._total_refused += 1
                full = True
            else:
                self._depth += n
                full = False
        if full:
            raise OverloadedError(
                "the %s model's queue is full (%d items waiting, limit %d); retry later"
                % (self.name, self._depth, self.max_queue),
                retry_after_s=max(0.1, self.max_queue_delay_s * 4),
            )
        for p in pending:
            self._q.put_nowait(p)

    def queue_depth(self) -> int:
        """Items waiting (not counting the batch running now)."""
        return self._depth

    @property
    def total_refused(self) -> int:
        """Refusals since start (never reset)."""
        return self._total_refused

    # ------------------------------------------------------------------------------------------ worker
    def _take(self, timeout: Optional[float]) -> Optional[_Pending]:
        """The carried-over entry, else the next queued one (None on timeout or stop)."""
        if self._carry is not None:
            p, self._carry = self._carry, None
            return p
        try:
            p = self._q.get_nowait() if timeout is None else self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if p is _STOP:
            return None
        with self._lock:
            self._depth -= p.n
        return p

    def _collect(self) -> Optional[List[_Pending]]:
        first = self._take(_IDLE_POLL_S)
        if first is None:
            return None
        batch = [first]
        size = first.n
        deadline = first.arrival + self.max_queue_delay_s
        while size < self.max_batch:
            remaining = deadline - self._clock()
            nxt = self._take(None if remaining <= 0 else remaining)
            if nxt is None:
                break
            if size + nxt.n > self.max_batch:
                self._carry = nxt  # starts the next batch
                break
            batch.append(nxt)
            size += nxt.n
        return batch

    def _run(self) -> None:
        while not self._closed.is_set():
            batch = self._collect()
            if batch is None:
                continue
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)
        self._fail_waiting()

    def _run_batch(self, batch: List[_Pending]) -> None:
        n = sum(p.n for p in batch)
        t0 = self._clock()
        try:
            if len(batch) == 1 and not batch[0].single:
                feed = batch[0].item
            elif all(p.single for p in batch):
                feed = {k: np.stack([p.item[k] for p in batch]) for k in batch[0].item}
            else:
                feed = {
                    k: np.concatenate([p.item[k][None] if p.single else p.item[k] for p in batch])
                    for k in batch[0].item
                }
            out = self.engine.infer(feed)
        except Exception as e:  # one bad batch must not stop the worker
            err = e if isinstance(e, EdgeAgentError) else InferenceError("%s model failed: %s" % (self.name, e))
            if not isinstance(e, EdgeAgentError):
                log.exception("%s batch of %d failed", self.name, n)
            with self._lock:
                self._errors += n
            for p in batch:
                p.future.set_exception(err)
            return
        done = self._clock()
        with self._lock:
            self._batches += 1
            self._items += n
            self._busy_s += done - t0
        off = 0
        for p in batch:
            lat = (done - p.arrival) * 1000.0
            self.latency.add(lat, done)
            if p.single:
                outs = {k: v[off] for k, v in out.items()}
            else:
                outs = {k: v[off : off + p.n] for k, v in out.items()}
            off += p.n
            p.future.set_result(BatchItemResult(outs, n, lat))

    def _fail_waiting(self) -> None:
        pending = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                p = self._q.get_nowait()
            except queue.Empty:
                break
            if p is not _STOP:
                with self._lock:
                    self._depth -= p.n
                pending.append(p)
        for p in pending:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(ServiceClosedError("the %s model stopped serving" % self.name))

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
                "queue_depth": self.queue_depth(),
                "latency_samples_ms": lat,
            }
            if reset:
                self._batches = self._items = self._refused = self._errors = 0
                self._busy_s = 0.0
        return snap

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker after the batch it is running; waiting requests fail with ServiceClosedError."""
        self._closed.set()
        self._q.put_nowait(_STOP)
        self._thread.join(timeout_s)
        self._fail_waiting()
