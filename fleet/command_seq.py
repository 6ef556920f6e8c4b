"""Command sequence numbers, strictly increasing per device across restarts and processes."""

from __future__ import annotations

import fcntl
import json
import threading
import time
from pathlib import Path
from typing import Optional

from edge_agent.fsutil import write_atomic


class SeqCounter:
    """Command sequence numbers that strictly increase per device across restarts and processes.

    One counter serves every device (a number above the last one a device saw is all it needs), handed
    out from a block reserved in the state file: the block's upper end (`ceiling`) is written atomically
    and fsynced *before* the first number of the block is returned, so a wave of a thousand commands
    costs one fsync instead of a thousand, and a restarted controller (or a crash at any point) starts at
    the persisted ceiling, above every number ever handed out. `fleet push` and `fleet serve` share the
    file under an flock; a process that sees the file changed by another one reserves a new block above
    it before handing out the next number. A fresh file starts from the clock in milliseconds, so even a
    lost state file does not go backwards (unless it is lost within `block` commands' worth of
    milliseconds of the last reservation).
    """

    #: Numbers reserved per persisted step.
    BLOCK = 4096

    def __init__(self, path: Path, *, block: int = BLOCK, clock=time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.block = max(1, int(block))
        self.clock = clock
        self._lock = threading.Lock()
        self._next = 0
        self._ceiling = 0  # exclusive: numbers below it (and >= _next) are reserved for this process
        self._written: Optional[bytes] = None
        self.reservations = 0

    def next(self, device_id: str) -> int:
        """The next sequence number for `device_id` (its block is persisted before it is returned)."""
        with self._lock:
            if self._next >= self._ceiling or self._file_bytes() != self._written:
                self._reserve()
            seq = self._next
            self._next += 1
        return seq

    def _file_bytes(self) -> Optional[bytes]:
        # A few microseconds, no lock: another process that reserved a block changed the file.
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def _reserve(self) -> None:
        with open(str(self.path) + ".lock", "a+") as lockf:
            fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    data = json.loads(self.path.read_bytes())
                except (OSError, ValueError):
                    data = {}
                if not isinstance(data, dict):
                    data = {}
                # Older files hold the last number per device instead of a ceiling: above all of them.
                floor = 0
                for v in data.values():
                    if isinstance(v, int) and not isinstance(v, bool):
                        floor = max(floor, v + 1)
                base = max(floor, int(self.clock() * 1000), self._next)
                ceiling = base + self.block
                raw = json.dumps({"ceiling": ceiling}, sort_keys=True).encode()
                write_atomic(self.path, raw)
                self._written = raw
            finally:
                fcntl.flock(lockf.fileno(), fcntl.LOCK_UN)
        self._next, self._ceiling = base, ceiling
        self.reservations += 1


class RegistrySeqCounter:
    """Command sequence numbers allocated in the shared registry (PostgreSQL): one row per device,
    raised in one statement under the row's lock, so the numbers a device gets strictly increase
    whichever controller signs its commands."""

    def __init__(self, registry, *, clock=time.time) -> None:
        self.registry = registry
        self.clock = clock

    def next(self, device_id: str) -> int:
        """The next sequence number for `device_id` (committed before it is returned)."""
        return self.registry.next_command_seq(device_id, floor=int(self.clock() * 1000))
