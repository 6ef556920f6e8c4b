"""prepare_engines + run_golden on the real sample bundle: ONNX Runtime for real, TensorRT through the double."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from edge_agent.config import EngineConfig
from edge_agent.engines.budget import MIB, MemoryBudget
from edge_agent.engines.golden import run_golden
from edge_agent.engines.platform import PlatformInfo
from edge_agent.engines.prepare import choose_backend, prepare_engines
from edge_agent.engines.prepared import choose_precision
from edge_agent.errors import EngineError, IntegrityError, ResourceError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SPEC = Path(__file__).resolve().parents[1] / "samples" / "digits" / "bundle.toml"


def _budget(mb: float) -> MemoryBudget:
    b = int(mb * MIB)
    return MemoryBudget(source="test", total_bytes=b * 2, available_bytes=b, fraction=1.0, reserve_bytes=0,
                        budget_bytes=b)


def _platform(trt: Optional[str] = None, sm=None) -> PlatformInfo:
    return PlatformInfo(python="3", machine="aarch64", jetson_model="NVIDIA Jetson Xavier NX Developer Kit",
                        l4t_release="35.4.1", trt_version=trt, trt_error=None if trt else "tensorrt does not import",
                        cuda_version="11.4" if sm else None, gpu_name="Double GPU sm72" if sm else None,
                        compute_capability=sm)


def _build_bundle(tmp: Path, engines=None):
    from edge_agent.bundle.archive import unpack_bundle
    from edge_agent.signing import PrivateKey
    from fleet.bundle_builder import build_bundle

    out = tmp / "digits.bundle"
    manifest = build_bundle(SPEC, PrivateKey.generate("test"), out, engines=engines)
    dest = tmp / "unpacked"
    unpack_bundle(out, dest, manifest, max_bundle_bytes=1 << 30)
    return dest, manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    assert SPEC.exists(), "sample bundle spec %s missing (moved?)" % SPEC
    return _build_bundle(tmp_path_factory.mktemp("bundle"))


class Events(list):
    def __call__(self, kind, message, data):
        self.append((kind, message, dict(data)))

    def kinds(self):
        return [k for k, _, _ in self]


CFG = EngineConfig(backend="onnxruntime", tune_iterations=5, max_batch_limit=32, latency_slo_ms=1000.0)


def test_onnxruntime_prepare_tune_and_golden_pass(bundle, tmp_path):
    bundle_dir, manifest = bundle
    events = Events()
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=CFG, cache_dir=tmp_path / "cache",
                             emit=events, platform=_platform(), budget=_budget(512))
    try:
        assert models.backend == "onnxruntime" and models.precision == "fp32"
        assert models.max_batch == 32  # tiny models: the limit, not the budget, binds
        assert 1 <= models.batch["small"] <= 32 and 1 <= models.batch["large"] <= 32
        assert events.kinds().count("engine-loaded") == 2 and events.kinds().count("batch-tuned") == 2
        d = models.describe()
        assert all(v is None or isinstance(v, (str, int, float)) for v in d.values())
        assert d["backend"] == "onnxruntime" and d["batch_large"] == models.batch["large"]
        report = run_golden(models, bundle_dir, manifest)
        assert report.passed, report.message
        assert report.details["large"]["top1_agreement"] == 1.0
        assert report.details["small"]["outputs"]["logits"]["max_abs_diff"] < 1e-4
    finally:
        models.close()


def test_tuning_is_persisted_and_reused_until_budget_moves(bundle, tmp_path):
    bundle_dir, manifest = bundle
    kw = dict(bundle_dir=bundle_dir, manifest=manifest, cfg=CFG, cache_dir=tmp_path / "cache", platform=_platform())
    first = Events()
    prepare_engines(emit=first, budget=_budget(512), **kw).close()
    assert first.kinds().count("batch-tuned") == 2
    again = Events()
    prepare_engines(emit=again, budget=_budget(560), **kw).close()  # +9%: under the 25% retune threshold
    assert again.kinds().count("batch-tuned") == 0
    moved = Events()
    prepare_engines(emit=moved, budget=_budget(1024), **kw).close()  # doubled: re-measured
    assert moved.kinds().count("batch-tuned") == 2
    forced = Events()
    prepare_engines(emit=forced, budget=_budget(1024), retune=True, **kw).close()
    assert forced.kinds().count("batch-tuned") == 2


def test_budget_too_small_for_both_models_is_a_resource_error(bundle, tmp_path):
    bundle_dir, manifest = bundle
    with pytest.raises(ResourceError, match="at batch 1"):
        prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=CFG, cache_dir=tmp_path / "c",
                        emit=Events(), platform=_platform(), budget=_budget(0.05))


def test_golden_failure_reports_measured_disagreement(bundle, tmp_path):
    bundle_dir, manifest = bundle
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=CFG, cache_dir=tmp_path / "c",
                             emit=Events(), platform=_platform(), budget=_budget(512))
    try:
        # a model that disagrees with the reference: scale the large model's outputs
        real = models.large._infer_impl
        models.large._infer_impl = lambda feed: {k: v[:, ::-1].copy() for k, v in real(feed).items()}
        report = run_golden(models, bundle_dir, manifest)
    finally:
        models.close()
    assert not report.passed
    assert "large model" in report.message and "top-1 agreement" in report.message
    assert report.details["large"]["top1_agreement"] < 0.5
    assert report.details["small"]["passed"]


def test_backend_choice_says_why():
    assert choose_backend("auto", _platform()) == ("onnxruntime", "auto: tensorrt does not import")
    assert choose_backend("auto", _platform("8.5.2.2", (7, 2)))[0] == "tensorrt"
    assert "no CUDA GPU" in choose_backend("auto", _platform("8.5.2.2", None))[1]
    with pytest.raises(EngineError, match="backend tensorrt is configured but tensorrt does not import"):
        choose_backend("tensorrt", _platform())


def test_precision_falls_back_to_what_the_manifest_allows(bundle):
    _, manifest = bundle
    spec = manifest.models["large"]  # precisions fp32, fp16; no calibration cache
    assert choose_precision("int8", spec) == "fp16"
    assert choose_precision("fp16", spec) == "fp16"
    assert choose_precision("fp32", spec) == "fp32"


# ------------------------------------------------------------------------------ TensorRT via the double

TRT_CFG = EngineConfig(backend="tensorrt", tune_iterations=3, max_batch_limit=16, latency_slo_ms=1000.0,
                       precision="fp16", trt_overhead_mb=0)


def test_tensorrt_build_cache_reload_and_golden(trt_double, bundle, tmp_path):
    bundle_dir, manifest = bundle
    plat = _platform(trt_double.__version__, (7, 2))
    kw = dict(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "cache", platform=plat,
              budget=_budget(1024))
    events = Events()
    models = prepare_engines(emit=events, **kw)
    try:
        assert models.backend == "tensorrt"
        assert models.sources == {"small": "built", "large": "built"}
        assert models.precisions == {"small": "fp16", "large": "fp16"}
        assert events.kinds().count("engine-build-done") == 2
        report = run_golden(models, bundle_dir, manifest)
        assert report.passed, report.message
        assert 0 < report.details["large"]["outputs"]["logits"]["max_abs_diff"] < 1e-2  # FP16 shows
    finally:
        models.close()
    metas = sorted((tmp_path / "cache" / "engines").glob("*.json"))
    assert len(metas) == 2
    import json

    meta = json.loads(metas[0].read_text())
    for field_name in ("trt_version", "compute_capability", "l4t", "device", "precision", "profile", "onnx_sha256"):
        assert meta[field_name] is not None, field_name
    assert (tmp_path / "cache" / "timing" / ("%s.cache" % plat.key)).exists()

    again = Events()
    models = prepare_engines(emit=again, **kw)
    models.close()
    assert models.sources == {"small": "cache", "large": "cache"}
    assert "engine-build-started" not in again.kinds()


def test_cache_entry_for_other_trt_version_is_rebuilt(trt_double, bundle, tmp_path, monkeypatch):
    bundle_dir, manifest = bundle
    kw = dict(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "cache", budget=_budget(1024))
    prepare_engines(emit=Events(), platform=_platform(trt_double.__version__, (7, 2)), **kw).close()
    # TensorRT upgraded: the platform key changes, the old entries do not match
    trt_double.__version__ = "8.5.3.1"
    monkeypatch.setenv("TRT_DOUBLE_VERSION", "8.5.3.1")  # the builder child imports the upgraded one too
    events = Events()
    models = prepare_engines(emit=events, platform=_platform("8.5.3.1", (7, 2)), **kw)
    models.close()
    assert models.sources == {"small": "built", "large": "built"}


def test_cached_plan_that_fails_to_deserialize_is_rebuilt(trt_double, bundle, tmp_path):
    bundle_dir, manifest = bundle
    kw = dict(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "cache",
              budget=_budget(1024), platform=_platform(trt_double.__version__, (7, 2)))
    prepare_engines(emit=Events(), **kw).close()
    # same metadata, but TensorRT now refuses the plan (e.g. a patch release with the same version string)
    real_version = trt_double.__version__
    for meta in (tmp_path / "cache" / "engines").glob("*.json"):
        plan = meta.with_suffix(".plan")
        data = plan.read_bytes().replace(real_version.encode(), b"0.0.0.0", 1)
        plan.write_bytes(data)
        import hashlib
        import json

        m = json.loads(meta.read_text())
        m["plan_sha256"] = hashlib.sha256(data).hexdigest()
        meta.write_text(json.dumps(m))
    events = Events()
    models = prepare_engines(emit=events, **kw)
    try:
        assert models.sources == {"small": "built", "large": "built"}
        assert models.large.infer({"image": np.zeros((2, 1, 8, 8), np.float32)})["logits"].shape == (2, 10)
    finally:
        models.close()


def test_tampered_cache_plan_is_a_miss(trt_double, bundle, tmp_path):
    bundle_dir, manifest = bundle
    kw = dict(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "cache",
              budget=_budget(1024), platform=_platform(trt_double.__version__, (7, 2)))
    prepare_engines(emit=Events(), **kw).close()
    for plan in (tmp_path / "cache" / "engines").glob("*.plan"):
        plan.write_bytes(plan.read_bytes() + b"x")
    models = prepare_engines(emit=Events(), **kw)
    models.close()
    assert models.sources == {"small": "built", "large": "built"}


def test_profile_too_big_for_budget_is_rebuilt_smaller(trt_double, bundle, tmp_path, monkeypatch):
    bundle_dir, manifest = bundle
    monkeypatch.setenv("TRT_DOUBLE_SCRATCH_BYTES", str(64 << 10))  # batch-dependent memory dominates
    cfg = TRT_CFG.model_copy(update={"max_batch_limit": 64, "precision": "fp32"})
    plat = _platform(trt_double.__version__, (7, 2))
    # measure what batch 64 needs, then give a budget that fits about a third of that
    probe = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=cfg, cache_dir=tmp_path / "probe",
                            emit=Events(), platform=plat, budget=_budget(4096))
    need64 = probe.memory_bytes["small"] + probe.memory_bytes["large"]
    probe.close()
    assert probe.max_batch == 64
    events = Events()
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=cfg, cache_dir=tmp_path / "c",
                             emit=events, platform=plat, budget=_budget(need64 / 3 / MIB))
    try:
        assert 1 <= models.max_batch < 64
        assert sum(models.memory_bytes.values()) <= need64 / 3
        assert models.small.max_batch == models.large.max_batch == models.max_batch
        assert events.kinds().count("engine-build-done") == 4  # built at 64, then rebuilt smaller
    finally:
        models.close()


def test_prebuilt_engine_for_our_platform_is_verified_and_loaded(trt_double, tmp_path):
    from edge_agent.engines.trt_plan import BuildRequest, build_plan

    samples = SPEC.parent
    plans = {}
    for name in ("small", "large"):
        plans[name] = tmp_path / ("%s.plan" % name)
        build_plan(BuildRequest(model=name, onnx_path=str(samples / ("%s.onnx" % name)), plan_path=str(plans[name]),
                                precision="fp16", min_batch=1, opt_batch=4, max_batch=8, workspace_bytes=64 << 20))
    plat = _platform(trt_double.__version__, (7, 2))
    bundle_dir, manifest = _build_bundle(tmp_path, engines=[(plat.key, n, plans[n]) for n in ("small", "large")])
    events = Events()
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "c",
                             emit=events, platform=plat, budget=_budget(1024))
    try:
        assert models.sources == {"small": "prebuilt", "large": "prebuilt"}
        assert models.max_batch == 8
        assert "engine-build-started" not in events.kinds()
        assert run_golden(models, bundle_dir, manifest).passed
    finally:
        models.close()
    # a prebuilt plan whose bytes differ from the manifest's pin is the bundle's fault
    rel = manifest.models["small"].engines[plat.key]
    (bundle_dir / rel).write_bytes((bundle_dir / rel).read_bytes() + b"!")
    with pytest.raises(IntegrityError, match="prebuilt engine"):
        prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "c",
                        emit=Events(), platform=plat, budget=_budget(1024))


def test_retune_runs_on_command_or_when_budget_moves(bundle, tmp_path):
    from edge_agent.engines.prepare import retune_if_needed

    bundle_dir, manifest = bundle
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=CFG, cache_dir=tmp_path / "c",
                             emit=Events(), platform=_platform(), budget=_budget(512))
    try:
        events = Events()
        assert not retune_if_needed(models, cfg=CFG, cache_dir=tmp_path / "c", emit=events, budget=_budget(600))
        assert events == []
        assert retune_if_needed(models, cfg=CFG, cache_dir=tmp_path / "c", emit=events, budget=_budget(200))
        assert events.kinds() == ["batch-tuned", "batch-tuned"] and models.budget_bytes == 200 * MIB
        assert retune_if_needed(models, cfg=CFG, cache_dir=tmp_path / "c", emit=events, force=True,
                                budget=_budget(200))
        assert len(events) == 4
    finally:
        models.close()


def test_builder_killed_during_prepare_fails_cleanly_and_serving_models_stay_up(
    trt_double, bundle, tmp_path, monkeypatch
):
    import os
    import signal

    from edge_agent.errors import BuildError

    bundle_dir, manifest = bundle
    plat = _platform(trt_double.__version__, (7, 2))
    serving = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "old",
                              emit=Events(), platform=plat, budget=_budget(1024))
    monkeypatch.setenv("TRT_DOUBLE_BUILD_SECONDS", "30")
    killed = []

    class KillOnBuild(Events):
        def __call__(self, kind, message, data):
            super().__call__(kind, message, data)
            if kind == "engine-build-started":
                killed.append(data["pid"])
            if kind == "engine-build-progress" and data.get("stage") == "building" and killed:
                os.kill(killed[0], signal.SIGKILL)

    events = KillOnBuild()
    try:
        with pytest.raises(BuildError, match="SIGKILL"):
            prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "new",
                            emit=events, platform=plat, budget=_budget(1024))
        assert events.kinds()[-1] == "engine-build-failed"
        assert "SIGKILL" in events[-1][2]["error"]
        assert not list((tmp_path / "new" / "engines").glob("*.plan"))
        x = np.zeros((3, 1, 8, 8), np.float32)
        assert serving.small.infer({"image": x})["logits"].shape == (3, 10)
        assert serving.large.infer({"image": x})["logits"].shape == (3, 10)
    finally:
        serving.close()
    import pycuda.driver as cuda

    assert cuda.double_state()["allocations"] == 0 and cuda.double_state()["contexts"] == 0


def test_discrete_gpu_budget_comes_from_device_memory(trt_double, monkeypatch):
    from edge_agent.engines.prepare import current_budget

    monkeypatch.setenv("TRT_DOUBLE_MEM_TOTAL", str(4 << 30))
    monkeypatch.setenv("TRT_DOUBLE_CONTEXT_BYTES", str(64 << 20))  # the CUDA context itself takes device memory
    dgpu = PlatformInfo(python="3", machine="x86_64", jetson_model=None, l4t_release=None, trt_version="8.6.1.6",
                        trt_error=None, cuda_version="12.2", gpu_name="Double GPU sm72", compute_capability=(7, 2))
    cfg = EngineConfig(memory_fraction=0.5, memory_reserve_mb=0)
    b = current_budget(cfg, dgpu, "tensorrt")
    assert (b.source, b.total_bytes, b.budget_bytes) == ("cuda", 4 << 30, ((4 << 30) - (64 << 20)) // 2)
    # a Jetson's integrated GPU shares system memory: /proc/meminfo, never cudaMemGetInfo
    assert current_budget(cfg, _platform("8.5.2.2", (7, 2)), "tensorrt").source == "meminfo"
