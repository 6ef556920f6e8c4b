"""Which chunks of one file have arrived: a bitmap that survives restarts (saved as JSON)."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple


class ChunkMap:
    """The received-chunk bitmap of one file of `size` bytes cut into `chunk_bytes` pieces."""

    def __init__(self, sha256: str, size: int, chunk_bytes: int) -> None:
        self.sha256 = sha256
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.count = max(1, -(-size // chunk_bytes)) if size else 0
        self._bits = bytearray(-(-self.count // 8)) if self.count else bytearray()
        self.done_count = 0

    def chunk_range(self, index: int) -> Tuple[int, int]:
        """(offset, length) of chunk `index`."""
        offset = index * self.chunk_bytes
        return offset, min(self.chunk_bytes, self.size - offset)

    def has(self, index: int) -> bool:
        """True when chunk `index` has arrived."""
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def mark(self, index: int) -> bool:
        """Record chunk `index`; False when it was already there."""
        if self.has(index):
            return False
        self._bits[index >> 3] |= 1 << (index & 7)
        self.done_count += 1
        return True

    def clear(self) -> None:
        """Forget every chunk (the file failed its hash)."""
        self._bits = bytearray(len(self._bits))
        self.done_count = 0

    @property
    def complete(self) -> bool:
        """True when every chunk arrived."""
        return self.done_count == self.count

    @property
    def bytes_done(self) -> int:
        """Bytes held so far."""
        if self.complete:
            return self.size
        return sum(self.chunk_range(i)[1] for i in range(self.count) if self.has(i))

    def missing(self) -> Iterator[int]:
        """Indices still to fetch, in order."""
        for i in range(self.count):
            if not self.has(i):
                yield i

    def to_json(self) -> Dict[str, Any]:
        """The persisted form."""
        return {"sha256": self.sha256, "size": self.size, "chunk_bytes": self.chunk_bytes, "bits": self._bits.hex()}

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]], *, sha256: str, size: int, chunk_bytes: int) -> ChunkMap:
        """Restore a saved map; a map for another file, size or chunk size starts empty."""
        m = cls(sha256, size, chunk_bytes)
        if not data or (data.get("sha256"), data.get("size"), data.get("chunk_bytes")) != (sha256, size, chunk_bytes):
            return m
        try:
            bits = bytearray.fromhex(str(data.get("bits", "")))
        except ValueError:
            return m
        if len(bits) != len(m._bits):
            return m
        m._bits = bits
        m.done_count = sum(1 for i in range(m.count) if m.has(i))
        return m
