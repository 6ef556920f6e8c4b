"""The trusted time floor has an upper bound (`edge_agent/protocol/trusted_time.py`).

Before, one validly signed bundle created in 2100, or a command issued a day ahead (a build host or
controller whose clock runs ahead), moved the floor there, and afterwards every bundle was "expired" and
every command refused — rollback included — until that date. Each attack is refused (or cannot move the
floor) and `state.json` shows it; an RTC-less device at 1970 keeps working; a signed `reset-time-floor`
command repairs a floor that was pushed ahead."""

from __future__ import annotations

import json
import time

import pytest
from agent_helpers import build_sample_bundle, write_key

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.errors import ExpiredError, ManifestError
from edge_agent.protocol.commands import sign_command
from edge_agent.protocol.messages import PingArgs, ResetTimeFloorArgs
from edge_agent.protocol.trusted_time import EARLIEST_PLAUSIBLE_TIME, clock_is_plausible, future_reason, raised_floor

DAY = 86400
YEAR_2100 = 4102444800
SKEW = 3600


# ------------------------------------------------------------------------------------------ the rule


def test_floor_never_passes_a_plausible_clock_plus_skew():
    now = EARLIEST_PLAUSIBLE_TIME + 300 * DAY
    assert future_reason(now + SKEW + 1, clock=now, floor=now - DAY, skew_s=SKEW) is not None
    assert future_reason(now + SKEW, clock=now, floor=now - DAY, skew_s=SKEW) is None
    floor, _ = raised_floor(now - DAY, YEAR_2100, source="bundle", seen={}, clock=now, skew_s=SKEW)
    assert floor == now + SKEW


def test_implausible_clock_floor_rises_only_to_what_both_signers_vouch_for():
    now = EARLIEST_PLAUSIBLE_TIME + 300 * DAY
    assert not clock_is_plausible(0, 0, SKEW)  # 1970: before this release existed
    assert not clock_is_plausible(now - 2 * SKEW, now, SKEW)  # behind a time already proven
    assert future_reason(YEAR_2100, clock=0, floor=now, skew_s=SKEW) is None  # nothing to compare with
    floor, seen = raised_floor(now, YEAR_2100, source="bundle", seen={}, clock=0, skew_s=SKEW)
    assert floor == now and seen == {"bundle": YEAR_2100, "command": 0}
    floor, seen = raised_floor(floor, now + 60, source="command", seen=seen, clock=0, skew_s=SKEW)
    assert floor == now + 60  # the controller's time, not 2100


# ------------------------------------------------------------------------------------------ the agent


@pytest.fixture
def keys(tmp_path):
    return {"release": write_key(tmp_path / "bundle-keys", "release"),
            "controller": write_key(tmp_path / "command-keys", "controller")}


@pytest.fixture
def agent(tmp_path, keys):
    cfg = AgentConfig.model_validate({
        "device_id": "dev1", "state_dir": str(tmp_path / "state"),
        "trust": {"bundle_keys_dir": str(tmp_path / "bundle-keys"), "max_clock_skew_s": SKEW,
                  "command_keys": [str(tmp_path / "command-keys" / "controller.pub")]},
        "engine": {"backend": "onnxruntime", "tune_iterations": 3, "max_batch_limit": 8},
        "api": {"enabled": False},
    })
    a = Agent(cfg).build(with_mqtt=False)
    a.events = []
    a.emit = lambda kind, message, **kw: a.events.append((kind, message))
    yield a
    a.shutdown(timeout_s=1)


class Controller:
    """Signs commands for dev1 with increasing sequence numbers."""

    def __init__(self, key) -> None:
        self.key = key
        self.seq = 0

    def __call__(self, args, *, now: int) -> bytes:
        self.seq += 1
        return sign_command(args, device_id="dev1", seq=self.seq, keys=[self.key], now=now)


def _state(agent) -> bytes:
    return agent.store.state_path.read_bytes()


def _kinds(agent):
    return [k for k, _ in agent.events]


def test_bundle_created_in_2100_is_refused_and_does_not_move_the_floor(tmp_path, keys, agent):
    now = int(time.time())
    ctl = Controller(keys["controller"])
    agent.handle_command(ctl(PingArgs(nonce="a"), now=now))
    before = _state(agent)
    future = build_sample_bundle(tmp_path / "b", keys["release"], version=1, now=YEAR_2100)
    with pytest.raises(ManifestError, match="ahead of the device clock"):
        agent.deployer.install_file(future, max_bundle_bytes=1 << 30)
    assert _state(agent) == before  # floor, versions, active: nothing moved
    assert not list(agent.store.objects_dir.iterdir())
    # Everything dated now still works: the device is not locked out.
    agent.handle_command(ctl(PingArgs(nonce="b"), now=now))
    assert _kinds(agent)[-1] == "command-accepted"
    fresh = build_sample_bundle(tmp_path / "b", keys["release"], version=2, now=now)
    assert agent.deployer.install_file(fresh, max_bundle_bytes=1 << 30).version == 2
    assert agent.store.state.time_floor <= int(time.time()) + SKEW


def test_command_issued_a_day_ahead_is_refused_and_does_not_move_the_floor(keys, agent):
    now = int(time.time())
    ctl = Controller(keys["controller"])
    agent.handle_command(ctl(PingArgs(nonce="a"), now=now))
    before = _state(agent)
    agent.handle_command(ctl(PingArgs(nonce="fast clock"), now=now + DAY))
    assert _kinds(agent)[-1] == "command-refused" and "ahead of the device clock" in agent.events[-1][1]
    assert _state(agent) == before
    agent.handle_command(ctl(PingArgs(nonce="c"), now=now))  # a controller with the right time still works
    assert _kinds(agent)[-1] == "command-accepted"
    assert json.loads(_state(agent))["time_floor"] <= now + SKEW


def test_clock_at_1970_keeps_working_and_one_fast_signer_cannot_move_the_floor(tmp_path, keys, agent):
    now = int(time.time())
    ctl = Controller(keys["controller"])
    agent.deployer.clock = lambda: 0.0  # a Jetson without an RTC that booted before NTP
    fresh = build_sample_bundle(tmp_path / "b", keys["release"], version=1, now=now)
    stale = build_sample_bundle(tmp_path / "b", keys["release"], version=2, now=now - 3 * DAY, expires_in_days=1)
    future = build_sample_bundle(tmp_path / "b", keys["release"], version=3, now=YEAR_2100)
    agent.handle_command(ctl(PingArgs(nonce="a"), now=now))
    assert _kinds(agent)[-1] == "command-accepted"
    assert agent.store.state.time_floor == 0  # one signer alone (the controller) does not set it
    agent.deployer.install_file(fresh, max_bundle_bytes=1 << 30)
    assert agent.store.state.time_floor == now  # both signers now vouch for `now`
    # The floor stands in for the clock: v2 expired before it.
    with pytest.raises(ExpiredError):
        agent.deployer.install_file(stale, max_bundle_bytes=1 << 30)
    # A bundle dated 2100 is not refused for its date (the device cannot tell) but cannot move the floor.
    assert agent.deployer.install_file(future, max_bundle_bytes=1 << 30).version == 3
    assert agent.store.state.time_floor == now
    agent.handle_command(ctl(PingArgs(nonce="b"), now=now + 60))
    assert _kinds(agent)[-1] == "command-accepted" and agent.store.state.time_floor == now + 60


def test_floor_pushed_to_2100_is_repaired_by_a_signed_reset_command(keys, agent):
    now = int(time.time())
    ctl = Controller(keys["controller"])
    agent.store.update_state(time_floor=YEAR_2100)  # written by an agent before the bound existed
    agent.handle_command(ctl(PingArgs(nonce="locked out"), now=now))
    assert _kinds(agent)[-1] == "command-refused" and "expired" in agent.events[-1][1]
    agent.handle_command(ctl(ResetTimeFloorArgs(reason="controller clock was wrong"), now=now))
    assert "time-floor-reset" in _kinds(agent)
    st = agent.store.state
    assert st.time_floor == now and st.signed_time_seen == {"bundle": now, "command": now}
    agent.handle_command(ctl(PingArgs(nonce="back"), now=now + 1))
    assert _kinds(agent)[-1] == "command-accepted"


def test_reset_command_is_still_a_signed_command(keys, agent):
    """The recovery path is no way around the command checks: untrusted keys and replays are refused."""
    from edge_agent.signing import PrivateKey

    now = int(time.time())
    agent.store.update_state(time_floor=YEAR_2100, last_command_seq=5)
    before = _state(agent)
    rogue = sign_command(ResetTimeFloorArgs(), device_id="dev1", seq=10, keys=[PrivateKey.generate()], now=now)
    replay = sign_command(ResetTimeFloorArgs(), device_id="dev1", seq=5, keys=[keys["controller"]], now=now)
    stale = sign_command(ResetTimeFloorArgs(), device_id="dev1", seq=11, keys=[keys["controller"]], now=now - DAY)
    for raw in (rogue, replay, stale):
        agent.handle_command(raw)
        assert _kinds(agent)[-1] == "command-refused"
    assert _state(agent) == before
