"""The pure rollout planner: waves, health gates, halts with rollback, timeouts, restarts."""

from __future__ import annotations

import pytest

from fleet.registry import Registry
from fleet.rollouts.actions import Note, SendDeploy, SendPromote, SendRollback
from fleet.rollouts.classify import classify_event, classify_status
from fleet.rollouts.plan import Rollout
from fleet.rollouts.record import RolloutParams
from fleet.rollouts.states import (
    ABORTED,
    D_FAILED,
    D_ROLLBACK_FAILED,
    D_ROLLBACK_SENT,
    D_ROLLED_BACK,
    D_SENT,
    D_SKIPPED,
    D_SUCCEEDED,
    D_TIMED_OUT,
    HALTED,
    OBS_FAILURE,
    OBS_PROGRESS,
    OBS_SUCCESS,
    PAUSED,
    RUNNING,
    STALLED,
    SUCCEEDED,
    RolloutError,
)
from fleet.rollouts.waves import resolve_waves

BUNDLE = {"name": "digits", "version": 2}
OLD = {"name": "digits", "version": 1}
DEVICES = ["dev-%02d" % i for i in range(20)]


def make(devices=DEVICES, percents=(10, 30, 100), **params) -> Rollout:
    return Rollout.create(
        rollout_id="r1",
        bundle=BUNDLE,
        manifest_sha256="a" * 64,
        manifest_size=1234,
        waves=resolve_waves(devices, percents),
        priors={d: OLD for d in devices},
        params=RolloutParams(**params),
        now=0.0,
    )


def deploys(acts):
    return [a.device_id for a in acts if isinstance(a, SendDeploy)]


def rollbacks(acts):
    return [a for a in acts if isinstance(a, SendRollback)]


def event_obs(r, kind, rollout_id="r1", bundle=BUNDLE):
    return classify_event(r, kind=kind, bundle=bundle, rollout_id=rollout_id)


def pass_device(r, d, now):
    """The device reports the events a healthy deploy produces; returns all actions."""
    acts = []
    for kind in ("command-accepted", "fetch-done", "selftest-passed", "activated", "probation-passed"):
        acts += r.observe(d, event_obs(r, kind), kind, now)
    return acts


def test_percent_waves_are_cumulative_and_cover_every_device_once():
    waves = resolve_waves(DEVICES, (10, 30, 100))
    assert [len(w) for w in waves] == [2, 4, 14]
    assert [d for w in waves for d in w] == DEVICES
    assert [len(w) for w in resolve_waves(["a", "b", "c"], (10, 30, 100))] == [1, 1, 1]
    assert [len(w) for w in resolve_waves(["a"], (10, 30, 100))] == [1]


@pytest.mark.parametrize("percents", [(10, 30), (30, 10, 100), (0, 100), (50, 150), ()])
def test_bad_wave_percentages_refused(percents):
    with pytest.raises(RolloutError):
        resolve_waves(DEVICES, percents)


def test_device_in_two_explicit_waves_refused():
    with pytest.raises(RolloutError, match="more than one wave"):
        Rollout.create(
            rollout_id="r", bundle=BUNDLE, manifest_sha256="a" * 64, manifest_size=1, waves=[["a", "b"], ["b"]], now=0
        )


def test_good_bundle_goes_through_three_waves_to_twenty_devices():
    r = make()
    acts = r.start(0.0)
    assert deploys(acts) == DEVICES[:2]
    sent = list(deploys(acts))
    t = 1.0
    for wave in range(3):
        # Self-test alone is not enough: the wave waits for probation.
        wave_devs = r.waves[wave]
        for d in wave_devs:
            r.observe(d, event_obs(r, "selftest-passed"), "", t)
        assert r.current_wave == wave
        for d in wave_devs:
            t += 1
            new = pass_device(r, d, t)
            sent += deploys(new)
    assert sent == DEVICES, "every device receives the deploy exactly once, wave by wave"
    assert r.state == SUCCEEDED
    assert all(e.state == D_SUCCEEDED for e in r.devices.values())
    assert [s["succeeded"] for s in r.summary()["wave_progress"]] == [2, 4, 14]


def test_next_wave_waits_for_the_whole_current_wave():
    r = make()
    r.start(0)
    acts = pass_device(r, "dev-00", 1)
    assert deploys(acts) == []
    acts = pass_device(r, "dev-01", 2)
    assert deploys(acts) == DEVICES[2:6]


def test_failing_golden_halts_in_wave_one_and_later_waves_never_get_it():
    r = make()
    r.start(0)
    r.observe("dev-00", event_obs(r, "fetch-done"), "", 1)
    acts = r.observe("dev-00", event_obs(r, "selftest-failed"), "selftest-failed: top-1 mismatch", 2)
    assert r.state == HALTED
    assert "1 of 2 devices failed" in r.reason
    # dev-01 was still deploying: it is told to roll back to the bundle it ran before.
    rb = rollbacks(acts)
    assert [(a.device_id, a.to) for a in rb] == [("dev-01", OLD)]
    assert r.devices["dev-00"].state == D_FAILED
    assert r.devices["dev-01"].state == D_ROLLBACK_SENT
    assert all(r.devices[d].state == D_SKIPPED for d in DEVICES[2:])
    # Later news changes nothing for the skipped waves.
    later = pass_device(r, "dev-01", 3)
    assert deploys(later) == []
    assert all(r.devices[d].state == D_SKIPPED for d in DEVICES[2:])


def test_halt_rolls_back_devices_that_already_succeeded():
    r = make(error_threshold=0.1)
    r.start(0)
    pass_device(r, "dev-00", 1)
    pass_device(r, "dev-01", 2)  # wave 2 starts: dev-02..05
    pass_device(r, "dev-02", 3)
    acts = r.observe("dev-03", event_obs(r, "probation-failed"), "p99 over SLO", 4)
    # 1 failure of 6 started devices > 10%: halt.
    assert r.state == HALTED
    assert sorted(a.device_id for a in rollbacks(acts)) == ["dev-00", "dev-01", "dev-02", "dev-04", "dev-05"]
    assert all(a.to == OLD for a in rollbacks(acts))
    r.observe("dev-00", event_obs(r, "rolled-back"), "rolled back", 5)
    assert r.devices["dev-00"].state == D_ROLLED_BACK


def test_failures_under_the_error_threshold_do_not_halt():
    r = make(devices=DEVICES, percents=(50, 100), error_threshold=0.2, success_threshold=0.8)
    r.start(0)
    r.observe("dev-00", event_obs(r, "selftest-failed"), "", 1)
    assert r.state == RUNNING
    for i, d in enumerate(DEVICES[1:10]):
        pass_device(r, d, 2 + i)
    assert r.current_wave == 1, "9/10 passed >= 80%: the next wave starts"


def test_offline_device_times_out_and_is_reported_then_the_operator_decides():
    r = make(device_timeout_s=60)
    r.start(0)
    pass_device(r, "dev-00", 5)
    r.observe(
        "dev-01",
        classify_status(r, online=False, active=OLD, deploy_state=None, deploy_bundle=None, deploy_rollout_id=None),
        "",
        6,
    )
    assert r.tick(30) == []
    acts = r.tick(61)
    assert r.devices["dev-01"].state == D_TIMED_OUT
    assert any(isinstance(a, Note) and a.kind == "device-timed-out" and a.device_id == "dev-01" for a in acts)
    # 1 of 2 succeeded with a 90% threshold: not a failure, but not enough to go on by itself.
    assert r.state == STALLED
    assert "timed out" in r.reason
    assert deploys(acts) == []
    acts = r.resume(70)
    assert r.state == RUNNING
    assert deploys(acts) == DEVICES[2:6]


def test_late_success_of_a_timed_out_device_unstalls_the_wave():
    r = make(device_timeout_s=60)
    r.start(0)
    pass_device(r, "dev-00", 5)
    r.tick(61)
    assert r.state == STALLED
    acts = pass_device(r, "dev-01", 90)
    assert r.devices["dev-01"].state == D_SUCCEEDED
    assert r.state == RUNNING
    assert deploys(acts) == DEVICES[2:6]


def test_status_active_with_the_bundle_counts_as_success_but_probation_does_not():
    r = make(devices=["a"], percents=(100,))
    r.start(0)
    obs = classify_status(
        r, online=True, active=BUNDLE, deploy_state="probation", deploy_bundle=BUNDLE, deploy_rollout_id="r1"
    )
    assert obs == OBS_PROGRESS
    r.observe("a", obs, "", 1)
    assert r.state == RUNNING
    obs = classify_status(
        r, online=True, active=BUNDLE, deploy_state="active", deploy_bundle=BUNDLE, deploy_rollout_id="r1"
    )
    assert obs == OBS_SUCCESS
    r.observe("a", obs, "", 2)
    assert r.state == SUCCEEDED


def test_events_of_another_rollout_or_bundle_are_ignored():
    r = make()
    assert event_obs(r, "selftest-failed", rollout_id="other") is None
    assert event_obs(r, "selftest-failed", rollout_id=None, bundle={"name": "digits", "version": 9}) is None
    assert event_obs(r, "selftest-failed", rollout_id=None, bundle=BUNDLE) == OBS_FAILURE
    assert (
        classify_status(r, online=True, active=OLD, deploy_state="failed", deploy_bundle=BUNDLE, deploy_rollout_id="r0")
        is None
    )


def test_pause_holds_the_next_wave_and_resume_starts_it():
    r = make()
    r.start(0)
    r.pause(1)
    pass_device(r, "dev-00", 2)
    acts = pass_device(r, "dev-01", 3)
    assert deploys(acts) == []
    assert r.state == PAUSED
    acts = r.resume(4)
    assert deploys(acts) == DEVICES[2:6]
    with pytest.raises(RolloutError):
        r.resume(5)


def test_abort_rolls_back_unless_told_to_keep():
    r = make()
    r.start(0)
    pass_device(r, "dev-00", 1)
    acts = r.abort(2)
    assert r.state == ABORTED
    assert sorted(a.device_id for a in rollbacks(acts)) == ["dev-00", "dev-01"]
    with pytest.raises(RolloutError):
        r.abort(3)
    r2 = make()
    r2.start(0)
    acts = r2.abort(1, rollback=False)
    assert rollbacks(acts) == []
    assert r2.devices["dev-05"].state == D_SKIPPED


def test_device_activating_after_a_halt_is_rolled_back():
    r = make(device_timeout_s=10)
    r.start(0)
    r.tick(11)  # both time out: stalled
    r.abort(12)
    assert r.devices["dev-00"].state == D_TIMED_OUT
    acts = pass_device(r, "dev-00", 20)
    assert [a.device_id for a in rollbacks(acts)] == ["dev-00"]


def test_unconfirmed_rollback_is_reported_after_the_timeout():
    r = make(device_timeout_s=10)
    r.start(0)
    r.observe("dev-00", event_obs(r, "selftest-failed"), "", 1)
    assert r.devices["dev-01"].state == D_ROLLBACK_SENT
    acts = r.tick(20)
    assert r.devices["dev-01"].state == D_ROLLBACK_FAILED
    assert any(isinstance(a, Note) and a.kind == "rollback-unconfirmed" for a in acts)


def test_ab_rollout_succeeds_on_shadow_started_and_promotes():
    devs = ["a", "b"]
    r = Rollout.create(
        rollout_id="r1", bundle=BUNDLE, manifest_sha256="a" * 64, manifest_size=1, waves=[devs], mode="ab",
        ab_split=10.0, now=0
    )
    r.start(0)
    for d in devs:
        r.observe(d, event_obs(r, "shadow-started"), "", 1)
    assert r.state == SUCCEEDED
    acts = r.promote(2)
    assert sorted(a.device_id for a in acts if isinstance(a, SendPromote)) == devs
    with pytest.raises(RolloutError):
        make().promote(1)


def test_restart_resumes_from_registry_state(tmp_path):
    """Save mid-rollout, rebuild from the registry as a restarted controller does, and carry on."""
    reg = Registry(tmp_path / "fleet.db")
    r = make()
    r.start(0)
    pass_device(r, "dev-00", 1)
    pass_device(r, "dev-01", 2)
    pass_device(r, "dev-02", 3)
    reg.save_rollout(r.to_dict(), [(3.0, "note", None, "saved")])
    reg.close()

    reg = Registry(tmp_path / "fleet.db")
    r2 = Rollout.from_dict(reg.load_rollout("r1"))
    assert r2.to_dict() == r.to_dict()
    assert r2.current_wave == 1
    assert r2.devices["dev-02"].state == D_SUCCEEDED
    assert r2.devices["dev-03"].state == D_SENT
    sent = []
    for d in DEVICES[3:6]:
        sent += deploys(pass_device(r2, d, 10))
    assert sent == DEVICES[6:], "the resumed rollout starts wave 3 and nothing is sent twice"
    reg.close()


def test_after_a_restart_commands_not_confirmed_within_the_grace_are_sent_again():
    """The controller may die between persisting 'sent' and publishing: unconfirmed deploys are resent."""
    r = Rollout.from_dict(make().to_dict())
    r.start(0)
    r2 = Rollout.from_dict(r.to_dict())  # as loaded by a restarted controller
    acts = r2.restarted(100, grace_s=10)
    assert any(isinstance(a, Note) and a.kind == "resumed-after-restart" for a in acts)
    # dev-00's retained status shows it is working on this rollout: it got the command.
    r2.observe(
        "dev-00",
        classify_status(
            r2, online=True, active=OLD, deploy_state="fetching", deploy_bundle=BUNDLE, deploy_rollout_id="r1"
        ),
        "",
        101,
    )
    assert deploys(r2.tick(105)) == []
    acts = r2.tick(111)
    assert deploys(acts) == ["dev-01"], "only the device that never showed it got the deploy"
    assert deploys(r2.tick(200)) == [], "resent once"
