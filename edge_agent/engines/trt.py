"""The TensorRT backend: a deserialized plan run with the named-tensor API (TRT 8.5, 8.6 and 10.x).

Buffers are sized once for the optimization profile's max batch (pinned host + device), every I/O tensor's
address is set once, and each `infer` pushes the process-wide CUDA context, sets the input shapes, copies
only the used part on a non-default stream and pops the context again — from whatever thread calls it.
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


def make_logger(trt: Any, min_severity: Optional[Any] = None) -> Any:
    """A `trt.ILogger` that forwards to `logging` and keeps the error messages for our exceptions."""

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: List[str] = []
            self.min_severity = min_severity if min_severity is not None else trt.ILogger.WARNING

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.ERROR):
                self.errors.append(msg)
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
        self._logger = make_logger(trt)
        self._ctx = _cuda.acquire_context()
        self._buffers: Optional[_cuda.DeviceBuffers] = None
        self._engine = self._context = self._runtime = None
        try:
            with self._ctx.active():
                inputs, outputs, profile_max = self._load(plan)
        except BaseException:
            self._release_all()
            raise
        if max_batch is not None:
            profile_max = min(profile_max, int(max_batch))
        super().__init__(inputs=inputs, outputs=outputs, max_batch=profile_max)
        self.plan_bytes = len(plan)
        log.info("loaded TensorRT engine %s (max batch %d, %d bytes device memory)",
                 name, profile_max, self.device_memory_bytes)

    def _load(self, plan: bytes) -> Tuple[List[TensorSpec], List[TensorSpec], int]:
        trt = self._trt
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            reason = self._logger.errors[-1] if self._logger.errors else "deserialize_cuda_engine returned None"
            raise PlanRejectedError("TensorRT %s cannot load the %s plan: %s" % (trt.__version__, self.name, reason))
        engine = self._engine
        inputs: List[TensorSpec] = []
        outputs: List[TensorSpec] = []
        max_shapes: Dict[str, Tuple[int, ...]] = {}
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tname))).name
            shape = tuple(int(d) for d in engine.get_tensor_shape(tname))
            spec = TensorSpec(name=tname, dtype=dtype, shape=shape)
            if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                try:
                    prof = engine.get_tensor_profile_shape(tname, 0)
                except Exception:  # static inputs have no profile; some versions raise instead of returning []
                    prof = []
                max_shapes[tname] = tuple(int(d) for d in prof[2]) if len(prof) == 3 else shape
                if any(d < 1 for d in max_shapes[tname]):
                    raise EngineError("input %s of the %s plan has no profile for its dynamic axes"
                                      % (tname, self.name))
            else:
                outputs.append(spec)
        if not inputs:
            raise EngineError("the %s plan has no inputs" % self.name)
        profile_max = min(s[0] for s in max_shapes.values())
        self._context = engine.create_execution_context()
        context = self._context
        for tname, shape in max_shapes.items():
            if not context.set_input_shape(tname, shape):
                raise EngineError("TensorRT refused the profile's max shape for %s: %s"
                                  % (tname, "; ".join(self._logger.errors[-1:])))
        self._buffers = _cuda.DeviceBuffers()
        for spec in inputs:
            self._buffers.allocate(spec.name, trt.volume(max_shapes[spec.name]), spec.dtype)
        for spec in outputs:
            out_max = tuple(int(d) for d in context.get_tensor_shape(spec.name))
            if any(d < 0 for d in out_max):
                raise EngineError("cannot size output %s of the %s plan" % (spec.name, self.name))
            self._buffers.allocate(spec.name, trt.volume(out_max), spec.dtype)
        for spec in inputs + outputs:
            if not context.set_tensor_address(spec.name, self._buffers.pointer(spec.name)):
                raise EngineError("TensorRT refused the address of %s" % spec.name)
        return inputs, outputs, profile_max

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
            context, buffers = self._context, self._buffers
            assert context is not None and buffers is not None
            for spec in self.inputs:
                x = feed[spec.name]
                if not context.set_input_shape(spec.name, tuple(x.shape)):
                    raise InputError("TensorRT refused shape %s for %s: %s"
                                     % (tuple(x.shape), spec.name, "; ".join(self._logger.errors[-1:])))
                buffers.to_device(spec.name, np.ascontiguousarray(x).reshape(-1))
            if not context.execute_async_v3(buffers.stream.handle):
                raise InferenceError("TensorRT execution failed for %s: %s"
                                     % (self.name, "; ".join(self._logger.errors[-1:]) or "enqueue returned False"))
            shapes = {o.name: tuple(int(d) for d in context.get_tensor_shape(o.name)) for o in self.outputs}
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
