"""The memory budget engines are sized to.

budget = memory available to the GPU × fraction − reserve, where "available to the GPU" is
`MemAvailable` (+ `SwapFree` when allowed) on a Jetson's unified memory, the same from jtop when it is
running, and free device memory on a discrete GPU. The functions that compute a budget are pure (dicts
in, a `MemoryBudget` out); `read_budget` does the reading.
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

    source: str  #: "meminfo", "jtop" or "cuda"
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


def budget_from_jtop(
    memory: Mapping[str, Any], *, fraction: float, reserve_bytes: int, allow_swap: bool = False
) -> MemoryBudget:
    """Budget from jtop's `j.memory` dict (`RAM`/`SWAP` values in KB).

    jtop's RAM `used` excludes buffers and page cache, so available = free + buffers + cached.
    """
    try:
        ram = memory["RAM"]
        total = int(ram["tot"]) * KIB
        available = (int(ram["free"]) + int(ram.get("buffers", 0)) + int(ram.get("cached", 0))) * KIB
    except (KeyError, TypeError, ValueError) as e:
        raise ResourceError("jtop memory report lacks RAM tot/free (%s): cannot size engines" % e)
    available = min(available, total)
    if allow_swap and isinstance(memory.get("SWAP"), Mapping):
        swap = memory["SWAP"]
        swap_total = int(swap.get("tot", 0)) * KIB
        available += max(0, swap_total - int(swap.get("used", 0)) * KIB)
        total += swap_total
    return MemoryBudget(
        source="jtop",
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
    use_jtop: bool = False,
    meminfo_path: Path = MEMINFO_PATH,
    cuda_mem_get_info: Optional[Any] = None,
) -> MemoryBudget:
    """Read the current budget.

    Unified memory (Jetson, CPU-only boxes): jtop when asked for and running, else /proc/meminfo
    (cudaMemGetInfo under-reports there). Discrete GPU: `cuda_mem_get_info()` → (free, total).
    """
    if not unified_memory and cuda_mem_get_info is not None:
        free, total = cuda_mem_get_info()
        return budget_from_cuda(free, total, fraction=fraction, reserve_bytes=reserve_bytes)
    if use_jtop:
        memory = _jtop_memory()
        if memory is not None:
            try:
                return budget_from_jtop(memory, fraction=fraction, reserve_bytes=reserve_bytes, allow_swap=allow_swap)
            except ResourceError as e:
                log.warning("%s; falling back to %s", e, meminfo_path)
    try:
        info = read_meminfo_bytes(meminfo_path)
    except OSError as e:
        raise ResourceError("cannot read %s (%s): cannot size engines" % (meminfo_path, e.strerror))
    return budget_from_meminfo(info, fraction=fraction, reserve_bytes=reserve_bytes, allow_swap=allow_swap)


def budget_for_config(cfg: Any, *, unified_memory: bool = True, use_jtop: bool = False,
                      cuda_mem_get_info: Optional[Any] = None) -> MemoryBudget:
    """`read_budget` with the fraction, reserve and swap setting of an `EngineConfig`."""
    return read_budget(
        fraction=cfg.memory_fraction,
        reserve_bytes=cfg.memory_reserve_mb * MIB,
        allow_swap=cfg.allow_swap,
        unified_memory=unified_memory,
        use_jtop=use_jtop,
        cuda_mem_get_info=cuda_mem_get_info,
    )


def _jtop_memory() -> Optional[Mapping[str, Any]]:
    """jtop's memory dict, or None when jtop is not installed or its service is not reachable."""
    try:
        from jtop import jtop
    except ImportError:
        return None
    try:
        with jtop(interval=0.5) as j:
            if j.ok():
                return dict(j.memory)
    except Exception as e:  # JtopException when jtop.service is down or we are not in group jtop
        log.info("jtop unavailable (%s); using /proc/meminfo", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None
