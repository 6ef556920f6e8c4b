"""The TensorRT backend and builder, run against the TensorRT/pycuda double (ONNX Runtime underneath)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from edge_agent.engines.ort import OrtEngine
from edge_agent.engines.trt_build import run_build
from edge_agent.engines.trt_plan import BuildRequest, build_plan
from edge_agent.errors import BuildError, InputError
from edge_agent.selftest import tiny_model_path

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _req(tmp_path, **kw):
    base = dict(model="small", onnx_path=str(tiny_model_path()), plan_path=str(tmp_path / "p.plan"),
                precision="fp32", min_batch=1, opt_batch=4, max_batch=8, workspace_bytes=64 << 20,
                timing_cache_path=str(tmp_path / "timing.cache"))
    base.update(kw)
    return BuildRequest(**base)


class Events:
    def __init__(self):
        self.items = []
        self.lock = threading.Lock()

    def __call__(self, kind, message, data):
        with self.lock:
            self.items.append((kind, message, dict(data)))

    def kinds(self):
        with self.lock:
            return [k for k, _, _ in self.items]


def _x(n, seed=0):
    return np.random.RandomState(seed).rand(n, 1, 8, 8).astype(np.float32)


def test_child_build_then_load_matches_onnxruntime(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    events = Events()
    outcome = run_build(_req(tmp_path), emit=events, timeout_s=60)
    assert outcome.plan_path.exists() and outcome.precision == "fp32"
    assert events.kinds()[0] == "engine-build-started" and events.kinds()[-1] == "engine-build-done"
    assert "engine-build-progress" in events.kinds()
    assert (tmp_path / "timing.cache").stat().st_size > 0  # timing cache persisted
    eng = TrtEngine(outcome.plan_path.read_bytes(), name="small")
    ref = OrtEngine(tiny_model_path(), max_batch=8)
    try:
        assert eng.max_batch == 8
        assert [(s.name, s.dtype, s.shape) for s in eng.inputs] == [("image", "float32", (-1, 1, 8, 8))]
        for n in (1, 3, 8):
            got, want = eng.infer({"image": _x(n, n)}), ref.infer({"image": _x(n, n)})
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
    finally:
        eng.close()
        ref.close()
    import pycuda.driver as cuda

    state = cuda.double_state()
    assert state["allocations"] == 0 and state["contexts"] == 0 and state["stack_depth"] == 0


def test_fp16_engine_differs_a_little_from_fp32(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    outcome = run_build(_req(tmp_path, precision="fp16"), emit=Events(), timeout_s=60)
    assert outcome.precision == "fp16"
    with TrtEngine(outcome.plan_path.read_bytes()) as eng, OrtEngine(tiny_model_path(), max_batch=8) as ref:
        got, want = eng.infer({"image": _x(8)})["logits"], ref.infer({"image": _x(8)})["logits"]
    diff = np.abs(got - want).max()
    assert 0 < diff < 1e-2


def test_fp16_falls_back_to_fp32_without_fast_fp16(trt_double, tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_DOUBLE_FAST_FP16", "0")
    outcome = build_plan(_req(tmp_path, precision="fp16"))
    assert outcome.precision == "fp32" and "no fast FP16" in outcome.notes[0]


def test_shape_outside_profile_refused_and_engine_keeps_serving(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    build_plan(_req(tmp_path, max_batch=4, opt_batch=2))
    with TrtEngine((tmp_path / "p.plan").read_bytes()) as eng:
        assert eng.max_batch == 4
        with pytest.raises(InputError, match=r"outside 1\.\.4"):
            eng.infer({"image": _x(5)})
        # the double's context itself refuses a shape beyond the profile, like TensorRT
        import pycuda.driver as cuda  # noqa: F401

        with eng._ctx.active():
            assert eng._context.set_input_shape("image", (5, 1, 8, 8)) is False
            assert eng._context.set_input_shape("image", (4, 1, 8, 8)) is True
        assert eng.infer({"image": _x(4)})["logits"].shape == (4, 10)


def test_plan_from_other_trt_version_is_rejected_not_crashing(trt_double, tmp_path):
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    build_plan(_req(tmp_path))
    trt_double.__version__ = "8.6.1.6"  # as after a JetPack upgrade
    with pytest.raises(PlanRejectedError, match="Version tag does not match"):
        TrtEngine((tmp_path / "p.plan").read_bytes())
    import pycuda.driver as cuda

    assert cuda.double_state()["contexts"] == 0  # the failed load released its context


def test_plan_from_other_gpu_is_rejected(trt_double, tmp_path, monkeypatch):
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    build_plan(_req(tmp_path))
    monkeypatch.setenv("TRT_DOUBLE_SM", "87")
    with pytest.raises(PlanRejectedError, match="incompatible device"):
        TrtEngine((tmp_path / "p.plan").read_bytes())


def test_garbage_plan_is_rejected(trt_double):
    from edge_agent.engines.trt import PlanRejectedError, TrtEngine

    with pytest.raises(PlanRejectedError, match="Magic tag"):
        TrtEngine(b"\x00" * 64)


def test_failed_build_reports_tensorrt_message(trt_double, tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_DOUBLE_BUILD_FAIL", "1")
    events = Events()
    with pytest.raises(BuildError, match="double told to fail"):
        run_build(_req(tmp_path), emit=events, timeout_s=60)
    assert events.kinds()[-1] == "engine-build-failed"
    assert not (tmp_path / "p.plan").exists()


def test_unparseable_onnx_is_a_build_error(trt_double, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(BuildError, match=r"cannot parse bad\.onnx"):
        run_build(_req(tmp_path, onnx_path=str(bad)), emit=Events(), timeout_s=60)


def test_builder_child_killed_mid_build_reports_failure_and_old_engine_keeps_serving(
    trt_double, tmp_path, monkeypatch
):
    from edge_agent.engines.trt import TrtEngine

    build_plan(_req(tmp_path))
    serving = TrtEngine((tmp_path / "p.plan").read_bytes(), name="serving")
    monkeypatch.setenv("TRT_DOUBLE_BUILD_SECONDS", "30")
    events = Events()
    errors = []

    def build():
        try:
            run_build(_req(tmp_path, plan_path=str(tmp_path / "new.plan")), emit=events, timeout_s=60,
                      progress_interval_s=0.2)
        except BuildError as e:
            errors.append(e)

    t = threading.Thread(target=build)
    t.start()
    deadline = time.monotonic() + 20
    pid = None
    while pid is None and time.monotonic() < deadline:
        started = [d for k, _, d in events.items if k == "engine-build-progress" and d.get("stage") == "building"]
        if started:
            pid = next(d for k, _, d in events.items if k == "engine-build-started")["pid"]
        time.sleep(0.05)
    assert pid is not None, events.items
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=20)
    assert not t.is_alive()
    assert errors and "SIGKILL" in str(errors[0])
    assert events.kinds()[-1] == "engine-build-failed"
    assert not (tmp_path / "new.plan").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    out = serving.infer({"image": _x(2)})  # the previous engine still serves
    assert out["logits"].shape == (2, 10)
    serving.close()


def test_build_timeout_stops_the_child(trt_double, tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_DOUBLE_BUILD_SECONDS", "30")
    events = Events()
    t0 = time.monotonic()
    with pytest.raises(BuildError, match="longer than"):
        run_build(_req(tmp_path), emit=events, timeout_s=1.5, progress_interval_s=0.5)
    assert time.monotonic() - t0 < 10


def test_engine_used_from_many_threads_pushes_and_pops(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    build_plan(_req(tmp_path))
    eng = TrtEngine((tmp_path / "p.plan").read_bytes())
    ref = OrtEngine(tiny_model_path(), max_batch=8)
    failures = []

    def work(seed):
        import pycuda.driver as cuda

        try:
            for i in range(10):
                x = _x(1 + (seed + i) % 8, seed * 100 + i)
                np.testing.assert_allclose(eng.infer({"image": x})["logits"], ref.infer({"image": x})["logits"],
                                           rtol=1e-6, atol=1e-6)
            assert cuda.double_state()["stack_depth"] == 0
        except Exception as e:  # collected and asserted below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng.close()
    ref.close()
    assert not failures


def test_int8_request_without_calibration_cache_is_refused():
    with pytest.raises(ValueError, match="calibration cache"):
        BuildRequest(model="m", onnx_path="a", plan_path="b", precision="int8", min_batch=1, opt_batch=1,
                     max_batch=1, workspace_bytes=1)


def test_int8_build_uses_the_shipped_calibration_cache(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    cal = tmp_path / "calib.cache"
    cal.write_bytes(b"TRT-8502-EntropyCalibration2\nimage: 3c010a14\n")
    outcome = build_plan(_req(tmp_path, precision="int8", calibration_cache_path=str(cal)))
    assert outcome.precision == "int8"
    with TrtEngine(outcome.plan_path.read_bytes()) as eng:
        assert eng.infer({"image": _x(2)})["logits"].shape == (2, 10)


@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.2.3", "10.3.0.30"])
def test_same_code_builds_and_runs_on_each_tensorrt_generation(trt_double, tmp_path, monkeypatch, version):
    import importlib

    from edge_agent.engines.trt import TrtEngine, device_memory_bytes

    monkeypatch.setenv("TRT_DOUBLE_VERSION", version)
    trt = importlib.reload(trt_double)
    assert trt.__version__ == version
    outcome = build_plan(_req(tmp_path, optimization_level=2))  # level is applied only where it exists
    with TrtEngine(outcome.plan_path.read_bytes()) as eng, OrtEngine(tiny_model_path(), max_batch=8) as ref:
        np.testing.assert_allclose(eng.infer({"image": _x(3)})["logits"], ref.infer({"image": _x(3)})["logits"],
                                   rtol=1e-6, atol=1e-6)
        assert device_memory_bytes(eng._engine) == eng.device_memory_bytes > 0
        has_v2 = hasattr(eng._engine, "device_memory_size_v2")
    assert has_v2 == (version.startswith("10."))


def test_execute_uses_a_non_default_stream(trt_double, tmp_path):
    from edge_agent.engines.trt import TrtEngine

    build_plan(_req(tmp_path))
    with TrtEngine((tmp_path / "p.plan").read_bytes()) as eng:
        eng.infer({"image": _x(2)})
        assert eng._buffers.stream.handle != 0
        assert eng._context.default_stream_calls == 0


def test_builder_child_dies_with_a_killed_agent(trt_double, tmp_path, monkeypatch):
    import subprocess
    import sys
    import textwrap

    monkeypatch.setenv("TRT_DOUBLE_BUILD_SECONDS", "60")
    script = textwrap.dedent("""
        import sys
        from edge_agent.engines.trt_build import run_build
        from edge_agent.engines.trt_plan import BuildRequest
        from edge_agent.selftest import tiny_model_path
        def emit(kind, msg, data):
            if kind == "engine-build-started":
                print(data["pid"], flush=True)
            elif kind == "engine-build-progress" and data.get("stage") == "parsing":
                print("parsing", flush=True)  # reported by the builder after it armed its parent-death signal
        run_build(BuildRequest(model="m", onnx_path=str(tiny_model_path()), plan_path=sys.argv[1], precision="fp32",
                               min_batch=1, opt_batch=1, max_batch=2, workspace_bytes=1 << 26),
                  emit=emit, timeout_s=120)
    """)
    agent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "x.plan")], stdout=subprocess.PIPE)
    try:
        child = int(agent.stdout.readline())
        assert agent.stdout.readline().strip() == b"parsing"  # past the builder's start-up, inside its 60 s build
        os.kill(child, 0)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = True
        while alive and time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                with open("/proc/%d/stat" % child) as f:
                    alive = f.read().split(")")[-1].split()[0] != "Z"
            except (ProcessLookupError, FileNotFoundError):
                alive = False
            time.sleep(0.05)
        assert not alive, "the builder outlived the agent"
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.stdout.close()
