"""Rate limits the controller applies to what it sends."""

from __future__ import annotations

import threading
import time
from typing import Optional


class RateLimit:
    """A token bucket over bytes per second (None = unlimited)."""

    def __init__(self, bytes_per_s: Optional[int]) -> None:
        self.rate = bytes_per_s
        # Bursts of at most a tenth of a second's worth: the cap holds over short intervals too.
        self.capacity = float(bytes_per_s or 0) / 10
        self.tokens = 0.0
        self.at = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        if not self.rate:
            return
        while not stop.is_set():
            now = time.monotonic()
            self.tokens = min(max(self.capacity, float(n)), self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            time.sleep(min(0.05, (n - self.tokens) / self.rate))
