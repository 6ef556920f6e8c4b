"""Router calibration: run both models over labelled data, sweep τ, recommend one you can trust.

`collect` runs the engines (the only I/O here) and measures each model's cost per item; the rest is
pure. The data are split: τ is chosen on the calibration part and checked on a held-out part it never
saw. The choice rests on a bound, not on the point estimate: at each τ the accuracy lost against
large-only is bounded above by an exact one-sided Clopper-Pearson bound on the share of items the
router loses (routed to small, where small is wrong and large is right); τ is the one with the fewest
large calls whose bound is within the budget. Items the small model gets right and the large one wrong
are not credited, so the bound is conservative.

Throughput estimates come from the measured costs: with a gate that reads the small model
(``confidence``, or ``linear`` over features) every item pays the small model and the large fraction
also pays the large one; with a ``linear`` head over input statistics, items go to one model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

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

    def subset(self, idx: np.ndarray) -> CalibrationData:
        """The same data restricted to the items `idx` (costs unchanged)."""
        return replace(self, scores=self.scores[idx], small_correct=self.small_correct[idx],
                       large_correct=self.large_correct[idx])


def split_holdout(n: int, fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(calibration indices, held-out indices): a seeded shuffle, `fraction` of the items held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("the held-out fraction must be within (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    k = round(n * fraction)
    if k < 1 or k > n - 1:
        raise ValueError("%d items are too few to hold out %g of them" % (n, fraction))
    return np.sort(order[k:]), np.sort(order[:k])


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    i = np.arange(0, k + 1, dtype=np.float64)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(k + 1)])
    return float(np.exp(logc + i * math.log(p) + (n - i) * math.log1p(-p)).sum())


def binomial_upper(k: int, n: int, alpha: float) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound at level 1 - alpha on a rate seen k times in n."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):  # bisection: the CDF falls as p grows
        mid = (lo + hi) / 2.0
        if _binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def binomial_interval(k: int, n: int, confidence: float) -> Tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval at `confidence` for a rate seen k times in n."""
    alpha = (1.0 - confidence) / 2.0
    upper = binomial_upper(k, n, alpha)
    lower = 0.0 if k == 0 else 1.0 - binomial_upper(n - k, n, alpha)
    return lower, upper


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


def evaluate(data: CalibrationData, tau: float, *, confidence: float = 0.95) -> Dict[str, float]:
    """Large fraction, accuracy, the drop against large-only (points) with its one-sided upper bound at
    `confidence`, the items lost, and the estimated items/s of the router at τ."""
    to_large = routes_large(data.gate, data.scores, tau)
    n = int(to_large.size)
    frac = float(to_large.mean())
    acc = float(np.where(to_large, data.large_correct, data.small_correct).mean())
    losses = int(np.count_nonzero(~to_large & ~data.small_correct & data.large_correct))
    small_share = 1.0 if data.small_always_runs else 1.0 - frac
    cost = data.cost_small_ms * small_share + data.cost_large_ms * frac
    return {"tau": float(tau), "large_fraction": frac, "accuracy": acc, "items": n, "losses": losses,
            "drop_pts": (data.large_accuracy - acc) * 100.0,
            "drop_upper_pts": binomial_upper(losses, n, 1.0 - confidence) * 100.0,
            "items_per_s": 1000.0 / max(cost, 1e-9)}


def sweep(data: CalibrationData, taus: List[float], *, confidence: float = 0.95) -> List[Dict[str, float]]:
    """`evaluate` at every τ."""
    return [evaluate(data, t, confidence=confidence) for t in taus]


def recommend(rows: List[Dict[str, float]], *, max_drop_pts: float,
              key: str = "drop_upper_pts") -> Optional[Dict[str, float]]:
    """The row with the fewest large calls whose `key` (by default the upper bound on the drop) is
    within `max_drop_pts` points (ties: the more accurate); None when no row qualifies."""
    ok = [r for r in rows if r[key] <= max_drop_pts + 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["large_fraction"], -r["accuracy"]))


def binding_notes(data: CalibrationData, best: Optional[Dict[str, float]], *, tau_min: float, tau_max: float,
                  max_drop_pts: float, confidence: float) -> List[str]:
    """What decided the choice, in words: the bundle's τ bound (when a τ beyond it would need fewer
    large calls) and the confidence bound (when the point estimate alone would pick another τ)."""
    notes = []
    lo, hi = float(np.min(data.scores)) - 1e-9, float(np.max(data.scores)) + 1e-9
    free = recommend(sweep(data, candidate_taus(data.scores, min(lo, tau_min), max(hi, tau_max)),
                           confidence=confidence), max_drop_pts=max_drop_pts)
    side = "tau_min" if data.gate == "confidence" else "tau_max"
    bound = tau_min if side == "tau_min" else tau_max
    if free is not None and (best is None or free["large_fraction"] < best["large_fraction"] - 1e-12):
        notes.append("the bundle's %s = %g binds: tau = %.6g beyond it would meet the budget with large fraction "
                     "%.3f" % (side, bound, free["tau"], free["large_fraction"]))
    rows = sweep(data, candidate_taus(data.scores, tau_min, tau_max), confidence=confidence)
    point = recommend(rows, max_drop_pts=max_drop_pts, key="drop_pts")
    if point is not None and (best is None or point["large_fraction"] < best["large_fraction"] - 1e-12):
        notes.append("the %g%% confidence bound binds: by the point estimate alone tau = %.6g (large fraction %.3f, "
                     "%.2f points lost on the calibration part) would be chosen"
                     % (confidence * 100, point["tau"], point["large_fraction"], point["drop_pts"]))
    return notes
