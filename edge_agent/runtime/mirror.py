"""Shadow serving: the active service answers every request; a sampled fraction is mirrored to the
candidate afterwards, off the request path.

`ShadowService` stands where the agent's `InferenceService` stands (HTTP API, sources, telemetry) and
delegates everything to the active service. After the active model has answered, a request picked by
the sampling fraction is appended to a bounded mirror queue (O(1), no waiting) and the caller gets its
answer; a mirror thread runs the candidate on it and compares the two answers. Mirrored work is the
first thing shed: it is dropped (and counted) when the mirror queue is full, and while more than
`shed_in_flight` requests are in the active model (waiting in its queues or being served), both when it
is offered and again when the mirror thread is about to run it: a busy device spends nothing on the
candidate. The mirror thread and the candidate's batcher threads run at normal priority on purpose:
the candidate's latency is then measured under the same conditions as the active model's, so the
latency-ratio gate compares like with like (shedding, not priority, keeps the candidate off a busy
device).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np

from edge_agent.errors import EdgeAgentError, InputError
from edge_agent.lifecycle.shadow import ShadowJudge, Split, agreement
from edge_agent.runtime.errors import OverloadedError
from edge_agent.runtime.stats import LatencyRecorder, percentiles

log = logging.getLogger(__name__)

def active_queue_depth(service: Any) -> int:
    """Items waiting in a service's batchers (0 when it has none)."""
    try:
        return int(service.small_batcher.queue_depth()) + int(service.large_batcher.queue_depth())
    except AttributeError:
        return 0


class _Delegating:
    """Anything not defined here is the active service's (pre, bundle, set_router, router_state...)."""

    active: Any

    def __getattr__(self, name: str) -> Any:
        if name == "active":  # not set yet (construction failed): no recursion
            raise AttributeError(name)
        return getattr(self.active, name)

    def engine_call_age_s(self) -> float:
        """The longest engine call in progress, of the active service or the candidate."""
        ages = [getattr(svc, "engine_call_age_s", lambda: 0.0)() for svc in (self.active, self.candidate)]
        return max(ages)


class ShadowService(_Delegating):
    """The active service plus a mirror of a fraction of its traffic to the candidate."""

    def __init__(self, active: Any, candidate: Any, *, candidate_ref: Dict[str, Any], fraction: float,
                 queue_size: int, shed_in_flight: int, judge: Optional[ShadowJudge] = None,
                 timeout_s: float = 10.0) -> None:
        self.active = active
        self.candidate = candidate
        self.candidate_ref = dict(candidate_ref)
        self.fraction = float(fraction)
        self.judge = judge
        self.shed_in_flight = int(shed_in_flight)
        self._in_flight = 0  # requests inside the active service now (through this wrapper)
        self._flight_lock = threading.Lock()
        self.timeout_s = float(timeout_s)
        self._sample = Split(self.fraction * 100.0)
        self._queue: Deque[Tuple[str, Any, Any]] = collections.deque()
        self._queue_size = max(1, int(queue_size))
        self._cond = threading.Condition()
        self._closed = False
        self._lock = threading.Lock()
        self._reset_period()
        self.total_mirrored = 0
        self.total_dropped = 0
        self._thread = threading.Thread(target=self._run, name="shadow-mirror", daemon=True)
        self._thread.start()

    def _reset_period(self) -> None:
        self._mirrored = 0
        self._dropped = 0
        self._compared = 0
        self._agree_sum = 0.0
        self._cand_errors = 0
        self._cand_lat = LatencyRecorder()
        self._active_lat = LatencyRecorder()

    # ------------------------------------------------------------------------------------ serving
    def _serve(self, kind: str, fn: Any, x: Any, timeout_s: Optional[float]) -> Any:
        lock = self._flight_lock
        with lock:
            self._in_flight += 1
        try:
            res = fn(x, timeout_s)
        finally:
            with lock:
                self._in_flight -= 1
        self._offer(kind, x, res)
        return res

    def infer_tensor(self, x: np.ndarray, timeout_s: Optional[float] = None) -> Any:
        """Answered by the active model; maybe mirrored afterwards."""
        return self._serve("tensor", self.active.infer_tensor, x, timeout_s)

    def infer_batch(self, x: np.ndarray, timeout_s: Optional[float] = None) -> List[Any]:
        """Answered by the active model; the whole request may be mirrored afterwards."""
        return self._serve("batch", self.active.infer_batch, x, timeout_s)

    def infer_image(self, data: bytes, timeout_s: Optional[float] = None) -> Any:
        """Answered by the active model; maybe mirrored afterwards."""
        return self._serve("image", self.active.infer_image, data, timeout_s)

    def infer_frame(self, frame: np.ndarray, timeout_s: Optional[float] = None) -> Any:
        """Answered by the active model; maybe mirrored afterwards."""
        return self._serve("frame", self.active.infer_frame, frame, timeout_s)

    def _offer(self, kind: str, x: Any, res: Any) -> None:
        if not self._sample.take():
            return
        n = len(res) if kind == "batch" else 1
        if self._busy():
            self._drop(n)
            return
        with self._cond:
            if len(self._queue) >= self._queue_size or self._closed:
                full = True
            else:
                full = False
                self._queue.append((kind, x, res))
                self._cond.notify()
        if full:
            self._drop(n)

    def _busy(self) -> bool:
        limit = self.shed_in_flight
        return self._in_flight > limit or active_queue_depth(self.active) > limit

    def _drop(self, n: int) -> None:
        with self._lock:
            self._dropped += n
            self.total_dropped += n

    # ------------------------------------------------------------------------------------ mirror thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    return
                job = self._queue.popleft()
            try:
                self._mirror(*job)
            except Exception:  # a bug in one comparison must not stop the mirror
                log.exception("shadow mirror failed")

    def _mirror(self, kind: str, x: Any, res: Any) -> None:
        n = len(res) if kind == "batch" else 1
        if self._busy():
            self._drop(n)  # the active model got busy while this waited: shed it
            return
        try:
            if kind == "tensor":
                cand = [self.candidate.infer_tensor(x, self.timeout_s)]
            elif kind == "batch":
                cand = self.candidate.infer_batch(x, self.timeout_s)
            elif kind == "image":
                cand = [self.candidate.infer_image(x, self.timeout_s)]
            else:
                cand = [self.candidate.infer_frame(x, self.timeout_s)]
        except (OverloadedError, InputError):
            # A full queue, or an input the candidate's preprocessing refuses (the client's fault, not
            # the candidate model's): not compared, never counted as a candidate error.
            self._drop(n)
            return
        except EdgeAgentError as e:
            log.debug("candidate failed on a mirrored input: %s", e)
            with self._lock:
                self._mirrored += n
                self.total_mirrored += n
                self._cand_errors += n
            if self.judge is not None:
                for _ in range(n):
                    self.judge.observe_error()
            return
        done = time.monotonic()
        actives = res if kind == "batch" else [res]
        scores = [agreement(a.output, c.output) for a, c in zip(actives, cand)]
        # both latencies as each service measured its own answer (same clock points in both)
        active_ms = [float(a.latency_ms) for a in actives]
        cand_ms = [float(c.latency_ms) for c in cand]
        with self._lock:
            self._mirrored += n
            self.total_mirrored += n
            self._compared += len(scores)
            self._agree_sum += sum(scores)
        self._cand_lat.add_each(cand_ms, done)
        self._active_lat.add_each(active_ms, done)
        if self.judge is not None:
            for s, c_ms, a_ms in zip(scores, cand_ms, active_ms):
                self.judge.observe(s, c_ms, a_ms)

    # ------------------------------------------------------------------------------------ stats
    def shadow_stats(self, reset: bool = True) -> Dict[str, Any]:
        """The period's `ShadowStats` fields (JSON-ready)."""
        with self._lock:
            cand = percentiles(self._cand_lat.snapshot(reset))
            act = percentiles(self._active_lat.snapshot(reset))
            out: Dict[str, Any] = {
                "mode": "shadow",
                "candidate": dict(self.candidate_ref),
                "fraction": self.fraction,
                "mirrored": self._mirrored,
                "dropped": self._dropped,
                "compared": self._compared,
                "agreement": round(self._agree_sum / self._compared, 6) if self._compared else None,
                "candidate_errors": self._cand_errors,
                "candidate_latency_ms": cand,
                "active_latency_ms": act,
            }
            if reset:
                self._mirrored = self._dropped = self._compared = self._cand_errors = 0
                self._agree_sum = 0.0
        if self.judge is not None:
            w = self.judge.measured()
            out["window"] = {k: w[k] for k in ("elapsed_s", "window_s", "compared", "agreement", "candidate_errors",
                                                "candidate_p99_ms", "active_p99_ms")}
        return out

    def stats_snapshot(self, reset: bool = True) -> dict:
        """The active service's period stats with a `shadow` section."""
        snap = self.active.stats_snapshot(reset)
        try:
            self.candidate.stats_snapshot(reset)  # keeps the candidate's own period counters bounded
        except Exception as e:
            log.debug("candidate stats failed: %s", e)
        snap["shadow"] = self.shadow_stats(reset)
        return snap

    def queue_len(self) -> int:
        """Mirrored inputs waiting for the candidate."""
        return len(self._queue)

    def close_mirror(self, timeout_s: float = 5.0) -> None:
        """Stop mirroring (queued inputs are dropped) and close the candidate's service; the active
        service keeps serving."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)
        try:
            self.candidate.close()
        except Exception:
            log.exception("closing the candidate service failed")

    def close(self) -> None:
        """Stop mirroring and close both services (the engines stay open: their owners close them)."""
        self.close_mirror()
        self.active.close()
