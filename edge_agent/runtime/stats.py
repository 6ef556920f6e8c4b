"""Bounded latency recorders and percentiles for the runtime's statistics."""

from __future__ import annotations

import bisect
import collections
import threading
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

#: Latency samples kept per recorder and period (the newest win; percentiles are over these).
MAX_SAMPLES = 8192


#: Upper bounds (milliseconds) of the latency histogram's buckets; Prometheus adds +Inf. Fixed, so
#: histograms from every device of a fleet add up.
HISTOGRAM_BOUNDS_MS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0)


def percentiles(samples_ms: np.ndarray) -> Dict[str, Optional[float]]:
    """``{"p50", "p95", "p99"}`` in milliseconds, None when there are no samples."""
    if samples_ms.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(samples_ms, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


def merge_histograms(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """Sum two services' ``latency_histogram`` stats ({"total", "routes"}); either may be None."""
    if not a or not b:
        return a or b

    def add(x: Optional[dict], y: Optional[dict]) -> Optional[dict]:
        if not x or not y:
            return x or y
        return {"counts": [i + j for i, j in zip(x["counts"], y["counts"])], "sum_ms": x["sum_ms"] + y["sum_ms"]}

    routes = dict(a.get("routes") or {})
    for r, h in (b.get("routes") or {}).items():
        routes[r] = add(routes.get(r), h)
    return {"total": add(a.get("total"), b.get("total")), "routes": routes}


class LatencyRecorder:
    """Latencies of one period (bounded samples for percentiles, exact bucket counts for a histogram),
    plus a time window of recent ones for live SLO checks."""

    def __init__(self, *, max_samples: int = MAX_SAMPLES, recent_window_s: float = 2.0) -> None:
        self._lock = threading.Lock()
        self._period: Deque[float] = collections.deque(maxlen=max_samples)
        self._recent: Deque[Tuple[float, float]] = collections.deque(maxlen=max_samples)
        self.recent_window_s = recent_window_s
        self._buckets = [0] * (len(HISTOGRAM_BOUNDS_MS) + 1)  # the last one is +Inf
        self._sum_ms = 0.0

    def add(self, latency_ms: float, now: float) -> None:
        """Record one latency measured at monotonic time `now`."""
        i = bisect.bisect_left(HISTOGRAM_BOUNDS_MS, latency_ms)
        with self._lock:
            self._period.append(latency_ms)
            self._recent.append((now, latency_ms))
            self._buckets[i] += 1
            self._sum_ms += latency_ms

    def add_each(self, latencies_ms: List[float], now: float) -> None:
        """Record several latencies measured at the same time `now` (one lock round trip)."""
        idx = [bisect.bisect_left(HISTOGRAM_BOUNDS_MS, v) for v in latencies_ms]
        with self._lock:
            self._period.extend(latencies_ms)
            self._recent.extend([(now, v) for v in latencies_ms])
            for i in idx:
                self._buckets[i] += 1
            self._sum_ms += sum(latencies_ms)

    def add_many(self, latency_ms: float, count: int, now: float) -> None:
        """Record the same latency for `count` items answered together."""
        i = bisect.bisect_left(HISTOGRAM_BOUNDS_MS, latency_ms)
        with self._lock:
            self._period.extend([latency_ms] * count)
            self._recent.extend([(now, latency_ms)] * count)
            self._buckets[i] += count
            self._sum_ms += latency_ms * count

    def histogram(self, reset: bool) -> Dict[str, object]:
        """The period's histogram: ``{"counts": per bucket of HISTOGRAM_BOUNDS_MS then +Inf (not
        cumulative), "sum_ms"}``; cleared when `reset`."""
        with self._lock:
            out = {"counts": list(self._buckets), "sum_ms": round(self._sum_ms, 6)}
            if reset:
                self._buckets = [0] * len(self._buckets)
                self._sum_ms = 0.0
        return out

    def snapshot(self, reset: bool) -> np.ndarray:
        """The period's samples; cleared when `reset`."""
        with self._lock:
            out = np.fromiter(self._period, dtype=np.float64, count=len(self._period))
            if reset:
                self._period.clear()
        return out

    def recent_p99(self, now: float, min_samples: int = 20) -> Optional[float]:
        """p99 over the last `recent_window_s` seconds; None with fewer than `min_samples` samples."""
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.recent_window_s:
                self._recent.popleft()
            if len(self._recent) < min_samples:
                return None
            vals = np.fromiter((v for _, v in self._recent), dtype=np.float64, count=len(self._recent))
        return float(np.percentile(vals, 99))
