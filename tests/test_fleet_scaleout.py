"""Several controllers, one fleet: two `fleet serve` processes on one real PostgreSQL registry and one
broker, with simulated devices that verify every signed command (signature, expiry, sequence number).

The rollout's owner is killed with -9 in the middle of a wave; the other controller takes the rollout
over when the lease expires and finishes it, and no device is sent a conflicting command (each device
accepts only deploys of the rollout's bundle, refuses nothing — no replayed or out-of-order sequence
number — and ends on the new bundle)."""

from __future__ import annotations

import json

import pytest
from scaleout_helpers import SharedRig, insert_bundle_record

pytestmark = pytest.mark.mqtt


def cli(rig, capsys, *args):
    from fleet.cli import main

    capsys.readouterr()
    rc = main([*args, "--broker", "%s:%d" % (rig.broker.host, rig.broker.port)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def rig(broker, tmp_path, pg_url):
    r = SharedRig(broker, tmp_path, pg_url, controllers=2, devices=12, step_s=0.25, lease_s=2.0)
    try:
        yield r.start()
    finally:
        r.stop()


def test_any_controller_answers_with_the_same_view(rig, capsys):
    views = set()
    for _ in range(6):  # shared RPC: requests go round-robin to both controllers
        rc, out, err = cli(rig, capsys, "devices", "--json")
        assert rc == 0, err
        views.add(tuple(sorted(d["device_id"] for d in json.loads(out))))
    assert views == {tuple(rig.device_ids)}
    from fleet_helpers import mqtt_cfg

    from fleet.rpc import RpcClient

    rpc = RpcClient.connect(mqtt_cfg(rig.broker))
    try:
        answered = set()

        def ask():
            # Until both answered (a controller that is still connecting joins the group a moment later).
            st = rpc.call("controller.status", timeout_s=10)
            answered.add(st["answered_by"].split("@")[0])
            assert st["registry"] == "postgresql" and st["devices"] == len(rig.device_ids)
            return answered == set(rig.names)

        rig.wait(ask, 20, "both controllers answering")
        rig.wait(lambda: sorted(c["client_id"] for c in rpc.call("controller.status", timeout_s=10)["controllers"])
                 == rig.names, 10, "both controllers listed")
    finally:
        rpc.close()
    assert answered == set(rig.names)  # the shared RPC group reached both, and both gave the same view


def test_rollout_owner_killed_mid_wave_is_finished_by_the_other_controller(rig, capsys):
    insert_bundle_record(rig.pg_url, "digits", 2)
    rc, out, err = cli(rig, capsys, "rollout", "start", "digits@2", "--waves", "25,50,100", "--json")
    assert rc == 0, err
    rid = json.loads(out.splitlines()[-1])["rollout_id"]
    # Mid-wave: commands of wave 1 are out, the devices are still deploying.
    rig.wait(lambda: rig.query("SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = %s AND state IN "
                               "('sent', 'in-progress')", (rid,))[0][0] > 0, 20, "wave 1 in flight")
    owner = rig.lease_owner(rid)
    assert owner in rig.names
    survivor = next(n for n in rig.names if n != owner)
    rig.kill(owner)
    rig.wait(lambda: rig.lease_owner(rid) == survivor, 20, "the surviving controller takes the lease")
    rig.wait(lambda: rig.rollout_state(rid) == "succeeded", 60,
             "rollout finished by %s\n%s" % (survivor, rig.log(survivor)))

    rc, out, err = cli(rig, capsys, "rollout", "status", rid, "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["state"] == "succeeded"
    assert {e["state"] for e in status["devices"]} == {"succeeded"}
    assert any(h["kind"] == "resumed-after-restart" for h in status["history"])
    for dev_id, d in rig.fleet.devices.items():
        assert d.refused == [], (dev_id, d.refused)
        assert set(d.commands) == {"deploy"}, (dev_id, d.commands)
        assert {(a.bundle.name, a.bundle.version, a.rollout_id) for a in d.deploys} == {("digits", 2, rid)}
        assert d.active.version == 2


def test_operator_request_reaches_the_owner_from_either_controller(rig, capsys):
    insert_bundle_record(rig.pg_url, "digits", 2)
    rc, out, err = cli(rig, capsys, "rollout", "start", "digits@2", "--waves", "25,50,100", "--json")
    assert rc == 0, err
    rid = json.loads(out.splitlines()[-1])["rollout_id"]
    # Several pauses/resumes: the shared RPC group hands some to the controller that does not own it,
    # which forwards them through the rollout's inbox; every one is answered with the owner's state.
    for want, verb in (("paused", "pause"), ("running", "resume"), ("paused", "pause"), ("running", "resume")):
        rc, out, err = cli(rig, capsys, "rollout", verb, rid)
        assert rc == 0, err
        rig.wait(lambda w=want: rig.rollout_state(rid) in (w, "succeeded"), 10, "rollout %s" % want)
    rig.wait(lambda: rig.rollout_state(rid) == "succeeded", 60, "rollout finished")
    assert all(d.refused == [] for d in rig.fleet.devices.values())


def test_rollouts_started_at_once_through_both_controllers_never_share_a_device(rig):
    """`rollout start` for overlapping devices sent twice at the same instant; the shared RPC group hands
    the two requests to the two controllers. Each time exactly one rollout gets the devices."""
    import threading

    from fleet_helpers import mqtt_cfg

    from fleet.rpc import RpcClient, RpcError

    insert_bundle_record(rig.pg_url, "digits", 2)
    clients = [RpcClient.connect(mqtt_cfg(rig.broker)) for _ in range(2)]
    halves = [rig.device_ids[:8], rig.device_ids[4:]]  # four devices in both
    winners = []
    try:
        for _ in range(4):
            gate = threading.Barrier(2)
            out = [None, None]

            def go(k, gate=gate, out=out):
                gate.wait()
                try:
                    out[k] = clients[k].call("rollout.start", {"bundle": {"name": "digits", "version": 2},
                                                               "devices": halves[k]}, timeout_s=20)
                except RpcError as e:
                    out[k] = e

            threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            won = [o for o in out if isinstance(o, dict)]
            lost = [o for o in out if isinstance(o, RpcError)]
            assert len(won) == 1 and len(lost) == 1, out
            rid = won[0]["rollout_id"]
            assert "are already in rollout %s" % rid in str(lost[0])
            winners.append((rid, rig.lease_owner(rid)))
            rig.wait(lambda rid=rid: _ended(clients[0], rid), 30, "rollout %s aborted" % rid)
            rig.wait(lambda: rig.registry_count("rollout_claims") == 0, 20, "devices released")
    finally:
        for c in clients:
            c.close()
    ids = {rid for rid, _ in winners}
    assert rig.registry_count("rollouts") == 4
    # Both controllers answered requests of the race (their own counters, in their heartbeats).
    rig.wait(lambda: all(json.loads(s)["rpc"]["requests"] > 0 for (s,) in rig.query("SELECT stats FROM controllers"))
             and rig.registry_count("controllers") == 2, 10, "requests answered by both controllers")
    for dev_id, d in rig.fleet.devices.items():
        assert d.refused == [], (dev_id, d.refused)
        assert {a.rollout_id for a in d.deploys} <= ids


def _ended(rpc, rollout_id):
    """Abort the rollout without rollbacks; True once it is aborted or had ended (False: try again, e.g.
    a forward to its owner that timed out on a loaded machine)."""
    from fleet.rpc import RpcError

    try:
        rpc.call("rollout.abort", {"rollout_id": rollout_id, "rollback": False}, timeout_s=20)
        return True
    except RpcError as e:
        if "already ended" in str(e):
            return True
        assert "try again" in str(e), str(e)
        return False
