"""Bounded latency recorders and percentiles for the runtime's statistics."""

from __future__ import annotations

import collections
import threading
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

#: Latency samples kept per recorder and period (the newest win; percentiles are over these).
MAX_SAMPLES = 8192


def percentiles(samples_ms: np.ndarray) -> Dict[str, Optional[float]]:
    """``{"p50", "p95", "p99"}`` in milliseconds, None when there are no samples."""
    if samples_ms.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(samples_ms, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


class LatencyRecorder:
    """Latencies of one period (bounded), plus a time window of recent ones for live SLO checks."""

    def __init__(self, *, max_samples: int = MAX_SAMPLES, recent_window_s: float = 2.0) -> None:
        self._lock = threading.Lock()
        self._period: Deque[float] = collections.deque(maxlen=max_samples)
        self._recent: Deque[Tuple[float, float]] = collections.deque(maxlen=max_samples)
        self.recent_window_s = recent_window_s

    def add(self, latency_ms: float, now: float) -> None:
        """Record one latency measured at monotonic time `now`."""
        with self._lock:
            self._period.append(latency_ms)
            self._recent.append((now, latency_ms))

    def add_each(self, latencies_ms: List[float], now: float) -> None:
        """Record several latencies measured at the same time `now` (one lock round trip)."""
        with self._lock:
            self._period.extend(latencies_ms)
            self._recent.extend([(now, v) for v in latencies_ms])

    def add_many(self, latency_ms: float, count: int, now: float) -> None:
        """Record the same latency for `count` items answered together."""
        with self._lock:
            self._period.extend([latency_ms] * count)
            self._recent.extend([(now, latency_ms)] * count)

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
