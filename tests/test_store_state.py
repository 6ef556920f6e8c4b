"""The device store: atomic state.json, verified objects only, quarantine, GC, quota, activation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from bundle_helpers import FILES, body_dict, signed_bytes

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store import BundleStore
from edge_agent.bundle.store_state import BundleRecord
from edge_agent.errors import IntegrityError, ResourceError
from edge_agent.signing import PrivateKey


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def store(tmp_path):
    return BundleStore(tmp_path / "state").open()


def _install(store: BundleStore, files=None, **overrides):
    """Put a bundle's manifest and files into the store; returns (record, body)."""
    files = FILES if files is None else files
    key = PrivateKey.generate()
    body = body_dict(files, **overrides)
    raw = signed_bytes(body, [key])
    msha = store.add_object_bytes(raw)
    for data in files.values():
        store.add_object_bytes(data)
    mb = ManifestBody.model_validate(body)
    return BundleRecord(name=mb.name, version=mb.version, manifest_sha256=msha), mb


def test_state_survives_reopen_and_is_written_atomically(store, tmp_path):
    store.update_state(last_command_seq=42, time_floor=1000)
    assert not list((tmp_path / "state").glob(".state.json.*"))  # no temp file left behind
    again = BundleStore(tmp_path / "state").open()
    assert again.state.last_command_seq == 42 and again.state.time_floor == 1000


def test_state_json_valid_after_kill_9_during_writes(tmp_path):
    """A process killed with SIGKILL while rewriting state.json in a loop leaves a parseable file."""
    root = tmp_path / "state"
    code = (
        "import sys; from edge_agent.bundle.store import BundleStore\n"
        "s = BundleStore(sys.argv[1]).open()\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1; s.update_state(last_command_seq=i, highest_versions={'n%d' % (i % 50): i})\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(root)])
    deadline = time.time() + 10
    while time.time() < deadline and _seq_on_disk(root) < 100:  # kill it mid-stream of writes
        time.sleep(0.02)
    assert _seq_on_disk(root) >= 100, "the writer never got going"
    p.kill()
    p.wait()
    st = BundleStore(root).open().state
    assert st.last_command_seq >= 1
    assert json.loads((root / "state.json").read_bytes())["last_command_seq"] == st.last_command_seq


def test_corrupt_state_json_refused_with_clear_error_and_left_alone(tmp_path):
    root = tmp_path / "state"
    root.mkdir()
    (root / "state.json").write_text("{not json")
    with pytest.raises(ResourceError, match=r"state\.json"):
        BundleStore(root).open()
    assert (root / "state.json").read_text() == "{not json"


def test_unwritable_state_dir_is_a_resource_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResourceError, match="not writable"):
        BundleStore(blocker / "state").open()


def test_object_with_wrong_hash_never_enters_the_store(store):
    part = store.partial_path("0" * 64)
    part.write_bytes(b"evil")
    with pytest.raises(IntegrityError):
        store.add_object_file(part, _sha(b"good"), 4)
    assert not store.has_object(_sha(b"good"))
    assert not store.has_object(_sha(b"evil"))


def test_corrupted_object_quarantined_at_start(store, tmp_path):
    rec, body = _install(store)
    store.record_activation(rec)
    store.materialize(body)
    victim = body.files["models/large.onnx"].sha256
    p = store.object_path(victim)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"X")
    again = BundleStore(tmp_path / "state").open()
    bad = again.check_objects()
    assert bad == [victim]
    assert not again.has_object(victim)
    assert list(again.quarantine_dir.iterdir())
    assert victim in again.missing_files(body)
    # The bundle tree that hard-linked the bad object is gone too; it is rebuilt after a re-fetch.
    assert not again.bundle_dir(body.name, body.version).exists()


def test_activation_moves_active_to_previous_and_raises_highest_version(store):
    r1, _ = _install(store, version=1)
    r2, _ = _install(store, files=dict(FILES, **{"models/small.onnx": b"v2-small"}), version=2)
    store.record_activation(r1)
    st = store.record_activation(r2)
    assert st.active.version == 2 and st.previous.version == 1
    assert st.highest_versions == {"digits": 2}


def test_gc_keeps_active_and_previous_and_removes_the_rest(store):
    r1, b1 = _install(store, version=1)
    r2, b2 = _install(store, files=dict(FILES, **{"models/small.onnx": b"v2-small"}), version=2)
    r3, b3 = _install(store, files=dict(FILES, **{"models/small.onnx": b"v3-small"}), version=3)
    for r, b in ((r1, b1), (r2, b2), (r3, b3)):
        store.record_activation(r)
        store.materialize(b)
    store.partial_path("f" * 64).write_bytes(b"stale partial")
    removed, freed = store.gc()
    assert removed >= 3 and freed > 0
    assert not store.has_object(r1.manifest_sha256)
    assert not store.has_object(_sha(b"small-model-bytes" * 10))  # only v1 used it
    assert not store.bundle_dir("digits", 1).exists()
    for b in (b2, b3):
        assert not store.missing_files(b)
        assert store.bundle_dir("digits", b.version).is_dir()
    assert not store.partial_path("f" * 64).exists()


def test_store_quota_refuses_before_writing(tmp_path):
    s = BundleStore(tmp_path / "state", quota_bytes=1000).open()
    s.add_object_bytes(b"a" * 600)
    with pytest.raises(ResourceError, match="quota"):
        s.add_object_bytes(b"b" * 600)
    assert not s.has_object(_sha(b"b" * 600))


def test_materialized_tree_matches_manifest(store):
    _rec, body = _install(store)
    d = store.materialize(body)
    for path, entry in body.files.items():
        assert _sha((d / path).read_bytes()) == entry.sha256


def _seq_on_disk(root) -> int:
    """last_command_seq in state.json (0 before the first write); the file is replaced atomically."""
    try:
        return int(json.loads((root / "state.json").read_bytes()).get("last_command_seq") or 0)
    except FileNotFoundError:
        return 0
