"""Thread-safe monotonic counters for the agent's own bookkeeping (published, spooled, malformed...).

Latency windows and percentiles live with the runtime (`edge_agent.runtime.stats`); this module only
holds the plain counters that the runtime does not, so they are not written twice.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterable


class Counters:
    """Named counters that only go up; safe to bump from any thread."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: Dict[str, int] = {n: 0 for n in names}

    def inc(self, name: str, n: int = 1) -> int:
        """Add `n` (>= 0) to `name`; returns the new value."""
        if n < 0:
            raise ValueError("counters only go up (got %d for %s)" % (n, name))
        with self._lock:
            v = self._values.get(name, 0) + n
            self._values[name] = v
            return v

    def get(self, name: str) -> int:
        """Current value (0 for a counter never bumped)."""
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> Dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._values)


class CumulativeHistogram:
    """Bucket counts and a sum that only go up: the period histograms of the runtime's stats added
    together, for a Prometheus histogram. Malformed periods are ignored, never fatal."""

    def __init__(self, n_buckets: int) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * n_buckets
        self._sum = 0.0

    def add(self, period: object) -> bool:
        """Add one period's ``{"counts", "sum_ms"}``; False (and nothing added) when it does not fit."""
        if not isinstance(period, dict):
            return False
        counts, total = period.get("counts"), period.get("sum_ms")
        if (not isinstance(counts, list) or len(counts) != len(self._counts)
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                or not isinstance(total, (int, float)) or isinstance(total, bool) or not total >= 0):
            return False
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts)]
            self._sum += float(total)
        return True

    def snapshot(self) -> Dict[str, object]:
        """``{"counts": per bucket (not cumulative), "sum_ms", "count"}``."""
        with self._lock:
            return {"counts": list(self._counts), "sum_ms": self._sum, "count": sum(self._counts)}
