"""The one /proc/meminfo reader. Every figure it returns is in bytes (the kernel writes kB = KiB).

`parse_meminfo_bytes` is pure (text in, {field: bytes} out); `read_meminfo_bytes` reads the file with a
size cap. Lines without a `kB` unit (`HugePages_Total`, ...) are counts, not sizes, and are left out,
so every value in the result is a byte count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Union

MEMINFO_PATH = Path("/proc/meminfo")
#: /proc/meminfo is about 1.5 KiB; anything past this cap is not read.
MAX_MEMINFO_BYTES = 64 * 1024
KIB = 1024


def parse_meminfo_bytes(text: str) -> Dict[str, int]:
    """`/proc/meminfo` text -> {field: bytes} for the `kB` lines; other lines are skipped."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or len(parts) != 2 or parts[1].lower() != "kb" or not parts[0].isdigit():
            continue
        out[key.strip()] = int(parts[0]) * KIB
    return out


def read_meminfo_bytes(path: Union[str, Path] = MEMINFO_PATH) -> Dict[str, int]:
    """Read and parse `path` ({field: bytes}). Raises OSError; undecodable bytes only lose their lines."""
    with open(str(path), "rb") as f:
        raw = f.read(MAX_MEMINFO_BYTES)
    return parse_meminfo_bytes(raw.decode("ascii", "replace"))


def available_bytes(info: Mapping[str, int]) -> Optional[int]:
    """Memory available to new work: MemAvailable, or MemFree + Buffers + Cached on kernels before 3.14
    (which have no MemAvailable line). None when neither is there."""
    if "MemAvailable" in info:
        return info["MemAvailable"]
    if "MemFree" not in info:
        return None
    return info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
