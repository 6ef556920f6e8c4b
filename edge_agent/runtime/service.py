"""The inference service: preprocessing, the DynamicRouter over two dynamic batchers, postprocessing,
and the statistics telemetry reports.

One request takes this path::

    raw input -> Preprocessor -> gate -> small batcher ──(escalate?)──> large batcher -> Postprocessor

With the ``confidence`` gate or a ``linear`` head over the small model's features, the small model runs
first and its outputs decide; a ``linear`` head over input statistics decides before any model runs.
When the large model's queue refuses an escalated request, the small model's answer is returned
(counted as shed) rather than failing the request.

A request of many items (a batch .npy) takes the same path per chunk: `service_batch`. The answer type
is `answer.InferResult`; the checks on model outputs are `output_checks`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.config import RuntimeConfig
from edge_agent.errors import EdgeAgentError, InferenceError
from edge_agent.runtime.answer import InferResult
from edge_agent.runtime.batcher import BatchItemResult, DynamicBatcher
from edge_agent.runtime.errors import OverloadedError, RequestTimeoutError, RouterPolicyError
from edge_agent.runtime.output_checks import check_finite, detection_gate_score
from edge_agent.runtime.postprocess import Postprocessor
from edge_agent.runtime.preprocess import Preprocessor
from edge_agent.runtime.router import (
    LinearHead,
    TauController,
    confidence_scores,
    input_stats,
    top_probability,
)
from edge_agent.runtime.service_batch import BatchServing
from edge_agent.runtime.stats import LatencyRecorder, percentiles

log = logging.getLogger(__name__)

#: How often (seconds) the large model's recent p99 is recomputed for the shedding check.
_P99_REFRESH_S = 0.05
ROUTES = ("small", "large")


class _RouteCounters:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = LatencyRecorder()


class InferenceService(BatchServing):
    """Serves one activated bundle: `infer_tensor`, `infer_image`, `stats_snapshot`, `set_router`.

    `models` is anything with `.small` and `.large` Engines and a `.batch` dict (the tuned batch size per
    model name); the service does not close the engines (their owner does), only its batchers.
    """

    def __init__(self, models: Any, manifest: ManifestBody, bundle_dir: Path, cfg: RuntimeConfig) -> None:
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.cfg = cfg
        self.bundle = {"name": manifest.name, "version": manifest.version}
        small_spec = manifest.models["small"]
        self._engines = {"small": models.small, "large": models.large}
        self._input_names = {r: e.inputs[0].name for r, e in self._engines.items()}
        for r, e in self._engines.items():
            if len(e.inputs) != 1:
                raise InferenceError(
                    "the %s model has %d inputs; the service serves single-input models" % (r, len(e.inputs))
                )
        self.pre = Preprocessor(manifest.preprocessing, small_spec.inputs[0])
        self._post = {
            r: Postprocessor(manifest.postprocessing, [o.name for o in e.outputs]) for r, e in self._engines.items()
        }
        # The outputs an answer is made of (checked for NaN/Inf before it is given).
        self._answer_outputs = {
            r: tuple(o.name for o in e.outputs) if p.post.kind == "raw" else (p.output_name,)
            for (r, e), p in zip(self._engines.items(), self._post.values())
        }
        batch = dict(getattr(models, "batch", {}) or {})
        self._batchers = {
            r: DynamicBatcher(
                e, name=r, max_batch=int(batch.get(r, e.max_batch)), max_queue_delay_ms=cfg.max_queue_delay_ms,
                max_queue=cfg.max_queue, inline_when_idle=cfg.inline_when_idle,
            )
            for r, e in self._engines.items()
        }
        small_outputs = [o.name for o in models.small.outputs]
        self._features_output = small_spec.features_output or ("features" if "features" in small_outputs else None)
        pol = manifest.router
        self.head: Optional[LinearHead] = None
        if pol.linear_head:
            self.head = LinearHead.load(self.bundle_dir / pol.linear_head)
            if self.head.source == "features" and self._features_output not in small_outputs:
                raise RouterPolicyError("the linear head reads the small model's features, which it does not output")
        self._router_lock = threading.Lock()
        self.router = TauController(
            gate=pol.gate, tau=float(pol.tau), tau_min=float(pol.tau_min), tau_max=float(pol.tau_max),
            adaptive=pol.adaptive,
            target_large_fraction=float(pol.target_large_fraction) if pol.target_large_fraction is not None else None,
            window=pol.window, large_queue_limit=pol.large_queue_limit,
            large_p99_slo_ms=float(pol.large_p99_slo_ms) if pol.large_p99_slo_ms is not None else None,
        )
        self._p99_cache: Tuple[float, Optional[float]] = (-1.0, None)
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._refused = 0
        self._shed = 0
        self._routes = {r: _RouteCounters() for r in ROUTES}
        self._latency = LatencyRecorder()
        self._closed = False

    # ------------------------------------------------------------------------------------------ public
    @property
    def small_batcher(self) -> DynamicBatcher:
        """The small model's batcher."""
        return self._batchers["small"]

    @property
    def large_batcher(self) -> DynamicBatcher:
        """The large model's batcher."""
        return self._batchers["large"]

    def engine_call_age_s(self) -> float:
        """Seconds the longest engine call in progress has run (0.0 when both engines are idle)."""
        return max(b.engine_call_age_s() for b in self._batchers.values())

    def infer_tensor(self, x: np.ndarray, timeout_s: Optional[float] = None) -> InferResult:
        """Serve one input tensor (without the batch axis, or with a batch axis of 1)."""
        t0 = time.monotonic()
        item = self.pre.from_tensor(x)
        return self._serve(item, t0, self._timeout(timeout_s))

    def infer_batch(self, x: np.ndarray, timeout_s: Optional[float] = None) -> List[InferResult]:
        """Serve N items of one request (x with a leading batch axis): one answer per item, in order.

        The items enter the batchers as one chunk, so a request of many items costs one queue round
        trip instead of N; the router still decides per item. At most `max_queue` items per request.
        """
        t0 = time.monotonic()
        items = self.pre.from_tensor_batch(x, max_items=self.cfg.max_queue)
        return self._serve_many(items, t0, self._timeout(timeout_s))

    def infer_image(self, data: bytes, timeout_s: Optional[float] = None) -> InferResult:
        """Serve one encoded JPEG/PNG image; detection boxes are in the original image's pixels."""
        t0 = time.monotonic()
        item, hw = self.pre.from_image_bytes(data)
        return self._serve(item, t0, self._timeout(timeout_s), original_hw=hw)

    def infer_frame(self, frame: np.ndarray, timeout_s: Optional[float] = None) -> InferResult:
        """Serve one decoded frame (BGR as OpenCV reads it, or grayscale)."""
        t0 = time.monotonic()
        item = self.pre.from_decoded(frame)
        return self._serve(item, t0, self._timeout(timeout_s), original_hw=(int(frame.shape[0]), int(frame.shape[1])))

    def set_router(self, gate: Optional[str] = None, tau: Union[str, float, None] = None,
                   target_large_fraction: Union[str, float, None] = None, adaptive: Optional[bool] = None) -> dict:
        """Change the routing policy at run time (validated first; nothing changes on error)."""
        if gate == "linear" and self.head is None:
            raise RouterPolicyError("the active bundle ships no linear head; the linear gate is unavailable")
        try:
            tau_f = None if tau is None else float(tau)
            target_f = None if target_large_fraction is None else float(target_large_fraction)
        except (TypeError, ValueError):
            raise RouterPolicyError("tau and target_large_fraction must be numbers")
        with self._router_lock:
            self.router.set_policy(gate=gate, tau=tau_f, adaptive=adaptive, target_large_fraction=target_f)
            state = self.router.state()
        log.info("router policy now %s", state)
        return state

    def set_batch_sizes(self, batch: Dict[str, int]) -> Dict[str, int]:
        """Apply re-tuned batch sizes (per route) to the running batchers; returns what each now uses
        (capped by the engine's own max batch)."""
        out = {}
        for r, b in self._batchers.items():
            if r in batch:
                b.max_batch = max(1, min(int(batch[r]), self._engines[r].max_batch))
            out[r] = b.max_batch
        return out

    def router_state(self) -> dict:
        """The router's policy and live state (τ, shed level, shed count)."""
        with self._router_lock:
            state = self.router.state()
        state["shed_to_small"] = self._shed
        return state

    def stats_snapshot(self, reset: bool = True) -> dict:
        """Counters of the period (Telemetry field names); counters restart when `reset`."""
        b = {r: self._batchers[r].snapshot(reset) for r in ROUTES}
        with self._lock:
            routes = {}
            for r in ROUTES:
                c = self._routes[r]
                routes[r] = {
                    "requests": c.requests,
                    "errors": c.errors,
                    "latency_ms": percentiles(c.latency.snapshot(reset)),
                    "queue_depth": b[r]["queue_depth"],
                    "mean_batch": _round(b[r]["mean_batch"]),
                }
            answered = routes["small"]["requests"] + routes["large"]["requests"]
            batches = b["small"]["batches"] + b["large"]["batches"]
            snap = {
                "requests": self._requests,
                "errors": self._errors,
                "refused": self._refused,
                "latency_ms": percentiles(self._latency.snapshot(reset)),
                "queue_depth": b["small"]["queue_depth"] + b["large"]["queue_depth"],
                "mean_batch": _round((b["small"]["items"] + b["large"]["items"]) / batches) if batches else None,
                "large_fraction": _round(routes["large"]["requests"] / answered) if answered else None,
                "tau": None,
                "routes": routes,
                # exact bucket counts of the period (the Prometheus histograms accumulate them)
                "latency_histogram": {
                    "total": self._latency.histogram(reset),
                    "routes": {r: self._routes[r].latency.histogram(reset) for r in ROUTES},
                },
            }
            if reset:
                self._requests = self._errors = self._refused = 0
                for c in self._routes.values():
                    c.requests = c.errors = 0
        with self._router_lock:
            if self.router.thresholded:
                snap["tau"] = round(self.router.tau, 6)
        return snap

    def close(self) -> None:
        """Stop the batchers; waiting requests fail with ServiceClosedError. The engines stay open."""
        self._closed = True
        for b in self._batchers.values():
            b.close()

    # --------------------------------------------------------------------------------------- internals
    def _timeout(self, timeout_s: Optional[float]) -> float:
        return self.cfg.request_timeout_s if timeout_s is None else float(timeout_s)

    def _serve(self, item: np.ndarray, t0: float, timeout_s: float,
               original_hw: Optional[Tuple[int, int]] = None) -> InferResult:
        deadline = t0 + timeout_s
        with self._lock:
            self._requests += 1
        route = "small"
        gate = self.router.gate  # one attribute read: a consistent value without the router lock
        head = self.head  # fixed for the service's life
        try:
            if gate == "large-only":
                route, res = "large", self._run("large", item, deadline)
            elif gate == "linear" and head is not None and head.source == "input_stats":
                score = float(head.scores(input_stats(item[None]))[0])
                if self._decide(score):
                    route, res = self._escalate(item, deadline, None)
                else:
                    res = self._run("small", item, deadline)
            else:
                res = self._run("small", item, deadline)
                if gate != "small-only" and self._decide(self._score(gate, head, res)):
                    route, res = self._escalate(item, deadline, res)
            check_finite(route, res.outputs, self._answer_outputs[route])
        except OverloadedError:
            with self._lock:
                self._refused += 1
            raise
        except EdgeAgentError:
            with self._lock:
                self._errors += 1
                self._routes[route].errors += 1
            raise
        output = self._post[route](res.outputs, input_hw=self.pre.size_hw, original_hw=original_hw)
        done = time.monotonic()
        latency_ms = (done - t0) * 1000.0
        with self._lock:
            self._routes[route].requests += 1
        self._routes[route].latency.add(latency_ms, done)
        self._latency.add(latency_ms, done)
        return InferResult(route=route, output=output, latency_ms=round(latency_ms, 3),
                           extra={"batch": res.batch_size})

    def _run(self, route: str, item: np.ndarray, deadline: float) -> BatchItemResult:
        fut = self._batchers[route].submit({self._input_names[route]: item})
        remaining = deadline - time.monotonic()
        try:
            return fut.result(timeout=max(0.0, remaining))
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RequestTimeoutError("no answer from the %s model within the timeout" % route)

    def _escalate(self, item: np.ndarray, deadline: float,
                  small_res: Optional[BatchItemResult]) -> Tuple[str, BatchItemResult]:
        """Run large; when its queue is full, answer with small instead (load shedding)."""
        try:
            return "large", self._run("large", item, deadline)
        except OverloadedError:
            with self._lock:
                self._shed += 1
            if small_res is None:
                small_res = self._run("small", item, deadline)
            return "small", small_res

    def _score(self, gate: str, head: Optional[LinearHead], res: BatchItemResult) -> float:
        if gate == "linear" and head is not None:
            assert self._features_output is not None
            return float(head.scores(res.outputs[self._features_output][None])[0])
        post = self._post["small"]
        out = res.outputs[post.output_name]
        if post.post.kind == "detection":
            return detection_gate_score(post, out)
        if post.post.kind == "classification" and not post.post.apply_softmax:
            return float(np.max(out))
        if out.size <= 64:
            return top_probability(out.reshape(-1).tolist())
        return float(confidence_scores(np.asarray(out).reshape(1, -1))[0])

    def _decide(self, score: float) -> bool:
        now = time.monotonic()
        p99 = self._large_p99(now)
        with self._router_lock:
            self.router.update_load(now, self._batchers["large"].queue_depth(), p99)
            return self.router.decide(score)

    def _large_p99(self, now: float) -> float:
        """The large model's recent p99 latency, recomputed at most every _P99_REFRESH_S."""
        t_p99, p99 = self._p99_cache
        if now - t_p99 > _P99_REFRESH_S:
            p99 = self._batchers["large"].latency.recent_p99(now)
            self._p99_cache = (now, p99)
        return p99


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(float(v), 4)
