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
            values = self._session.run(self._output_names, feed if type(feed) is dict else dict(feed))
        except Exception as e:
            raise InferenceError("onnxruntime failed on %s: %s" % (self.model_path.name, _first_line(e))) from e
        return dict(zip(self._output_names, values))

    def _close_impl(self) -> None:
        self._session = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def io_bytes_per_item(engine: Engine) -> int:
    """Bytes of one item's inputs and outputs (exact, from the specs)."""
    total = 0
    for spec in list(engine.inputs) + list(engine.outputs):
        n = 1
        for d in spec.shape[1:]:
            n *= max(int(d), 1)
        total += n * np.dtype(spec.dtype).itemsize
    return total


def measure_memory_model(engine: OrtEngine, probe_batch: int) -> Tuple[int, int, str]:
    """(fixed_bytes, per_item_bytes, method) for an ONNX Runtime engine, measured from the process's peak
    RSS while running batch 1 and `probe_batch` (Linux), with the exact I/O size per item as a floor.

    The figure is approximate: other threads of the process allocate too, so it is rounded up, never down.
    """
    from edge_agent.engines.tuner import make_feed

    floor = io_bytes_per_item(engine)
    weights = engine.model_path.stat().st_size
    probe_batch = max(2, min(int(probe_batch), engine.max_batch))
    rss0 = _proc_status_kib("VmRSS")
    if rss0 is None or not _reset_peak_rss():
        engine.infer(make_feed(engine.inputs, 1))
        return weights, floor, "estimated"
    engine.infer(make_feed(engine.inputs, 1))
    hwm1 = _proc_status_kib("VmHWM") or rss0
    _reset_peak_rss()
    engine.infer(make_feed(engine.inputs, probe_batch))
    hwm_p = _proc_status_kib("VmHWM") or hwm1
    per_item = max(floor, (hwm_p - hwm1) * 1024 // (probe_batch - 1))
    fixed = weights + max(0, (hwm1 - rss0) * 1024 - per_item)
    return int(fixed), int(per_item), "measured"
