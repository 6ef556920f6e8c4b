"""The ONNX Runtime backend: CPU everywhere, CUDA/TensorRT execution providers where installed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from edge_agent.engines.base import Engine, TensorSpec
from edge_agent.errors import EngineError, InferenceError

log = logging.getLogger(__name__)

#: ONNX Runtime's type strings -> numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def available_providers() -> List[str]:
    """Execution providers this onnxruntime build offers ([] when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def default_providers() -> List[str]:
    """CUDA before CPU when the CUDA provider exists; never the TensorRT provider by default (it builds
    engines silently inside the agent process, which the tensorrt backend exists to avoid)."""
    have = available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have] or have


def _spec(arg: Any) -> TensorSpec:
    name = arg.name
    type_str = arg.type
    dtype = _ORT_TYPES.get(type_str)
    if dtype is None:
        raise EngineError("tensor %s has type %s, which the agent does not support" % (name, type_str))
    shape: Tuple[int, ...] = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorSpec(name=name, dtype=dtype, shape=shape)


class OrtEngine(Engine):
    """An ONNX model run by an `onnxruntime.InferenceSession` (thread-safe `run`)."""

    backend = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        max_batch: int,
        intra_op_threads: int = 0,
        providers: Optional[List[str]] = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EngineError("onnxruntime is not installed (pip install onnxruntime)") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        chosen = list(providers) if providers else default_providers()
        try:
            session = ort.InferenceSession(str(model_path), sess_options=opts, providers=chosen)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise EngineError("onnxruntime cannot load %s: %s" % (Path(model_path).name, _first_line(e))) from e
        inputs = [_spec(a) for a in session.get_inputs()]
        outputs = [_spec(a) for a in session.get_outputs()]
        super().__init__(inputs=inputs, outputs=outputs, max_batch=max_batch)
        self.model_path = Path(model_path)
        self.providers = list(session.get_providers())
        self.intra_op_threads = int(intra_op_threads)
        self._session = session
        self._output_names = [o.name for o in outputs]
        log.debug("loaded %s with %s (max batch %d)", self.model_path.name, self.providers, max_batch)

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        try:
            values = self._session.run(self._output_names, dict(feed))
        except Exception as e:
            raise InferenceError("onnxruntime failed on %s: %s" % (self.model_path.name, _first_line(e))) from e
        return dict(zip(self._output_names, values))

    def _close_impl(self) -> None:
        self._session = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
