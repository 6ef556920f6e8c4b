"""Build one TensorRT plan from ONNX, in this process: what `trt_build`'s child process runs.

`build_plan(request)` follows the TENSORRT.md build sketch: a profile over the batch range, FP16/INT8
where allowed and fast, a workspace limit, and the timing cache loaded (when it matches this device and
TensorRT version) and saved. The plan is written to a temporary name and renamed, so a killed build
leaves no half-written plan. `BuildRequest` (JSON round-trips through a file) and `BuildOutcome` are
the two ends of a build. TensorRT is imported inside `build_plan`, lazily.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.errors import BuildError
from edge_agent.fsutil import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildRequest:
    """Everything the builder child needs (JSON round-trips through a file)."""

    model: str
    onnx_path: str
    plan_path: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_bytes: int
    timing_cache_path: Optional[str] = None
    calibration_cache_path: Optional[str] = None
    optimization_level: Optional[int] = None
    #: also build a throw-away plan with this max batch to measure device memory at a second profile size
    memory_probe_batch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ValueError("precision must be fp32, fp16 or int8")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need 1 <= min_batch <= opt_batch <= max_batch")
        if self.precision == "int8" and not self.calibration_cache_path:
            raise ValueError("int8 needs a calibration cache")


@dataclass(frozen=True)
class BuildOutcome:
    """What the child built."""

    plan_path: Path
    precision: str
    seconds: float
    notes: List[str]
    #: execution-context device memory (bytes) measured per profile max batch
    device_memory: Dict[int, int] = field(default_factory=dict)


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """An entropy calibrator that only replays the bundle's calibration cache (no data on the device)."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: List[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return _Calibrator()


def _batch_profile(builder: Any, network: Any, lo: int, opt: int, hi: int) -> Any:
    """An optimization profile over batch min..opt..max for the inputs with a dynamic batch axis, or None when
    every input is static (a static-batch model needs no profile; only dynamic inputs do)."""
    profile = None
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(int(d) for d in t.shape)
        if all(d >= 1 for d in shape):
            continue
        if shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise BuildError("input %s has dynamic axes besides the batch axis: %s" % (t.name, shape))
        rest = shape[1:]
        if profile is None:
            profile = builder.create_optimization_profile()
        profile.set_shape(t.name, (lo, *rest), (opt, *rest), (hi, *rest))
    return profile


def _attach_timing_cache(config: Any, req: BuildRequest, notes: List[str]) -> Any:
    """Load the persisted timing cache into `config`. A cache TensorRT cannot read, or refuses with
    `set_timing_cache(...) == False` (made on another device or TensorRT version), is discarded: the stale
    file is removed and the build starts from an empty cache, which is saved afterwards."""
    path = req.timing_cache_path
    blob = b""
    if path and os.path.exists(path):
        try:
            blob = Path(path).read_bytes()
        except OSError as e:
            log.warning("cannot read timing cache %s (%s): building without it", path, e.strerror)
    timing = config.create_timing_cache(blob) if blob else None
    if blob and (timing is None or not config.set_timing_cache(timing, ignore_mismatch=False)):
        log.warning("timing cache %s does not match this device or TensorRT version: discarded, building cold", path)
        notes.append("stale timing cache discarded: built cold")
        _discard(path)
        timing = None
    if timing is None:
        timing = config.create_timing_cache(b"")
        if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
            notes.append("TensorRT refused an empty timing cache: built without one")
            return None
    return timing


def _discard(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError as e:
            log.warning("cannot remove stale timing cache %s: %s", path, e.strerror)


def build_plan(req: BuildRequest, progress: Callable[[str], None] = lambda s: None) -> BuildOutcome:
    """Build and write the plan (runs in the child). Raises BuildError with TensorRT's own messages.

    With `req.memory_probe_batch`, a second plan with that max batch is built (warm timing cache) and both
    are deserialized here to read their device memory: engine memory is affine in the batch, not linear."""
    from edge_agent.engines.trt import import_tensorrt, shared_logger, trt_major

    trt = import_tensorrt()
    logger = shared_logger(trt)
    logger.begin()
    started = time.monotonic()
    notes: List[str] = []
    builder = trt.Builder(logger)
    flags = 0 if trt_major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress("parsing")
    if not parser.parse_from_file(req.onnx_path):
        raise BuildError("TensorRT cannot parse %s: %s" % (
            Path(req.onnx_path).name, "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))))
    progress("building")
    plan, precision, has_profile = _build_one(trt, builder, network, req, max_batch=req.max_batch, notes=notes)
    write_atomic(Path(req.plan_path), bytes(plan), make_parents=True)
    memory = {}
    probe = req.memory_probe_batch
    if has_profile and probe is not None and 1 <= probe < req.max_batch:
        progress("measuring")
        memory[req.max_batch] = _plan_device_memory(trt, plan)
        probe_plan, _, _ = _build_one(trt, builder, network, req, max_batch=probe, notes=[])
        memory[probe] = _plan_device_memory(trt, probe_plan)
    return BuildOutcome(Path(req.plan_path), precision, time.monotonic() - started, notes, memory)


def _build_one(trt: Any, builder: Any, network: Any, req: BuildRequest, *, max_batch: int,
               notes: List[str]) -> Tuple[Any, str, bool]:
    """One plan with profile batch min..max: (serialized plan, precision built, whether it has a profile)."""
    from edge_agent.engines.trt import shared_logger

    logger = shared_logger(trt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_bytes))
    if req.optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(req.optimization_level)
    lo = min(req.min_batch, max_batch)
    profile = _batch_profile(builder, network, lo, max(lo, min(req.opt_batch, max_batch)), max_batch)
    if profile is not None and config.add_optimization_profile(profile) < 0:
        raise BuildError("TensorRT refused the optimization profile (batch %d..%d)" % (lo, max_batch))
    precision, calibrator = _set_precision(trt, builder, config, profile, req, notes=notes)
    timing = _attach_timing_cache(config, req, notes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT build failed: %s" % ("; ".join(logger.errors[-3:]) or "no message"))
    if req.timing_cache_path and timing is not None:
        cache_obj = config.get_timing_cache()
        if cache_obj is not None:
            write_atomic(Path(req.timing_cache_path), bytes(cache_obj.serialize()), make_parents=True)
    del calibrator  # referenced until the build returned
    return plan, precision, profile is not None


def _set_precision(trt: Any, builder: Any, config: Any, profile: Any, req: BuildRequest, *,
                   notes: List[str]) -> Tuple[str, Any]:
    """Set FP16/INT8 flags where asked for and fast; (precision built, calibrator to keep alive)."""
    precision = req.precision
    calibrator = None
    if precision == "int8":
        if builder.platform_has_fast_int8:
            cache = Path(req.calibration_cache_path or "").read_bytes()
            calibrator = _cache_calibrator(trt, cache)
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator  # keep a reference until the build returns
            if profile is not None:
                config.set_calibration_profile(profile)
            # layers without INT8 kernels fall back to FP16 when that is fast
            if builder.platform_has_fast_fp16:
                config.set_flag(trt.BuilderFlag.FP16)
        else:
            notes.append("no fast INT8 on this GPU: built FP16/FP32 instead")
            precision = "fp16"
    if precision == "fp16":
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            notes.append("no fast FP16 on this GPU: built FP32 instead")
            precision = "fp32"
    return precision, calibrator


def _plan_device_memory(trt: Any, plan: Any) -> int:
    """Deserialize `plan` here (the builder child) and read its execution-context device memory."""
    from edge_agent.engines import _cuda
    from edge_agent.engines.trt import device_memory_bytes, shared_logger

    ctx = _cuda.acquire_context()
    try:
        with ctx.active():
            runtime = trt.Runtime(shared_logger(trt))
            engine = runtime.deserialize_cuda_engine(bytes(plan))
            if engine is None:
                raise BuildError("the freshly built plan does not deserialize: %s"
                                 % "; ".join(shared_logger(trt).errors[-2:]))
            size = device_memory_bytes(engine)
            del engine, runtime
        return size
    finally:
        _cuda.release_context()
