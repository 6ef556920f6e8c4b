"""Rate limits of the controller: on what it sends (`RateLimit`, bytes per second) and on what each
sender may ask of it (`KeyedRate`, a token bucket per device or operator)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, List, Optional, Sequence


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


class KeyedRate:
    """A token bucket per key (a device id, an operator name): `allow(key)` takes one token, False when that
    key's bucket is empty. At most `max_keys` buckets are kept (the least recently used goes first), so a
    sender inventing keys cannot grow this without bound."""

    def __init__(self, per_s: float, burst: float, *, max_keys: int = 100000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = float(per_s)
        self.burst = max(1.0, float(burst))
        self.max_keys = max(1, max_keys)
        self.clock = clock
        self._buckets: collections.OrderedDict[str, List[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket; False (nothing taken) when it holds fewer."""
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self.max_keys:
                    self._buckets.popitem(last=False)
                b = self._buckets[key] = [self.burst, now]
            else:
                self._buckets.move_to_end(key)
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.per_s)
                b[1] = now
            if b[0] < cost:
                return False
            b[0] -= cost
            return True

    def allow_batch(self, keys: Sequence[Optional[str]]) -> List[bool]:
        """`allow(key)` for each key in turn, under one lock and one clock reading (the keys of one
        network read); a None key is refused without taking anything."""
        now = self.clock()
        out = []
        with self._lock:
            buckets, burst, per_s = self._buckets, self.burst, self.per_s
            for key in keys:
                if key is None:
                    out.append(False)
                    continue
                b = buckets.get(key)
                if b is None:
                    if len(buckets) >= self.max_keys:
                        buckets.popitem(last=False)
                    b = buckets[key] = [burst, now]
                else:
                    buckets.move_to_end(key)
                    b[0] = min(burst, b[0] + (now - b[1]) * per_s)
                    b[1] = now
                if b[0] < 1.0:
                    out.append(False)
                else:
                    b[0] -= 1.0
                    out.append(True)
        return out
