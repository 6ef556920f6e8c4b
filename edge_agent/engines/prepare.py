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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.bundle.manifest import ManifestBody, ModelSpec
from edge_agent.config import EngineConfig
from edge_agent.engines.base import Engine
from edge_agent.engines.budget import MIB, MemoryBudget, budget_for_config
from edge_agent.engines.cache import EngineCache, EngineKey
from edge_agent.engines.platform import PlatformInfo, detect_platform
from edge_agent.engines.tuner import (
    MemoryModel,
    TuneChoice,
    candidate_batches,
    choose_batch,
    max_batch_for_budget,
    measure_batches,
)
from edge_agent.errors import EngineError, IntegrityError, ResourceError
from edge_agent.fsutil import sha256_file

log = logging.getLogger(__name__)

Emit = Callable[[str, str, dict], None]
MODELS = ("small", "large")
_PRECISION_ORDER = ("int8", "fp16", "fp32")
_MIN_WORKSPACE = 16 * MIB
_SIZING_ROUNDS = 3


@dataclass
class PreparedModels:
    """Both engines, ready to serve, and how they were prepared."""

    small: Engine
    large: Engine
    backend: str
    precision: str
    batch: Dict[str, int]
    budget_bytes: int
    max_batch: int = 1
    backend_reason: str = ""
    precisions: Dict[str, str] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    memory_bytes: Dict[str, int] = field(default_factory=dict)
    tuning: Dict[str, TuneChoice] = field(default_factory=dict)
    tuning_keys: Dict[str, str] = field(default_factory=dict)
    memory_models: Dict[str, MemoryModel] = field(default_factory=dict)
    platform: Optional[PlatformInfo] = None
    budget: Optional[MemoryBudget] = None

    def engine(self, name: str) -> Engine:
        """`small` or `large`."""
        return self.small if name == "small" else self.large

    def describe(self) -> Dict[str, Any]:
        """JSON-ready summary for status and telemetry (str/int/float/None values only)."""
        out: Dict[str, Any] = {
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "budget_mb": round(self.budget_bytes / MIB, 1),
            "platform_key": self.platform.key if self.platform else None,
            "trt": self.platform.trt_version if self.platform else None,
        }
        for name in MODELS:
            out["batch_%s" % name] = self.batch.get(name)
            out["source_%s" % name] = self.sources.get(name)
            out["precision_%s" % name] = self.precisions.get(name)
            mem = self.memory_bytes.get(name)
            out["memory_mb_%s" % name] = round(mem / MIB, 2) if mem is not None else None
            choice = self.tuning.get(name)
            out["slo_met_%s" % name] = int(choice.slo_met) if choice else None
        return out

    def close(self) -> None:
        """Close both engines."""
        for eng in (self.small, self.large):
            try:
                eng.close()
            except Exception:  # closing must not hide the other engine's close
                log.exception("closing an engine failed")


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


def choose_precision(requested: str, spec: ModelSpec) -> str:
    """The requested precision if the manifest allows it for this model (INT8 also needs the bundle's
    calibration cache), else the next wider one the manifest allows."""
    start = _PRECISION_ORDER.index(requested)
    for p in _PRECISION_ORDER[start:]:
        if p not in spec.precisions:
            continue
        if p == "int8" and not spec.calibration_cache:
            continue
        return p
    # the manifest lists only narrower precisions than asked for: take its widest
    return next(p for p in reversed(_PRECISION_ORDER) if p in spec.precisions)


def _sha256_of(manifest: ManifestBody, path: str) -> str:
    return manifest.files[path].sha256


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
        models = _prepare_ort(bundle_dir, manifest, cfg, budget, emit)
    else:
        models = _prepare_trt(bundle_dir, manifest, cfg=cfg, budget=budget, cache=cache, platform=platform, emit=emit)
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


# ---------------------------------------------------------------------------------------- onnxruntime


def _prepare_ort(bundle_dir: Path, manifest: ManifestBody, cfg: EngineConfig, budget: MemoryBudget,
                 emit: Emit) -> PreparedModels:
    from edge_agent.engines.ort import OrtEngine, measure_memory_model

    engines: Dict[str, Engine] = {}
    mem_models: Dict[str, MemoryModel] = {}
    methods: Dict[str, str] = {}
    try:
        for name in MODELS:
            spec = manifest.models[name]
            eng = OrtEngine(bundle_dir / spec.path, max_batch=cfg.max_batch_limit,
                            intra_op_threads=cfg.ort_intra_op_threads)
            engines[name] = eng
            fixed, per_item, method = measure_memory_model(eng, probe_batch=min(16, cfg.max_batch_limit))
            mem_models[name] = MemoryModel(fixed, per_item)
            methods[name] = method
        max_b = max_batch_for_budget(list(mem_models.values()), budget.budget_bytes, cfg.max_batch_limit)
        if max_b < 1:
            need = sum(m.bytes_at(1) for m in mem_models.values())
            raise ResourceError("both models need %.1f MB at batch 1 but the memory budget is %.1f MB"
                                % (need / MIB, budget.budget_bytes / MIB))
        for name, eng in engines.items():
            eng.max_batch = max_b
            emit("engine-loaded", "%s model loaded with onnxruntime (max batch %d)" % (name, max_b),
                 {"model": name, "backend": "onnxruntime", "source": "onnx", "max_batch": max_b,
                  "providers": ",".join(getattr(eng, "providers", [])),
                  "memory_mb": round(mem_models[name].bytes_at(max_b) / MIB, 2), "memory_method": methods[name]})
    except BaseException:
        for eng in engines.values():
            eng.close()
        raise
    import onnxruntime

    keys = {}
    for name in MODELS:
        eng = engines[name]
        raw = json.dumps([_sha256_of(manifest, manifest.models[name].path), "onnxruntime", onnxruntime.__version__,
                          getattr(eng, "providers", []), cfg.ort_intra_op_threads, max_b], sort_keys=True)
        keys[name] = "ort-" + hashlib.sha256(raw.encode()).hexdigest()[:32]
    models = PreparedModels(
        small=engines["small"], large=engines["large"], backend="onnxruntime", precision="fp32",
        batch={n: 1 for n in MODELS}, budget_bytes=budget.budget_bytes, max_batch=max_b,
        precisions={n: "fp32" for n in MODELS}, sources={n: "onnx" for n in MODELS},
        memory_bytes={n: mem_models[n].bytes_at(max_b) for n in MODELS}, tuning_keys=keys,
        memory_models=mem_models,
    )
    return models


# ------------------------------------------------------------------------------------------- tensorrt


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
    want = _sha256_of(manifest, rel)
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
    from edge_agent.engines.trt_build import BuildRequest, run_build

    assert platform.key is not None
    opt = max(1, max_batch // 2)
    key = EngineKey(onnx_sha256=_sha256_of(manifest, m.spec.path), platform_key=platform.key,
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


def _prepare_trt(bundle_dir: Path, manifest: ManifestBody, *, cfg: EngineConfig, budget: MemoryBudget,
                 cache: EngineCache, platform: PlatformInfo, emit: Emit) -> PreparedModels:
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
            n, _sha256_of(manifest, items[n].spec.engines[platform.key or ""])[:32]) for n in MODELS},
        memory_models={n: items[n].model for n in MODELS},  # type: ignore[misc]
    )
    return models


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
