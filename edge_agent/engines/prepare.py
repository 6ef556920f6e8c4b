"""Turn an unpacked, verified bundle into two running engines sized to this device's memory.

    prepare_engines(bundle_dir=..., manifest=..., cfg=..., cache_dir=..., emit=...) -> PreparedModels

1. backend: `auto` picks TensorRT when it imports and a GPU answers, else ONNX Runtime (and says why);
2. memory budget (budget.py);
3. engines: ONNX Runtime loads the ONNX files; TensorRT loads a verified prebuilt plan for this platform
   key, else a valid cache entry, else builds in a child process (trt_build.py);
4. max batch: the largest batch at which both models' engine memory fits the budget (TensorRT: the
   built engine's device memory; ONNX Runtime: measured). A TensorRT profile that turns out too large is
   rebuilt smaller;
5. batch tuning per model (tuner.py), persisted per engine key, re-run when asked or when the budget
   moved by more than `retune_memory_change`.

This module chooses and ties the steps together; the backends' own steps are `prepare_ort` and
`prepare_trt`, the result and the shared choices `prepared`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.config import EngineConfig
from edge_agent.engines.budget import MIB, MemoryBudget, budget_for_config
from edge_agent.engines.cache import EngineCache
from edge_agent.engines.platform import PlatformInfo, detect_platform
from edge_agent.engines.prepare_ort import prepare_ort
from edge_agent.engines.prepare_trt import prepare_trt
from edge_agent.engines.prepared import MODELS, Emit, PreparedModels
from edge_agent.engines.tuner import (
    TuneChoice,
    candidate_batches,
    choose_batch,
    measure_batches,
)
from edge_agent.errors import EngineError, ResourceError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- choices


def choose_backend(requested: str, platform: PlatformInfo) -> Tuple[str, str]:
    """(backend, reason). `tensorrt` requested on a box without TensorRT or a GPU is an EngineError."""
    if requested == "onnxruntime":
        return "onnxruntime", "configured"
    usable = platform.trt_version is not None and platform.has_gpu
    if requested == "tensorrt":
        if not usable:
            raise EngineError("backend tensorrt is configured but %s" % _why_no_trt(platform))
        return "tensorrt", "configured"
    if usable:
        return "tensorrt", "auto: TensorRT %s on %s" % (platform.trt_version, platform.gpu_name)
    return "onnxruntime", "auto: %s" % _why_no_trt(platform)


def _why_no_trt(platform: PlatformInfo) -> str:
    if platform.trt_version is None:
        return platform.trt_error or "tensorrt does not import"
    return platform.gpu_error or "no CUDA GPU answered"


def _needs_retune(saved: Optional[Dict[str, Any]], budget_bytes: int, cfg: EngineConfig) -> bool:
    if not saved or "choice" not in saved:
        return True
    old = int(saved.get("budget_bytes", 0))
    return abs(budget_bytes - old) / max(old, 1) > cfg.retune_memory_change


def current_budget(cfg: EngineConfig, platform: Optional[PlatformInfo], backend: str = "tensorrt") -> MemoryBudget:
    """The budget now: free device memory on a discrete GPU used by TensorRT, else system memory."""
    unified = platform.unified_memory if platform is not None else True
    cuda_info = None
    if backend == "tensorrt" and not unified:
        from edge_agent.engines import _cuda

        cuda_info = _cuda.mem_get_info
    return budget_for_config(cfg, unified_memory=unified or cuda_info is None, cuda_mem_get_info=cuda_info)


# ---------------------------------------------------------------------------------------------- entry


def prepare_engines(
    *,
    bundle_dir: Path,
    manifest: ManifestBody,
    cfg: EngineConfig,
    cache_dir: Path,
    emit: Emit,
    platform: Optional[PlatformInfo] = None,
    budget: Optional[MemoryBudget] = None,
    retune: bool = False,
) -> PreparedModels:
    """Load or build both engines, size them to the memory budget and tune their batch sizes."""
    bundle_dir = Path(bundle_dir)
    if platform is None:
        platform = detect_platform(probe_gpu=cfg.backend != "onnxruntime")
    backend, reason = choose_backend(cfg.backend, platform)
    log.info("engine backend: %s (%s)", backend, reason)
    cache = EngineCache(Path(cache_dir))
    if budget is None:
        budget = current_budget(cfg, platform, backend)
    if budget.budget_bytes <= 0:
        raise ResourceError("memory budget is %d MB (available %d MB × %.2f − %d MB reserve): free memory or lower "
                            "engine.memory_reserve_mb" % (budget.budget_bytes // MIB, budget.available_bytes // MIB,
                                                          cfg.memory_fraction, cfg.memory_reserve_mb))
    if backend == "onnxruntime":
        models = prepare_ort(bundle_dir, manifest, cfg, budget, emit)
    else:
        models = prepare_trt(bundle_dir, manifest, cfg=cfg, budget=budget, cache=cache, platform=platform, emit=emit)
    models.backend_reason = reason
    models.platform = platform
    models.budget = budget
    try:
        tune_models(models, cfg=cfg, cache_dir=Path(cache_dir), emit=emit, force=retune)
    except BaseException:
        models.close()
        raise
    return models


def tune_models(models: PreparedModels, *, cfg: EngineConfig, cache_dir: Path, emit: Emit, force: bool = True) -> None:
    """Measure candidate batches per model and set `models.batch` (re-used from disk unless `force` or the
    budget moved by more than `cfg.retune_memory_change`)."""
    cache = EngineCache(Path(cache_dir))
    budget_bytes = models.budget_bytes
    for name in MODELS:
        eng = models.engine(name)
        key = models.tuning_keys.get(name) or "untracked-%s" % name
        saved = cache.load_tuning(key)
        if not force and not _needs_retune(saved, budget_bytes, cfg):
            assert saved is not None
            choice = TuneChoice.from_dict(saved["choice"])
            if choice.batch <= eng.max_batch:
                models.tuning[name] = choice
                models.batch[name] = choice.batch
                continue
        memory_at = _memory_at(models, name) if name in models.memory_models else None
        table = measure_batches(eng, candidate_batches(eng.max_batch), iterations=cfg.tune_iterations,
                                memory_at=memory_at)
        choice = choose_batch(table, cfg.latency_slo_ms)
        models.tuning[name] = choice
        models.batch[name] = choice.batch
        cache.save_tuning(key, {"choice": choice.as_dict(), "budget_bytes": budget_bytes, "model": name,
                                "max_batch": eng.max_batch, "measured_at": int(time.time())})
        emit("batch-tuned", "%s model: batch %d (%s)" % (name, choice.batch, choice.reason),
             {"model": name, "batch": choice.batch, "slo_met": choice.slo_met, "max_batch": eng.max_batch,
              "slo_ms": cfg.latency_slo_ms,
              "table": [m.as_dict() for m in choice.table]})


def _memory_at(models: PreparedModels, name: str) -> Callable[[int], Optional[int]]:
    model = models.memory_models.get(name)

    def at(batch: int) -> Optional[int]:
        return model.bytes_at(batch) if model is not None else None

    return at


def available_backends() -> List[str]:
    """Backends whose Python modules import here (TensorRT also needs a GPU at prepare time)."""
    out = []
    try:
        import onnxruntime  # noqa: F401

        out.append("onnxruntime")
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        out.append("tensorrt")
    except Exception:  # ImportError, or OSError from a broken libnvinfer
        pass
    return out


def retune_if_needed(
    models: PreparedModels,
    *,
    cfg: EngineConfig,
    cache_dir: Path,
    emit: Emit,
    force: bool = False,
    budget: Optional[MemoryBudget] = None,
) -> bool:
    """Re-measure the batch sizes of running engines on a `retune` command (`force`) or when the memory
    budget moved by more than `cfg.retune_memory_change` since they were prepared. Returns whether it ran.

    The engines' max batch (their profile) is kept: shrinking it needs a new `prepare_engines`.
    """
    if budget is None:
        budget = current_budget(cfg, models.platform, models.backend)
    old = models.budget_bytes
    moved = abs(budget.budget_bytes - old) / max(old, 1) > cfg.retune_memory_change
    if not (force or moved):
        return False
    models.budget = budget
    models.budget_bytes = budget.budget_bytes
    tune_models(models, cfg=cfg, cache_dir=Path(cache_dir), emit=emit, force=True)
    return True
