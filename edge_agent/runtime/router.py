"""The DynamicRouter's pure logic: gate scores, the routing rule, and the adaptive threshold τ.

Nothing here touches engines, threads or clocks: scores and times come in as values, decisions go out.

Gates and their rule (the product card's small/large gating):

* ``confidence``: run small; its top softmax probability is the score; escalate to large when
  ``score < τ``. Raising τ sends more to large.
* ``linear``: a linear complexity head (weights ``w``, bias ``b`` in an npz shipped in the bundle) over
  either the small model's pooled features (``source = "features"``) or cheap input statistics
  (``source = "input_stats"``, see `input_stats`); the score is ``sigmoid(w·v + b)`` and the item goes
  to large when ``score > τ``. Raising τ sends fewer to large. With input statistics the decision is made
  before any model runs, so large-routed items skip the small model entirely.
* ``small-only`` / ``large-only``: fixed routes (baselines, or an operator's emergency switch).

For a detection bundle the ``confidence`` gate's score is `detection_certainty`: how far the small
detector's least decided box (after NMS at a low floor) lies from the score threshold that decides
whether it is reported. A frame whose boxes are all clearly in or clearly out scores near 1 and stays
on the small model; a frame with a box near the threshold (a faint object, or a clutter blob the small
model half believes) scores near 0 and goes to large when the score is under τ.

τ adaptation (`TauController`): with a target large fraction, τ is set to the quantile of the gate
scores over a sliding window that puts exactly that fraction on the large side. Independently, when the
large model's queue or its p99 latency passes its SLO, a shed level rises quickly and pulls τ towards the
bound that sends least to large; it decays slowly once the pressure is gone. τ never leaves
[τmin, τmax].
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Optional, Sequence

import numpy as np

from edge_agent.runtime.errors import RouterPolicyError

GATES = ("confidence", "linear", "small-only", "large-only")
HEAD_SOURCES = ("features", "input_stats")
#: Names of the columns `input_stats` returns, in order.
INPUT_STAT_NAMES = ("mean", "std", "min", "max", "dark_fraction", "bright_fraction", "grad_x", "grad_y")
#: Largest linear-head npz read, in bytes (a head is one weight per feature: kilobytes).
MAX_HEAD_BYTES = 16 * 1024 * 1024


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (N, C) array, numerically stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence_scores(logits: np.ndarray) -> np.ndarray:
    """Top softmax probability per row of (N, C) logits (= 1 / sum(exp(z - max z)))."""
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    return 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)


def top_probability(logits: Sequence[float]) -> float:
    """Top softmax probability of one item's logits; plain Python, which beats numpy on a few classes."""
    m = max(logits)
    return 1.0 / sum(math.exp(v - m) for v in logits)


#: Boxes scoring under this share of the postprocessing score threshold are background for
#: `detection_certainty` (they are neither reported nor doubtful).
DETECTION_FLOOR_RATIO = 0.25


def detection_certainty(scores: np.ndarray, threshold: float) -> float:
    """Certainty in [0, 1] of one frame's detections, for the confidence gate (large when under τ).

    `scores` are the frame's candidate boxes after NMS (at a floor of `DETECTION_FLOOR_RATIO` x
    `threshold`); `threshold` is the score at which a box is reported. Each box's margin is its distance
    from the threshold as a share of the room on its side (``(s - t) / (1 - t)`` above, ``(t - s) / t``
    below); the frame's certainty is the smallest margin, or 1.0 without candidates.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return 1.0
    t = min(max(float(threshold), 1e-6), 1.0 - 1e-6)
    margins = np.where(s >= t, (s - t) / (1.0 - t), (t - s) / t)
    return float(np.clip(margins.min(), 0.0, 1.0))


def input_stats(x: np.ndarray) -> np.ndarray:
    """Eight cheap statistics per item of a batch (N, ...): see `INPUT_STAT_NAMES`.

    Spatial gradients use the last two axes (H, W for NCHW; for NHWC they mix W and C, which is still a
    fixed, cheap statistic the head is trained on).
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    span = np.maximum(hi - lo, 1e-6)
    norm = (flat - lo[:, None]) / span[:, None]
    if x.ndim >= 3:
        gx = np.abs(np.diff(x, axis=-1)).reshape(n, -1).mean(axis=1)
        gy = np.abs(np.diff(x, axis=-2)).reshape(n, -1).mean(axis=1)
    else:
        gx = gy = np.zeros(n, np.float32)
    return np.stack(
        [flat.mean(axis=1), flat.std(axis=1), lo, hi, (norm < 0.25).mean(axis=1), (norm > 0.75).mean(axis=1), gx, gy],
        axis=1,
    ).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


@dataclass(frozen=True)
class LinearHead:
    """``sigmoid(w·v + b)`` over the small model's features or over `input_stats`."""

    w: np.ndarray
    b: float
    source: str

    def __post_init__(self) -> None:
        if self.source not in HEAD_SOURCES:
            raise RouterPolicyError(
                "linear head source must be one of %s, got %r" % (", ".join(HEAD_SOURCES), self.source)
            )
        if self.w.ndim != 1 or self.w.size < 1 or not np.all(np.isfinite(self.w)) or not math.isfinite(self.b):
            raise RouterPolicyError("linear head needs a finite 1-D weight vector and a finite bias")

    @property
    def dim(self) -> int:
        """Length of the vector the head reads."""
        return int(self.w.size)

    def scores(self, v: np.ndarray) -> np.ndarray:
        """Scores in (0, 1) for a batch of vectors (N, dim) (any trailing shape is flattened)."""
        v = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
        if v.shape[1] != self.dim:
            raise RouterPolicyError("linear head expects %d values per item, got %d" % (self.dim, v.shape[1]))
        return _sigmoid(v @ self.w + self.b)

    def save(self, path: Path) -> None:
        """Write the npz the bundle ships (`w`, `b`, `source`)."""
        with open(path, "wb") as f:
            np.savez(f, w=self.w.astype(np.float32), b=np.float32(self.b), source=np.array(self.source))

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        """Read a head npz; anything malformed is a RouterPolicyError with a one-line reason."""
        from edge_agent.npz import NpzError, load_npz

        try:
            z = load_npz(path, max_bytes=MAX_HEAD_BYTES)
        except NpzError as e:
            raise RouterPolicyError("cannot read linear head %s" % e) from None
        missing = [k for k in ("w", "b", "source") if k not in z]
        if missing:
            raise RouterPolicyError("linear head %s lacks %s" % (Path(path).name, ", ".join(missing)))
        try:
            w = np.asarray(z["w"], dtype=np.float64).reshape(-1)
            b = float(np.asarray(z["b"]).reshape(-1)[0])
            source = str(np.asarray(z["source"]).reshape(-1)[0])
        except (TypeError, ValueError, IndexError) as e:
            raise RouterPolicyError("cannot read linear head %s: %s" % (Path(path).name, e)) from None
        return cls(w=w, b=b, source=source)


def fit_linear_head(v: np.ndarray, needs_large: np.ndarray, *, source: str, l2: float = 1e-3,
                    steps: int = 2000, lr: float = 0.5) -> LinearHead:
    """Logistic regression (full-batch gradient descent on standardised inputs) predicting `needs_large`.

    The standardisation is folded back into `w` and `b`, so the head reads raw vectors.
    """
    v = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
    y = np.asarray(needs_large, dtype=np.float64).reshape(-1)
    if len(v) != len(y) or len(y) < 2:
        raise ValueError("need at least two labelled vectors")
    mu = v.mean(axis=0)
    sd = v.std(axis=0)
    sd[sd < 1e-8] = 1.0
    z = (v - mu) / sd
    w = np.zeros(z.shape[1])
    prior = min(max(y.mean(), 1e-3), 1 - 1e-3)
    b = math.log(prior / (1 - prior))
    pos_weight = (1 - prior) / prior  # balance the (usually rare) escalations
    sample_w = np.where(y > 0.5, pos_weight, 1.0)
    sample_w /= sample_w.mean()
    for _ in range(steps):
        p = _sigmoid(z @ w + b)
        g = (p - y) * sample_w
        w -= lr * (z.T @ g / len(y) + l2 * w)
        b -= lr * float(g.mean())
    return LinearHead(w=w / sd, b=float(b - (w / sd) @ mu), source=source)


def routes_large(gate: str, scores: np.ndarray, tau: float) -> np.ndarray:
    """Boolean mask: which items the gate sends to the large model at threshold τ."""
    scores = np.asarray(scores, dtype=np.float64)
    if gate == "confidence":
        return scores < tau
    if gate == "linear":
        return scores > tau
    if gate == "large-only":
        return np.ones(scores.shape, dtype=bool)
    if gate == "small-only":
        return np.zeros(scores.shape, dtype=bool)
    raise RouterPolicyError("unknown gate %r (one of %s)" % (gate, ", ".join(GATES)))


def tau_for_fraction(gate: str, scores: np.ndarray, target: float) -> float:
    """The τ that sends (as nearly as the scores allow) `target` of these items to large."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if s.size == 0:
        raise ValueError("no scores")
    k = round(min(max(target, 0.0), 1.0) * s.size)
    if gate == "confidence":  # large iff score < τ: τ just above the k-th smallest score
        if k == 0:
            return float(s[0])
        if k == s.size:
            return float(s[-1]) + 1e-12
        return float((s[k - 1] + s[k]) / 2.0)
    if gate == "linear":  # large iff score > τ: τ just below the k-th largest score
        if k == 0:
            return float(s[-1])
        if k == s.size:
            return float(s[0]) - 1e-12
        return float((s[s.size - k - 1] + s[s.size - k]) / 2.0)
    raise RouterPolicyError("gate %r has no threshold" % gate)


def _more_large_sign(gate: str) -> float:
    """+1 when raising τ sends more to large (confidence), -1 when it sends fewer (linear)."""
    return 1.0 if gate == "confidence" else -1.0


class TauController:
    """The threshold τ of one gate: fixed, or adapted to a target large fraction, plus load shedding.

    `decide(score, now)` records the score and returns the route; `update_load(now, ...)` feeds the large
    model's queue depth and recent p99 latency. Not thread-safe: the service holds a lock around it.
    """

    #: Seconds for the shed level to go from 0 to 1 while overloaded (fast), and back (slow).
    ATTACK_S = 0.25
    RELEASE_S = 2.0
    #: Re-fit τ to the window after this many new scores.
    UPDATE_EVERY = 8

    def __init__(self, *, gate: str, tau: float, tau_min: float, tau_max: float, adaptive: bool = False,
                 target_large_fraction: Optional[float] = None, window: int = 500, large_queue_limit: int = 64,
                 large_p99_slo_ms: Optional[float] = None) -> None:
        if not tau_min <= tau_max:
            raise RouterPolicyError("router needs tau_min <= tau_max")
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        self.window = int(window)
        self.large_queue_limit = int(large_queue_limit)
        self.large_p99_slo_ms = large_p99_slo_ms
        self._scores: Deque[float] = collections.deque(maxlen=self.window)
        self._since_update = 0
        self.shed_level = 0.0
        self.shed_episodes = 0
        self._last_load_t: Optional[float] = None
        self.gate = "confidence"
        self.base_tau = self.tau_min
        self.adaptive = False
        self.target_large_fraction: Optional[float] = None
        self.set_policy(gate=gate, tau=tau, adaptive=adaptive, target_large_fraction=target_large_fraction)

    # ---------------------------------------------------------------------------------------- policy
    def set_policy(self, *, gate: Optional[str] = None, tau: Optional[float] = None, adaptive: Optional[bool] = None,
                   target_large_fraction: Optional[float] = None) -> None:
        """Change any part of the policy; validated as a whole before anything changes."""
        new_gate = self.gate if gate is None else gate
        if new_gate not in GATES:
            raise RouterPolicyError("unknown gate %r (one of %s)" % (new_gate, ", ".join(GATES)))
        new_tau = self.base_tau if tau is None else float(tau)
        if not (math.isfinite(new_tau) and self.tau_min <= new_tau <= self.tau_max):
            raise RouterPolicyError(
                "tau %s is outside the bundle's bounds [%s, %s]" % (new_tau, self.tau_min, self.tau_max)
            )
        new_target = self.target_large_fraction if target_large_fraction is None else float(target_large_fraction)
        if new_target is not None and not 0.0 <= new_target <= 1.0:
            raise RouterPolicyError("target_large_fraction must be within [0, 1], got %s" % new_target)
        new_adaptive = self.adaptive if adaptive is None else bool(adaptive)
        if new_adaptive and new_target is None:
            raise RouterPolicyError("adaptive routing needs target_large_fraction")
        if new_gate != self.gate:
            self._scores.clear()  # scores of another gate mean something else
        self.gate, self.base_tau = new_gate, new_tau
        self.adaptive, self.target_large_fraction = new_adaptive, new_target

    @property
    def thresholded(self) -> bool:
        """Whether the gate uses τ at all."""
        return self.gate in ("confidence", "linear")

    @property
    def tau(self) -> float:
        """The effective τ: the base τ pulled towards the least-large bound by the shed level."""
        if not self.thresholded:
            return self.base_tau
        least_large = self.tau_min if _more_large_sign(self.gate) > 0 else self.tau_max
        t = self.base_tau + self.shed_level * (least_large - self.base_tau)
        return min(max(t, self.tau_min), self.tau_max)

    # -------------------------------------------------------------------------------------- decisions
    def decide(self, score: float) -> bool:
        """Record one gate score and return True when the item goes to the large model."""
        if self.gate == "large-only":
            return True
        if self.gate == "small-only":
            return False
        score = float(score)
        self._scores.append(score)
        self._since_update += 1
        if self.adaptive and self._since_update >= self.UPDATE_EVERY:
            self._refit()
        # the rule of `routes_large`, on one Python float (a one-element array costs more than the rest)
        return score < self.tau if self.gate == "confidence" else score > self.tau

    def _refit(self) -> None:
        self._since_update = 0
        if self.target_large_fraction is None or len(self._scores) < min(self.window, 32):
            return
        t = tau_for_fraction(self.gate, np.fromiter(self._scores, dtype=np.float64), self.target_large_fraction)
        self.base_tau = min(max(t, self.tau_min), self.tau_max)

    def window_large_fraction(self) -> Optional[float]:
        """Share of the windowed scores that the current τ sends to large (None before any score)."""
        if not self._scores:
            return None
        return float(routes_large(self.gate, np.fromiter(self._scores, dtype=np.float64), self.tau).mean())

    # ------------------------------------------------------------------------------------------- load
    def overloaded(self, large_queue_depth: int, large_p99_ms: Optional[float]) -> bool:
        """Whether the large model is past its queue limit or its p99 SLO."""
        if large_queue_depth >= self.large_queue_limit:
            return True
        return self.large_p99_slo_ms is not None and large_p99_ms is not None and large_p99_ms > self.large_p99_slo_ms

    def update_load(self, now: float, large_queue_depth: int, large_p99_ms: Optional[float]) -> bool:
        """Move the shed level with the large model's load; returns whether it is overloaded now."""
        dt = 0.0 if self._last_load_t is None else max(0.0, now - self._last_load_t)
        self._last_load_t = now
        over = self.overloaded(large_queue_depth, large_p99_ms)
        if over:
            if self.shed_level == 0.0:
                self.shed_episodes += 1
            self.shed_level = min(1.0, self.shed_level + max(dt / self.ATTACK_S, 0.05))
        else:
            self.shed_level = max(0.0, self.shed_level - dt / self.RELEASE_S)
        return over

    def state(self) -> dict:
        """JSON-ready view of the policy and its live state."""
        return {
            "gate": self.gate,
            "tau": round(self.tau, 6),
            "base_tau": round(self.base_tau, 6),
            "tau_min": self.tau_min,
            "tau_max": self.tau_max,
            "adaptive": self.adaptive,
            "target_large_fraction": self.target_large_fraction,
            "shed_level": round(self.shed_level, 4),
            "shed_episodes": self.shed_episodes,
            "window_large_fraction": self.window_large_fraction(),
        }
