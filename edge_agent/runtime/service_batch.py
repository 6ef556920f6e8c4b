"""The batch path of the inference service: one request carrying many items (a batch .npy), routed,
run in chunks through the batchers, checked and answered item by item.

`BatchServing` is a mixin of `edge_agent.runtime.service.InferenceService` (it uses the service's
batchers, router, postprocessors and counters).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Dict, List, Optional

import numpy as np

from edge_agent.errors import EdgeAgentError, InferenceError
from edge_agent.runtime.answer import InferResult
from edge_agent.runtime.errors import OverloadedError, RequestTimeoutError
from edge_agent.runtime.output_checks import detection_gate_score, non_finite_rows
from edge_agent.runtime.router import (
    LinearHead,
    confidence_scores,
    input_stats,
)


class BatchServing:
    """`infer_batch`'s path through the service (mixin of `InferenceService`)."""

    def _serve_many(self, items: np.ndarray, t0: float, timeout_s: float) -> List[InferResult]:
        n = len(items)
        deadline = t0 + timeout_s
        with self._lock:
            self._requests += n
        to_large = np.zeros(n, dtype=bool)
        small_out: Optional[Dict[str, np.ndarray]] = None
        large_out: Optional[Dict[str, np.ndarray]] = None
        gate = self.router.gate
        head = self.head
        try:
            if gate == "large-only":
                to_large[:] = True
            elif gate == "linear" and head is not None and head.source == "input_stats":
                to_large = self._decide_many(head.scores(input_stats(items)))
            else:
                small_out = self._run_chunk("small", items, deadline)
                if gate != "small-only":
                    to_large = self._decide_many(self._scores_many(gate, head, small_out, n))
            idx_large = np.nonzero(to_large)[0]
            if idx_large.size:
                try:
                    large_out = self._run_chunk("large", items[idx_large], deadline)
                except OverloadedError:  # shed: these items get the small model's answers
                    with self._lock:
                        self._shed += int(idx_large.size)
                    to_large[:] = False
                    idx_large = idx_large[:0]
            if small_out is None and idx_large.size < n:
                idx_small = np.nonzero(~to_large)[0]
                part = self._run_chunk("small", items[idx_small], deadline)
                small_out = {k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in part.items()}
                for k, v in part.items():
                    small_out[k][idx_small] = v
        except OverloadedError:
            with self._lock:
                self._refused += n
            raise
        except EdgeAgentError:
            with self._lock:
                self._errors += n
                self._routes["small"].errors += n
            raise
        bad = non_finite_rows(to_large, small_out, large_out, self._answer_outputs)
        if bad:
            # The request is answered with an error; every item of it counts as failed, on its route.
            n_large = int(np.count_nonzero(to_large))
            with self._lock:
                self._errors += n
                self._routes["large"].errors += n_large
                self._routes["small"].errors += n - n_large
            raise InferenceError("the %s model returned a non-finite value (NaN or Inf) for %d of %d items"
                                 % (bad[0], bad[1], n))
        idx_large = np.nonzero(to_large)[0]
        idx_small = np.nonzero(~to_large)[0]
        answers: List[Any] = [None] * n
        for route, idx, outs in (("large", idx_large, large_out), ("small", idx_small, small_out)):
            if idx.size == 0:
                continue
            assert outs is not None
            if route == "small" and idx.size < n:
                outs = {k: v[idx] for k, v in outs.items()}
            for i, o in zip(idx.tolist(), self._post[route].many(outs, int(idx.size), input_hw=self.pre.size_hw)):
                answers[i] = (route, o)
        done = time.monotonic()
        latency_ms = (done - t0) * 1000.0
        with self._lock:
            self._routes["large"].requests += int(idx_large.size)
            self._routes["small"].requests += int(idx_small.size)
        for route, idx in (("large", idx_large), ("small", idx_small)):
            if idx.size:
                self._routes[route].latency.add_many(latency_ms, int(idx.size), done)
        self._latency.add_many(latency_ms, n, done)
        lat = round(latency_ms, 3)
        return [InferResult(route=r, output=o, latency_ms=lat) for r, o in answers]

    def _run_chunk(self, route: str, items: np.ndarray, deadline: float) -> Dict[str, np.ndarray]:
        futs = self._batchers[route].submit_chunk({self._input_names[route]: items})
        parts = []
        try:
            for f in futs:
                parts.append(f.result(timeout=max(0.0, deadline - time.monotonic())).outputs)
        except concurrent.futures.TimeoutError:
            for f in futs:
                f.cancel()
            raise RequestTimeoutError("no answer from the %s model within the timeout" % route)
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _scores_many(self, gate: str, head: Optional[LinearHead], out: Dict[str, np.ndarray], n: int) -> np.ndarray:
        if gate == "linear" and head is not None:
            assert self._features_output is not None
            return head.scores(out[self._features_output])
        post = self._post["small"]
        o = out[post.output_name]
        if post.post.kind == "detection":
            return np.array([detection_gate_score(post, o[i]) for i in range(n)])
        if post.post.kind == "classification" and not post.post.apply_softmax:
            return np.asarray(o, dtype=np.float64).reshape(n, -1).max(axis=1)
        return confidence_scores(np.asarray(o).reshape(n, -1))

    def _decide_many(self, scores: np.ndarray) -> np.ndarray:
        now = time.monotonic()
        p99 = self._large_p99(now)
        with self._router_lock:
            self.router.update_load(now, self._batchers["large"].queue_depth(), p99)
            return np.array([self.router.decide(float(s)) for s in scores], dtype=bool)
