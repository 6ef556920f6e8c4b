"""Regenerate `tiny.onnx`, the model `edge-agent selftest` builds and runs.

An 8x8 single-channel image classifier with fixed pseudo-random weights (no training: the self-test
compares backends with each other, not with labels). Input `image` float32 (N,1,8,8); outputs
`logits` (N,10) and `features` (N,16). Opset 13, ops every backend supports: Flatten, Gemm, Relu.

Usage (needs the `onnx` package): python -m edge_agent.selftest._make_model [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SEED = 7
OPSET = 13


def make_model_bytes(seed: int = SEED, hidden: int = 16) -> bytes:
    """Serialized ONNX model bytes (deterministic for a seed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    w1 = (rng.randn(hidden, 64) * 0.3).astype(np.float32)
    b1 = (rng.randn(hidden) * 0.1).astype(np.float32)
    w2 = (rng.randn(10, hidden) * 0.5).astype(np.float32)
    b2 = (rng.randn(10) * 0.1).astype(np.float32)
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
    """Write the model to OUT (default: tiny.onnx beside this file)."""
    out = Path(argv[0]) if argv else Path(__file__).with_name("tiny.onnx")
    out.write_bytes(make_model_bytes())
    print("wrote %s" % out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
