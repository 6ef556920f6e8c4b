"""On a real Jetson (TensorRT + GPU): the tiny model built by the real builder agrees with ONNX Runtime,
and the budget comes from the real memory readings. Skipped elsewhere (see tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.selftest import tiny_model_path, tiny_reference_path

pytestmark = pytest.mark.jetson


def test_real_tensorrt_build_matches_numpy_reference(tmp_path):
    from edge_agent.engines.trt import TrtEngine
    from edge_agent.engines.trt_build import BuildRequest, run_build

    events = []
    outcome = run_build(
        BuildRequest(model="tiny", onnx_path=str(tiny_model_path()), plan_path=str(tmp_path / "t.plan"),
                     precision="fp32", min_batch=1, opt_batch=8, max_batch=8, workspace_bytes=256 << 20,
                     timing_cache_path=str(tmp_path / "timing.cache")),
        emit=lambda k, m, d: events.append(k), timeout_s=900)
    ref = dict(np.load(str(tiny_reference_path())))
    with TrtEngine(outcome.plan_path.read_bytes()) as eng:
        got = eng.infer({"image": ref["image"]})
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-3, atol=1e-3)
    assert events[-1] == "engine-build-done"


def test_real_platform_key_and_budget():
    from edge_agent.config import EngineConfig
    from edge_agent.engines.budget import budget_for_config
    from edge_agent.engines.platform import detect_platform

    plat = detect_platform()
    assert plat.key is not None and plat.key.startswith("trt")
    budget = budget_for_config(EngineConfig(), unified_memory=plat.unified_memory)
    assert budget.budget_bytes > 0
