"""The inference service: preprocessing, the DynamicRouter over two dynamic batchers, postprocessing,
and the statistics telemetry reports.

One request takes this path::

    raw input -> Preprocessor -> gate -> small batcher ──(escalate?)──> large batcher -> Postprocessor

With the ``confidence`` gate or a ``linear`` head over the small model's features, the small model runs
first and its outputs decide; a ``linear`` head over input statistics decides before any model runs.
When the large model's queue refuses an escalated request, the small model's answer is returned
(counted as shed) rather than failing the request.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.config import RuntimeConfig
from edge_agent.errors import EdgeAgentError, InferenceError
from edge_agent.runtime.batcher import BatchItemResult, DynamicBatcher
from edge_agent.runtime.errors import OverloadedError, RequestTimeoutError, RouterPolicyError
from edge_agent.runtime.postprocess import Postprocessor, decode_yolo, nms_per_class
from edge_agent.runtime.preprocess import Preprocessor
from edge_agent.runtime.router import (
    DETECTION_FLOOR_RATIO,
    LinearHead,
    TauController,
    confidence_scores,
    detection_certainty,
    input_stats,
    top_probability,
)
from edge_agent.runtime.stats import LatencyRecorder, percentiles

log = logging.getLogger(__name__)

#: How often (seconds) the large model's recent p99 is recomputed for the shedding check.
_P99_REFRESH_S = 0.05
ROUTES = ("small", "large")


@dataclass(frozen=True)
class InferResult:
    """The answer to one request."""

    route: str
    output: Dict[str, Any]
    latency_ms: float
    extra: Dict[str, Any] = field(default_factory=dict)


class _RouteCounters:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = LatencyRecorder()


class InferenceService:
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
            _check_finite(route, res.outputs, self._answer_outputs[route])
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
        bad = _non_finite_rows(to_large, small_out, large_out, self._answer_outputs)
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
            return np.array([_detection_gate_score(post, o[i]) for i in range(n)])
        if post.post.kind == "classification" and not post.post.apply_softmax:
            return np.asarray(o, dtype=np.float64).reshape(n, -1).max(axis=1)
        return confidence_scores(np.asarray(o).reshape(n, -1))

    def _decide_many(self, scores: np.ndarray) -> np.ndarray:
        now = time.monotonic()
        large = self._batchers["large"]
        t_p99, p99 = self._p99_cache
        if now - t_p99 > _P99_REFRESH_S:
            p99 = large.latency.recent_p99(now)
            self._p99_cache = (now, p99)
        with self._router_lock:
            self.router.update_load(now, large.queue_depth(), p99)
            return np.array([self.router.decide(float(s)) for s in scores], dtype=bool)

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
            return _detection_gate_score(post, out)
        if post.post.kind == "classification" and not post.post.apply_softmax:
            return float(np.max(out))
        if out.size <= 64:
            return top_probability(out.reshape(-1).tolist())
        return float(confidence_scores(np.asarray(out).reshape(1, -1))[0])

    def _decide(self, score: float) -> bool:
        now = time.monotonic()
        large = self._batchers["large"]
        t_p99, p99 = self._p99_cache
        if now - t_p99 > _P99_REFRESH_S:
            p99 = large.latency.recent_p99(now)
            self._p99_cache = (now, p99)
        with self._router_lock:
            self.router.update_load(now, large.queue_depth(), p99)
            return self.router.decide(score)


def _detection_gate_score(post: Postprocessor, out: np.ndarray) -> float:
    """The confidence gate's score for one frame of the small detector: `detection_certainty` of its
    candidate boxes after NMS at a floor under the score threshold."""
    boxes, scores, cls = decode_yolo(out)
    floor = post.score_threshold * DETECTION_FLOOR_RATIO
    keep = nms_per_class(boxes, scores, cls, score_threshold=floor, iou_threshold=post.iou_threshold,
                         max_detections=post.post.max_detections)
    return detection_certainty(scores[keep], post.score_threshold)


def _check_finite(route: str, outputs: Dict[str, np.ndarray], names: Tuple[str, ...]) -> None:
    """A NaN or Inf in the outputs an answer is made of is an inference error, not an answer."""
    for name in names:
        v = outputs[name]
        if v.dtype.kind != "f":
            continue
        # Small outputs (one item's logits): a Python sum in double precision is finite exactly when every
        # value is (float32/16 values cannot overflow it) and costs a tenth of np.isfinite(v).all().
        finite = math.isfinite(sum(v.ravel().tolist())) if v.size <= 256 else bool(np.isfinite(v).all())
        if not finite:
            raise InferenceError("the %s model returned a non-finite value (NaN or Inf) in output %r" % (route, name))


def _non_finite_rows(to_large: np.ndarray, small_out: Optional[Dict[str, np.ndarray]],
                     large_out: Optional[Dict[str, np.ndarray]],
                     names: Dict[str, Tuple[str, ...]]) -> Optional[Tuple[str, int]]:
    """(route, number of items) of the first route whose answering rows hold a NaN/Inf in the outputs
    answers are made of, else None (one vectorised check per chunk)."""
    for route, outs, rows in (("large", large_out, None), ("small", small_out, ~to_large)):
        if outs is None:
            continue
        for name in names[route]:
            v = outs[name]
            if v.dtype.kind != "f":
                continue
            ok = np.isfinite(v.reshape(len(v), -1)).all(axis=1)
            if rows is not None:
                ok = ok | ~rows  # rows answered by the large model do not count against the small one
            if not ok.all():
                return route, int(np.count_nonzero(~ok))
    return None


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(float(v), 4)
