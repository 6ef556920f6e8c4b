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
