"""The agent's real TensorRT/pycuda sequences against the double where it is as strict as the real libraries
(each behaviour's source is in tests/trt_double/README.md): 8.5.2's broken `nptype`, the one process-wide
logger, pycuda's `detach` from another thread, static-batch models, plans from another 4th version digit,
stale timing caches, invalid profile Dims, engine memory and selftest without pycuda."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import threading
import types

import numpy as np
import pytest

from edge_agent.engines.ort import OrtEngine
from edge_agent.engines.trt_plan import BuildRequest, build_plan
from edge_agent.errors import EngineError
from edge_agent.selftest import tiny_model_path

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _req(tmp_path, **kw):
    base = dict(model="small", onnx_path=str(tiny_model_path()), plan_path=str(tmp_path / "p.plan"),
                precision="fp32", min_batch=1, opt_batch=4, max_batch=8, workspace_bytes=64 << 20,
                timing_cache_path=str(tmp_path / "timing.cache"))
    base.update(kw)
    return BuildRequest(**base)


def _x(n, seed=0):
    return np.random.RandomState(seed).rand(n, 1, 8, 8).astype(np.float32)


def _version(monkeypatch, trt_double, version):
    monkeypatch.setenv("TRT_DOUBLE_VERSION", version)
    trt = importlib.reload(trt_double)
    assert trt.__version__ == version
    return trt


def _static_model(tmp_path, batch=2):
    """The tiny model with its batch axis fixed at `batch` (no dynamic dimension anywhere)."""
    m = onnx.load(str(tiny_model_path()))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    path = tmp_path / "static.onnx"
    onnx.save(m, str(path))
    return path


# ------------------------------------------------------------------------------------------------ nptype


def test_engine_loads_on_8_5_2_with_a_numpy_that_has_no_np_bool(trt_double, tmp_path, monkeypatch):
    trt = _version(monkeypatch, trt_double, "8.5.2.2")
    build_plan(_req(tmp_path))
    numpy_1_24 = types.SimpleNamespace(**{k: getattr(np, k) for k in ("float32", "float16", "int8", "int32",
                                                                       "uint8", "bool_", "int64")})
    monkeypatch.setattr(trt, "_numpy", lambda: numpy_1_24)  # numpy 1.24-1.26: np.bool is gone
    with pytest.raises(AttributeError):
        trt.nptype(trt.DataType.FLOAT)  # the double's 8.5.2 table, like the real one, names np.bool
    from edge_agent.engines.trt import TrtEngine

    with TrtEngine((tmp_path / "p.plan").read_bytes()) as eng, OrtEngine(tiny_model_path(), max_batch=8) as ref:
        np.testing.assert_allclose(eng.infer({"image": _x(3)})["logits"], ref.infer({"image": _x(3)})["logits"],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version, int64", [("8.5.3.1", False), ("8.6.2.3", False), ("10.3.0.30", True)])
def test_nptype_tables_per_release(trt_double, monkeypatch, version, int64):
    trt = _version(monkeypatch, trt_double, version)
    assert trt.nptype(trt.DataType.BOOL) is np.bool_
    if int64:
        assert trt.nptype(trt.DataType.INT64) is np.int64
    else:
        with pytest.raises(TypeError):
            trt.nptype(trt.DataType.INT64)


def test_unexpected_exception_while_loading_is_an_engine_error(trt_double, tmp_path, monkeypatch):
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    build_plan(_req(tmp_path))

    def boom(self, data):
        raise RuntimeError("libnvinfer exploded")

    monkeypatch.setattr(trt_double.Runtime, "deserialize_cuda_engine", boom)
    with pytest.raises(EngineError, match="RuntimeError: libnvinfer exploded") as info:
        TrtEngine((tmp_path / "p.plan").read_bytes())
    assert not isinstance(info.value, PlanRejectedError)
    import pycuda.driver as cuda

    assert cuda.double_state()["contexts"] == 0


# ------------------------------------------------------------------------------------------------ logger


def test_double_ignores_a_second_logger_while_a_runtime_lives(trt_double):
    class Collect(trt_double.ILogger):
        def __init__(self):
            trt_double.ILogger.__init__(self)
            self.seen = []

        def log(self, severity, msg):
            self.seen.append((int(severity), msg))

    first, second = Collect(), Collect()
    rt1 = trt_double.Runtime(first)
    rt2 = trt_double.Runtime(second)
    assert any("differs from one already provided" in m for _, m in first.seen)
    assert rt2.deserialize_cuda_engine(b"junk") is None
    assert second.seen == []  # ignored: its errors went to the first logger
    assert any("Magic tag does not match" in m for _, m in first.seen)
    del rt1, rt2
    third = Collect()
    rt3 = trt_double.Runtime(third)  # no Builder/Runtime alive any more: a new logger is taken
    assert trt_double.double_registered_logger() is third
    del rt3


def test_activation_loads_new_engines_while_old_ones_live(trt_double, tmp_path, caplog):
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    build_plan(_req(tmp_path))
    plan = (tmp_path / "p.plan").read_bytes()
    caplog.set_level(logging.WARNING, logger="edge_agent.engines.trt")
    old = TrtEngine(plan, name="old")
    with pytest.raises(PlanRejectedError) as bad:
        TrtEngine(b"\0" * 64, name="candidate-bad")
    assert "Magic tag" in str(bad.value)
    new = TrtEngine(plan, name="candidate")  # the old engine still serves meanwhile
    try:
        assert trt_double.double_registered_logger() is old._logger is new._logger
        assert not [r for r in caplog.records if "differs from one already provided" in r.getMessage()]
        assert old.infer({"image": _x(2)})["logits"].shape == (2, 10)
        assert new.infer({"image": _x(3)})["logits"].shape == (3, 10)
        assert new._logger.errors == []  # the earlier failure's errors were cleared for this call
    finally:
        old.close()
        new.close()


def test_errors_are_collected_per_thread(trt_double):
    from edge_agent.engines.trt import shared_logger

    logger = shared_logger(trt_double)
    logger.begin()
    seen = {}

    def other():
        logger.begin()
        logger.log(trt_double.ILogger.ERROR, "from the other thread")
        seen["other"] = logger.errors

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["other"] == ["from the other thread"]
    assert logger.errors == []


# ----------------------------------------------------------------------------------- pycuda contexts


def test_pycuda_double_leaks_a_context_detached_from_another_thread(trt_double):
    import pycuda.driver as cuda

    cuda.init()
    ctx = cuda.Device(0).make_context()
    ctx.pop()
    t = threading.Thread(target=ctx.detach)  # not current there, not the creating thread
    t.start()
    t.join()
    state = cuda.double_state()
    assert state["leaked_contexts"] == 1 and state["contexts"] == 0
    with pytest.raises(cuda.LogicError):
        ctx.detach()  # invalid now


def test_pycuda_double_destroys_a_context_pushed_then_detached_in_another_thread(trt_double):
    import pycuda.driver as cuda

    cuda.init()
    ctx = cuda.Device(0).make_context()
    ctx.pop()
    depth = {}

    def close():
        ctx.push()
        ctx.detach()  # current here: destroyed, and popped from this thread's stack
        depth["after"] = cuda.double_state()["stack_depth"]

    t = threading.Thread(target=close)
    t.start()
    t.join()
    assert ctx.destroyed and depth["after"] == 0
    assert cuda.double_state()["leaked_contexts"] == 0


def test_infer_from_a_worker_and_close_from_another_thread_leaks_nothing(trt_double, tmp_path):
    import pycuda.driver as cuda

    from edge_agent.engines.trt import TrtEngine

    build_plan(_req(tmp_path))
    eng = TrtEngine((tmp_path / "p.plan").read_bytes())  # created (and its context made) in this thread
    out = {}
    worker = threading.Thread(target=lambda: out.update(eng.infer({"image": _x(4)})))
    worker.start()
    worker.join()
    assert out["logits"].shape == (4, 10)
    closer = threading.Thread(target=eng.close)
    closer.start()
    closer.join()
    state = cuda.double_state()
    assert state == dict(state, contexts=0, leaked_contexts=0, allocations=0, stack_depth=0)
    assert state["pageable_async_copies"] == 0  # every async copy came from pinned memory, so it can overlap
    with TrtEngine((tmp_path / "p.plan").read_bytes()) as again:  # a fresh context afterwards
        assert again.infer({"image": _x(1)})["logits"].shape == (1, 10)
    assert cuda.double_state()["contexts"] == 0


# ------------------------------------------------------------------------------------ static batch


def test_static_batch_model_builds_without_a_profile_and_runs(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    onnx_path = _static_model(tmp_path, batch=2)
    outcome = build_plan(_req(tmp_path, onnx_path=str(onnx_path), memory_probe_batch=4))
    assert outcome.device_memory == {}  # no profile, nothing to vary
    with TrtEngine(outcome.plan_path.read_bytes()) as eng, OrtEngine(tiny_model_path(), max_batch=8) as ref:
        assert eng.max_batch == 2 and eng.inputs[0].shape == (2, 1, 8, 8)
        np.testing.assert_allclose(eng.infer({"image": _x(2)})["logits"], ref.infer({"image": _x(2)})["logits"],
                                   rtol=1e-6, atol=1e-6)


def test_double_refuses_an_empty_profile_and_a_dynamic_input_without_one(trt_double, tmp_path):
    from edge_agent.engines.trt import shared_logger

    logger = shared_logger(trt_double)
    builder = trt_double.Builder(logger)

    def network(path):
        net = builder.create_network(1 << int(trt_double.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        assert trt_double.OnnxParser(net, logger).parse_from_file(str(path))
        return net

    logger.begin()
    config = builder.create_builder_config()
    assert config.add_optimization_profile(builder.create_optimization_profile()) == 0  # isValid: nothing set
    assert builder.build_serialized_network(network(_static_model(tmp_path)), config) is None
    assert "sets no input shapes" in logger.errors[-1]
    logger.begin()
    assert builder.build_serialized_network(network(tiny_model_path()), builder.create_builder_config()) is None
    assert "no optimization profile has been defined" in logger.errors[-1]


# ------------------------------------------------------------------------------ versions and caches


def test_plan_from_another_fourth_version_digit_is_rejected(trt_double, tmp_path, monkeypatch):
    _version(monkeypatch, trt_double, "8.6.1.6")
    build_plan(_req(tmp_path))
    _version(monkeypatch, trt_double, "8.6.1.2")
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    with pytest.raises(PlanRejectedError, match=r"expecting library version 8\.6\.1\.2 got 8\.6\.1\.6"):
        TrtEngine((tmp_path / "p.plan").read_bytes())


def test_timing_cache_from_another_device_is_discarded_and_rebuilt_cold(trt_double, tmp_path, monkeypatch, caplog):
    build_plan(_req(tmp_path))
    cache = tmp_path / "timing.cache"
    assert b'"sm": "72"' in cache.read_bytes()
    monkeypatch.setenv("TRT_DOUBLE_SM", "87")
    caplog.set_level(logging.WARNING, logger="edge_agent.engines.trt_plan")
    outcome = build_plan(_req(tmp_path, plan_path=str(tmp_path / "orin.plan")))
    assert "stale timing cache discarded: built cold" in outcome.notes
    assert any("does not match" in r.getMessage() for r in caplog.records)
    assert b'"sm": "87"' in cache.read_bytes()  # replaced by this device's cache
    assert "stale" not in " ".join(build_plan(_req(tmp_path, plan_path=str(tmp_path / "again.plan"))).notes)


def test_profile_shape_of_a_bad_name_is_an_invalid_dims_not_an_exception(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine, dims_tuple

    build_plan(_req(tmp_path))
    with TrtEngine((tmp_path / "p.plan").read_bytes()) as eng:
        shapes = eng._engine.get_tensor_profile_shape("no-such-tensor", 0)
        assert len(shapes) == 3
        with pytest.raises(ValueError):
            len(shapes[2])
        assert dims_tuple(shapes[2]) is None
        assert dims_tuple(eng._engine.get_tensor_profile_shape("image", 0)[2]) == (8, 1, 8, 8)


# ----------------------------------------------------------------------------------------------- memory


def test_builder_measures_device_memory_at_two_profile_sizes(trt_double, tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_DOUBLE_SCRATCH_BYTES", str(1 << 20))
    outcome = build_plan(_req(tmp_path, max_batch=8, memory_probe_batch=4))
    m8, m4 = outcome.device_memory[8], outcome.device_memory[4]
    assert m8 > m4 > 0
    assert m8 < 2 * m4  # affine, not proportional: scratch does not shrink with the batch
    from edge_agent.engines.prepare_trt import _trt_memory_model

    class Eng:
        max_batch, device_memory_bytes, io_buffer_bytes, plan_bytes = 8, m8, 8 * 1000, 5000

    unified = _trt_memory_model(Eng, outcome.device_memory, unified=True)
    discrete = _trt_memory_model(Eng, outcome.device_memory, unified=False)
    assert unified.bytes_at(8) == pytest.approx(5000 + m8 + 2 * 8000, abs=8)
    assert unified.bytes_at(4) == pytest.approx(5000 + m4 + 2 * 4000, abs=8)
    assert discrete.bytes_at(8) == pytest.approx(5000 + m8 + 8000, abs=8)
    one_point = _trt_memory_model(Eng, {}, unified=True)
    assert one_point.bytes_at(4) >= unified.bytes_at(4)  # one measurement: never an under-estimate


def test_estimate_covers_what_two_live_engines_take_in_the_double(trt_double, tmp_path, monkeypatch):
    import pycuda.driver as cuda
    from test_engines_prepare import _budget, _build_bundle, _platform

    from edge_agent.config import EngineConfig
    from edge_agent.engines.prepare import prepare_engines

    monkeypatch.setenv("TRT_DOUBLE_SCRATCH_BYTES", str(1 << 20))
    monkeypatch.setenv("TRT_DOUBLE_CONTEXT_BYTES", str(32 << 20))
    bundle_dir, manifest = _build_bundle(tmp_path)
    cfg = EngineConfig(backend="tensorrt", tune_iterations=3, max_batch_limit=16, latency_slo_ms=1000.0,
                       precision="fp32", trt_overhead_mb=32)
    cuda.init()
    before = cuda.double_state()["used_bytes"]
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=cfg, cache_dir=tmp_path / "c",
                             emit=lambda *a: None, platform=_platform(trt_double.__version__, (7, 2)),
                             budget=_budget(4096))
    try:
        measured = cuda.double_state()["used_bytes"] - before
        estimate = sum(models.memory_bytes.values()) + cfg.trt_overhead_mb * (1 << 20)
        assert measured <= estimate <= 1.5 * measured, (measured, estimate)
    finally:
        models.close()


# --------------------------------------------------------------------------------------------- selftest


def _selftest(capsys, *argv):
    from edge_agent.cli import main

    rc = main(["selftest", *argv])
    out = capsys.readouterr()
    return rc, json.loads(out.out) if "--json" in argv else out.out


def test_selftest_without_pycuda_says_so(trt_double, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    rc, report = _selftest(capsys, "--json")
    checks = {c["name"]: c for c in report["checks"]}
    assert rc == 0  # auto: serves with ONNX Runtime
    assert checks["tensorrt"]["status"] == "skip"
    assert "pycuda is not installed" in checks["tensorrt"]["detail"]
    assert report["environment"]["pycuda"] is None
    rc, _ = _selftest(capsys, "--require-tensorrt", "--json")
    assert rc == 1


def test_selftest_json_reports_the_driver_cuda_version_and_what_a_bug_report_needs(trt_double, capsys, monkeypatch):
    monkeypatch.setenv("TRT_DOUBLE_CUDA_DRIVER", "12020")  # driver newer than the CUDA pycuda was built with
    rc, report = _selftest(capsys, "--json")
    env = report["environment"]
    assert rc == 0
    assert env["cuda"] == "12.2" and env["cuda_compiled"] == "11.4"
    assert env["trt"] == "8.5.2.2" and env["sm"] == "72" and env["platform_key"] == "trt8.5.2.2-sm72"
    assert env["pycuda"] == "2022.2.2"
    for key in ("numpy", "pycuda", "python", "l4t", "jetson_model", "gpu", "gpu_memory_mb", "ram_total_mb"):
        assert key in env


def test_selftest_turns_a_library_crash_into_a_failed_check(trt_double, capsys, monkeypatch):
    from edge_agent.engines import trt as trt_mod

    def crash(*a, **kw):
        raise AttributeError("module 'numpy' has no attribute 'bool'")

    monkeypatch.setattr(trt_mod, "numpy_dtype", crash)
    rc, report = _selftest(capsys, "--json")
    checks = {c["name"]: c for c in report["checks"]}
    assert rc == 1
    assert checks["tensorrt inference"]["status"] == "FAIL"
    assert "no attribute 'bool'" in checks["tensorrt inference"]["detail"]


def test_activation_prepares_a_candidate_while_the_serving_models_live_then_closes_them_elsewhere(
    trt_double, tmp_path, caplog
):
    """The agent's activation: prepare the candidate's engines while the serving ones run, serve from a worker
    thread meanwhile, then close the old ones from another thread. One logger, no leaked context."""
    import pycuda.driver as cuda
    from test_engines_prepare import TRT_CFG, _budget, _build_bundle, _platform

    from edge_agent.engines.prepare import prepare_engines

    bundle_dir, manifest = _build_bundle(tmp_path)
    plat = _platform(trt_double.__version__, (7, 2))
    caplog.set_level(logging.WARNING)

    def prepare(cache):
        return prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / cache,
                               emit=lambda *a: None, platform=plat, budget=_budget(4096))

    serving = prepare("serving")
    x = {s.name: np.zeros(s.with_batch(2), dtype=s.dtype) for s in serving.small.inputs}
    stop = threading.Event()
    served, failures = [0], []

    def serve():
        while not stop.is_set():
            try:
                serving.small.infer(x)
                served[0] += 1
            except Exception as e:  # collected and asserted below
                failures.append(e)
                return

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        candidate = prepare("candidate")  # built and loaded while the serving engines run
    finally:
        stop.set()
        worker.join()
    assert not failures and served[0] > 0
    closer = threading.Thread(target=serving.close)
    closer.start()
    closer.join()
    try:
        assert candidate.large.infer({s.name: np.zeros(s.with_batch(1), dtype=s.dtype)
                                      for s in candidate.large.inputs})
        assert not [r for r in caplog.records if "differs from one already provided" in r.getMessage()]
    finally:
        closer = threading.Thread(target=candidate.close)  # the last engine, closed off the creating thread
        closer.start()
        closer.join()
    state = cuda.double_state()
    assert (state["contexts"], state["leaked_contexts"], state["allocations"]) == (0, 0, 0)
