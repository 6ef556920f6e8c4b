"""Side-loading through the agent's deployer, in-process with real models: the store quota and what
stays on disk after a refusal (the trusted clock floor: tests/test_time_floor.py)."""

from __future__ import annotations

import pytest
from agent_helpers import build_sample_bundle, write_key

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.errors import ResourceError

DAY = 86400


@pytest.fixture
def keys(tmp_path):
    return write_key(tmp_path / "keys", "release")


def _agent(tmp_path, **limits) -> Agent:
    cfg = AgentConfig.model_validate({
        "device_id": "dev1", "state_dir": str(tmp_path / "state"),
        "trust": {"bundle_keys_dir": str(tmp_path / "keys"), "command_keys": []},
        "engine": {"backend": "onnxruntime", "tune_iterations": 3, "max_batch_limit": 8},
        "api": {"enabled": False}, "limits": limits,
    })
    return Agent(cfg).build(with_mqtt=False)


def test_store_quota_refuses_a_bundle_before_writing_its_files(tmp_path, keys):
    bundle = build_sample_bundle(tmp_path / "b", keys, version=1, extra={"extra/blob.bin": b"z" * (2 << 20)})
    agent = _agent(tmp_path, store_quota_bytes=1 << 20)
    try:
        with pytest.raises(ResourceError, match="quota"):
            agent.deployer.install_file(bundle, max_bundle_bytes=1 << 30)
        assert not list(agent.store.objects_dir.iterdir())
        assert agent.store.state.active is None
    finally:
        agent.shutdown(timeout_s=1)


def test_second_agent_on_the_same_state_dir_is_refused(tmp_path, keys):
    first = _agent(tmp_path)
    try:
        with pytest.raises(ResourceError, match="in use by another edge-agent"):
            _agent(tmp_path)
    finally:
        first.shutdown(timeout_s=1)


def test_write_failure_while_side_loading_is_a_resource_error_and_leaves_no_partial(tmp_path, keys):
    import resource
    import signal

    bundle = build_sample_bundle(tmp_path / "b", keys, version=1, extra={"extra/blob.bin": b"z" * (2 << 20)})
    agent = _agent(tmp_path)
    # A real write failure from the kernel: files may not grow past 1 MiB (EFBIG instead of SIGXFSZ).
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        with pytest.raises(ResourceError, match=r"cannot copy extra/blob\.bin"):
            agent.deployer.install_file(bundle, max_bundle_bytes=1 << 30)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    try:
        assert not list(agent.store.partial_dir.iterdir())
        assert agent.store.state.active is None
        # With room again the same file installs.
        rec = agent.deployer.install_file(bundle, max_bundle_bytes=1 << 30)
        assert rec.version == 1 and agent.store.state.active.version == 1
    finally:
        agent.shutdown(timeout_s=1)
