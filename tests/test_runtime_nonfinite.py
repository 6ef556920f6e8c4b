"""A NaN or Inf in a model's answer is an inference error: the request fails with a clear message and is
counted in `errors` (so in telemetry's error rate and the probation gate), never returned as an answer."""

from __future__ import annotations

import numpy as np
import pytest
from _runtime_helpers import DIGITS, Models, digits_manifest, load_split
from nan_model import add_nan_branch, golden_max_mean, overexposed

from edge_agent.config import RuntimeConfig
from edge_agent.errors import InferenceError
from edge_agent.runtime.service import InferenceService


@pytest.fixture
def service(tmp_path):
    from edge_agent.engines.ort import OrtEngine

    threshold = golden_max_mean(DIGITS / "golden.npz")
    bad_large = add_nan_branch(DIGITS / "large.onnx", tmp_path / "large-nan.onnx", threshold)
    models = Models(OrtEngine(DIGITS / "small.onnx", max_batch=8, intra_op_threads=1),
                    OrtEngine(bad_large, max_batch=8, intra_op_threads=1), {"small": 8, "large": 8})
    svc = InferenceService(models, digits_manifest(tmp_path), tmp_path, RuntimeConfig(max_queue_delay_ms=0.5))
    yield svc
    svc.close()
    models.close()


def test_the_nan_branch_leaves_golden_like_inputs_bit_identical(tmp_path):
    import onnxruntime as ort

    bad = add_nan_branch(DIGITS / "large.onnx", tmp_path / "l.onnx", golden_max_mean(DIGITS / "golden.npz"))
    golden = np.load(str(DIGITS / "golden.npz"))["image"]
    a = ort.InferenceSession(str(DIGITS / "large.onnx")).run(["logits"], {"image": golden})[0]
    b = ort.InferenceSession(str(bad)).run(["logits"], {"image": golden})[0]
    assert np.array_equal(a, b)
    c = ort.InferenceSession(str(bad)).run(["logits"], {"image": overexposed(golden)})[0]
    assert np.isnan(c).all()


def test_nan_answer_is_an_inference_error_counted_in_errors(service):
    x, _ = load_split("heldout")
    service.set_router(gate="large-only")
    service.stats_snapshot(reset=True)
    assert service.infer_tensor(x[0]).output["kind"] == "classification"  # a normal frame is answered
    with pytest.raises(InferenceError, match=r"large model returned a non-finite value \(NaN or Inf\)"):
        service.infer_tensor(overexposed(x[:1])[0])
    st = service.stats_snapshot(reset=True)
    assert (st["requests"], st["errors"]) == (2, 1)
    assert st["routes"]["large"]["errors"] == 1


def test_a_batch_request_with_nan_items_fails_whole_and_counts_every_item(service):
    x, _ = load_split("heldout")
    service.set_router(gate="large-only")
    service.stats_snapshot(reset=True)
    mixed = np.concatenate([x[:3], overexposed(x[3:5])])
    with pytest.raises(InferenceError, match="for 2 of 5 items"):
        service.infer_batch(mixed)
    assert len(service.infer_batch(x[:4])) == 4  # the service still answers
    st = service.stats_snapshot(reset=True)
    assert (st["requests"], st["errors"]) == (9, 5)


def test_with_the_router_only_escalated_unlike_inputs_fail(service):
    """Confidence gate: over-exposed frames the small model is sure of are answered; those it escalates
    hit the broken large model and fail."""
    x, _ = load_split("heldout")
    service.stats_snapshot(reset=True)
    ok = failed = 0
    for item in overexposed(x[:60]):
        try:
            res = service.infer_tensor(item)
        except InferenceError:
            failed += 1
            continue
        assert res.route == "small"
        ok += 1
    st = service.stats_snapshot(reset=True)
    assert failed > 0 and ok > 0 and st["errors"] == failed and st["requests"] == 60
