"""Router calibration: run both models over labelled data, sweep τ, recommend one.

`collect` runs the engines (the only I/O here) and measures each model's cost per item; `sweep` and
`recommend` are pure. Throughput estimates come from the measured costs: with a gate that reads the
small model (``confidence``, or ``linear`` over features) every item pays the small model and the large
fraction also pays the large one; with a ``linear`` head over input statistics, items go to one model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from edge_agent.runtime.router import LinearHead, confidence_scores, input_stats, routes_large


@dataclass(frozen=True)
class CalibrationData:
    """Per-item gate scores and correctness of both models, plus measured costs."""

    gate: str
    scores: np.ndarray
    small_correct: np.ndarray
    large_correct: np.ndarray
    cost_small_ms: float
    cost_large_ms: float
    small_always_runs: bool

    @property
    def small_accuracy(self) -> float:
        """Accuracy of the small model alone."""
        return float(self.small_correct.mean())

    @property
    def large_accuracy(self) -> float:
        """Accuracy of the large model alone."""
        return float(self.large_correct.mean())


def _run_batched(engine: Any, input_name: str, x: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    outs: Dict[str, List[np.ndarray]] = {}
    for s in range(0, len(x), batch):
        for k, v in engine.infer({input_name: x[s : s + batch]}).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def measure_cost_ms(engine: Any, input_name: str, x: np.ndarray, *, batch: int, repeats: int = 20) -> float:
    """Median milliseconds per item of one batch of `batch` items (after a warm-up run)."""
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])).astype(x.dtype))
    engine.infer({input_name: xb})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.infer({input_name: xb})
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0 / batch


def collect(small: Any, large: Any, x: np.ndarray, y: np.ndarray, *, gate: str, head: Optional[LinearHead] = None,
            logits_output: str = "logits", features_output: Optional[str] = "features",
            batch: int = 32) -> CalibrationData:
    """Run both engines over (x, y) and measure their costs at `batch` items per call."""
    batch = max(1, min(batch, small.max_batch, large.max_batch))
    in_s, in_l = small.inputs[0].name, large.inputs[0].name
    out_s = _run_batched(small, in_s, x, batch)
    out_l = _run_batched(large, in_l, x, batch)
    small_pred = out_s[logits_output].reshape(len(x), -1).argmax(axis=1)
    large_pred = out_l[logits_output].reshape(len(x), -1).argmax(axis=1)
    always = True
    if gate == "confidence":
        scores = confidence_scores(out_s[logits_output])
    elif gate == "linear":
        if head is None:
            raise ValueError("the linear gate needs a linear head")
        if head.source == "features":
            if not features_output or features_output not in out_s:
                raise ValueError("the small model has no features output for the linear head")
            scores = head.scores(out_s[features_output])
        else:
            scores = head.scores(input_stats(x))
            always = False
    else:
        raise ValueError("gate %r has no threshold to calibrate" % gate)
    return CalibrationData(
        gate=gate,
        scores=np.asarray(scores, dtype=np.float64),
        small_correct=small_pred == y,
        large_correct=large_pred == y,
        cost_small_ms=measure_cost_ms(small, in_s, x, batch=batch),
        cost_large_ms=measure_cost_ms(large, in_l, x, batch=batch),
        small_always_runs=always,
    )


def candidate_taus(scores: np.ndarray, tau_min: float, tau_max: float, limit: int = 400) -> List[float]:
    """Midpoints between distinct scores (so no item sits on τ) within the bounds, plus the bounds."""
    u = np.unique(np.asarray(scores, dtype=np.float64))
    mids = (u[:-1] + u[1:]) / 2.0 if u.size > 1 else u
    mids = mids[(mids > tau_min) & (mids < tau_max)]
    if mids.size > limit:
        mids = mids[np.linspace(0, mids.size - 1, limit).round().astype(int)]
    return [float(tau_min), *mids.tolist(), float(tau_max)]


def evaluate(data: CalibrationData, tau: float) -> Dict[str, float]:
    """Large fraction, accuracy and estimated items/s of the router at τ."""
    to_large = routes_large(data.gate, data.scores, tau)
    frac = float(to_large.mean())
    acc = float(np.where(to_large, data.large_correct, data.small_correct).mean())
    small_share = 1.0 if data.small_always_runs else 1.0 - frac
    cost = data.cost_small_ms * small_share + data.cost_large_ms * frac
    return {"tau": float(tau), "large_fraction": frac, "accuracy": acc, "items_per_s": 1000.0 / max(cost, 1e-9)}


def sweep(data: CalibrationData, taus: List[float]) -> List[Dict[str, float]]:
    """`evaluate` at every τ."""
    return [evaluate(data, t) for t in taus]


def recommend(rows: List[Dict[str, float]], *, large_accuracy: float,
              max_drop_pts: float) -> Optional[Dict[str, float]]:
    """The row with the fewest large calls whose accuracy is within `max_drop_pts` points of large-only
    (ties: the more accurate); None when no row qualifies."""
    floor = large_accuracy - max_drop_pts / 100.0 - 1e-12
    ok = [r for r in rows if r["accuracy"] >= floor]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["large_fraction"], -r["accuracy"]))
