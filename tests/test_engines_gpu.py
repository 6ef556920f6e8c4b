"""The real TensorRT path on any Linux host with an NVIDIA GPU, CUDA, TensorRT and pycuda — a desktop GPU
or a Jetson. Skipped elsewhere (tests/conftest.py). Run them with the one command in docs/engines.md:

    python -m pytest -m "gpu or jetson" -s -p no:cacheprovider tests/test_engines_gpu.py

Covered: build in a child process, load, infer against the numpy reference, prepare + tune + golden on the
sample bundle (two engines alive), inference from a worker thread and close from another one without
leaking the CUDA context, and the memory the engines really take against the budget's estimate.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.selftest import tiny_model_path, tiny_reference_path

pytestmark = pytest.mark.gpu

_MB = 1 << 20


def _build(tmp_path, max_batch=8):
    from edge_agent.engines.trt_build import run_build
    from edge_agent.engines.trt_plan import BuildRequest

    events = []
    outcome = run_build(
        BuildRequest(model="tiny", onnx_path=str(tiny_model_path()), plan_path=str(tmp_path / "t.plan"),
                     precision="fp32", min_batch=1, opt_batch=max_batch, max_batch=max_batch,
                     workspace_bytes=256 * _MB, timing_cache_path=str(tmp_path / "timing.cache"),
                     memory_probe_batch=max(1, max_batch // 2)),
        emit=lambda k, m, d: events.append(k), timeout_s=900)
    assert events[-1] == "engine-build-done"
    return outcome


def _free_device_bytes() -> int:
    """Free memory as this device counts it: MemAvailable on unified memory, cuMemGetInfo on a discrete GPU
    (measured with a context that is destroyed again before returning)."""
    from edge_agent.engines import _cuda
    from edge_agent.engines.platform import detect_platform
    from edge_agent.sysinfo.meminfo import available_bytes, read_meminfo_bytes

    if detect_platform(probe_gpu=True).unified_memory:
        return int(available_bytes(read_meminfo_bytes()) or 0)
    return _cuda.mem_get_info()[0]


def test_real_build_load_infer_matches_numpy_reference(tmp_path):
    from edge_agent.engines.trt import TrtEngine

    outcome = _build(tmp_path)
    assert set(outcome.device_memory) == {8, 4} and outcome.device_memory[8] >= outcome.device_memory[4] > 0
    ref = dict(np.load(str(tiny_reference_path())))
    with TrtEngine(outcome.plan_path.read_bytes()) as eng:
        got = eng.infer({"image": ref["image"]})
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-3, atol=1e-3)


def test_real_platform_key_and_budget():
    from edge_agent.config import EngineConfig
    from edge_agent.engines.budget import budget_for_config
    from edge_agent.engines.platform import detect_platform

    plat = detect_platform()
    assert plat.key is not None and plat.key.startswith("trt" + plat.trt_version)
    assert plat.cuda_version is not None  # the driver's CUDA version
    budget = budget_for_config(EngineConfig(), unified_memory=plat.unified_memory)
    assert budget.budget_bytes > 0


def test_worker_thread_infers_and_another_thread_closes_without_leaking_the_context(tmp_path):
    from edge_agent.engines.trt import TrtEngine

    outcome = _build(tmp_path)
    plan = outcome.plan_path.read_bytes()
    x = dict(np.load(str(tiny_reference_path())))["image"]
    free_before = _free_device_bytes()
    for _ in range(3):  # a leaked context per round would add up to hundreds of MB
        eng = TrtEngine(plan)
        out = {}
        worker = threading.Thread(target=lambda e=eng, o=out: o.update(e.infer({"image": x})))
        worker.start()
        worker.join()
        assert out["logits"].shape[0] == len(x)
        closer = threading.Thread(target=eng.close)
        closer.start()
        closer.join()
    free_after = _free_device_bytes()
    print("free before %.0f MB, after 3 create/close rounds %.0f MB" % (free_before / _MB, free_after / _MB))
    assert free_after >= free_before - 128 * _MB


def test_prepare_tune_golden_and_memory_estimate_on_the_sample_bundle(tmp_path):
    """Two engines alive (small + large), tuned, golden-checked; what they take against the estimate."""
    from test_engines_prepare import SPEC, _build_bundle

    from edge_agent.config import EngineConfig
    from edge_agent.engines.golden import run_golden
    from edge_agent.engines.prepare import prepare_engines

    assert SPEC.exists(), "sample bundle spec %s missing (moved?)" % SPEC
    bundle_dir, manifest = _build_bundle(tmp_path)
    cfg = EngineConfig(backend="tensorrt", precision="fp16", max_batch_limit=16, tune_iterations=5,
                       latency_slo_ms=1000.0)
    free_before = _free_device_bytes()
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=cfg, cache_dir=tmp_path / "cache",
                             emit=lambda *a: None)
    try:
        assert models.backend == "tensorrt"
        report = run_golden(models, bundle_dir, manifest)
        assert report.passed, report.message
        assert set(models.batch) == {"small", "large"}
        taken = free_before - _free_device_bytes()
        estimate = sum(models.memory_bytes.values()) + cfg.trt_overhead_mb * _MB
        print("engines + process overhead: measured %.1f MB, estimated %.1f MB (overhead %d MB, max batch %d)"
              % (taken / _MB, estimate / _MB, cfg.trt_overhead_mb, models.max_batch))
        assert taken <= estimate * 1.2, "the budget's estimate is too low: raise engine.trt_overhead_mb"
    finally:
        models.close()
