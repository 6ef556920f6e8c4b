"""A real ONNX model that breaks on inputs unlike the golden set: the sample model plus a branch that turns
its logits into NaN when an input's mean pixel value is above a threshold (for example the highest mean of
the golden inputs). On inputs at or under it the outputs are bit-for-bit the original model's (x + 0.0),
so the bundle's golden self-test passes; an over-exposed camera frame gets NaN."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def golden_max_mean(golden_npz: Path) -> float:
    """The highest mean pixel value over the golden inputs (key `image`, N x 1 x 8 x 8)."""
    x = np.load(str(golden_npz))["image"]
    return float(x.reshape(len(x), -1).mean(axis=1).max())


def add_nan_branch(src: Path, out: Path, threshold: float, output: str = "logits") -> Path:
    """Write `src` with `output` replaced by `output + where(mean(input) > threshold, NaN, 0)`."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    g = model.graph
    inp = g.input[0].name
    raw = output + "_raw"
    for node in g.node:
        node.output[:] = [raw if o == output else o for o in node.output]
    g.initializer.extend([
        helper.make_tensor("nan_threshold", TensorProto.FLOAT, [], [float(threshold)]),
        helper.make_tensor("nan_value", TensorProto.FLOAT, [], [float("nan")]),
        helper.make_tensor("zero_value", TensorProto.FLOAT, [], [0.0]),
    ])
    g.node.extend([
        helper.make_node("ReduceMean", [inp], ["item_mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["item_mean"], ["item_mean_2d"], axis=1),  # (N, 1)
        helper.make_node("Greater", ["item_mean_2d", "nan_threshold"], ["unlike_golden"]),
        helper.make_node("Where", ["unlike_golden", "nan_value", "zero_value"], ["nan_or_zero"]),
        helper.make_node("Add", [raw, "nan_or_zero"], [output]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return Path(out)


def overexposed(x: np.ndarray) -> np.ndarray:
    """The same digits as an over-exposed camera would see them (every mean far above the golden set's)."""
    return np.clip(x * 0.5 + 0.5, 0.0, 1.0).astype(np.float32)
