"""Regenerate `tiny.onnx`, the model `edge-agent selftest` builds and runs.

An 8x8 single-channel image classifier with fixed pseudo-random weights (no training: the self-test
compares backends with each other, not with labels). Input `image` float32 (N,1,8,8); outputs
`logits` (N,10) and `features` (N,16). Opset 13, ops every backend supports: Flatten, Gemm, Relu.

Also writes `tiny_reference.npz`: 8 fixed inputs `image` and the outputs `logits`/`features` computed in
plain numpy (float64), so the self-test can check a backend against an independent computation.

Usage (needs the `onnx` package): python -m edge_agent.selftest._make_model [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SEED = 7
OPSET = 13


def weights(seed: int = SEED, hidden: int = 16):
    """The fixed weights (w1, b1, w2, b2)."""
    rng = np.random.RandomState(seed)
    w1 = (rng.randn(hidden, 64) * 0.3).astype(np.float32)
    b1 = (rng.randn(hidden) * 0.1).astype(np.float32)
    w2 = (rng.randn(10, hidden) * 0.5).astype(np.float32)
    b2 = (rng.randn(10) * 0.1).astype(np.float32)
    return w1, b1, w2, b2


def reference(x: np.ndarray, seed: int = SEED) -> dict:
    """The model's outputs computed in float64 numpy."""
    w1, b1, w2, b2 = (w.astype(np.float64) for w in weights(seed))
    h = np.maximum(x.reshape(len(x), -1).astype(np.float64) @ w1.T + b1, 0)
    return {"features": h.astype(np.float32), "logits": (h @ w2.T + b2).astype(np.float32)}


def make_model_bytes(seed: int = SEED, hidden: int = 16) -> bytes:
    """Serialized ONNX model bytes (deterministic for a seed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = weights(seed, hidden)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["pre"], transB=1),
        helper.make_node("Relu", ["pre"], ["features"]),
        helper.make_node("Gemm", ["features", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "selftest_tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", hidden]),
        ],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-agent")
    model.ir_version = 7  # readable by the onnxruntime releases JetPack 5 users have
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main(argv: list) -> int:
    """Write tiny.onnx and tiny_reference.npz into OUT_DIR (default: beside this file)."""
    out = Path(argv[0]) if argv else Path(__file__).parent
    (out / "tiny.onnx").write_bytes(make_model_bytes())
    x = np.random.RandomState(SEED + 1).rand(8, 1, 8, 8).astype(np.float32)
    np.savez(str(out / "tiny_reference.npz"), image=x, **reference(x))
    print("wrote %s and %s" % (out / "tiny.onnx", out / "tiny_reference.npz"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
