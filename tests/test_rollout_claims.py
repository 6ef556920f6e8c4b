"""Rollout start is atomic across controllers: each device is claimed by one rollout in the transaction
that creates it. Two runners on two registry connections (two controllers) race `start` for overlapping
devices again and again; exactly one wins each time, the other is told which rollout holds the devices,
and no device is sent a command by two rollouts. Claims are released when the rollout can send nothing
more, and they follow the rollout when another controller takes its lease over. Both engines."""

from __future__ import annotations

import threading
import time

import pytest

from edge_agent.protocol.messages import Event
from fleet.leases import RolloutLeases
from fleet.registry import Registry
from fleet.rollouts.runner import RolloutRunner
from fleet.rollouts.states import RolloutError

BUNDLE = {"name": "digits", "version": 2}
DEVICES = ["dev-%02d" % i for i in range(10)]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("pg_url")


class Controller:
    """One controller's runner on its own registry connection, recording the commands it sends."""

    def __init__(self, target: str, name: str) -> None:
        self.registry = Registry(target)
        self.sent = []  # (device, command kind, rollout id)
        leases = RolloutLeases(self.registry, name, lease_s=30) if self.registry.shared else None
        self.runner = RolloutRunner(self.registry, self._send, leases=leases, resend_grace_s=0.0)

    def _send(self, device_id, args):
        self.sent.append((device_id, args.kind, getattr(args, "rollout_id", None)))

    def start(self, devices):
        return self.runner.start(bundle=BUNDLE, manifest_sha256="ab" * 32, manifest_size=100,
                                 wave_devices=[devices])

    def close(self):
        self.registry.close()


def _online_pair(target):
    """Two controllers on one registry in which every device of DEVICES is online."""
    reg = Registry(target)
    for d in DEVICES:
        reg.record_status({"device_id": d, "online": True, "ts": 1.0}, now=time.time())
    reg.close()
    a, b = Controller(target, "ctl-a"), Controller(target, "ctl-b")
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pair(target):
    yield from _online_pair(target)


@pytest.fixture
def pg_pair(pg_url):
    """`pair` on PostgreSQL only (the tests of leases moving between controllers)."""
    yield from _online_pair(pg_url)


def _claims(ctl):
    rows = ctl.registry.read("SELECT device_id, rollout_id FROM rollout_claims")
    return {r["device_id"]: r["rollout_id"] for r in rows}


def _race(a, b, devs_a, devs_b):
    """Both controllers start a rollout at the same instant; returns [(controller, summary or error)]."""
    gate = threading.Barrier(2)
    out = {}

    def go(ctl, devs):
        gate.wait()
        try:
            out[ctl] = ctl.start(devs)
        except RolloutError as e:
            out[ctl] = e

    threads = [threading.Thread(target=go, args=(a, devs_a)), threading.Thread(target=go, args=(b, devs_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_two_controllers_starting_rollouts_at_once_on_overlapping_devices_one_wins(pair):
    a, b = pair
    wins = {a: 0, b: 0}
    for round_no in range(12):
        a.sent.clear()
        b.sent.clear()
        out = _race(a, b, DEVICES[:6], DEVICES[4:])  # dev-04 and dev-05 in both
        won = [c for c, r in out.items() if isinstance(r, dict)]
        lost = [c for c, r in out.items() if isinstance(r, RolloutError)]
        assert len(won) == 1 and len(lost) == 1, (round_no, out)
        winner, loser = won[0], lost[0]
        rid = out[winner]["rollout_id"]
        wins[winner] += 1
        assert str(out[loser]).startswith("device(s) dev-04, dev-05 are already in rollout %s" % rid)
        # The loser saved nothing and sent nothing; the winner's devices are claimed by its rollout only.
        assert loser.sent == [] and loser.runner.active_ids() == []
        assert winner.registry.list_rollouts(states=["running"]) == [winner.registry.list_rollouts(limit=1)[0]]
        mine = DEVICES[:6] if winner is a else DEVICES[4:]
        assert _claims(a) == {d: rid for d in mine}
        assert sorted(d for d, kind, r in winner.sent) == mine and {r for _, _, r in winner.sent} == {rid}
        assert loser.registry.read("SELECT COUNT(*) AS n FROM rollout_leases WHERE owner = ?",
                                   (getattr(loser.runner.leases, "owner", "-"),))[0]["n"] == 0
        # Ending it (abort, devices keep the bundle: nothing outstanding) frees every device at once.
        winner.runner.abort(rid, rollback=False)
        assert _claims(a) == {}
    assert sum(wins.values()) == 12


def test_devices_stay_claimed_until_their_rollbacks_are_confirmed(pair):
    a, b = pair
    rid = a.start(DEVICES[:3])["rollout_id"]
    a.runner.abort(rid)  # the three were sent the deploy: each gets a rollback
    assert sorted(d for d, kind, _ in a.sent if kind == "rollback") == DEVICES[:3]
    with pytest.raises(RolloutError, match="already in rollout %s" % rid):
        b.start(DEVICES[2:5])
    for i, d in enumerate(DEVICES[:3]):
        a.runner.on_event(Event(device_id=d, ts=time.time(), seq=i, kind="rolled-back", message="back",
                                bundle=BUNDLE, rollout_id=rid))
        if i < 2:
            assert set(_claims(b)) == set(DEVICES[:3])  # one rollback still outstanding: all held
    assert _claims(b) == {}
    assert b.start(DEVICES[2:5])["state"] == "running"
    assert set(_claims(a)) == set(DEVICES[2:5])


def test_a_rollout_that_succeeds_releases_its_devices(pair):
    a, b = pair
    rid = a.start(DEVICES[:2])["rollout_id"]
    for i, d in enumerate(DEVICES[:2]):
        a.runner.on_event(Event(device_id=d, ts=time.time(), seq=i, kind="probation-passed", message="ok",
                                bundle=BUNDLE, rollout_id=rid))
    assert a.runner.get(rid)["state"] == "succeeded" and _claims(a) == {}
    assert b.start(DEVICES[:2])["state"] == "running"


def test_claims_follow_the_rollout_when_another_controller_takes_its_lease(pg_pair):
    a, b = pg_pair
    reg = b.registry
    rid = a.start(DEVICES[:4])["rollout_id"]
    # ctl-a dies: its lease runs out (moved into the past on the database's clock).
    reg.write(lambda tx: tx.execute("UPDATE rollout_leases SET expires_at = expires_at - 3600"))
    b.runner.tick()
    assert b.runner.active_ids() == [rid] and b.runner.takeovers == 1
    with pytest.raises(RolloutError, match="already in rollout %s" % rid):
        b.start(DEVICES[3:4])
    assert set(_claims(b)) == set(DEVICES[:4])
    b.runner.abort(rid, rollback=False)
    assert _claims(b) == {}
    # The old owner comes back: it cannot start anything on a stale view, and its next step is fenced.
    a.runner.tick()
    assert a.runner.active_ids() == []
    assert a.start(DEVICES[:1])["state"] == "running"


def test_a_registry_upgraded_with_a_running_rollout_claims_its_devices(tmp_path, monkeypatch):
    """Migration 6 gives the rollouts that were running when it was applied their devices' claims."""
    import fleet.registry as regmod

    path = str(tmp_path / "old.db")
    monkeypatch.setattr(regmod, "MIGRATIONS", regmod.MIGRATIONS[:5])
    monkeypatch.setattr(regmod, "SCHEMA_VERSION", 5)
    reg = Registry(path)
    for rid, state in (("r-run", "running"), ("r-done", "succeeded")):
        devs = [{"device_id": d, "wave": 0, "state": "sent", "updated": 1.0} for d in DEVICES[:2]]
        reg.save_rollout({"rollout_id": rid, "bundle": BUNDLE, "mode": "normal", "state": state, "created": 1.0,
                          "updated": 1.0, "reason": "", "waves": [DEVICES[:2]], "devices": devs})
    assert reg.schema_version() == 5
    reg.close()
    monkeypatch.undo()
    reg = Registry(path)
    assert reg.schema_version() == 6
    assert {r["device_id"]: r["rollout_id"] for r in reg.read("SELECT * FROM rollout_claims")} == {
        d: "r-run" for d in DEVICES[:2]}
    reg.close()


def test_an_operator_request_on_a_rollout_taken_over_meanwhile_is_an_error_not_a_false_success(pg_pair):
    a, b = pg_pair
    reg = b.registry
    rid = a.start(DEVICES[:2])["rollout_id"]
    reg.write(lambda tx: tx.execute("UPDATE rollout_leases SET expires_at = expires_at - 3600"))
    b.runner.tick()  # b takes it over; a has not noticed yet (no tick since)
    with pytest.raises(RolloutError, match="taken over by another controller"):
        a.runner.pause(rid)
    assert reg.load_rollout(rid)["state"] == "running" and a.runner.active_ids() == []
    assert b.runner.pause(rid)["state"] == "paused"


def test_an_ab_rollout_keeps_its_devices_until_promoted_from_any_controller(pair):
    a, b = pair
    reg = b.registry
    rid = a.runner.start(bundle=BUNDLE, manifest_sha256="ab" * 32, manifest_size=100,
                         wave_devices=[DEVICES[:2]], mode="ab", ab_split=20)["rollout_id"]
    for i, d in enumerate(DEVICES[:2]):
        a.runner.on_event(Event(device_id=d, ts=time.time(), seq=i, kind="shadow-started", message="split",
                                bundle=BUNDLE, rollout_id=rid))
    assert reg.load_rollout(rid)["state"] == "succeeded" and a.runner.active_ids() == []
    # Serving the split: nobody else may deploy to them until the candidate is promoted or dropped.
    with pytest.raises(RolloutError, match="already in rollout %s" % rid):
        b.start(DEVICES[:1])
    b.runner.promote(rid)  # from the controller that did not drive it
    assert sorted(d for d, kind, _ in b.sent if kind == "promote") == DEVICES[:2]
    assert _claims(b) == {}
    if reg.shared:
        assert reg.read("SELECT owner FROM rollout_leases WHERE rollout_id = ?", (rid,))[0]["owner"] == "(settled)"
    assert b.start(DEVICES[:1])["state"] == "running"


def test_a_start_whose_first_save_fails_leaves_nothing_behind(pair, monkeypatch):
    from fleet.registry_db import RegistryError

    a, b = pair
    real = a.registry.save_rollout

    def broken(*args, **kw):
        raise RegistryError("registry: write failed: connection lost")

    monkeypatch.setattr(a.registry, "save_rollout", broken)
    with pytest.raises(RegistryError):
        a.start(DEVICES[:2])
    assert a.runner.active_ids() == [] and a.sent == [] and _claims(a) == {}
    assert a.registry.read("SELECT COUNT(*) AS n FROM rollout_leases")[0]["n"] == 0
    monkeypatch.setattr(a.registry, "save_rollout", real)
    assert b.start(DEVICES[:2])["state"] == "running"


def test_deploys_still_queued_when_a_rollout_stops_are_not_published(pair):
    """A wave's deploys wait in the sender's queue; the operator aborts (devices freed at once when no
    rollback is asked for): none of the queued deploys may reach a device after that, since another
    controller may already be deploying another rollout to it."""
    a, _b = pair
    a.runner._sender = True  # queue commands as the sender thread would find them; sent by hand below
    rid = a.start(DEVICES[:4])["rollout_id"]
    queued = []
    while not a.runner._outbox.empty():
        queued.append(a.runner._outbox.get_nowait())
    assert len(queued) == 4 and a.sent == []
    a.runner.abort(rid, rollback=False)
    assert _claims(a) == {}
    for item in queued:
        a.runner._send(*item)
    assert a.sent == [] and a.runner.stale_dropped == 4
