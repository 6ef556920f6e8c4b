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


# ---------------------------------------------------------------------------------------------------------
# Non-finite or out-of-range *inputs* are the client's fault: refused before any model runs, never counted
# as a model error (so never in the error rate, the probation gate or the shadow/A-B gates).


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_an_input_error_not_counted_as_a_model_error(service, bad):
    from edge_agent.errors import InputError

    x, _ = load_split("heldout")
    service.stats_snapshot(reset=True)
    item = x[0].copy()
    item[0, 3, 3] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        service.infer_tensor(item)
    batch = x[:4].copy()
    batch[2, 0, 1, 1] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        service.infer_batch(batch)
    st = service.stats_snapshot(reset=True)
    assert (st["requests"], st["errors"]) == (0, 0)


def test_out_of_range_inputs_are_input_errors(service):
    from edge_agent.errors import InputError

    x, _ = load_split("heldout")
    with pytest.raises(InputError, match="out of the float32 range"):
        service.infer_tensor(np.full(x[0].shape, 1e300, dtype=np.float64))
    with pytest.raises(InputError, match="cannot be cast safely"):
        service.infer_tensor(np.rint(x[0] * 16).astype(np.int64))  # raw, unscaled values
    assert service.infer_tensor(x[0].astype(np.float64)).route in ("small", "large")  # a safe cast is served
    assert service.stats_snapshot(reset=True)["errors"] == 0


def test_nan_inputs_during_probation_do_not_fail_a_good_bundle(service):
    """The field report: 5 NaN requests of 105 rolled a good bundle back. Now they are refused as the
    client's and the probation gate, fed from the service's stats, sees 100 clean requests."""
    from edge_agent.bundle.manifest import HealthGates
    from edge_agent.config import ProbationConfig
    from edge_agent.errors import InputError
    from edge_agent.lifecycle.probation import Probation

    x, _ = load_split("heldout")
    service.stats_snapshot(reset=True)
    refused = 0
    for i in range(105):
        item = x[i % 50].copy()
        if i % 21 == 0:
            item[0, 0, 0] = np.nan
        try:
            service.infer_tensor(item)
        except InputError:
            refused += 1
    assert refused == 5
    st = service.stats_snapshot(reset=True)
    assert st["errors"] == 0 and st["requests"] == 100
    t = [0.0]
    p = Probation(HealthGates(probation_s=10, max_error_rate="0.01"),
                  ProbationConfig(window_s=10, early_fail_min_requests=50, golden_recheck=False), lambda: t[0])
    p.observe(st)
    t[0] = 11.0
    v = p.verdict()
    assert v is not None and v.passed, v
