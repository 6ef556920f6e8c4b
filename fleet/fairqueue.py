"""A bounded queue that serves its senders in turn, so one sender's flood cannot starve the others."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Deque, Dict, Optional


class FairQueue:
    """Items queued per key (a device); `get` takes one item from each key in turn (round robin).

    Bounded twice: at most `per_key` items wait for one key and at most `total` items overall; `put`
    refuses (returns False) beyond either, so a flood from one device fills only its own share."""

    def __init__(self, *, per_key: int, total: int) -> None:
        self.per_key = max(1, per_key)
        self.total = max(1, total)
        self._queues: collections.OrderedDict[str, Deque[Any]] = collections.OrderedDict()
        self._size = 0
        self._cv = threading.Condition()

    def put(self, key: str, item: Any) -> bool:
        """Queue `item` for `key`; False when that key's share or the whole queue is full."""
        with self._cv:
            q = self._queues.get(key)
            if self._size >= self.total or (q is not None and len(q) >= self.per_key):
                return False
            if q is None:
                q = self._queues[key] = collections.deque()
            q.append(item)
            self._size += 1
            self._cv.notify()
            return True

    def get(self, timeout_s: float) -> Optional[Any]:
        """The next item in turn, or None after `timeout_s` with nothing queued."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self._queues:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            key, q = next(iter(self._queues.items()))
            item = q.popleft()
            self._size -= 1
            if q:
                self._queues.move_to_end(key)  # this key's next item waits for everyone else's turn
            else:
                del self._queues[key]
            return item

    def __len__(self) -> int:
        with self._cv:
            return self._size

    def sizes(self) -> Dict[str, int]:
        """Items waiting per key (for status and tests)."""
        with self._cv:
            return {k: len(q) for k, q in self._queues.items()}
