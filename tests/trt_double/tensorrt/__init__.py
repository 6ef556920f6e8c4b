"""Test double of the `tensorrt` Python package: the named-tensor API of TRT 8.5-10.x from TENSORRT.md.

Plans are `MAGIC + header JSON line + ONNX bytes`; execution runs the ONNX model with ONNX Runtime on
the bytes behind the addresses given to `set_tensor_address` (device memory of the pycuda double).
Every behaviour follows a real source listed in tests/trt_double/README.md, per emulated version.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__version__ = os.environ.get("TRT_DOUBLE_VERSION", "8.5.2.2")
_MAJOR, _MINOR, _PATCH = (int(p) for p in [*__version__.split("."), "0", "0"][:3])
_MAGIC = b"TRTDOUBLEPLAN1\n"
_CACHE_MAGIC = b"TRTDOUBLETC1\n"


def _pycuda():
    import pycuda.driver as cuda

    return cuda


# ------------------------------------------------------------------------------------------- enums


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    """Logger interface: subclasses call `ILogger.__init__(self)` and override `log`."""

    Severity = _Severity
    INTERNAL_ERROR = _Severity.INTERNAL_ERROR
    ERROR = _Severity.ERROR
    WARNING = _Severity.WARNING
    INFO = _Severity.INFO
    VERBOSE = _Severity.VERBOSE

    def __init__(self) -> None:
        self._ilogger_initialized = True

    def log(self, severity: _Severity, msg: str) -> None:
        """Receive one message."""
        raise NotImplementedError


class Logger(ILogger):
    """The stock logger: prints messages at or above `min_severity`."""

    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        ILogger.__init__(self)
        self.min_severity = min_severity

    def log(self, severity: _Severity, msg: str) -> None:
        if severity <= self.min_severity:
            import sys

            print("[TRT double] %s: %s" % (severity.name, msg), file=sys.stderr)


# TensorRT keeps ONE logger while any Builder, Runtime or Refitter lives: the first one given; a different one
# is ignored with this warning (text from NVIDIA/TensorRT#1475), and every message goes to the registered one.
_registry_lock = threading.Lock()
_registered: Optional[ILogger] = None
_holders: weakref.WeakSet[Any] = weakref.WeakSet()
_LOGGER_DIFFERS = ("The logger passed into %s differs from one already provided for an existing builder, runtime, "
                   "or refitter. TensorRT maintains only a single logger pointer at any given time, so the existing "
                   "value, which can be retrieved with getLogger(), will be used instead. In order to use a new "
                   "logger, first destroy all existing builder, runner or refitter objects.")


def _register(holder: Any, logger: ILogger, creator: str) -> None:
    global _registered
    if not getattr(logger, "_ilogger_initialized", False):
        raise TypeError("ILogger subclass did not call ILogger.__init__(self)")
    with _registry_lock:
        differs = len(_holders) > 0 and _registered is not None and _registered is not logger
        if not differs:
            _registered = logger
        _holders.add(holder)
    if differs:
        _emit(_Severity.WARNING, _LOGGER_DIFFERS % creator)


def _emit(severity: _Severity, msg: str) -> None:
    """Send a message to the registered logger (TensorRT's global one)."""
    logger = _registered
    if logger is not None:
        logger.log(severity, msg)


def double_registered_logger() -> Optional[ILogger]:
    """(Double only) the logger TensorRT would be using now."""
    return _registered


class NetworkDefinitionCreationFlag(enum.IntEnum):
    """Network creation flags (EXPLICIT_BATCH is required for ONNX before 10.0, ignored after)."""

    EXPLICIT_BATCH = 0
    EXPLICIT_PRECISION = 1


class MemoryPoolType(enum.IntEnum):
    """Builder memory pools."""

    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3


class BuilderFlag(enum.IntEnum):
    """Builder flags."""

    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    STRICT_TYPES = 4
    REFIT = 5


class TensorIOMode(enum.IntEnum):
    """Whether a tensor is an input or an output."""

    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DeviceType(enum.IntEnum):
    """Where layers run."""

    GPU = 0
    DLA = 1


class DataType(enum.IntEnum):
    """Tensor element types (INT64 exists from TensorRT 10.0)."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


float32, float16, int8, int32, bool, uint8, int64 = (
    DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.BOOL, DataType.UINT8, DataType.INT64)
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              2: DataType.UINT8, 7: DataType.INT64}
_NP_DTYPES = {DataType.FLOAT: "float32", DataType.HALF: "float16", DataType.INT8: "int8", DataType.INT32: "int32",
              DataType.BOOL: "bool", DataType.UINT8: "uint8", DataType.INT64: "int64"}


def _numpy() -> Any:
    """The numpy `nptype` sees (tests replace it with one lacking `bool`, as numpy 1.24-1.26 is; numpy 2.x
    has `np.bool` again, so with it installed 8.5.2's table works)."""
    import numpy

    return numpy


def nptype(trt_type: DataType) -> type:
    """numpy type of a TensorRT DataType, with each release's table: 8.5.2 names `np.bool` (an AttributeError
    on numpy 1.24-1.26, NVIDIA/TensorRT#2557), 8.5.3 and 8.6 `np.bool_` without int64, 10.x adds int64."""
    np = _numpy()

    if (_MAJOR, _MINOR, _PATCH) <= (8, 5, 2):
        mapping = {float32: np.float32, float16: np.float16, int8: np.int8, int32: np.int32, bool: np.bool,
                   uint8: np.uint8}
    else:
        mapping = {float32: np.float32, float16: np.float16, int8: np.int8, int32: np.int32, bool: np.bool_,
                   uint8: np.uint8}
        if _MAJOR >= 10:
            mapping[int64] = np.int64
    if trt_type in mapping:
        return mapping[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")


def volume(shape: Sequence[int]) -> int:
    """Product of the dimensions."""
    v = 1
    for d in shape:
        v *= int(d)
    return v


class Dims:
    """Shape of a tensor (-1 = dynamic), like the pybind11 `Dims`: `len`, indexing and `==` with tuples/lists,
    no `__iter__`. The invalid Dims (nbDims = -1) TensorRT returns for a bad name makes `len()` raise
    ValueError and indexing raise IndexError."""

    def __init__(self, shape: Sequence[int] = (), nb_dims: Optional[int] = None) -> None:
        self._d = tuple(int(x) for x in shape)
        self._nb = len(self._d) if nb_dims is None else int(nb_dims)

    def __len__(self) -> int:
        if self._nb < 0:
            raise ValueError("__len__() should return >= 0")
        return self._nb

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self._d[: max(self._nb, 0)][i]
        j = i + self._nb if i < 0 else i
        if not 0 <= j < self._nb:
            raise IndexError("Out of bounds")
        return self._d[j]

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, Dims):
            return self._nb == other._nb and self._d == other._d
        return isinstance(other, (tuple, list)) and len(other) == self._nb and tuple(other) == self._d

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._d) if self._nb >= 0 else "Dims(nbDims=-1)"


def _invalid_dims() -> Dims:
    return Dims((), nb_dims=-1)


def _tup(d: Any) -> Tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d))) if isinstance(d, Dims) else tuple(int(x) for x in d)


# ------------------------------------------------------------------------------------------ building


class ITensor:
    """A network input or output."""

    def __init__(self, name: str, shape: Tuple[int, ...], dtype: DataType) -> None:
        self.name = name
        self.shape = Dims(shape)
        self.dtype = dtype


class INetworkDefinition:
    """A network, populated by the ONNX parser."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self._inputs: List[ITensor] = []
        self._outputs: List[ITensor] = []
        self._onnx: Optional[bytes] = None
        self.num_layers = 0

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, i: int) -> ITensor:
        return self._inputs[i]

    def get_output(self, i: int) -> ITensor:
        return self._outputs[i]


class _ParserError:
    def __init__(self, desc: str, code: int = 1, node: int = -1) -> None:
        self._desc, self._code, self._node = desc, code, node

    def desc(self) -> str:
        return self._desc

    def code(self) -> int:
        return self._code

    def node(self) -> int:
        return self._node

    def __str__(self) -> str:
        return "In node %d (parse): %s" % (self._node, self._desc)


def _value_shape(vi: Any) -> Tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)


class OnnxParser:
    """Parses an ONNX model into a network."""

    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self.network = network
        self.logger = logger
        self._errors: List[_ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> _ParserError:
        return self._errors[i]

    def clear_errors(self) -> None:
        self._errors = []

    def parse_from_file(self, path: str) -> bool:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._errors.append(_ParserError("cannot open %s: %s" % (path, e.strerror)))
            return False
        return self.parse(data)

    def parse(self, model: bytes, path: Optional[str] = None) -> bool:
        import onnx

        if _MAJOR < 10 and not self.network.flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)):
            self._errors.append(_ParserError("Network must have explicit batch (EXPLICIT_BATCH flag)", code=2))
            return False
        try:
            m = onnx.load_from_string(bytes(model))
            onnx.checker.check_model(m)
        except Exception as e:
            self._errors.append(_ParserError("Failed to parse ONNX model: %s" % str(e).splitlines()[0], code=1))
            return False
        inits = {t.name for t in m.graph.initializer}
        for vi in m.graph.input:
            if vi.name in inits:
                continue
            self.network._inputs.append(ITensor(vi.name, _value_shape(vi), _FROM_ONNX[vi.type.tensor_type.elem_type]))
        for vi in m.graph.output:
            self.network._outputs.append(ITensor(vi.name, _value_shape(vi), _FROM_ONNX[vi.type.tensor_type.elem_type]))
        self.network.num_layers = len(m.graph.node)
        self.network._onnx = bytes(model)
        return True


class IOptimizationProfile:
    """min/opt/max shapes per input."""

    def __init__(self) -> None:
        self._shapes: Dict[str, List[Dims]] = {}

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
        self._shapes[input] = [Dims(_tup(min)), Dims(_tup(opt)), Dims(_tup(max))]

    def get_shape(self, input: str) -> List[Dims]:
        return self._shapes.get(input, [])

    def _valid(self) -> bool:
        """IOptimizationProfile::isValid (NvInferRuntime.h): shapes set have equal ranks and min<=opt<=max;
        a profile with no shapes set is valid (nothing to contradict); the rest is checked at build time."""
        for mn, op, mx in self._shapes.values():
            if not (len(mn) == len(op) == len(mx)):
                return False
            if any(not (0 < a <= b <= c) for a, b, c in zip(_tup(mn), _tup(op), _tup(mx))):
                return False
        return True


class ITimingCache:
    """Opaque timing cache (the double stores which networks were timed)."""

    def __init__(self, entries: Dict[str, int], version: str = "", sm: str = "") -> None:
        self._entries = dict(entries)
        self._version = version or __version__
        self._sm = sm or "%d%d" % _pycuda()._sm()

    def serialize(self) -> IHostMemory:
        body = {"version": self._version, "sm": self._sm, "entries": self._entries}
        return IHostMemory(_CACHE_MAGIC + json.dumps(body).encode())

    def combine(self, other: ITimingCache, ignore_mismatch: bool) -> bool:
        self._entries.update(other._entries)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


class IInt8Calibrator:
    """INT8 calibrator base."""

    def __init__(self) -> None:
        self._calibrator_initialized = True


class IInt8EntropyCalibrator2(IInt8Calibrator):
    """Entropy calibrator: subclasses implement get_batch_size, get_batch, read/write_calibration_cache."""


class IBuilderConfig:
    """Builder configuration. Unknown attributes are refused like pybind11 objects refuse them."""

    _ATTRS = {"int8_calibrator", "default_device_type", "DLA_core", "_flags", "_pools", "_profiles",
              "_timing_cache", "_calibration_profile", "_level"}

    def __init__(self) -> None:
        self._flags: set = set()
        self._pools: Dict[int, int] = {}
        self._profiles: List[IOptimizationProfile] = []
        self._timing_cache: Optional[ITimingCache] = None
        self._calibration_profile = None
        self._level = 3
        self.int8_calibrator = None
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "builder_optimization_level":
            if (_MAJOR, _MINOR) < (8, 6):
                raise AttributeError("'tensorrt.IBuilderConfig' object has no attribute 'builder_optimization_level'")
            if not 0 <= int(value) <= 5:
                raise ValueError("builder_optimization_level must be in 0..5")
            object.__setattr__(self, "_level", int(value))
            return
        if name not in self._ATTRS:
            raise AttributeError("'tensorrt.IBuilderConfig' object has no attribute %r" % name)
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "builder_optimization_level" and (_MAJOR, _MINOR) >= (8, 6):
            return self._level
        raise AttributeError("'tensorrt.IBuilderConfig' object has no attribute %r" % name)

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._pools[int(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(int(pool), _pycuda().Device(0).total_memory())

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self._flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile._valid():
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        self._calibration_profile = profile
        return True

    def create_timing_cache(self, serialized_timing_cache: bytes) -> Optional[ITimingCache]:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache({})
        if not data.startswith(_CACHE_MAGIC):
            return None  # "Timing cache blob is invalid": the real binding returns a null cache
        try:
            body = json.loads(data[len(_CACHE_MAGIC):].decode())
            return ITimingCache(body["entries"], str(body["version"]), str(body["sm"]))
        except (ValueError, KeyError):
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        """IBuilderConfig::setTimingCache (NvInfer.h): false when the cache was made on a device with other CUDA
        properties, unless ignore_mismatch. A cache of another TensorRT version is refused too (stricter: the
        header does not say)."""
        here = "%d%d" % _pycuda()._sm()
        if not ignore_mismatch and (cache._sm != here or cache._version != __version__):
            _emit(_Severity.ERROR, "1: [timingCache.cpp::verify] Error Code 1: Internal Error (timing cache "
                                   "mismatch: made for sm %s with TensorRT %s, this is sm %s with TensorRT %s)"
                  % (cache._sm, cache._version, here, __version__))
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> Optional[ITimingCache]:
        return self._timing_cache


class IHostMemory(bytes):
    """Serialized data returned by TensorRT (supports the buffer protocol)."""

    @property
    def nbytes(self) -> int:
        return len(self)


def _activation_bytes(onnx_bytes: bytes, batch: int, itemsize: int) -> int:
    """Bytes of every tensor in the graph at `batch` (a stand-in for engine activation memory)."""
    import onnx
    from onnx import shape_inference

    m = onnx.load_from_string(onnx_bytes)
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = batch
                break
    inferred = shape_inference.infer_shapes(m)
    total = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        total += volume(dims) * itemsize
    return total


class Builder:
    """Builds serialized engines."""

    def __init__(self, logger: ILogger) -> None:
        _register(self, logger, "createInferBuilder")
        self.logger = logger
        self.max_threads = 1
        self.num_DLA_cores = 0

    @property
    def platform_has_fast_fp16(self) -> bool:
        return os.environ.get("TRT_DOUBLE_FAST_FP16", "1") == "1"

    @property
    def platform_has_fast_int8(self) -> bool:
        return True

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(int(flags))

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def _check_profiles(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[str]:
        """Build-time profile validation; the error message, or None."""
        dynamic = [t for t in network._inputs if -1 in _tup(t.shape)]
        if dynamic and not config._profiles:
            return "4: Network has dynamic or shape inputs, but no optimization profile has been defined."
        for i, prof in enumerate(config._profiles):
            if not prof._shapes:
                # what real TensorRT does with a profile that sets nothing is not documented: refuse it (stricter)
                return "4: [double] optimization profile %d sets no input shapes" % i
            for t in network._inputs:
                shapes = prof.get_shape(t.name)
                static = _tup(t.shape)
                if not shapes:
                    if t in dynamic:
                        return "4: [network.cpp::validate] Optimization profile %d is missing values for input %s" % (
                            i, t.name)
                    continue
                if any(len(_tup(s)) != len(static) or any(d != -1 and d != v for d, v in zip(static, _tup(s)))
                       for s in shapes):
                    return "4: [network.cpp::validate] profile %d: shapes of %s do not match its dimensions %s" % (
                        i, t.name, static)
        return None

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[IHostMemory]:
        def err(msg: str) -> None:
            _emit(_Severity.ERROR, msg)

        if network._onnx is None:
            err("Network has no layers")
            return None
        problem = self._check_profiles(network, config)
        if problem:
            err(problem)
            return None
        dynamic = [t for t in network._inputs if -1 in _tup(t.shape)]
        profile = config._profiles[0] if config._profiles else IOptimizationProfile()
        flags = sorted(f.name for f in config._flags)
        if BuilderFlag.INT8 in config._flags and not self._calibrate(config, err):
            return None
        seconds = float(os.environ.get("TRT_DOUBLE_BUILD_SECONDS", "0"))
        key = hashlib.sha256(network._onnx + json.dumps(flags).encode()).hexdigest()[:16]
        tc = config._timing_cache
        if tc is not None and key in tc._entries:
            seconds *= 0.2  # tactics already timed: rebuilds are faster
        _emit(_Severity.INFO, "building (double): %d layers" % network.num_layers)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        if os.environ.get("TRT_DOUBLE_BUILD_FAIL") == "1":
            err("Internal error: double told to fail the build")
            return None
        if tc is not None:
            tc._entries[key] = tc._entries.get(key, 0) + 1
        workspace = config._pools.get(int(MemoryPoolType.WORKSPACE))
        if workspace is None:  # default: all device memory
            workspace = int(os.environ.get("TRT_DOUBLE_MEM_TOTAL", str(8 << 30)))
        if workspace < 4096:
            err("Workspace limit of %d bytes is too small for any tactic" % workspace)
            return None
        itemsize = 2 if BuilderFlag.FP16 in config._flags else 4
        max_batch = max([_tup(profile.get_shape(t.name)[2])[0] for t in dynamic] or [1])
        header = {
            "version": __version__,
            "sm": "%d%d" % _pycuda()._sm(),
            "flags": flags,
            "profile": {t.name: [list(_tup(s)) for s in profile.get_shape(t.name)] for t in dynamic},
            "inputs": [[t.name, list(_tup(t.shape)), int(t.dtype)] for t in network._inputs],
            "outputs": [[t.name, list(_tup(t.shape)), int(t.dtype)] for t in network._outputs],
            "device_memory": _device_memory(network._onnx, max_batch, itemsize, workspace),
        }
        return IHostMemory(_MAGIC + json.dumps(header).encode() + b"\n" + network._onnx)

    @staticmethod
    def _calibrate(config: IBuilderConfig, err: Any) -> bool:
        cal = config.int8_calibrator
        if cal is None or not getattr(cal, "_calibrator_initialized", False):
            err("Calibration failure: INT8 requested without a calibrator")
            return False
        cache = cal.read_calibration_cache()
        if not cache:
            err("Calibration failure: the double only supports calibration caches")
            return False
        cal.write_calibration_cache(memoryview(bytes(cache)))
        return True


def _device_memory(onnx_bytes: bytes, max_batch: int, itemsize: int, workspace: int) -> int:
    """Execution-context device memory: activations at the profile's max batch plus tactic scratch, which the
    workspace limit bounds (TRT_DOUBLE_SCRATCH_BYTES, default 4 MiB, capped at the workspace) — so memory is
    affine in the batch, not proportional to it."""
    scratch = min(int(workspace), int(os.environ.get("TRT_DOUBLE_SCRATCH_BYTES", str(4 << 20))))
    return _activation_bytes(onnx_bytes, max_batch, itemsize) + scratch


# ------------------------------------------------------------------------------------------- runtime


def _version_error(plan_version: str) -> Optional[str]:
    """The message TensorRT logs for a plan from another version, or None when the versions are equal.
    Another major.minor: the serialization tag differs. Same major.minor, another patch or build number
    (8.6.1.6 vs 8.6.1.2, NVIDIA/TensorRT#3069): the library version check."""
    if plan_version == __version__:
        return None
    if plan_version.split(".")[:2] != __version__.split(".")[:2]:
        return ("1: [stdArchiveReader.cpp::StdArchiveReader::40] Error Code 1: Serialization (Serialization "
                "assertion stdVersionRead == serializationVersion failed.Version tag does not match. Note: "
                "Current Version: %s, Serialized Engine Version: %s)" % (__version__, plan_version))
    return ("6: The engine plan file is not compatible with this version of TensorRT, expecting library version "
            "%s got %s, please rebuild." % (__version__, plan_version))


class Runtime:
    """Deserializes engines."""

    def __init__(self, logger: ILogger) -> None:
        _register(self, logger, "createInferRuntime")
        self.logger = logger
        self.DLA_core = -1

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Optional[ICudaEngine]:
        data = bytes(serialized_engine)

        def err(msg: str) -> None:
            _emit(_Severity.ERROR, msg)

        if not data.startswith(_MAGIC):
            err("1: [stdArchiveReader.cpp::StdArchiveReader::32] Error Code 1: Serialization (Serialization "
                "assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            err("4: [runtime.cpp::deserializeCudaEngine::50] Error Code 4: Internal Error (Engine deserialization "
                "failed.)")
            return None
        head, _, onnx_bytes = data[len(_MAGIC):].partition(b"\n")
        try:
            header = json.loads(head.decode())
        except ValueError:
            err("Serialization assertion failed: corrupt engine header")
            return None
        problem = _version_error(str(header["version"]))
        if problem is None:
            here = "%d%d" % _pycuda().Device(0).compute_capability()
            if header["sm"] != here:
                problem = ("6: The engine plan file is generated on an incompatible device, expecting compute %s.%s "
                           "got compute %s.%s, please rebuild." % (here[:-1], here[-1], header["sm"][:-1],
                                                                   header["sm"][-1]))
        if problem is not None:
            err(problem)
            err("4: [runtime.cpp::deserializeCudaEngine::50] Error Code 4: Internal Error (Engine deserialization "
                "failed.)")
            return None
        _pycuda()._need_context("deserialize_cuda_engine")
        return ICudaEngine(header, onnx_bytes)


class ICudaEngine:
    """A deserialized engine; its weights (~ the plan) take device memory while it lives."""

    def __init__(self, header: Dict[str, Any], onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        self._header = header
        self._onnx = onnx_bytes
        self._io: Dict[str, Tuple[TensorIOMode, Tuple[int, ...], DataType]] = {}
        for name, shape, dt in header["inputs"]:
            self._io[name] = (TensorIOMode.INPUT, tuple(shape), DataType(dt))
        for name, shape, dt in header["outputs"]:
            self._io[name] = (TensorIOMode.OUTPUT, tuple(shape), DataType(dt))
        self._names = list(self._io)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self._session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        _pycuda()._hold(self, len(onnx_bytes), "engine weights")

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._io[name][0] if name in self._io else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._io[name][1]) if name in self._io else _invalid_dims()

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> List[Dims]:
        """[min, opt, max]; each Dims is invalid (nbDims -1) for a bad profile index or a name that is not an
        input (ICudaEngine::getProfileShape, NvInferRuntime.h) — the binding returns them, it does not raise."""
        if profile_index != 0 or self.get_tensor_mode(name) != TensorIOMode.INPUT:
            return [_invalid_dims(), _invalid_dims(), _invalid_dims()]
        if name not in self._header["profile"]:
            return [Dims(self._io[name][1]) for _ in range(3)]  # a static input: its own shape
        return [Dims(s) for s in self._header["profile"][name]]

    @property
    def device_memory_size(self) -> int:
        return int(self._header["device_memory"])

    def __getattr__(self, name: str) -> Any:
        if name == "device_memory_size_v2" and (_MAJOR, _MINOR) >= (10, 1):
            return int(self._header["device_memory"])
        if name == "get_device_memory_size_for_profile_v2" and (_MAJOR, _MINOR) >= (10, 1):
            return lambda i: int(self._header["device_memory"])
        raise AttributeError("'tensorrt.ICudaEngine' object has no attribute %r" % name)

    def serialize(self) -> IHostMemory:
        return IHostMemory(_MAGIC + json.dumps(self._header).encode() + b"\n" + self._onnx)

    def create_execution_context(self) -> IExecutionContext:
        _pycuda()._need_context("create_execution_context")
        return IExecutionContext(self)


class IExecutionContext:
    """Runs an engine on the addresses set for its tensors; holds the engine's device memory while it lives."""

    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._addresses: Dict[str, int] = {}
        self.default_stream_calls = 0
        _pycuda()._hold(self, engine.device_memory_size, "execution context")

    def _err(self, msg: str) -> None:
        _emit(_Severity.ERROR, msg)

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        eng = self.engine
        if eng.get_tensor_mode(name) != TensorIOMode.INPUT:
            self._err("3: Cannot set input shape of %s: not an input tensor" % name)
            return False
        shape = tuple(int(d) for d in shape)
        declared = _tup(eng.get_tensor_shape(name))
        if len(shape) != len(declared) or any(d != -1 and d != s for d, s in zip(declared, shape)):
            self._err("3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error (%s: shape %s does "
                      "not match the static dimensions %s)" % (name, shape, tuple(declared)))
            return False
        if name in eng._header["profile"]:
            mn, _, mx = (_tup(d) for d in eng.get_tensor_profile_shape(name, 0))
            if any(not (a <= s <= b) for a, s, b in zip(mn, shape, mx)):
                self._err("3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error (Parameter check "
                          "failed, condition: engineDims.d[i] == dims.d[i]. Supplied shape %s is outside the "
                          "profile [%s, %s] for %s)" % (shape, tuple(mn), tuple(mx), name))
                return False
        self._shapes[name] = shape
        return True

    def _inputs(self) -> List[str]:
        return [n for n in self.engine._names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]

    def get_tensor_shape(self, name: str) -> Dims:
        eng = self.engine
        if eng.get_tensor_mode(name) == TensorIOMode.INPUT:
            return Dims(self._shapes.get(name, eng.get_tensor_shape(name)))
        declared = _tup(eng.get_tensor_shape(name))
        batches = {self._shapes[n][0] for n in self._inputs() if n in self._shapes}
        if len(batches) != 1 or len(self._shapes) != len(self._inputs()):
            return Dims(declared)
        batch = batches.pop()
        return Dims(tuple(batch if d == -1 else d for d in declared))

    def all_input_shapes_specified(self) -> bool:
        return all(n in self._shapes for n in self._inputs())

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            self._err("3: setTensorAddress given invalid tensor name: %s" % name)
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = _pycuda()
        cuda._need_context("execute_async_v3")
        if int(stream_handle) == 0:
            self.default_stream_calls += 1
            _emit(_Severity.WARNING,
                  "Using default stream in enqueueV3() may lead to performance issues")
        if not self.all_input_shapes_specified():
            self._err("3: not all input shapes are specified")
            return False
        missing = [n for n in self.engine._names if n not in self._addresses]
        if missing:
            self._err("3: Address is not set for I/O tensor %s" % missing[0])
            return False
        feed = {}
        fp16 = "FP16" in self.engine._header["flags"]
        int8 = "INT8" in self.engine._header["flags"]
        for n in self._inputs():
            shape = self._shapes[n]
            dt = np.dtype(_NP_DTYPES[self.engine.get_tensor_dtype(n)])
            nbytes = volume(shape) * dt.itemsize
            mem = cuda.device_memory(self._addresses[n])
            if mem.size < nbytes:
                self._err("3: input buffer for %s is smaller than its shape needs" % n)
                return False
            x = mem[:nbytes].view(dt).reshape(shape).copy()
            if int8 and dt.kind == "f":
                x = np.round(x * 127.0) / 127.0
            elif fp16 and dt.kind == "f":
                x = x.astype(np.float16).astype(dt)
            feed[n] = x
        outs = self.engine._session.run(None, feed)
        for meta, value in zip(self.engine._session.get_outputs(), outs):
            value = np.ascontiguousarray(value)
            if fp16 and value.dtype.kind == "f":
                value = value.astype(np.float16).astype(value.dtype)
            raw = value.reshape(-1).view(np.uint8)
            mem = cuda.device_memory(self._addresses[meta.name])
            if mem.size < raw.size:
                self._err("3: output buffer for %s is too small" % meta.name)
                return False
            mem[: raw.size] = raw
        return True
