"""Shadow and A/B deployments: the pure parts.

* `agreement(active_output, candidate_output)`: how far two answers to the same input agree, in [0, 1]:
  top-1 agreement for classifiers (1 or 0), matched-box F1 for detectors (boxes of the same class
  matched greedily by IoU >= 0.5, best score first), element-wise closeness for raw outputs.
* `ShadowJudge`: the promotion gates over a shadow window. It collects one observation per mirrored
  input (agreement, candidate and active latency, or a candidate error) and decides once the window
  has elapsed *and* at least `min_inputs` inputs were compared: promote when agreement, latency ratio
  and candidate error rate all hold, refuse otherwise (the reason names the failed gate and figures).
* `Split`: a deterministic request splitter (`P` percent of the calls answer True, spread evenly: the
  n-th call goes to the candidate when floor(n·P/100) grows), used by A/B serving and by the mirror's
  sampling fraction.

Nothing here does I/O or reads the clock except through the injected `clock`.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Mapping, NamedTuple, Optional

import numpy as np

from edge_agent.bundle.manifest import HealthGates

#: IoU at which two boxes of the same class count as the same detection.
MATCH_IOU = 0.5
#: Latency samples kept per side for the window's p99 (the newest win).
MAX_LATENCY_SAMPLES = 8192


# ----------------------------------------------------------------------------------------- agreement


def _top1(out: Mapping[str, Any]) -> Optional[int]:
    top = out.get("top") or []
    return int(top[0]["index"]) if top else None


def _iou(a: List[float], b: List[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_box_f1(active: List[Mapping[str, Any]], candidate: List[Mapping[str, Any]],
                   iou_threshold: float = MATCH_IOU) -> float:
    """F1 of the candidate's detections against the active model's: a candidate box matches the unmatched
    active box of the same class with the highest IoU (at least `iou_threshold`), best scores first.
    Both empty is full agreement."""
    if not active and not candidate:
        return 1.0
    if not active or not candidate:
        return 0.0
    used = [False] * len(active)
    tp = 0
    for c in sorted(candidate, key=lambda d: -float(d.get("score", 0.0))):
        best, best_iou = -1, iou_threshold
        for i, a in enumerate(active):
            if used[i] or a.get("class") != c.get("class"):
                continue
            v = _iou(a["box"], c["box"])
            if v >= best_iou:
                best, best_iou = i, v
        if best >= 0:
            used[best] = True
            tp += 1
    return 2.0 * tp / (len(active) + len(candidate))


def agreement(active: Mapping[str, Any], candidate: Mapping[str, Any]) -> float:
    """Agreement in [0, 1] between two post-processed answers to the same input."""
    kind = active.get("kind")
    if kind != candidate.get("kind"):
        return 0.0
    if kind == "classification":
        a, c = _top1(active), _top1(candidate)
        return 1.0 if a is not None and a == c else 0.0
    if kind == "detection":
        return matched_box_f1(active.get("detections") or [], candidate.get("detections") or [])
    a_out, c_out = active.get("outputs") or {}, candidate.get("outputs") or {}
    if set(a_out) != set(c_out):
        return 0.0
    for k in a_out:
        x, y = np.asarray(a_out[k], dtype=np.float64), np.asarray(c_out[k], dtype=np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-3, atol=1e-4):
            return 0.0
    return 1.0


# --------------------------------------------------------------------------------------------- split


class Split:
    """`take()` is True for `percent` % of the calls, deterministically and evenly spread."""

    def __init__(self, percent: float) -> None:
        if not 0.0 <= percent <= 100.0:
            raise ValueError("split percent must be in [0, 100], got %r" % percent)
        self.percent = float(percent)
        self._bp = round(float(percent) * 100)  # basis points: exact integer arithmetic
        self._count = itertools.count(1)  # next() on it is atomic in CPython: no lock on the request path

    def take(self) -> bool:
        """Whether this call goes to the candidate (or is mirrored)."""
        n = next(self._count)
        return (n * self._bp) // 10000 > ((n - 1) * self._bp) // 10000


# ----------------------------------------------------------------------------------------------- gates


class ShadowGates(NamedTuple):
    """The promotion gates, from the candidate's manifest (`health.shadow_*`, `max_error_rate`)."""

    min_agreement: float
    min_inputs: int
    window_s: float
    max_latency_ratio: float
    max_error_rate: float
    latency_slack_ms: float = 0.0

    @classmethod
    def from_health(cls, h: HealthGates, *, max_window_s: Optional[float] = None,
                    latency_slack_ms: float = 0.0) -> ShadowGates:
        """Gates of a manifest; `max_window_s` caps the window (test rigs)."""
        window = float(h.shadow_window_s)
        if max_window_s is not None:
            window = min(window, float(max_window_s))
        return cls(float(h.shadow_min_agreement), int(h.shadow_min_inputs), window,
                   float(h.shadow_max_latency_ratio), float(h.max_error_rate), float(latency_slack_ms))


class ShadowVerdict(NamedTuple):
    """Promote or refuse, a one-line reason, and the figures it was decided on."""

    promote: bool
    reason: str
    measured: Dict[str, Any]


def _p99(samples: Deque[float]) -> Optional[float]:
    if not samples:
        return None
    return round(float(np.percentile(np.fromiter(samples, dtype=np.float64, count=len(samples)), 99)), 3)


class ShadowJudge:
    """Collects the shadow window's observations and decides promotion (thread-safe)."""

    def __init__(self, gates: ShadowGates, clock: Callable[[], float] = time.monotonic) -> None:
        self.gates = gates
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self.compared = 0
        self.agree_sum = 0.0
        self.errors = 0
        self._cand_lat: Deque[float] = collections.deque(maxlen=MAX_LATENCY_SAMPLES)
        self._active_lat: Deque[float] = collections.deque(maxlen=MAX_LATENCY_SAMPLES)
        self._verdict: Optional[ShadowVerdict] = None

    def observe(self, score: float, candidate_ms: float, active_ms: float) -> None:
        """One input both models answered: agreement score and both latencies."""
        with self._lock:
            self.compared += 1
            self.agree_sum += score
            self._cand_lat.append(candidate_ms)
            self._active_lat.append(active_ms)

    def observe_error(self) -> None:
        """One mirrored input the candidate failed to answer."""
        with self._lock:
            self.errors += 1

    def elapsed_s(self) -> float:
        """Seconds since the window opened."""
        return max(0.0, self._clock() - self.started)

    def measured(self) -> Dict[str, Any]:
        """The window's figures so far (JSON-ready)."""
        with self._lock:
            return self._measured()

    def _measured(self) -> Dict[str, Any]:
        tried = self.compared + self.errors
        return {
            "elapsed_s": round(self.elapsed_s(), 3),
            "window_s": self.gates.window_s,
            "compared": self.compared,
            "min_inputs": self.gates.min_inputs,
            "agreement": round(self.agree_sum / self.compared, 6) if self.compared else None,
            "min_agreement": self.gates.min_agreement,
            "candidate_errors": self.errors,
            "error_rate": round(self.errors / tried, 6) if tried else None,
            "max_error_rate": self.gates.max_error_rate,
            "candidate_p99_ms": _p99(self._cand_lat),
            "active_p99_ms": _p99(self._active_lat),
            "max_latency_ratio": self.gates.max_latency_ratio,
        }

    def verdict(self) -> Optional[ShadowVerdict]:
        """None until the window has elapsed with enough inputs; then the (final) decision."""
        with self._lock:
            if self._verdict is not None:
                return self._verdict
            g = self.gates
            if self.elapsed_s() < g.window_s or self.compared < g.min_inputs:
                return None
            m = self._measured()
            reason = self._failed_gate(m)
            if reason is None:
                self._verdict = ShadowVerdict(True, "gates held for %.0f s over %d inputs: agreement %.4f, "
                                              "candidate p99 %s ms vs active %s ms, error rate %s"
                                              % (m["elapsed_s"], m["compared"], m["agreement"],
                                                 m["candidate_p99_ms"], m["active_p99_ms"], m["error_rate"]), m)
            else:
                self._verdict = ShadowVerdict(False, reason, m)
            return self._verdict

    def _failed_gate(self, m: Dict[str, Any]) -> Optional[str]:
        g = self.gates
        if m["agreement"] is not None and m["agreement"] < g.min_agreement:
            return "agreement %.4f with the active model is under the gate %s over %d inputs" % (
                m["agreement"], g.min_agreement, m["compared"])
        if m["error_rate"] is not None and m["error_rate"] > g.max_error_rate:
            return "candidate error rate %.4f is over the gate %s (%d errors)" % (
                m["error_rate"], g.max_error_rate, m["candidate_errors"])
        c, a = m["candidate_p99_ms"], m["active_p99_ms"]
        if c is not None and a is not None and c > a * g.max_latency_ratio and c - a > g.latency_slack_ms:
            return "candidate p99 %.3f ms is over %s x the active model's %.3f ms" % (c, g.max_latency_ratio, a)
        return None
