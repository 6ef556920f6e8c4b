"""`fleet rollout` end to end: the real CLI → MQTT 5 RPC → controller → signed commands → a simulated fleet
of 20 protocol-speaking devices → status/events → health-gated waves, on a real mosquitto."""

from __future__ import annotations

import json

import pytest
from fleet_helpers import FleetRig
from sim_devices import always

pytestmark = pytest.mark.mqtt


@pytest.fixture
def rig_factory(broker, tmp_path):
    rigs = []

    def make(**kw) -> FleetRig:
        rig = FleetRig(broker, tmp_path, **kw).start()
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.stop()


def status_json(rig, capsys, rid):
    rc, out, err = rig.cli(capsys, "rollout", "status", rid, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_good_bundle_rolls_through_three_waves_to_twenty_devices(rig_factory, capsys):
    rig = rig_factory()
    rc, out, err = rig.cli(
        capsys,
        "rollout",
        "start",
        "digits@2",
        "--waves",
        "10,30,100",
        "--watch",
        "--interval",
        "0.2",
        "--watch-timeout",
        "30",
    )
    assert rc == 0, err
    assert "started rollout r" in out
    assert "SUCCEEDED" in out and "20/" not in out  # per-wave counts, not a total
    rid = out.split("started rollout ")[1].split()[0]
    r = status_json(rig, capsys, rid)
    assert r["state"] == "succeeded"
    assert [(w["devices"], w["succeeded"]) for w in r["wave_progress"]] == [(2, 2), (4, 4), (14, 14)]
    # Waves went in order: every wave-1 device passed before any wave-2 device was sent the deploy.
    ents = {e["device_id"]: e for e in r["devices"]}
    w1_done = max(e["updated"] for e in ents.values() if e["wave"] == 0)
    w2_sent = min(e["sent_at"] for e in ents.values() if e["wave"] == 1)
    assert w2_sent >= w1_done
    rc, out, err = rig.cli(capsys, "devices", "--json")
    devs = json.loads(out)
    assert len(devs) == 20
    assert all(d["active"] == {"name": "digits", "version": 2} and d["deploy_state"] == "active" for d in devs)
    assert all(rig.commands_of(d) == ["deploy"] for d in rig.device_ids), "one signed deploy per device"


def test_failing_golden_halts_in_wave_one_and_later_waves_never_receive_it(rig_factory, capsys):
    rig = rig_factory(behaviour=lambda dev, b: "fail-selftest" if b.version == 3 else "pass")
    rc, out, _err = rig.cli(
        capsys, "rollout", "start", "digits@3", "--watch", "--interval", "0.2", "--watch-timeout", "30"
    )
    assert rc == 3, "a rollout that does not succeed exits 3 under --watch"
    assert "HALTED" in out and "failed" in out
    rid = out.split("started rollout ")[1].split()[0]
    r = status_json(rig, capsys, rid)
    assert r["state"] == "halted"
    wave1 = r["wave_progress"][0]
    assert wave1["devices"] == 2 and wave1["counts"].get("failed", 0) >= 1
    later = [e for e in r["devices"] if e["wave"] > 0]
    assert later and all(e["state"] == "skipped" for e in later)
    for e in later:
        assert rig.commands_of(e["device_id"]) == [], "devices in later waves never receive the bundle"
    devs = {d["device_id"]: d for d in json.loads(rig.cli(capsys, "devices", "--json")[1])}
    assert all(d["active"] == {"name": "digits", "version": 1} for d in devs.values())


def test_probation_failure_on_devices_halts_and_they_are_back_on_the_old_bundle(rig_factory, capsys):
    rig = rig_factory(behaviour=lambda dev, b: "fail-probation" if b.version == 4 else "pass")
    rc, out, _ = rig.cli(
        capsys, "rollout", "start", "digits@4", "--watch", "--interval", "0.2", "--watch-timeout", "30"
    )
    assert rc == 3
    rid = out.split("started rollout ")[1].split()[0]
    r = status_json(rig, capsys, rid)
    assert r["state"] == "halted"
    kinds = [h["kind"] for h in r["history"]]
    assert "device-failed" in kinds and "halted" in kinds
    # The failing device rolled itself back; the other wave-1 device was told to (it may still be finishing
    # its deploy, so wait for it to settle).
    rig.wait(lambda: all(rig.fleet.devices[d].active.version == 1 for d in rig.device_ids), 10, "all on v1")
    assert all(rig.commands_of(e["device_id"]) == [] for e in r["devices"] if e["wave"] > 0)


def test_offline_device_times_out_is_reported_and_resume_continues(rig_factory, capsys):
    # dev-00 and dev-01 make wave 1 (online devices come first, so make one of the first two silent).
    rig = rig_factory(
        behaviour=lambda dev, b: "silent" if dev == "dev-01" and b.version == 2 else "pass", device_timeout_s=1.5
    )
    rc, out, _ = rig.cli(capsys, "rollout", "start", "digits@2", "--json")
    assert rc == 0
    rid = json.loads(out.splitlines()[-1])["rollout_id"]
    rig.wait(lambda: status_json(rig, capsys, rid)["state"] == "stalled", 15, "rollout stalls on the timeout")
    r = status_json(rig, capsys, rid)
    assert "timed out" in r["reason"]
    assert {e["device_id"]: e["state"] for e in r["devices"] if e["wave"] == 0} == {
        "dev-00": "succeeded",
        "dev-01": "timed-out",
    }
    assert any(h["kind"] == "device-timed-out" and h["device_id"] == "dev-01" for h in r["history"])
    rc, out, _ = rig.cli(capsys, "rollout", "status", rid, "--devices")
    assert "timed-out" in out and "dev-01" in out
    rc, out, err = rig.cli(capsys, "rollout", "resume", rid)
    assert rc == 0, err
    rig.wait(lambda: status_json(rig, capsys, rid)["state"] == "succeeded", 20, "rollout completes after resume")


def test_controller_restarted_mid_rollout_resumes_from_the_registry(rig_factory, capsys):
    rig = rig_factory(step_s=0.4)
    _rc, out, _ = rig.cli(capsys, "rollout", "start", "digits@2", "--json")
    rid = json.loads(out.splitlines()[-1])["rollout_id"]
    rig.wait(lambda: rig.controller.control.runner.get(rid)["current_wave"] == 2, 15, "wave 2 started")
    rig.stop_controller()
    rig.start_controller()
    assert rid in rig.controller.control.runner.active_ids()
    rig.wait(lambda: status_json(rig, capsys, rid)["state"] == "succeeded", 30, "resumed rollout completes")
    r = status_json(rig, capsys, rid)
    assert any(h["kind"] == "resumed-after-restart" for h in r["history"])
    assert all(rig.commands_of(d) == ["deploy"] for d in rig.device_ids), "nothing sent twice after the restart"


def test_pause_resume_abort_from_the_cli(rig_factory, capsys):
    rig = rig_factory(step_s=0.3)
    rc, out, _ = rig.cli(capsys, "rollout", "start", "digits@2", "--json")
    rid = json.loads(out.splitlines()[-1])["rollout_id"]
    rc, out, _ = rig.cli(capsys, "rollout", "pause", rid)
    assert rc == 0 and "PAUSED" in out
    rig.wait(lambda: status_json(rig, capsys, rid)["wave_progress"][0]["succeeded"] == 2, 10, "wave 1 done")
    r = status_json(rig, capsys, rid)
    assert r["state"] == "paused" and r["current_wave"] == 1, "a paused rollout starts no new wave"
    rc, out, _ = rig.cli(capsys, "rollout", "resume", rid)
    assert rc == 0 and "RUNNING" in out
    rc, out, _ = rig.cli(capsys, "rollout", "abort", rid)
    assert rc == 0 and "ABORTED" in out
    r = status_json(rig, capsys, rid)
    took = [e["device_id"] for e in r["devices"] if e["wave"] <= 1]
    rig.wait(lambda: all("rollback" in rig.commands_of(d) for d in took), 10, "rollbacks delivered")
    rc, out, err = rig.cli(capsys, "rollout", "resume", rid)
    assert rc == 1 and "already ended" in err and "Traceback" not in err
    rc, out, _ = rig.cli(capsys, "rollout", "list")
    assert rid in out and "aborted" in out


def test_rollout_of_a_bundle_the_controller_does_not_store_is_refused(rig_factory, capsys):
    rig = rig_factory()
    rc, _out, err = rig.cli(capsys, "rollout", "start", "digits@9")
    assert rc == 1
    assert err.strip() == "fleet: error: the controller does not store bundle digits v9"
    rc, _out, err = rig.cli(capsys, "rollout", "start", "digits@2", "--devices", "dev-00,nope")
    assert rc == 1 and "unknown device(s): nope" in err
    rc, _out, err = rig.cli(capsys, "rollout", "start", "digits@2", "--waves", "50,20")
    assert rc == 1 and "must increase" in err
    assert all(rig.commands_of(d) == [] for d in rig.device_ids), "nothing was sent for refused requests"


def test_explicit_device_waves(rig_factory, capsys):
    rig = rig_factory(devices=4, behaviour=always("pass"))
    rc, _out, err = rig.cli(
        capsys,
        "rollout",
        "start",
        "digits@2",
        "--wave",
        "dev-03",
        "--wave",
        "dev-00,dev-02",
        "--watch",
        "--interval",
        "0.2",
        "--watch-timeout",
        "20",
    )
    assert rc == 0, err
    assert rig.commands_of("dev-01") == [], "a device in no wave is not touched"
    assert rig.commands_of("dev-03") == ["deploy"]


def test_rollout_of_a_bundle_file_stores_it_on_the_controller_first(rig_factory, capsys, tmp_path):
    from agent_helpers import build_sample_bundle

    from edge_agent.signing import PrivateKey

    rig = rig_factory(devices=3)
    bundle = build_sample_bundle(tmp_path / "b", PrivateKey.generate("release"), version=7)
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        '[mqtt]\nhost = "%s"\nport = %d\n[controller]\nstate_dir = "%s"\n'
        % (rig.broker.host, rig.broker.port, rig.state_dir)
    )
    # Without the controller's config the CLI only names the bundle, which the controller does not hold.
    rc, _out, err = rig.cli(capsys, "rollout", "start", str(bundle))
    assert rc == 1 and "does not store bundle digits v7" in err
    rc, out, err = rig.cli(
        capsys,
        "rollout",
        "start",
        str(bundle),
        "--config",
        str(toml),
        "--watch",
        "--interval",
        "0.2",
        "--watch-timeout",
        "20",
    )
    assert rc == 0, err
    assert "stored digits v7" in out and "SUCCEEDED" in out
    assert all(rig.fleet.devices[d].active.version == 7 for d in rig.device_ids)
    # The deploy commands pin the file's own manifest by hash and size.
    from edge_agent.bundle.archive import read_bundle
    from edge_agent.bundle.verify import manifest_digest

    raw, reader = read_bundle(bundle, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
    reader.close()
    for d in rig.device_ids:
        (dep,) = rig.fleet.devices[d].deploys
        assert (dep.manifest_sha256, dep.manifest_size) == (manifest_digest(raw), len(raw))
