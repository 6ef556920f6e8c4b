"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
from mqtt_broker import Broker, MosquittoMissing


@pytest.fixture
def broker(tmp_path_factory):
    """A real mosquitto on a free loopback port (fails, not skips, when mosquitto is missing,
    unless EDGE_AGENT_SKIP_MQTT=1)."""
    try:
        b = Broker(tmp_path_factory.mktemp("mosquitto"))
    except MosquittoMissing as e:
        if os.environ.get("EDGE_AGENT_SKIP_MQTT") == "1":
            pytest.skip(str(e))
        raise
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """One throw-away PostgreSQL cluster for the whole session (fails, not skips, when the server
    binaries are missing, unless EDGE_AGENT_SKIP_POSTGRES=1)."""
    from pg_server import PgServer, PostgresMissing

    try:
        server = PgServer()
    except PostgresMissing as e:
        if os.environ.get("EDGE_AGENT_SKIP_POSTGRES") == "1":
            pytest.skip(str(e))
        raise
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh, empty database in the session's PostgreSQL cluster."""
    return pg_server.create_db()


# ------------------------------------------------------------------ engines: TensorRT double, jetson skip

TRT_DOUBLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trt_double")


def _real_tensorrt_and_gpu() -> bool:
    """True only when the real tensorrt imports and pycuda sees a GPU."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        return False
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests unless the real TensorRT, pycuda and a CUDA GPU are present (any Linux host), and
    `jetson` tests unless that host is also a Jetson (/etc/nv_tegra_release)."""
    gpu_items = [i for i in items if "gpu" in i.keywords or "jetson" in i.keywords]
    if not gpu_items:
        return
    have_gpu = _real_tensorrt_and_gpu()
    on_jetson = os.path.exists("/etc/nv_tegra_release")
    for item in gpu_items:
        if not have_gpu:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT, pycuda and a CUDA GPU (not available here)"))
        elif "jetson" in item.keywords and not on_jetson:
            item.add_marker(pytest.mark.skip(reason="needs a Jetson (no /etc/nv_tegra_release)"))


def _drop_trt_modules():
    import sys

    for name in list(sys.modules):
        if name == "tensorrt" or name.startswith("tensorrt.") or name == "pycuda" or name.startswith("pycuda."):
            del sys.modules[name]


@pytest.fixture
def trt_double(monkeypatch):
    """Install the TensorRT/pycuda test double (tests/trt_double) for this test and its child processes."""
    import sys

    _drop_trt_modules()
    monkeypatch.syspath_prepend(TRT_DOUBLE_DIR)
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", TRT_DOUBLE_DIR + (os.pathsep + old if old else ""))
    import tensorrt

    assert tensorrt.__file__.startswith(TRT_DOUBLE_DIR)
    try:
        yield tensorrt
    finally:
        _drop_trt_modules()
        if TRT_DOUBLE_DIR in sys.path:
            sys.path.remove(TRT_DOUBLE_DIR)
