"""The TensorRT backend: a deserialized plan run with the named-tensor API (TRT 8.5, 8.6 and 10.x).

Buffers are sized once for the optimization profile's max batch (pinned host + device), every I/O tensor's
address is set once, and each `infer` pushes the process-wide CUDA context, sets the input shapes, copies
only the used part on a non-default stream and pops the context again — from whatever thread calls it.

Two traps of the real libraries are designed around here: TensorRT keeps one logger per process while any
Builder or Runtime lives (so there is one, `shared_logger`, never freed, with errors kept per thread), and
TensorRT 8.5.2's `trt.nptype` fails on numpy 1.24-1.26 (so tensor types are mapped by `numpy_dtype`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from edge_agent.engines import _cuda
from edge_agent.engines.base import Engine, TensorSpec
from edge_agent.errors import EngineError, InferenceError, InputError

log = logging.getLogger(__name__)


class PlanRejectedError(EngineError):
    """TensorRT refused a plan (built by another TensorRT version or for another GPU, or corrupt):
    rebuild it."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or EngineError saying why it is unavailable."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError("tensorrt is not installed (on Jetson: apt install python3-libnvinfer)") from e
    return trt


def trt_major(trt: Any) -> int:
    """Major version of the imported tensorrt module."""
    return int(str(trt.__version__).split(".")[0])


# TensorRT DataType name -> numpy dtype. `trt.nptype` is never called: TensorRT 8.5.2 builds its table with
# `np.bool`, which numpy >= 1.24 removed (AttributeError on every call; NVIDIA/TensorRT#2557).
_NUMPY_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a `trt.DataType` (EngineError for types numpy has no equivalent of, e.g. FP8/BF16)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in _NUMPY_DTYPES:
        raise EngineError("tensor type %s has no numpy equivalent" % name)
    return np.dtype(_NUMPY_DTYPES[name])


def dims_tuple(dims: Any) -> Optional[Tuple[int, ...]]:
    """A `trt.Dims` as a tuple, or None for the invalid Dims (nbDims = -1) TensorRT returns for a bad name or
    profile index — whose `len()` raises ValueError in the Python binding."""
    try:
        n = len(dims)
    except (TypeError, ValueError):
        return None
    if n < 0:
        return None
    return tuple(int(dims[i]) for i in range(n))


class _ErrorLog:
    """The process-wide TensorRT logger's per-thread error list (cleared by `begin`)."""

    def __init__(self) -> None:
        self._tls = threading.local()

    def begin(self) -> None:
        """Start collecting this thread's errors for one TensorRT call sequence."""
        self._tls.errors = []

    def add(self, msg: str) -> None:
        if not hasattr(self._tls, "errors"):
            self._tls.errors = []
        self._tls.errors.append(msg)

    @property
    def errors(self) -> List[str]:
        """Errors logged in this thread since `begin`."""
        return list(getattr(self._tls, "errors", []))


_logger_lock = threading.Lock()
_logger: Any = None
_logger_module: Any = None


def shared_logger(trt: Any) -> Any:
    """The one `trt.ILogger` of this process (created on first use and never freed).

    TensorRT keeps a single logger while any Builder, Runtime or Refitter lives and ignores a different one
    with a warning (NVIDIA/TensorRT#1475), so every Builder and Runtime gets this one. It forwards to
    `logging` and keeps error messages per thread: call `logger.begin()` before a call sequence and read
    `logger.errors` after it.
    """
    global _logger, _logger_module
    with _logger_lock:
        if _logger is None or _logger_module is not trt:  # a different module object only in tests
            _logger = _make_logger(trt)
            _logger_module = trt
        return _logger


def _make_logger(trt: Any) -> Any:
    errors = _ErrorLog()

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.min_severity = trt.ILogger.WARNING

        def begin(self) -> None:
            errors.begin()

        @property
        def errors(self) -> List[str]:
            return errors.errors

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.ERROR):
                errors.add(msg)
                log.error("tensorrt: %s", msg)
            elif int(severity) <= int(self.min_severity):
                log.log(logging.WARNING if int(severity) == int(trt.ILogger.WARNING) else logging.DEBUG,
                        "tensorrt: %s", msg)

    return _Logger()


def device_memory_bytes(engine: Any) -> int:
    """Device memory an execution context of `engine` needs (TRT 10.1+: the v2 property)."""
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = engine.device_memory_size
    return int(size)


class TrtEngine(Engine):
    """A TensorRT plan loaded for inference (one execution context, calls serialized by a lock)."""

    backend = "tensorrt"

    def __init__(self, plan: bytes, *, name: str = "engine", max_batch: Optional[int] = None) -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.name = name
        self._lock = threading.Lock()
        self._logger = shared_logger(trt)
        self._ctx = _cuda.acquire_context()
        self._buffers: Optional[_cuda.DeviceBuffers] = None
        self._engine = self._context = self._runtime = None
        try:
            with self._ctx.active():
                self._logger.begin()
                inputs, outputs, profile_max = self._load(plan)
        except EngineError:
            self._release_all()
            raise
        except Exception as e:  # anything else TensorRT or pycuda raise: the caller falls back, never crashes
            self._release_all()
            raise EngineError("cannot load the %s plan with TensorRT %s: %s: %s"
                              % (name, trt.__version__, type(e).__name__, e)) from e
        except BaseException:
            self._release_all()
            raise
        if max_batch is not None:
            profile_max = min(profile_max, int(max_batch))
        super().__init__(inputs=inputs, outputs=outputs, max_batch=profile_max)
        self.plan_bytes = len(plan)
        log.info("loaded TensorRT engine %s (max batch %d, %d bytes device memory)",
                 name, profile_max, self.device_memory_bytes)

    def _last_error(self, default: str = "") -> str:
        errors = self._logger.errors
        return errors[-1] if errors else default

    def _load(self, plan: bytes) -> Tuple[List[TensorSpec], List[TensorSpec], int]:
        trt = self._trt
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise PlanRejectedError("TensorRT %s cannot load the %s plan: %s" % (
                trt.__version__, self.name, "; ".join(self._logger.errors) or "deserialize_cuda_engine returned None"))
        inputs, outputs, max_shapes = self._io_specs()
        if not inputs:
            raise EngineError("the %s plan has no inputs" % self.name)
        profile_max = min(s[0] for s in max_shapes.values()) if all(max_shapes.values()) else 1
        self._context = self._engine.create_execution_context()
        context = self._context
        if context is None:
            raise EngineError("TensorRT cannot create an execution context for %s: %s"
                              % (self.name, self._last_error("no message")))
        for tname, shape in max_shapes.items():
            if not context.set_input_shape(tname, shape):
                raise EngineError("TensorRT refused the profile's max shape for %s: %s" % (tname, self._last_error()))
        self._buffers = _cuda.DeviceBuffers()
        for spec in inputs:
            self._buffers.allocate(spec.name, trt.volume(max_shapes[spec.name]), spec.dtype)
        for spec in outputs:
            out_max = dims_tuple(context.get_tensor_shape(spec.name))
            if out_max is None or any(d < 0 for d in out_max):
                raise EngineError("cannot size output %s of the %s plan" % (spec.name, self.name))
            self._buffers.allocate(spec.name, trt.volume(out_max), spec.dtype)
        for spec in inputs + outputs:
            if not context.set_tensor_address(spec.name, self._buffers.pointer(spec.name)):
                raise EngineError("TensorRT refused the address of %s" % spec.name)
        return inputs, outputs, profile_max

    def _io_specs(self) -> Tuple[List[TensorSpec], List[TensorSpec], Dict[str, Tuple[int, ...]]]:
        """Inputs, outputs and each input's largest shape (the profile's max, or its static shape)."""
        trt, engine = self._trt, self._engine
        inputs: List[TensorSpec] = []
        outputs: List[TensorSpec] = []
        max_shapes: Dict[str, Tuple[int, ...]] = {}
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            shape = dims_tuple(engine.get_tensor_shape(tname))
            if shape is None:
                raise EngineError("TensorRT reports no shape for tensor %s of the %s plan" % (tname, self.name))
            spec = TensorSpec(name=tname, dtype=numpy_dtype(engine.get_tensor_dtype(tname)).name, shape=shape)
            if engine.get_tensor_mode(tname) != trt.TensorIOMode.INPUT:
                outputs.append(spec)
                continue
            inputs.append(spec)
            if all(d >= 1 for d in shape):  # static input: no profile needed
                max_shapes[tname] = shape
                continue
            # get_tensor_profile_shape returns [min, opt, max]; a bad name or profile gives Dims with nbDims -1
            prof = [dims_tuple(d) for d in engine.get_tensor_profile_shape(tname, 0)]
            top = prof[2] if len(prof) == 3 else None
            if top is None or len(top) != len(shape) or any(d < 1 for d in top):
                raise EngineError("input %s of the %s plan has no profile for its dynamic axes" % (tname, self.name))
            max_shapes[tname] = top
        return inputs, outputs, max_shapes

    @property
    def device_memory_bytes(self) -> int:
        """Execution-context device memory for the profile (activations), excluding I/O buffers."""
        return device_memory_bytes(self._engine) if self._engine is not None else 0

    @property
    def io_buffer_bytes(self) -> int:
        """Bytes of the device I/O buffers (sized for the max batch)."""
        if self._buffers is None:
            return 0
        return sum(int(h.nbytes) for h in self._buffers.host.values())

    def memory_bytes(self) -> int:
        """Device memory this engine holds: activations + I/O buffers + weights (~ plan size)."""
        return self.device_memory_bytes + self.io_buffer_bytes + self.plan_bytes

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        trt = self._trt
        with self._lock, self._ctx.active():
            self._logger.begin()
            context, buffers = self._context, self._buffers
            assert context is not None and buffers is not None
            for spec in self.inputs:
                x = feed[spec.name]
                if not context.set_input_shape(spec.name, tuple(x.shape)):
                    raise InputError("TensorRT refused shape %s for %s: %s"
                                     % (tuple(x.shape), spec.name, self._last_error()))
                buffers.to_device(spec.name, np.ascontiguousarray(x).reshape(-1))
            if not context.execute_async_v3(buffers.stream.handle):
                raise InferenceError("TensorRT execution failed for %s: %s"
                                     % (self.name, self._last_error("enqueue returned False")))
            shapes = {}
            for o in self.outputs:
                shape = dims_tuple(context.get_tensor_shape(o.name))
                if shape is None or any(d < 0 for d in shape):
                    raise InferenceError("TensorRT reports no shape for output %s of %s" % (o.name, self.name))
                shapes[o.name] = shape
            for oname, shape in shapes.items():
                buffers.from_device(oname, trt.volume(shape))
            buffers.synchronize()
            return {o: buffers.host[o][: trt.volume(s)].reshape(s).copy() for o, s in shapes.items()}

    def _release_all(self) -> None:
        try:
            with self._ctx.active():
                if self._buffers is not None:
                    self._buffers.free()
                    self._buffers = None
                # TensorRT objects are freed by refcount; drop them while the context is current
                self._context = None
                self._engine = None
                self._runtime = None
        finally:
            _cuda.release_context()

    def _close_impl(self) -> None:
        with self._lock:
            self._release_all()
