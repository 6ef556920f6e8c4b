"""The agent end to end: real mosquitto, `fleet serve` and `edge-agent run` processes, real models.

Each test names the behaviour or attack it proves and checks both the events the device reported and
what is on its disk afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from agent_helpers import REPO, FleetRig, build_sample_bundle

from edge_agent.protocol.messages import BundleRef, DeployArgs, PingArgs

pytestmark = pytest.mark.mqtt

TIMEOUT = 60


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """v1 and v2 of the sample bundle sharing a 2 MiB payload file, differing in a small one."""
    from agent_helpers import write_key

    d = tmp_path_factory.mktemp("bundles")
    key = write_key(d / "keys", "release")
    blob = os.urandom(2 << 20)
    v1 = build_sample_bundle(d, key, version=1, extra={"extra/blob.bin": blob, "extra/notes.txt": b"first"})
    v2 = build_sample_bundle(d, key, version=2, extra={"extra/blob.bin": blob, "extra/notes.txt": b"second!"})
    return {"key": key, "v1": v1, "v2": v2, "dir": d}


@pytest.fixture
def rig(broker, tmp_path, bundles):
    r = FleetRig(broker, tmp_path)
    # The rig's release key must be the one the bundles were signed with.
    (tmp_path / "bundle-keys" / "release.pub").write_text(bundles["key"].public.to_text())
    yield r
    r.close()


def _active(rig, dev):
    st = rig.state(dev)
    return (st["active"]["name"], st["active"]["version"]) if st["active"] else None


def test_push_to_two_agents_end_to_end(rig, bundles):
    for dev in ("dev-a", "dev-b"):
        rig.start_agent(dev)
    res = rig.push(bundles["v1"], ["dev-a", "dev-b"], wait=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr + rig.logs("dev-a")
    assert res.stdout.count("activated") == 2
    w = rig.watcher
    for dev in ("dev-a", "dev-b"):
        kinds = w.kinds(dev)
        order = ["command-accepted", "fetch-started", "fetch-done", "bundle-installed", "selftest-passed", "activated",
                 "probation-passed"]
        assert [k for k in kinds if k in order] == order, kinds
        w.wait_for(lambda d=dev: (w.status[d].get("active") or {}).get("version") == 1 and w.status[d]["ready"], 10)
        assert _active(rig, dev) == ("digits", 1)
        assert rig.state(dev)["deploy"]["state"] == "active"
        assert rig.state(dev)["pending"] is None
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "status", "--config",
                          str(rig.tmp / "dev-a.toml"), "--json"], capture_output=True, text=True, cwd=str(REPO),
                         check=False)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["active"]["version"] == 1 and status["broker"]["agent_online"] is True


def test_second_version_fetches_only_the_changed_file_and_rollback_is_refused(rig, bundles):
    rig.start_agent("dev1")
    assert rig.push(bundles["v1"], ["dev1"], wait=TIMEOUT).returncode == 0
    res = rig.push(bundles["v2"], ["dev1"], wait=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    done = [e for e in rig.watcher.find("dev1", "fetch-done") if e["bundle"]["version"] == 2]
    assert len(done) == 1
    # Only extra/notes.txt changed (7 bytes); the 2 MiB blob and the models were not sent again.
    assert done[0]["data"]["bytes_received"] == len(b"second!")
    assert done[0]["data"]["bytes_held"] > 2 << 20
    st = rig.state("dev1")
    assert (st["active"]["version"], st["previous"]["version"]) == (2, 1)
    # Version rollback: v1 again is refused, nothing changes.
    before = rig.state("dev1")
    res = rig.push(bundles["v1"], ["dev1"], wait=TIMEOUT)
    assert res.returncode == 1 and "refused" in res.stdout
    refused = rig.watcher.find("dev1", "bundle-refused")
    assert refused and "not above the highest trusted version 2" in refused[-1]["message"]
    after = rig.state("dev1")
    assert after["active"] == before["active"] and after["previous"] == before["previous"]
    assert after["highest_versions"] == {"digits": 2}


def test_unsigned_and_replayed_commands_refused_and_nothing_changes(rig, bundles):
    rig.start_agent("dev1")
    assert rig.push(bundles["v1"], ["dev1"], wait=TIMEOUT).returncode == 0
    before = rig.state("dev1")
    pusher = rig.pusher()
    args = pusher.deploy_args("digits", 1)
    # 1. unsigned: a valid-looking envelope without signatures.
    signed = json.loads(pusher.sign("dev1", PingArgs(nonce="x")))
    signed["signatures"] = []
    rig.publish_raw_command("dev1", json.dumps(signed).encode())
    # 2. signed by a key the device does not trust.
    from edge_agent.protocol.commands import sign_command
    from edge_agent.signing import PrivateKey

    rogue = sign_command(args, device_id="dev1", seq=10**15, keys=[PrivateKey.generate()], now=int(time.time()))
    rig.publish_raw_command("dev1", rogue)
    # 3. replay of an older command after a newer one was accepted. (The very same bytes as the last
    #    accepted command are a QoS 1 redelivery: dropped quietly, no second execution, no refusal.)
    first = pusher.sign("dev1", PingArgs(nonce="once"))
    second = pusher.sign("dev1", PingArgs(nonce="twice"))
    rig.publish_raw_command("dev1", first)
    rig.publish_raw_command("dev1", second)
    rig.publish_raw_command("dev1", second)
    rig.publish_raw_command("dev1", first)
    rig.publish_raw_command("dev1", first)  # a barrier: refused again, after the duplicate was handled
    w = rig.watcher
    w.wait_for(lambda: len(w.find("dev1", "command-refused")) >= 4, 20, "four refusals")
    # Commands are handled in order, so by the barrier's refusal the duplicate of `second` was handled:
    # it was not refused (4 = unsigned, untrusted, replayed `first`, the barrier).
    assert len(w.find("dev1", "command-refused")) == 4
    seqs = [json.loads(c)["signed"]["seq"] for c in (first, second)]
    accepted = [e["command_seq"] for e in w.find("dev1", "command-accepted") if e["command_seq"] in seqs]
    assert accepted == seqs  # each executed exactly once
    reasons = [e["message"] for e in w.find("dev1", "command-refused")]
    assert any("unsigned" in r for r in reasons), reasons
    assert any("does not trust" in r for r in reasons), reasons
    assert any("replayed" in r for r in reasons), reasons
    after = rig.state("dev1")
    assert after["active"] == before["active"] and after["highest_versions"] == before["highest_versions"]
    assert after["last_command_seq"] == json.loads(second)["signed"]["seq"]


def test_manifest_over_size_limit_refused_before_download(rig, bundles):
    rig.start_agent("dev1", extra="[limits]\nmax_manifest_bytes = 1024")
    requests = []
    rig.watcher.session.subscribe("edge/v1/devices/+/fetch", requests.append)
    assert rig.watcher.session.wait_subscribed(10, "edge/v1/devices/+/fetch")
    res = rig.push(bundles["v1"], ["dev1"], wait=TIMEOUT)
    assert res.returncode == 1
    refused = rig.watcher.find("dev1", "bundle-refused")
    assert refused and "max_manifest_bytes" in refused[0]["message"]
    assert requests == []  # not one chunk request
    st = rig.state("dev1")
    assert st["active"] is None and st["pending"] is None and st["deploy"]["state"] == "failed"
    assert not list((rig.tmp / "state-dev1" / "objects" / "sha256").iterdir())


def test_rollback_command_restores_previous_bundle(rig, bundles):
    from edge_agent.protocol.messages import RollbackArgs

    rig.start_agent("dev1")
    assert rig.push(bundles["v1"], ["dev1"], wait=TIMEOUT).returncode == 0
    assert rig.push(bundles["v2"], ["dev1"], wait=TIMEOUT).returncode == 0
    rig.pusher().send_command("dev1", RollbackArgs(reason="operator")).wait(5)
    w = rig.watcher
    w.wait_for(lambda: bool(w.find("dev1", "rolled-back")), 30, "rolled-back")
    st = rig.state("dev1")
    assert (st["active"]["version"], st["previous"]["version"]) == (1, 2)
    assert st["highest_versions"] == {"digits": 2}
    assert w.find("dev1", "rolled-back")[0]["bundle"] == BundleRef(name="digits", version=1).model_dump()


def test_sigterm_is_a_clean_shutdown_with_offline_status(rig, bundles):
    p = rig.start_agent("dev1")
    p.terminate()
    assert p.wait(20) == 0
    w = rig.watcher
    w.wait_for(lambda: w.status["dev1"]["online"] is False, 10, "offline status")
    assert "agent-stopping" in w.kinds("dev1")


def test_kill_9_leaves_last_will_offline_status(rig, bundles):
    p = rig.start_agent("dev1")
    p.kill()
    p.wait(10)
    w = rig.watcher
    # The broker publishes the Last Will after the keep-alive lapses or at once on a dropped socket.
    w.wait_for(lambda: w.status["dev1"]["online"] is False, 60, "Last Will offline status")


def test_deploy_args_for_unknown_bundle_fails_cleanly(rig, bundles):
    rig.start_agent("dev1")
    args = DeployArgs(bundle=BundleRef(name="digits", version=9), manifest_sha256="e" * 64, manifest_size=100)
    rig.pusher().send_command("dev1", args).wait(5)
    w = rig.watcher
    w.wait_for(lambda: bool(w.find("dev1", "fetch-failed")), 30, "fetch-failed")
    assert "does not store bundle digits v9" in w.find("dev1", "fetch-failed")[0]["message"]
    st = rig.state("dev1")
    assert st["active"] is None and st["pending"] is None
