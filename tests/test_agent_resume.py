"""Crash and corruption recovery of the agent process: kill -9 mid-transfer, a store object that rots
on disk, and side-loading through the same verify path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from agent_helpers import REPO, FleetRig, build_sample_bundle, write_key

pytestmark = pytest.mark.mqtt

BLOB_BYTES = 8 << 20


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    key = write_key(d / "keys", "release")
    return key, build_sample_bundle(d, key, version=1, extra={"extra/blob.bin": os.urandom(BLOB_BYTES)})


@pytest.fixture
def rig(broker, tmp_path, big_bundle):
    # 4 MiB/s from the controller: the 8 MiB file takes about two seconds, long enough to kill mid-way.
    r = FleetRig(broker, tmp_path, max_bytes_per_s=4 << 20)
    (tmp_path / "bundle-keys" / "release.pub").write_text(big_bundle[0].public.to_text())
    yield r
    r.close()


def test_kill_9_mid_transfer_then_restart_completes_with_fewer_bytes_resent(rig, big_bundle):
    p = rig.start_agent("dev1", extra="[transfer]\nprogress_interval_s = 0.2\ncheckpoint_interval_s = 0.25")
    res_proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "push", str(big_bundle[1]), "--devices", "dev1", "--config",
         str(rig.fleet_toml)], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    w = rig.watcher
    w.wait_for(lambda: any(e["data"].get("percent", 0) >= 40 for e in w.find("dev1", "fetch-progress")), 60,
               "40% progress")
    p.kill()  # SIGKILL: no goodbye, no flush
    p.wait(10)
    res_proc.wait(30)
    st = rig.state("dev1")
    assert st["pending"] is not None and st["active"] is None  # the deploy is remembered
    partial = list((rig.tmp / "state-dev1" / "partial").glob("*.map"))
    assert partial, "no chunk map survived the kill"
    rig.start_agent("dev1")
    w.wait_for(lambda: bool(w.find("dev1", "activated")), 60, "activation after restart")
    done = w.find("dev1", "fetch-done")
    assert len(done) == 1
    data = done[0]["data"]
    assert data["bytes_resumed"] > 0
    assert data["bytes_received"] < BLOB_BYTES  # fewer bytes re-sent than the file
    st = rig.state("dev1")
    assert st["active"]["version"] == 1 and st["pending"] is None
    assert not list((rig.tmp / "state-dev1" / "partial").iterdir())


def test_rotten_store_object_quarantined_and_refetched_at_start(rig, big_bundle):
    p = rig.start_agent("dev1")
    assert rig.push(big_bundle[1], ["dev1"], wait=60).returncode == 0
    p.terminate()
    assert p.wait(20) == 0
    objects = rig.tmp / "state-dev1" / "objects" / "sha256"
    victim = max(objects.iterdir(), key=lambda f: f.stat().st_size)  # the 8 MiB blob
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(12345)
        f.write(b"bitrot")
    rig.start_agent("dev1")
    w = rig.watcher
    w.wait_for(lambda: w.status["dev1"].get("ready") is True, 60, "ready after re-fetch")
    assert any("quarantined" in e["message"] for e in w.find("dev1", "error"))
    assert list((rig.tmp / "state-dev1" / "quarantine").iterdir())
    import hashlib

    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.name
    assert rig.state("dev1")["active"]["version"] == 1


def test_side_load_install_uses_the_same_verify_path(rig, big_bundle, tmp_path):
    cfg = rig.agent_config("dev9")
    cmd = [sys.executable, "-m", "edge_agent.cli", "install", str(big_bundle[1]), "--config", str(cfg)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), check=False)
    assert first.returncode == 0, first.stderr
    assert rig.state("dev9")["active"]["version"] == 1
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), check=False)
    assert again.returncode == 1
    errors = [line for line in again.stderr.splitlines() if line.startswith("edge-agent:")]
    assert len(errors) == 1 and "not above the highest trusted version" in errors[0]
    assert "Traceback" not in again.stderr
    # A bundle signed by an unknown key is refused and leaves no object behind.
    other = build_sample_bundle(tmp_path / "other", write_key(tmp_path / "k2", "other"), version=5)
    before = sorted(p.name for p in (rig.tmp / "state-dev9" / "objects" / "sha256").iterdir())
    bad = subprocess.run([sys.executable, "-m", "edge_agent.cli", "install", str(other), "--config", str(cfg)],
                         capture_output=True, text=True, cwd=str(REPO), check=False)
    assert bad.returncode == 1 and "trust" in bad.stderr
    assert sorted(p.name for p in (rig.tmp / "state-dev9" / "objects" / "sha256").iterdir()) == before
    assert rig.state("dev9")["active"]["version"] == 1


def test_broker_outage_mid_transfer_then_completion(rig, big_bundle, broker):
    """The broker goes away at ~30% and comes back: agent and controller reconnect, the pull resumes
    where it was, the bundle activates, and the events from the outage arrive afterwards."""
    rig.start_agent("dev1", extra="[transfer]\nprogress_interval_s = 0.2")
    push = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "push", str(big_bundle[1]), "--devices", "dev1", "--config",
         str(rig.fleet_toml)], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    push.wait(30)
    w = rig.watcher
    w.wait_for(lambda: any(e["data"].get("percent", 0) >= 30 for e in w.find("dev1", "fetch-progress")), 60,
               "30% progress")
    broker.stop()
    import time

    time.sleep(1.5)
    broker.start()
    w.wait_for(lambda: bool(w.find("dev1", "activated")), 90, "activation after the outage")
    done = w.find("dev1", "fetch-done")[0]["data"]
    # Chunks that arrived before the outage were not fetched again (at most the window in flight was).
    assert done["bytes_received"] <= done["bytes_total"] + 8 * 256 * 1024
    st = rig.state("dev1")
    assert st["active"]["version"] == 1 and st["pending"] is None


def test_rogue_chunk_during_agent_pull_is_caught_and_bundle_installs_verified(rig, big_bundle):
    """A client with broker access answers one of the agent's requests first, with forged bytes. The
    agent's file check catches it, fetches the file again, and activates only verified bytes."""
    import hashlib

    from edge_agent.mqtt.session import MqttSession
    from edge_agent.protocol.messages import ChunkRequest

    rig.start_agent("dev1")
    forged = []
    rogue = MqttSession(rig.pusher().cfg.mqtt, client_id="rogue")

    def on_request(msg):
        req = ChunkRequest.from_json(msg.payload)
        # The blob's fourth chunk; the capped controller answers it ~200 ms after the request.
        if forged or req.offset != 3 * 256 * 1024 or req.length != 256 * 1024:
            return
        forged.append(req.sha256)
        rogue.publish(msg.response_topic, os.urandom(req.length), qos=1, correlation_data=msg.correlation_data,
                      user_properties={"sha256": req.sha256, "offset": str(req.offset), "length": str(req.length),
                                       "total": str(BLOB_BYTES)})

    rogue.subscribe("edge/v1/devices/dev1/fetch", on_request)
    rogue.start()
    try:
        assert rogue.wait_connected(10)
        res = rig.push(big_bundle[1], ["dev1"], wait=90)
    finally:
        rogue.stop()
    assert res.returncode == 0, res.stdout + res.stderr
    assert forged
    w = rig.watcher
    assert any("failed its sha256" in e["message"] for e in w.find("dev1", "error"))
    assert w.find("dev1", "fetch-done")[0]["data"]["files_refetched"] == 1
    objects = rig.tmp / "state-dev1" / "objects" / "sha256"
    for f in objects.iterdir():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    assert (objects / forged[0]).stat().st_size == BLOB_BYTES


def test_sigterm_mid_transfer_is_clean_and_the_restart_resumes(rig, big_bundle):
    """SIGTERM during a pull: exit code 0, the partial data and the pending deploy are kept (no half
    state), and the next start finishes the pull from where it stopped."""
    p = rig.start_agent("dev1", extra="[transfer]\nprogress_interval_s = 0.2")
    push = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "push", str(big_bundle[1]), "--devices", "dev1", "--config",
         str(rig.fleet_toml)], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    push.wait(30)
    w = rig.watcher
    w.wait_for(lambda: any(e["data"].get("percent", 0) >= 40 for e in w.find("dev1", "fetch-progress")), 60,
               "40% progress")
    p.terminate()
    assert p.wait(20) == 0
    st = rig.state("dev1")
    assert st["pending"] is not None and st["active"] is None
    assert "fetch-failed" not in w.kinds("dev1")  # a shutdown is not a failure
    rig.start_agent("dev1")
    w.wait_for(lambda: bool(w.find("dev1", "activated")), 60, "activation after restart")
    data = w.find("dev1", "fetch-done")[0]["data"]
    assert data["bytes_resumed"] > 0 and data["bytes_received"] < BLOB_BYTES
