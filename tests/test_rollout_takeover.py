"""Taking a rollout over from a dead controller (real PostgreSQL, two registry connections): devices whose
command the dead owner may not have published get it again after `[rollouts] resend_grace_s`, not
before, unless they show they got it; the setting reaches the runner from fleet.toml."""

from __future__ import annotations

import time

from edge_agent.protocol.messages import Event
from fleet.config import FleetConfig, RolloutSection
from fleet.leases import RolloutLeases
from fleet.registry import Registry
from fleet.rollouts.runner import RolloutRunner

BUNDLE = {"name": "digits", "version": 2}


def _runner(reg, name, sent, *, grace_s, clock=time.time):
    return RolloutRunner(reg, lambda d, a: sent.append((d, a.kind)), leases=RolloutLeases(reg, name, lease_s=30),
                         resend_grace_s=grace_s, clock=clock)


def test_the_new_owner_resends_after_the_configured_grace_unless_the_device_answered(pg_url):
    reg_a, reg_b = Registry(pg_url), Registry(pg_url)
    for d in ("dev-1", "dev-2"):
        reg_a.record_status({"device_id": d, "online": True, "ts": 1.0}, now=time.time())
    sent_a, sent_b = [], []
    now = {"t": time.time()}
    a = _runner(reg_a, "ctl-a", sent_a, grace_s=40.0)
    b = _runner(reg_b, "ctl-b", sent_b, grace_s=7.0, clock=lambda: now["t"])
    try:
        rid = a.start(bundle=BUNDLE, manifest_sha256="ab" * 32, manifest_size=100,
                      wave_devices=[["dev-1", "dev-2"]])["rollout_id"]
        assert sorted(sent_a) == [("dev-1", "deploy"), ("dev-2", "deploy")]
        # ctl-a dies right after saving; its lease runs out on the database's clock.
        reg_a.write(lambda tx: tx.execute("UPDATE rollout_leases SET expires_at = expires_at - 3600"))
        b.tick()
        assert b.active_ids() == [rid] and sent_b == []
        # dev-2 shows it got the deploy (an event forwarded or received here): no resend for it.
        b.on_event(Event(device_id="dev-2", ts=now["t"], seq=1, kind="fetch-started", message="",
                         bundle=BUNDLE, rollout_id=rid))
        now["t"] += 6.9
        b.tick()
        assert sent_b == []  # within the grace
        now["t"] += 0.2
        b.tick()
        assert sent_b == [("dev-1", "deploy")]
        assert [h["device_id"] for h in reg_b.rollout_history(rid) if h["kind"] == "resent"] == ["dev-1"]
    finally:
        reg_a.close()
        reg_b.close()


def test_resend_grace_is_a_rollouts_setting_passed_to_the_runner(tmp_path):
    from fleet.controller import Controller

    cfg = FleetConfig(rollouts=RolloutSection(resend_grace_s=4.5, registry_file=tmp_path / "r.db"),
                      controller={"state_dir": tmp_path / "state", "key_file": tmp_path / "k"})
    c = Controller(cfg, serve_chunks=False, manage_fleet=True)
    try:
        assert c.control.runner.resend_grace_s == 4.5
    finally:
        c.stop()


def test_a_controller_that_lost_a_rollout_answers_with_the_new_owners_view(pg_url):
    reg_a, reg_b = Registry(pg_url), Registry(pg_url)
    reg_a.record_status({"device_id": "dev-1", "online": True, "ts": 1.0}, now=time.time())
    a = _runner(reg_a, "ctl-a", [], grace_s=15.0)
    b = _runner(reg_b, "ctl-b", [], grace_s=15.0)
    try:
        rid = a.start(bundle=BUNDLE, manifest_sha256="ab" * 32, manifest_size=100,
                      wave_devices=[["dev-1"]])["rollout_id"]
        reg_a.write(lambda tx: tx.execute("UPDATE rollout_leases SET expires_at = expires_at - 3600"))
        b.tick()
        b.pause(rid)
        # a still holds its copy in memory (it notices the loss at its next tick), yet answers like b.
        assert a.active_ids() == [rid]
        view_a, view_b = a.get(rid, devices=True), b.get(rid, devices=True)
        assert view_a["state"] == view_b["state"] == "paused"
        assert view_a == view_b
    finally:
        reg_a.close()
        reg_b.close()


def test_a_command_queued_across_a_stall_longer_than_the_lease_is_held_back(pg_url):
    """A controller stalls (stopped VM, swapping) between saving a step and publishing its commands:
    once the lease may have expired it publishes nothing; if it still owns the rollout at its next tick
    it sends the command then, otherwise the new owner does."""
    reg = Registry(pg_url)
    for d in ("dev-1", "dev-2"):
        reg.record_status({"device_id": d, "online": True, "ts": 1.0}, now=time.time())
    mono = {"t": 1000.0}
    sent = []
    leases = RolloutLeases(reg, "ctl-a", lease_s=10, monotonic=lambda: mono["t"])
    a = RolloutRunner(reg, lambda d, args: sent.append((d, args.kind)), leases=leases, resend_grace_s=15.0)
    try:
        rid = a.start(bundle=BUNDLE, manifest_sha256="ab" * 32, manifest_size=100,
                      wave_devices=[["dev-1", "dev-2"]])["rollout_id"]
        assert sorted(sent) == [("dev-1", "deploy"), ("dev-2", "deploy")]
        sent.clear()
        mono["t"] += 10.5  # stalled past the lease (the database has not handed it to anyone yet)
        a.abort(rid)  # saved (still ours in the database), but the rollbacks are not published
        assert sent == [] and a.held_back == 2
        a.tick()  # renewed: ours after all, so the held-back rollbacks go out now
        assert sorted(sent) == [("dev-1", "rollback"), ("dev-2", "rollback")]
    finally:
        reg.close()
