"""The sample models in samples/digits: valid small ONNX files, the large one costs >= 10x the FLOPs and
is more accurate on the held-out split, ONNX Runtime agrees with the numpy forward pass, and the
README's figures are the measured ones."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "digits"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("digits_train", str(SAMPLES / "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _split(name):
    with np.load(SAMPLES / ("%s.npz" % name)) as z:
        return z["x"], z["y"]


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(SAMPLES / ("%s.onnx" % model)), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"image": x})))


def _accuracy(model):
    x, y = _split("heldout")
    return float((_run(model, x)["logits"].argmax(1) == y).mean())


@pytest.mark.parametrize("model,outputs", [("small", ["logits", "features"]), ("large", ["logits"])])
def test_onnx_models_are_valid_small_and_batch_dynamic(model, outputs):
    import onnx

    path = SAMPLES / ("%s.onnx" % model)
    assert path.stat().st_size < 1 << 20
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == outputs
    for vi in list(m.graph.input) + list(m.graph.output):
        assert vi.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert {n.op_type for n in m.graph.node} <= {"Gemm", "MatMul", "Conv", "Relu", "Flatten", "Reshape",
                                                  "GlobalAveragePool", "Add"}
    for batch in (1, 7):
        got = _run(model, np.zeros((batch, 1, 8, 8), np.float32))
        assert got["logits"].shape == (batch, 10)


def test_large_costs_at_least_ten_times_the_small_flops(train):
    small = train.count_flops(SAMPLES / "small.onnx")
    large = train.count_flops(SAMPLES / "large.onnx")
    assert small == 2 * (64 * 16 + 16 * 10)
    assert large >= 10 * small


def test_large_is_more_accurate_on_heldout():
    small, large = _accuracy("small"), _accuracy("large")
    assert small > 0.9  # a real classifier, not a strawman
    assert large >= small + 0.01


@pytest.mark.parametrize("model", ["small", "large"])
def test_onnx_outputs_match_the_numpy_forward_pass(train, model):
    params = train.params_from_onnx(SAMPLES / ("%s.onnx" % model))
    forward = train.small_forward if model == "small" else train.large_forward
    x, _ = _split("heldout")
    ref = forward(params, x)
    got = _run(model, x)
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4)
    assert (got["logits"].argmax(1) == ref["logits"].argmax(1)).all()


def test_small_features_are_the_hidden_relu_activations(train):
    params = train.params_from_onnx(SAMPLES / "small.onnx")
    x, _ = _split("calib")
    got = _run("small", x)
    feats = got["features"]
    assert feats.shape == (len(x), 16) and (feats >= 0).all()
    np.testing.assert_allclose(got["logits"], feats @ params["w2"].T + params["b2"], rtol=1e-5, atol=1e-5)


def test_splits_are_the_documented_deterministic_stratified_split(train):
    regenerated = train.load_splits()
    sizes = {}
    for name in ("train", "calib", "heldout"):
        x, y = _split(name)
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape[1:] == (1, 8, 8)
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(x, regenerated[name][0])
        np.testing.assert_array_equal(y, regenerated[name][1])
        assert sorted(set(y.tolist())) == list(range(10))
        sizes[name] = len(y)
    assert sizes == {"train": 1077, "calib": 360, "heldout": 360}


def test_golden_inputs_come_from_calib_not_heldout():
    with np.load(SAMPLES / "golden.npz") as z:
        g = z["image"]
    calib, _ = _split("calib")
    calib_rows = {r.tobytes() for r in calib}
    assert g.shape == (40, 1, 8, 8)
    assert all(r.tobytes() in calib_rows for r in g)


def test_readme_records_the_measured_figures(train):
    text = (SAMPLES / "README.md").read_text()
    for model in ("small", "large"):
        row = next(line for line in text.splitlines() if line.startswith("| `%s.onnx`" % model))
        flops = int(re.search(r"\| ([\d,]+) \|", row).group(1).replace(",", ""))
        acc = float(re.search(r"\| (0\.\d{4}) ", row).group(1))
        assert flops == train.count_flops(SAMPLES / ("%s.onnx" % model))
        assert acc == pytest.approx(_accuracy(model), abs=5e-5)
