"""Reconnect pacing for the MQTT session."""

from __future__ import annotations

import random
from typing import Optional


class Backoff:
    """Bounded exponential back-off with full jitter: min, 2·min, 4·min … capped at max."""

    def __init__(self, min_s: float, max_s: float, rng: Optional[random.Random] = None) -> None:
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt (grows until the cap)."""
        cap = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.min_s / 2 + self._rng.uniform(0, cap - self.min_s / 2)

    def reset(self) -> None:
        """After a successful connect."""
        self.attempt = 0
