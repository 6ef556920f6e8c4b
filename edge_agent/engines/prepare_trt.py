"""Preparing a bundle on TensorRT: per model a verified prebuilt plan for this platform, else a valid
cache entry, else a build in a child process (trt_build); the profile's max batch sized so both engines'
device memory fits the budget, rebuilt smaller when it does not."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from edge_agent.bundle.manifest import ManifestBody, ModelSpec
from edge_agent.config import EngineConfig
from edge_agent.engines.base import Engine
from edge_agent.engines.budget import MIB, MemoryBudget
from edge_agent.engines.cache import EngineCache, EngineKey
from edge_agent.engines.platform import PlatformInfo
from edge_agent.engines.prepared import MODELS, Emit, PreparedModels, choose_precision, file_sha256
from edge_agent.engines.tuner import MemoryModel, max_batch_for_budget
from edge_agent.errors import EngineError, IntegrityError, ResourceError
from edge_agent.fsutil import sha256_file

log = logging.getLogger(__name__)

_MIN_WORKSPACE = 16 * MIB
_SIZING_ROUNDS = 3


@dataclass
class _TrtModel:
    name: str
    spec: ModelSpec
    precision: str
    engine: Optional[Engine] = None
    source: str = ""
    key: Optional[EngineKey] = None
    model: Optional[MemoryModel] = None
    #: execution-context device memory measured per profile max batch (from the build, or its cache entry)
    points: Dict[int, int] = field(default_factory=dict)


def _expected_meta(platform: PlatformInfo, key: EngineKey) -> Dict[str, Any]:
    cc = platform.compute_capability
    return {
        "trt_version": platform.trt_version,
        "compute_capability": "%d.%d" % cc if cc else None,
        "l4t": platform.l4t_release,
        "device": platform.gpu_name,
        "jetson_model": platform.jetson_model,
        "precision": key.precision,
        "profile": [key.min_batch, key.opt_batch, key.max_batch],
        "onnx_sha256": key.onnx_sha256,
    }


def _trt_memory_model(engine: Any, points: Dict[int, int], *, unified: bool) -> MemoryModel:
    """Engine memory as fixed + per-item bytes.

    Activations: the execution-context device memory measured at two profile sizes gives slope and intercept
    (tactic scratch, bounded by the workspace, does not shrink with the batch); with one measurement all of it
    counts as fixed, which over-estimates smaller batches rather than under-estimating them. I/O buffers are
    sized per item; on unified memory (Jetson) the pinned host copy and the device copy both take DRAM, so they
    count twice. Weights ~ plan size. The per-process CUDA context and library handles are not in here:
    `trt_overhead_mb` is subtracted from the budget once.
    """
    top = max(engine.max_batch, 1)
    measured = dict(points)
    measured.setdefault(top, int(engine.device_memory_bytes))
    sizes = sorted(measured)
    per_item_act = 0.0
    if len(sizes) >= 2 and sizes[-1] > sizes[0]:
        hi, lo = sizes[-1], sizes[0]
        per_item_act = max(0.0, (measured[hi] - measured[lo]) / float(hi - lo))
    fixed_act = max(0, int(measured[sizes[-1]] - per_item_act * sizes[-1]))
    io_per_item = engine.io_buffer_bytes * (2 if unified else 1) / float(top)
    return MemoryModel(fixed_bytes=int(engine.plan_bytes + fixed_act),
                       per_item_bytes=max(math.ceil(per_item_act + io_per_item), 1))


def _load_prebuilt(m: _TrtModel, bundle_dir: Path, manifest: ManifestBody, platform: PlatformInfo,
                   emit: Emit) -> Optional[Engine]:
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    rel = m.spec.engines.get(platform.key or "")
    if rel is None:
        return None
    path = bundle_dir / rel
    want = file_sha256(manifest, rel)
    try:
        got = sha256_file(path)
    except OSError as e:
        raise IntegrityError("prebuilt engine %s cannot be read: %s" % (rel, e.strerror))
    if got != want:
        raise IntegrityError("prebuilt engine %s has sha256 %s, the manifest pins %s" % (rel, got[:12], want[:12]))
    try:
        eng = TrtEngine(path.read_bytes(), name=m.name)
    except PlanRejectedError as e:
        emit("error", "prebuilt %s engine for %s does not load here; building instead" % (m.name, platform.key),
             {"model": m.name, "error": str(e)})
        return None
    m.source = "prebuilt"
    m.precision = "prebuilt"
    return eng


def _load_or_build(m: _TrtModel, bundle_dir: Path, manifest: ManifestBody, *, cfg: EngineConfig, cache: EngineCache,
                   platform: PlatformInfo, max_batch: int, workspace: int, emit: Emit) -> Engine:
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine
    from edge_agent.engines.trt_build import run_build
    from edge_agent.engines.trt_plan import BuildRequest

    assert platform.key is not None
    opt = max(1, max_batch // 2)
    key = EngineKey(onnx_sha256=file_sha256(manifest, m.spec.path), platform_key=platform.key,
                    precision=m.precision, min_batch=1, opt_batch=opt, max_batch=max_batch,
                    flags=["workspace-from-budget"])
    m.key = key
    expected = _expected_meta(platform, key)
    hit = cache.lookup(key, expected)
    if hit is not None:
        try:
            eng = TrtEngine(hit.read_bytes(), name=m.name)
            m.source = "cache"
            meta = cache.read_meta(key) or {}
            m.points = {int(b): int(v) for b, v in dict(meta.get("device_memory_at") or {}).items()}
            return eng
        except PlanRejectedError as e:
            log.warning("cached %s engine rejected (%s): rebuilding", m.name, e)
            cache.invalidate(key)
    calib = None
    if m.precision == "int8" and m.spec.calibration_cache:
        calib = str(bundle_dir / m.spec.calibration_cache)
    plan_tmp = cache.plan_path(key).with_suffix(".building")
    req = BuildRequest(model=m.name, onnx_path=str(bundle_dir / m.spec.path), plan_path=str(plan_tmp),
                       precision=m.precision, min_batch=1, opt_batch=opt, max_batch=max_batch,
                       workspace_bytes=workspace, timing_cache_path=str(cache.timing_cache_path(platform.key)),
                       calibration_cache_path=calib,
                       memory_probe_batch=max(1, max_batch // 2) if max_batch > 1 else None)
    outcome = run_build(req, emit=emit, timeout_s=cfg.build_timeout_s)
    meta = dict(expected, built_precision=outcome.precision, build_seconds=round(outcome.seconds, 2),
                notes=outcome.notes, workspace_bytes=workspace,
                device_memory_at={str(b): v for b, v in outcome.device_memory.items()})
    m.points = dict(outcome.device_memory)
    final = cache.store(key, outcome.plan_path, meta)
    m.source = "built"
    m.precision = outcome.precision
    try:
        return TrtEngine(final.read_bytes(), name=m.name)
    except PlanRejectedError as e:
        cache.invalidate(key)
        raise EngineError("the freshly built %s engine does not load: %s" % (m.name, e))


def prepare_trt(bundle_dir: Path, manifest: ManifestBody, *, cfg: EngineConfig, budget: MemoryBudget,
                 cache: EngineCache, platform: PlatformInfo, emit: Emit) -> PreparedModels:
    """Load or build both TensorRT engines with a profile whose max batch fits the budget (rebuilding a
    profile that turns out too large, at most _SIZING_ROUNDS times)."""
    items = {n: _TrtModel(n, manifest.models[n], choose_precision(cfg.precision, manifest.models[n])) for n in MODELS}
    workspace = int(max(_MIN_WORKSPACE, min(cfg.workspace_max_mb * MIB, budget.budget_bytes // 2)))
    max_b = cfg.max_batch_limit
    engine_budget = budget.budget_bytes - cfg.trt_overhead_mb * MIB  # the CUDA context + library handles, once
    if engine_budget <= 0:
        raise ResourceError("the memory budget of %.1f MB does not cover TensorRT's %d MB process overhead "
                            "(engine.trt_overhead_mb)" % (budget.budget_bytes / MIB, cfg.trt_overhead_mb))
    try:
        for m in items.values():
            m.engine = _load_prebuilt(m, bundle_dir, manifest, platform, emit)
        for _round in range(_SIZING_ROUNDS):
            for m in items.values():
                if m.engine is None:
                    m.engine = _load_or_build(m, bundle_dir, manifest, cfg=cfg, cache=cache, platform=platform,
                                              max_batch=max_b, workspace=workspace, emit=emit)
                m.model = _trt_memory_model(m.engine, m.points, unified=platform.unified_memory)
            fit = max_batch_for_budget([m.model for m in items.values() if m.model], engine_budget,
                                       cfg.max_batch_limit)
            if fit < 1:
                need = sum(m.model.bytes_at(1) for m in items.values() if m.model)
                raise ResourceError("both engines need %.1f MB at batch 1 (+ %d MB TensorRT overhead) but the memory "
                                    "budget is %.1f MB" % (need / MIB, cfg.trt_overhead_mb, budget.budget_bytes / MIB))
            too_big = [m for m in items.values() if m.engine is not None and m.engine.max_batch > fit]
            if not too_big:
                break
            static = [m for m in too_big if m.engine is not None and all(-1 not in s.shape for s in m.engine.inputs)]
            if static:  # a fixed batch cannot be rebuilt smaller
                m = static[0]
                raise ResourceError("the %s model has a static batch of %d, but the memory budget of %.1f MB fits "
                                    "batch %d" % (m.name, m.engine.max_batch, budget.budget_bytes / MIB, fit))
            # profiles larger than the budget allows: rebuild those engines with a smaller max batch
            log.info("engines need %s at batch %d; rebuilding for max batch %d", "+".join(m.name for m in too_big),
                     max_b, fit)
            max_b = fit
            for m in too_big:
                if m.source == "prebuilt":
                    m.precision = choose_precision(cfg.precision, m.spec)
                assert m.engine is not None
                m.engine.close()
                m.engine = None
                m.points = {}
        else:
            raise ResourceError("could not size the engines to the %.1f MB budget" % (budget.budget_bytes / MIB))
    except BaseException:
        for m in items.values():
            if m.engine is not None:
                m.engine.close()
        raise
    engines = {n: items[n].engine for n in MODELS}
    max_batch = min(e.max_batch for e in engines.values() if e is not None)
    for n, m in items.items():
        assert m.engine is not None and m.model is not None
        m.engine.max_batch = max_batch
        emit("engine-loaded", "%s model: TensorRT engine from %s (max batch %d)" % (n, m.source, max_batch),
             {"model": n, "backend": "tensorrt", "source": m.source, "precision": m.precision,
              "max_batch": max_batch, "platform_key": platform.key,
              "memory_mb": round(m.model.bytes_at(max_batch) / MIB, 2)})
    precisions = {n: items[n].precision for n in MODELS}
    uniq = sorted(set(precisions.values()))
    models = PreparedModels(
        small=engines["small"], large=engines["large"], backend="tensorrt",  # type: ignore[arg-type]
        precision=uniq[0] if len(uniq) == 1 else ",".join("%s=%s" % kv for kv in sorted(precisions.items())),
        batch={n: 1 for n in MODELS}, budget_bytes=budget.budget_bytes, max_batch=max_batch,
        precisions=precisions, sources={n: items[n].source for n in MODELS},
        memory_bytes={n: items[n].model.bytes_at(max_batch) for n in MODELS},  # type: ignore[union-attr]
        tuning_keys={n: ("trt-" + items[n].key.digest()) if items[n].key else "trt-prebuilt-%s-%s" % (
            n, file_sha256(manifest, items[n].spec.engines[platform.key or ""])[:32]) for n in MODELS},
        memory_models={n: items[n].model for n in MODELS},  # type: ignore[misc]
    )
    return models
