"""A refused side-load (`edge-agent install`) changes nothing on disk: before, a refused bundle left its
manifest and files in the store and raised the trusted time floor. One test per way of being refused,
each asserting the error and that the state directory (every file's bytes, `state.json` included) is
exactly what it was, with the previous bundle still the active one."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Dict

import pytest
from agent_helpers import build_sample_bundle, write_key

from edge_agent.agent import Agent
from edge_agent.bundle.archive import pack_bundle, read_bundle
from edge_agent.config import AgentConfig
from edge_agent.errors import ArchiveError, EngineError, IntegrityError

MIB = 1 << 20


@pytest.fixture
def key(tmp_path):
    return write_key(tmp_path / "keys", "release")


@pytest.fixture
def agent(tmp_path, key):
    cfg = AgentConfig.model_validate({
        "device_id": "dev1", "state_dir": str(tmp_path / "state"),
        "trust": {"bundle_keys_dir": str(tmp_path / "keys"), "command_keys": []},
        "engine": {"backend": "onnxruntime", "tune_iterations": 3, "max_batch_limit": 8},
        "api": {"enabled": False},
    })
    a = Agent(cfg).build(with_mqtt=False)
    first = build_sample_bundle(tmp_path / "b", key, version=1, now=int(time.time()) - 60)
    a.deployer.install_file(first, max_bundle_bytes=1 << 30)
    assert a.store.state.active.version == 1
    yield a
    a.shutdown(timeout_s=1)


def _disk(root: Path) -> Dict[str, str]:
    """Every file under the state directory with its sha256 (folders as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _v2(tmp_path, key, **kw) -> Path:
    # created a little later than v1, so a leak would show as a raised time floor
    return build_sample_bundle(tmp_path / "b2", key, version=2, now=int(time.time()),
                               extra={"extra/a.bin": b"a" * 5000, "extra/b.bin": b"b" * 7000}, **kw)


def _assert_unchanged(agent, before: Dict[str, str], state_before: bytes) -> None:
    assert _disk(agent.store.root) == before
    assert agent.store.state_path.read_bytes() == state_before
    st = agent.store.state
    assert st.active.version == 1 and st.highest_versions == {"digits": 1}


def test_side_load_with_a_tampered_file_changes_nothing_on_disk(tmp_path, key, agent):
    bundle = _v2(tmp_path, key)
    _, reader = read_bundle(bundle, max_manifest_bytes=MIB, max_bundle_bytes=1 << 30)
    with reader:
        # extra/a.bin (new to the store) is copied in first: the refusal comes after it was stored
        last = reader.members["extra/b.bin"]
    data = bytearray(bundle.read_bytes())
    data[last.offset] ^= 0xFF
    bad = tmp_path / "tampered.bundle"
    bad.write_bytes(bytes(data))
    before, state_before = _disk(agent.store.root), agent.store.state_path.read_bytes()
    with pytest.raises(IntegrityError):
        agent.deployer.install_file(bad, max_bundle_bytes=1 << 30)
    _assert_unchanged(agent, before, state_before)


def test_side_load_failing_its_self_test_changes_nothing_on_disk(tmp_path, key, agent, monkeypatch):
    bundle = _v2(tmp_path, key)

    class Failed:
        passed = False
        message = "outputs differ from the golden set"

    monkeypatch.setattr(agent.deployer.hooks, "selftest", lambda *a: Failed())
    before, state_before = _disk(agent.store.root), agent.store.state_path.read_bytes()
    with pytest.raises(EngineError, match="self-test"):
        agent.deployer.install_file(bundle, max_bundle_bytes=1 << 30)
    _assert_unchanged(agent, before, state_before)
    assert agent._service is not None and agent._service.bundle["version"] == 1  # the old model still serves


def test_archive_member_not_listed_in_the_manifest_refused_on_side_load(tmp_path, key, agent):
    bundle = _v2(tmp_path, key)
    raw, reader = read_bundle(bundle, max_manifest_bytes=MIB, max_bundle_bytes=1 << 30)
    files = {}
    with reader:
        for m in reader.files():
            p = tmp_path / ("m-" + m.name.replace("/", "_"))
            p.write_bytes(b"".join(reader.iter_chunks(m.name)))
            files[m.name] = p
    smuggled = tmp_path / "smuggled"
    smuggled.write_bytes(b"#!/bin/sh\necho not signed\n")
    files["extra/run.sh"] = smuggled
    bad = pack_bundle(raw, files, tmp_path / "smuggled.bundle")  # the signed manifest, one extra member
    before, state_before = _disk(agent.store.root), agent.store.state_path.read_bytes()
    with pytest.raises(ArchiveError, match=r"does not list: extra/run\.sh"):
        agent.deployer.install_file(bad, max_bundle_bytes=1 << 30)
    _assert_unchanged(agent, before, state_before)
