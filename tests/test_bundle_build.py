"""`fleet/bundle_builder.py` on the real sample models: what it builds, and each SPEC mistake it refuses
(with the output file absent, or unchanged, afterwards)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import MIB

from edge_agent.bundle.archive import read_bundle, unpack_bundle
from edge_agent.bundle.verify import verify_manifest
from edge_agent.errors import SignatureError
from edge_agent.signing import PrivateKey
from fleet.bundle_builder import build_bundle
from fleet.bundle_spec import SpecError, parse_engine_option

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "digits"
KEY = PrivateKey.generate("build")
NOW = 1_800_000_000


@pytest.fixture
def spec_dir(tmp_path):
    d = tmp_path / "spec"
    d.mkdir()
    for name in ("small.onnx", "large.onnx", "golden.npz", "bundle.toml"):
        shutil.copy(SAMPLES / name, d / name)
    return d


def _edit(spec_dir: Path, old: str, new: str) -> Path:
    spec = spec_dir / "bundle.toml"
    text = spec.read_text()
    assert old in text, old
    spec.write_text(text.replace(old, new, 1))
    return spec


def _verify(out: Path, keys, threshold=1):
    raw, reader = read_bundle(out, max_manifest_bytes=MIB, max_bundle_bytes=64 * MIB)
    reader.close()
    return verify_manifest(raw, trusted={k.keyid: k.public for k in keys}, threshold=threshold, now=NOW,
                           highest_versions={}, max_manifest_bytes=MIB)


def test_sample_spec_builds_a_bundle_that_verifies_and_unpacks(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "digits.bundle"
    body = build_bundle(SAMPLES / "bundle.toml", KEY, out, now=NOW)
    assert (body.name, body.version, body.created, body.expires) == ("digits", 1, NOW, NOW + 365 * 86400)
    assert body.models["small"].features_output == "features"
    assert [o.name for o in body.models["small"].outputs] == ["logits", "features"]
    assert body.router.tau == "0.9" and body.preprocessing.scale == "0.00392156862745098"
    assert _verify(out, [KEY]) == body
    dest = unpack_bundle(out, tmp_path / "unpacked", body, max_bundle_bytes=64 * MIB)
    assert (dest / "models" / "large.onnx").read_bytes() == (SAMPLES / "large.onnx").read_bytes()
    # the recorded golden outputs are what ONNX Runtime gives for the golden inputs
    with np.load(dest / "golden" / "inputs.npz") as z:
        x = z["image"]
    assert x.shape == (40, 1, 8, 8)
    for m in ("small", "large"):
        sess = ort.InferenceSession(str(dest / body.models[m].path), providers=["CPUExecutionProvider"])
        with np.load(dest / ("golden/%s_outputs.npz" % m)) as ref:
            got = sess.run(None, {"image": x})
            names = [o.name for o in sess.get_outputs()]
            assert sorted(ref.files) == sorted(names)
            for n, v in zip(names, got):
                np.testing.assert_allclose(ref[n], v, rtol=1e-6, atol=1e-6)


def test_several_keys_sign_for_a_threshold(tmp_path):
    keys = [KEY, PrivateKey.generate("second")]
    out = tmp_path / "b.bundle"
    build_bundle(SAMPLES / "bundle.toml", keys, out, now=NOW)
    assert _verify(out, keys, threshold=2).version == 1
    with pytest.raises(SignatureError):
        _verify(out, keys[:1], threshold=2)


def test_declared_dtype_mismatch_in_spec_refused(spec_dir, tmp_path):
    spec = _edit(spec_dir, '{ name = "logits", dtype = "float32", shape = [-1, 10] }',
                 '{ name = "logits", dtype = "float16", shape = [-1, 10] }')
    out = tmp_path / "b.bundle"
    with pytest.raises(SpecError, match="small model output 'logits' is float32, the SPEC declares float16"):
        build_bundle(spec, KEY, out, now=NOW)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["spec"]  # no staging folder left behind


def test_declared_input_name_mismatch_refused(spec_dir, tmp_path):
    spec = _edit(spec_dir, 'inputs = [{ name = "image"', 'inputs = [{ name = "pixels"')
    with pytest.raises(SpecError, match="inputs are"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)
    assert not (tmp_path / "b.bundle").exists()


def test_declared_shape_mismatch_refused(spec_dir, tmp_path):
    spec = _edit(spec_dir, 'shape = [-1, 16]', 'shape = [-1, 32]')
    with pytest.raises(SpecError, match="shape"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)


def test_model_with_fixed_batch_axis_refused(spec_dir, tmp_path):
    import onnx

    m = onnx.load(str(spec_dir / "large.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, str(spec_dir / "large.onnx"))
    with pytest.raises(SpecError, match="fixed batch axis"):
        build_bundle(spec_dir / "bundle.toml", KEY, tmp_path / "b.bundle", now=NOW)
    assert not (tmp_path / "b.bundle").exists()


def test_spec_declaring_a_fixed_batch_refused(spec_dir, tmp_path):
    spec = _edit(spec_dir, 'shape = [-1, 16]', 'shape = [4, 16]')
    with pytest.raises(SpecError, match="batch axis as -1"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)


def test_golden_inputs_with_wrong_dtype_refused(spec_dir, tmp_path):
    with np.load(spec_dir / "golden.npz") as z:
        x = z["image"]
    np.savez(spec_dir / "golden.npz", image=x.astype(np.float64))
    with pytest.raises(SpecError, match="golden input 'image' is float64"):
        build_bundle(spec_dir / "bundle.toml", KEY, tmp_path / "b.bundle", now=NOW)


def test_golden_inputs_with_wrong_names_refused(spec_dir, tmp_path):
    np.savez(spec_dir / "golden.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(SpecError, match="golden inputs"):
        build_bundle(spec_dir / "bundle.toml", KEY, tmp_path / "b.bundle", now=NOW)


def test_unknown_spec_key_refused(spec_dir, tmp_path):
    spec = _edit(spec_dir, "version = 1\n", "version = 1\nversoin = 2\n")
    with pytest.raises(SpecError, match="versoin"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)


def test_invalid_router_setting_refused(spec_dir, tmp_path):
    spec = _edit(spec_dir, "tau = 0.9", "tau = 0.1")
    with pytest.raises(SpecError, match="tau_min <= tau <= tau_max"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)


def test_postprocessing_output_the_models_lack_is_refused_at_build(spec_dir, tmp_path):
    spec = _edit(spec_dir, 'output = "logits"', 'output = "scores"')
    with pytest.raises(SpecError, match=r"postprocessing.output 'scores' is not an output of the small model"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)
    assert not (tmp_path / "b.bundle").exists()


def test_labels_not_matching_the_class_count_are_refused_at_build(spec_dir, tmp_path):
    spec = _edit(spec_dir, '"8", "9"]', '"8"]')
    with pytest.raises(SpecError, match=r"9 labels but the small model's output 'logits' has 10 classes"):
        build_bundle(spec, KEY, tmp_path / "b.bundle", now=NOW)
    assert not (tmp_path / "b.bundle").exists()


def test_detection_class_count_from_either_yolo_layout():
    from fleet.spec_checks import class_count

    assert class_count("detection", np.zeros((100, 5 + 3))) == 3  # rows: cx, cy, w, h, obj, 3 classes
    assert class_count("detection", np.zeros((4 + 80, 8400))) == 80  # columns, no objectness
    assert class_count("detection", np.zeros((1, 4 + 2, 300))) == 2
    assert class_count("detection", np.zeros(7)) is None
    assert class_count("classification", np.zeros(10)) == 10


def test_missing_model_file_refused(spec_dir, tmp_path):
    (spec_dir / "large.onnx").unlink()
    with pytest.raises(SpecError, match=r"large model .* does not exist"):
        build_bundle(spec_dir / "bundle.toml", KEY, tmp_path / "b.bundle", now=NOW)


def test_corrupt_model_file_refused(spec_dir, tmp_path):
    (spec_dir / "small.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(SpecError, match=r"cannot load small\.onnx"):
        build_bundle(spec_dir / "bundle.toml", KEY, tmp_path / "b.bundle", now=NOW)


def test_failed_build_leaves_an_existing_bundle_unchanged(spec_dir, tmp_path):
    out = tmp_path / "b.bundle"
    out.write_bytes(b"previous bundle")
    spec = _edit(spec_dir, 'dtype = "float32", shape = [-1, 1, 8, 8]', 'dtype = "int64", shape = [-1, 1, 8, 8]')
    with pytest.raises(SpecError):
        build_bundle(spec, KEY, out, now=NOW)
    assert out.read_bytes() == b"previous bundle"


def test_prebuilt_engine_is_stored_and_recorded(tmp_path):
    plan = tmp_path / "large-orin.plan"
    plan.write_bytes(b"serialized engine bytes")
    out = tmp_path / "b.bundle"
    engines = [parse_engine_option("trt8.5.2-sm87=large:%s" % plan)]
    body = build_bundle(SAMPLES / "bundle.toml", KEY, out, engines, now=NOW)
    assert body.models["large"].engines == {"trt8.5.2-sm87": "engines/large/trt8.5.2-sm87.plan"}
    assert body.models["small"].engines == {}
    dest = unpack_bundle(out, tmp_path / "u", _verify(out, [KEY]), max_bundle_bytes=64 * MIB)
    assert (dest / "engines/large/trt8.5.2-sm87.plan").read_bytes() == b"serialized engine bytes"


@pytest.mark.parametrize("text", ["trt8.5-sm87=large", "nope=large:x.plan", "trt8.5-sm87=medium:x.plan", "x"])
def test_malformed_engine_option_refused(text):
    with pytest.raises(SpecError):
        parse_engine_option(text)
