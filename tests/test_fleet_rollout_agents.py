"""Staged rollouts with real parts end to end: mosquitto, `fleet serve` and `edge-agent run` processes on
the CPU backend, the real sample models, the `fleet rollout` CLI. A good bundle goes through three waves;
a bundle whose golden test fails on the devices halts in wave 1 and later waves never receive it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_helpers import FleetRig, add_files, build_sample_bundle

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

DEVICES = ["edge-a", "edge-b", "edge-c"]
TIMEOUT = 120


def perturbed_small_model(out: Path) -> Path:
    """The sample small model with its weights negated: valid ONNX, same I/O, different answers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    src = Path(__file__).resolve().parent.parent / "samples" / "digits" / "small.onnx"
    m = onnx.load(str(src))
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(-arr, init.name))
    onnx.save(m, str(out))
    return out


@pytest.fixture
def rig(broker, tmp_path):
    r = FleetRig(broker, tmp_path)
    for d in DEVICES:
        r.start_agent(d)
    yield r
    r.close()


def active(rig, dev):
    st = rig.state(dev)
    return st["active"]["version"] if st["active"] else None


def rollout(rig, capsys, bundle: Path, *extra: str):
    from fleet.cli import main

    capsys.readouterr()
    rc = main(
        [
            "rollout",
            "start",
            str(bundle),
            "--config",
            str(rig.fleet_toml),
            "--watch",
            "--interval",
            "0.5",
            "--watch-timeout",
            str(TIMEOUT),
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    rid = out.split("started rollout ")[1].split()[0] if "started rollout " in out else None
    return rc, out, err, rid


def status(rig, capsys, rid):
    from fleet.cli import main

    capsys.readouterr()
    assert main(["rollout", "status", rid, "--json", "--config", str(rig.fleet_toml)]) == 0
    return json.loads(capsys.readouterr()[0])


def test_good_bundle_through_three_waves_then_broken_golden_halts_in_wave_one(rig, tmp_path, capsys):
    key = rig.release_key
    v1 = build_sample_bundle(tmp_path / "b", key, version=1)
    v2 = build_sample_bundle(tmp_path / "b", key, version=2)
    good3 = build_sample_bundle(tmp_path / "b", key, version=3)
    from edge_agent.bundle.archive import read_bundle
    from edge_agent.bundle.verify import read_unverified

    raw, reader = read_bundle(good3, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
    reader.close()
    small_path = read_unverified(raw, max_manifest_bytes=1 << 20).models["small"].path
    v3_broken = add_files(
        good3,
        {small_path: perturbed_small_model(tmp_path / "bad-small.onnx")},
        key,
        tmp_path / "b" / "digits-3-broken.bundle",
    )

    # Every device starts on v1 (so a rollback has somewhere to go).
    rc, out, err, rid = rollout(rig, capsys, v1, "--waves", "100")
    assert rc == 0, out + err
    assert [active(rig, d) for d in DEVICES] == [1, 1, 1]

    # v2 in three waves of one device each; each wave only after the previous one passed.
    rc, out, err, rid = rollout(rig, capsys, v2, "--waves", "33,66,100")
    assert rc == 0, out + err + "".join(rig.logs(d) for d in DEVICES)
    r = status(rig, capsys, rid)
    assert r["state"] == "succeeded"
    assert [w["devices"] for w in r["wave_progress"]] == [1, 1, 1]
    ents = sorted(r["devices"], key=lambda e: e["wave"])
    for earlier, later in zip(ents, ents[1:]):
        assert later["sent_at"] >= earlier["updated"], "a wave starts only after the previous one passed"
    assert [active(rig, d) for d in DEVICES] == [2, 2, 2]

    # v3's golden test fails on the device: the rollout halts in wave 1, nobody else hears of v3.
    rc, out, err, rid = rollout(rig, capsys, v3_broken, "--waves", "33,66,100")
    assert rc == 3 and "HALTED" in out, out + err
    r = status(rig, capsys, rid)
    (first,) = [e for e in r["devices"] if e["wave"] == 0]
    assert first["state"] == "failed" and "golden self-test" in first["detail"]
    others = [e["device_id"] for e in r["devices"] if e["wave"] > 0]
    assert all(e["state"] == "skipped" for e in r["devices"] if e["wave"] > 0)
    for d in others:
        assert not [
            e for e in rig.watcher.events if e["device_id"] == d and (e.get("bundle") or {}).get("version") == 3
        ], "a later-wave device received the broken bundle"
    assert [active(rig, d) for d in DEVICES] == [2, 2, 2]


def _start_rollout(rig, capsys, bundle: Path, *extra: str) -> str:
    from fleet.cli import main

    capsys.readouterr()
    rc = main(["rollout", "start", str(bundle), "--config", str(rig.fleet_toml), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    return json.loads(out.splitlines()[-1])["rollout_id"]


def _wait_status(rig, capsys, rid, pred, *, timeout_s, what):
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = status(rig, capsys, rid)
        except AssertionError:  # the controller is restarting
            last = None
        if last is not None and pred(last):
            return last
        time.sleep(0.2)
    raise AssertionError("timed out waiting for %s; last: %s" % (what, last and last["state"]))


@pytest.fixture
def slow_rig(broker, tmp_path):
    """Agents with a 2 s probation window, so a rollout is still in its second wave when the test kills
    the controller (with no window, waves 2 and 3 can finish before the kill lands)."""
    r = FleetRig(broker, tmp_path, probation_s=2)
    for d in DEVICES:
        r.start_agent(d)
    yield r
    r.close()


def test_controller_killed_mid_rollout_resumes_and_finishes(slow_rig, tmp_path, capsys):
    rig = slow_rig
    import os
    import signal
    import subprocess
    import sys

    from agent_helpers import REPO

    key = rig.release_key
    v1 = build_sample_bundle(tmp_path / "b", key, version=1)
    v2 = build_sample_bundle(tmp_path / "b", key, version=2)
    assert rollout(rig, capsys, v1, "--waves", "100")[0] == 0
    rid = _start_rollout(rig, capsys, v2, "--waves", "33,66,100")
    r = _wait_status(rig, capsys, rid, lambda r: r["current_wave"] >= 2, timeout_s=TIMEOUT, what="wave 2 started")
    assert r["state"] == "running", "the rollout must still be running when the controller is killed"
    os.kill(rig.serve.pid, signal.SIGKILL)
    rig.serve.wait(10)
    rig.serve = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "serve", "--config", str(rig.fleet_toml)],
        stdout=open(tmp_path / "serve2.log", "ab"),
        stderr=subprocess.STDOUT,
        cwd=str(REPO),
    )
    r = _wait_status(
        rig, capsys, rid, lambda r: r["state"] in ("succeeded", "halted"), timeout_s=TIMEOUT, what="rollout end"
    )
    assert r["state"] == "succeeded", r["reason"]
    assert any(h["kind"] == "resumed-after-restart" for h in r["history"])
    assert [active(rig, d) for d in DEVICES] == [2, 2, 2]
    for d in DEVICES:
        deploys = [
            e
            for e in rig.watcher.events
            if e["device_id"] == d and e["kind"] == "command-accepted" and e.get("rollout_id") == rid
        ]
        assert len(deploys) == 1, "each device got the v2 deploy exactly once across the restart"


def test_device_offline_mid_rollout_times_out_and_resume_finishes(rig, tmp_path, capsys):
    from agent_helpers import stop_process

    key = rig.release_key
    v1 = build_sample_bundle(tmp_path / "b", key, version=1)
    v2 = build_sample_bundle(tmp_path / "b", key, version=2)
    assert rollout(rig, capsys, v1, "--waves", "100")[0] == 0
    # The last device in the order (online ones first, then by id) goes offline before its wave.
    stop_process(rig.agents["edge-c"])
    rig.watcher.wait_for(lambda: rig.watcher.status["edge-c"]["online"] is False, 15, "edge-c offline")
    rid = _start_rollout(rig, capsys, v2, "--waves", "33,66,100", "--device-timeout", "6")
    r = _wait_status(
        rig, capsys, rid, lambda r: r["state"] == "stalled", timeout_s=TIMEOUT, what="stalled on the offline device"
    )
    (entry,) = [e for e in r["devices"] if e["device_id"] == "edge-c"]
    assert entry["state"] == "timed-out" and entry["wave"] == 2
    assert "timed out" in r["reason"]
    assert [active(rig, d) for d in ("edge-a", "edge-b")] == [2, 2]
    # The device comes back; the deploy it missed is not replayed to it by the broker (clean session), so
    # the operator resumes (the wave is the last one: the rollout ends) and re-targets it.
    from fleet.cli import main

    capsys.readouterr()
    assert main(["rollout", "resume", rid, "--config", str(rig.fleet_toml)]) == 0
    r = _wait_status(
        rig, capsys, rid, lambda r: r["state"] == "succeeded", timeout_s=30, what="resumed past the timeout"
    )
    rig.start_agent("edge-c")
    rid2 = _start_rollout(rig, capsys, v2, "--devices", "edge-c", "--waves", "100")
    _wait_status(rig, capsys, rid2, lambda r: r["state"] == "succeeded", timeout_s=TIMEOUT, what="edge-c caught up")
    assert active(rig, "edge-c") == 2
