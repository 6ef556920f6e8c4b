"""A file being pulled and its chunk requests in flight.

`PartialFile` holds the chunk map of one file, the descriptor of its ``partial/<sha256>.part`` and a
running sha256 fed in file order (chunks that arrive early wait in memory, up to `MAX_HELD_CHUNKS`, or
are re-read from disk), so a finished file's hash is known without reading it again.
`PendingRequest` is one chunk request the fetcher waits for an answer to.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from edge_agent.transfer.chunkmap import ChunkMap

#: Out-of-order chunks kept in memory for the running hash (beyond this they are re-read from disk).
MAX_HELD_CHUNKS = 64


@dataclass
class PartialFile:
    """One file being pulled: its chunk map, its open partial file and the running sha256 over it."""

    sha256: str
    size: int
    label: str
    cmap: ChunkMap
    fd: int = -1
    unsaved: int = 0
    saved_at: float = 0.0
    refetches: int = 0
    keep_in_store: bool = True
    # Running sha256 over the chunks in file order; chunks that arrive early wait in `held`.
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0
    held: Dict[int, bytes] = field(default_factory=dict)

    def feed(self, index: int, payload: Optional[bytes]) -> None:
        """Advance the running hash with chunk `index` (None: it is already on disk)."""
        if index != self.hashed:
            if payload is not None and len(self.held) < MAX_HELD_CHUNKS:
                self.held[index] = payload
            return
        if payload is None:
            payload = self._read(index)
        self.hasher.update(payload)
        self.hashed += 1
        while self.hashed < self.cmap.count and self.cmap.has(self.hashed):
            data = self.held.pop(self.hashed, None)
            self.hasher.update(data if data is not None else self._read(self.hashed))
            self.hashed += 1

    def _read(self, index: int) -> bytes:
        offset, length = self.cmap.chunk_range(index)
        return os.pread(self.fd, length, offset)

    def reset_hash(self) -> None:
        """Start the running hash over (the file is fetched again)."""
        self.hasher = hashlib.sha256()
        self.hashed = 0
        self.held.clear()


@dataclass
class PendingRequest:
    """One chunk request in flight: what it asked for, when, how often, and its correlation id."""

    target: PartialFile
    index: int
    sent_at: float
    attempts: int = 0
    corr: bytes = b""
    payload: bytes = field(default=b"", repr=False)
