"""A/B serving: `P` percent of requests are answered by the candidate bundle, the rest by the active one.

The split is deterministic and even (`edge_agent.lifecycle.shadow.Split`: the n-th request goes to the candidate
when floor(n·P/100) grows), so over any run of requests the candidate's share is within one request of
P %. A request of several items goes to one arm as a whole. Each answer from the candidate carries the
candidate's bundle in `InferResult.extra["bundle"]` (the HTTP API returns it), and each arm has its own
counters and latency percentiles in the period stats (`shadow.arms`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from edge_agent.errors import EdgeAgentError, InputError
from edge_agent.lifecycle.shadow import Split
from edge_agent.runtime.answer import InferResult
from edge_agent.runtime.errors import OverloadedError
from edge_agent.runtime.mirror import _Delegating
from edge_agent.runtime.stats import LatencyRecorder, merge_histograms, percentiles

log = logging.getLogger(__name__)

ARMS = ("active", "candidate")


class _Arm:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self.latency = LatencyRecorder()


class SplitService(_Delegating):
    """Serves `split` percent of requests with the candidate service and the rest with the active one."""

    def __init__(self, active: Any, candidate: Any, *, candidate_ref: Dict[str, Any], split: float) -> None:
        import threading

        self.active = active
        self.candidate = candidate
        self.candidate_ref = dict(candidate_ref)
        self.split = float(split)
        self._split = Split(self.split)
        self._lock = threading.Lock()
        self._arms = {a: _Arm() for a in ARMS}

    # ------------------------------------------------------------------------------------ serving
    def _call(self, fn: Callable[[Any], Any], n_items: Callable[[Any], int]) -> Any:
        arm = "candidate" if self._split.take() else "active"
        svc = self.candidate if arm == "candidate" else self.active
        a = self._arms[arm]
        t0 = time.monotonic()
        try:
            res = fn(svc)
        except OverloadedError:
            with self._lock:
                a.refused += 1
            raise
        except InputError:  # the client's fault: never counted against either arm
            raise
        except EdgeAgentError:
            with self._lock:
                a.errors += 1
            raise
        done = time.monotonic()
        n = n_items(res)
        with self._lock:
            a.requests += n
        a.latency.add_many((done - t0) * 1000.0, n, done)
        if arm == "candidate":
            if isinstance(res, list):
                return [self._mark(r) for r in res]
            return self._mark(res)
        return res

    def _mark(self, r: InferResult) -> InferResult:
        return InferResult(route=r.route, output=r.output, latency_ms=r.latency_ms,
                           extra=dict(r.extra, bundle=self.candidate.bundle, arm="candidate"))

    def infer_tensor(self, x: np.ndarray, timeout_s: Optional[float] = None) -> InferResult:
        """One input, answered by the arm the split picks."""
        return self._call(lambda s: s.infer_tensor(x, timeout_s), lambda r: 1)

    def infer_batch(self, x: np.ndarray, timeout_s: Optional[float] = None) -> List[InferResult]:
        """N items of one request, all answered by the arm the split picks."""
        return self._call(lambda s: s.infer_batch(x, timeout_s), len)

    def infer_image(self, data: bytes, timeout_s: Optional[float] = None) -> InferResult:
        """One encoded image, answered by the arm the split picks."""
        return self._call(lambda s: s.infer_image(data, timeout_s), lambda r: 1)

    def infer_frame(self, frame: np.ndarray, timeout_s: Optional[float] = None) -> InferResult:
        """One decoded frame, answered by the arm the split picks."""
        return self._call(lambda s: s.infer_frame(frame, timeout_s), lambda r: 1)

    # ------------------------------------------------------------------------------------ stats
    def stats_snapshot(self, reset: bool = True) -> dict:
        """Period stats over both arms (top-level counters and latency), per-arm figures in `shadow.arms`.

        `routes`, `tau` and the batch figures stay the active bundle's (the candidate's router has its own)."""
        snap = self.active.stats_snapshot(reset)
        cand = self.candidate.stats_snapshot(reset)
        arms: Dict[str, Dict[str, Any]] = {}
        samples = []
        with self._lock:
            for name in ARMS:
                a = self._arms[name]
                lat = a.latency.snapshot(reset)
                samples.append(lat)
                src = snap if name == "active" else cand
                arms[name] = {"requests": a.requests, "errors": a.errors, "latency_ms": percentiles(lat),
                              "queue_depth": src.get("queue_depth") or 0, "mean_batch": src.get("mean_batch")}
                if reset:
                    a.requests = a.errors = a.refused = 0
        for k in ("requests", "errors", "refused"):
            snap[k] = int(snap.get(k) or 0) + int(cand.get(k) or 0)
        snap["latency_ms"] = percentiles(np.concatenate(samples))
        snap["latency_histogram"] = merge_histograms(snap.get("latency_histogram"), cand.get("latency_histogram"))
        snap["queue_depth"] = int(snap.get("queue_depth") or 0) + int(cand.get("queue_depth") or 0)
        total = arms["active"]["requests"] + arms["candidate"]["requests"]
        snap["shadow"] = {
            "mode": "ab",
            "candidate": dict(self.candidate_ref),
            "split": self.split,
            "candidate_errors": arms["candidate"]["errors"],
            "candidate_latency_ms": arms["candidate"]["latency_ms"],
            "active_latency_ms": arms["active"]["latency_ms"],
            "candidate_share": round(arms["candidate"]["requests"] / total, 6) if total else None,
            "arms": arms,
        }
        return snap

    def close_candidate(self) -> None:
        """Stop sending traffic to the candidate and close its service (the active one keeps serving)."""
        self._split = Split(0.0)
        try:
            self.candidate.close()
        except Exception:
            log.exception("closing the candidate service failed")

    def close(self) -> None:
        """Close both services (the engines stay open: their owners close them)."""
        self.close_candidate()
        self.active.close()
