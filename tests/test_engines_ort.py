"""The ONNX Runtime backend on real ONNX models: specs, numerics, and refusal of bad feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.engines.ort import OrtEngine
from edge_agent.errors import EngineError, InputError
from edge_agent.selftest import tiny_model_path

pytest.importorskip("onnxruntime")

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "digits"


def _numpy_reference(model_path: Path, x: np.ndarray) -> dict:
    """Forward pass of the tiny Flatten-Gemm-Relu-Gemm model in plain numpy."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    h = np.maximum(x.reshape(len(x), -1) @ w["w1"].T + w["b1"], 0)
    return {"features": h, "logits": h @ w["w2"].T + w["b2"]}


def test_specs_come_from_the_model():
    with OrtEngine(tiny_model_path(), max_batch=8) as eng:
        assert eng.backend == "onnxruntime"
        assert [(s.name, s.dtype, s.shape) for s in eng.inputs] == [("image", "float32", (-1, 1, 8, 8))]
        assert {s.name: s.shape for s in eng.outputs} == {"logits": (-1, 10), "features": (-1, 16)}
        assert "CPUExecutionProvider" in eng.providers


def test_outputs_match_numpy_reference():
    x = np.random.RandomState(0).rand(5, 1, 8, 8).astype(np.float32)
    with OrtEngine(tiny_model_path(), max_batch=8, intra_op_threads=1) as eng:
        out = eng.infer({"image": x})
    ref = _numpy_reference(tiny_model_path(), x)
    assert set(out) == {"logits", "features"}
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["features"], ref["features"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "feed, fragment",
    [
        ({"img": np.zeros((1, 1, 8, 8), np.float32)}, "inputs image expected"),
        ({"image": np.zeros((1, 1, 8, 8), np.float64)}, "dtype float64"),
        ({"image": np.zeros((1, 8, 8), np.float32)}, "shape"),
        ({"image": np.zeros((2, 1, 8, 9), np.float32)}, "shape"),
        ({"image": np.zeros((9, 1, 8, 8), np.float32)}, "outside 1..8"),
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "outside 1..8"),
    ],
)
def test_bad_feed_refused_and_engine_keeps_serving(feed, fragment):
    with OrtEngine(tiny_model_path(), max_batch=8) as eng:
        with pytest.raises(InputError, match=fragment):
            eng.infer(feed)
        out = eng.infer({"image": np.zeros((2, 1, 8, 8), np.float32)})
        assert out["logits"].shape == (2, 10)


def test_closed_engine_refuses():
    eng = OrtEngine(tiny_model_path(), max_batch=2)
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(InputError, match="closed"):
        eng.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})


def test_corrupt_model_file_is_an_engine_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(EngineError, match=r"cannot load bad\.onnx"):
        OrtEngine(bad, max_batch=1)


def test_missing_model_file_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="cannot load"):
        OrtEngine(tmp_path / "absent.onnx", max_batch=1)


@pytest.mark.skipif(not (SAMPLES / "large.onnx").exists(), reason="sample models not generated yet")
@pytest.mark.parametrize("name", ["small", "large"])
def test_sample_models_classify_heldout_digits(name):
    data = np.load(str(SAMPLES / "heldout.npz"))
    x, y = data["x"][:64], data["y"][:64]
    with OrtEngine(SAMPLES / ("%s.onnx" % name), max_batch=64) as eng:
        out = eng.infer({"image": x})
        # one-by-one and batched answers agree (the dynamic batch axis really is independent)
        single = np.concatenate([eng.infer({"image": x[i : i + 1]})["logits"] for i in range(8)])
    np.testing.assert_allclose(single, out["logits"][:8], rtol=1e-4, atol=1e-4)
    assert out["logits"].shape == (64, 10)
    assert (out["logits"].argmax(1) == y).mean() > 0.8
