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
    """What a batcher future resolves to: one item's outputs and the size of the batch it ran in."""

    __slots__ = ("batch_size", "latency_ms", "outputs")

    def __init__(self, outputs: Dict[str, np.ndarray], batch_size: int, latency_ms: float) -> None:
        self.outputs = outputs
        self.batch_size = batch_size
        self.latency_ms = latency_ms


class _Pending:
    __slots__ = ("arrival", "future", "item")

    def __init__(self, item: Dict[str, np.ndarray], arrival: float) -> None:
        self.item = item
        self.arrival = arrival
        self.future: Future = Future()


class DynamicBatcher:
    """Batches single items for one engine; `submit` returns a Future of `BatchItemResult`."""

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
        self._q: queue.Queue = queue.Queue(maxsize=self.max_queue)
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
        if self._closed.is_set():
            raise ServiceClosedError("the %s model is not serving any more" % self.name)
        p = _Pending(item, self._clock())
        try:
            self._q.put_nowait(p)
        except queue.Full:
            with self._lock:
                self._refused += 1
                self._total_refused += 1
            raise OverloadedError(
                "the %s model's queue is full (%d waiting); retry later" % (self.name, self.max_queue),
                retry_after_s=max(0.1, self.max_queue_delay_s * 4),
            )
        return p.future

    def queue_depth(self) -> int:
        """Items waiting (not counting the batch running now)."""
        return self._q.qsize()

    @property
    def total_refused(self) -> int:
        """Refusals since start (never reset)."""
        return self._total_refused

    # ------------------------------------------------------------------------------------------ worker
    def _collect(self) -> Optional[List[_Pending]]:
        try:
            first = self._q.get(timeout=_IDLE_POLL_S)
        except queue.Empty:
            return None
        if first is _STOP:
            return None
        batch = [first]
        deadline = first.arrival + self.max_queue_delay_s
        while len(batch) < self.max_batch:
            remaining = deadline - self._clock()
            try:
                nxt = self._q.get_nowait() if remaining <= 0 else self._q.get(timeout=remaining)
            except queue.Empty:
                break
            if nxt is _STOP:
                break
            batch.append(nxt)
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
        n = len(batch)
        t0 = self._clock()
        try:
            feed = {k: np.stack([p.item[k] for p in batch]) for k in batch[0].item}
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
        for i, p in enumerate(batch):
            lat = (done - p.arrival) * 1000.0
            self.latency.add(lat, done)
            p.future.set_result(BatchItemResult({k: v[i] for k, v in out.items()}, n, lat))

    def _fail_waiting(self) -> None:
        while True:
            try:
                p = self._q.get_nowait()
            except queue.Empty:
                return
            if p is not _STOP and p.future.set_running_or_notify_cancel():
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
        try:
            self._q.put_nowait(_STOP)
        except queue.Full:
            pass  # the worker is busy and will see the flag after this batch
        self._thread.join(timeout_s)
        self._fail_waiting()
