"""The memory budget engines are sized to.

budget = memory available to the GPU × fraction − reserve, where "available to the GPU" is
`MemAvailable` (+ `SwapFree` when allowed) on a Jetson's unified memory and free device memory on a
discrete GPU. The functions that compute a budget are pure (dicts in, a `MemoryBudget` out); `read_budget`
does the reading.

jtop is deliberately not a source: it reads the same /proc/meminfo, and its RAM `cached` is Cached +
SReclaimable (jetson_stats jtop/core/memory.py), where Cached includes Shmem, which cannot be reclaimed —
so free + buffers + cached over-counts what the kernel's own MemAvailable estimate says is available.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from edge_agent.errors import ResourceError
from edge_agent.sysinfo.meminfo import MEMINFO_PATH, available_bytes, read_meminfo_bytes

log = logging.getLogger(__name__)

MIB = 1024 * 1024
KIB = 1024


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory the engines of both models may use, and where the figure came from."""

    source: str  #: "meminfo" or "cuda"
    total_bytes: int
    available_bytes: int
    fraction: float
    reserve_bytes: int
    budget_bytes: int

    def describe(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)

    def changed_by(self, other: MemoryBudget) -> float:
        """Relative change of the budget from `other` to this one (0.0 = same; 1.0 = doubled or zeroed)."""
        base = max(other.budget_bytes, 1)
        return abs(self.budget_bytes - other.budget_bytes) / base


def apply_budget(available_bytes: int, *, fraction: float, reserve_bytes: int) -> int:
    """available × fraction − reserve, never below zero."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    return max(0, int(available_bytes * fraction) - int(reserve_bytes))


def budget_from_meminfo(
    info: Mapping[str, int], *, fraction: float, reserve_bytes: int, allow_swap: bool = False
) -> MemoryBudget:
    """Unified-memory budget from /proc/meminfo in bytes (`edge_agent.sysinfo.meminfo.parse_meminfo_bytes`):
    MemAvailable (free + page cache on old kernels), + SwapFree when allowed."""
    if "MemTotal" not in info:
        raise ResourceError("meminfo has no MemTotal line: cannot size engines")
    available = available_bytes(info)
    if available is None:
        raise ResourceError("meminfo has neither MemAvailable nor MemFree: cannot size engines")
    total = info["MemTotal"]
    if allow_swap:
        available += info.get("SwapFree", 0)
        total += info.get("SwapTotal", 0)
    return MemoryBudget(
        source="meminfo",
        total_bytes=total,
        available_bytes=available,
        fraction=fraction,
        reserve_bytes=int(reserve_bytes),
        budget_bytes=apply_budget(available, fraction=fraction, reserve_bytes=reserve_bytes),
    )


def budget_from_cuda(free_bytes: int, total_bytes: int, *, fraction: float, reserve_bytes: int) -> MemoryBudget:
    """Discrete-GPU budget from `cuda.mem_get_info()` → (free, total)."""
    return MemoryBudget(
        source="cuda",
        total_bytes=int(total_bytes),
        available_bytes=int(free_bytes),
        fraction=fraction,
        reserve_bytes=int(reserve_bytes),
        budget_bytes=apply_budget(free_bytes, fraction=fraction, reserve_bytes=reserve_bytes),
    )


def read_budget(
    *,
    fraction: float,
    reserve_bytes: int,
    allow_swap: bool = False,
    unified_memory: bool = True,
    meminfo_path: Path = MEMINFO_PATH,
    cuda_mem_get_info: Optional[Any] = None,
) -> MemoryBudget:
    """Read the current budget.

    Unified memory (Jetson, CPU-only boxes): /proc/meminfo (cudaMemGetInfo under-reports there).
    Discrete GPU: `cuda_mem_get_info()` → (free, total).
    """
    if not unified_memory and cuda_mem_get_info is not None:
        free, total = cuda_mem_get_info()
        return budget_from_cuda(free, total, fraction=fraction, reserve_bytes=reserve_bytes)
    try:
        info = read_meminfo_bytes(meminfo_path)
    except OSError as e:
        raise ResourceError("cannot read %s (%s): cannot size engines" % (meminfo_path, e.strerror))
    return budget_from_meminfo(info, fraction=fraction, reserve_bytes=reserve_bytes, allow_swap=allow_swap)


def budget_for_config(cfg: Any, *, unified_memory: bool = True,
                      cuda_mem_get_info: Optional[Any] = None) -> MemoryBudget:
    """`read_budget` with the fraction, reserve and swap setting of an `EngineConfig`."""
    return read_budget(
        fraction=cfg.memory_fraction,
        reserve_bytes=cfg.memory_reserve_mb * MIB,
        allow_swap=cfg.allow_swap,
        unified_memory=unified_memory,
        cuda_mem_get_info=cuda_mem_get_info,
    )
