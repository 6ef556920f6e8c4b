"""The signed recovery path for a trusted time floor pushed ahead, with real processes: mosquitto,
`fleet serve`, `edge-agent run`. A device whose floor says 2100 refuses every deploy as expired;
`fleet reset-time-floor` repairs it, and the same deploy then succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from agent_helpers import REPO, FleetRig, build_sample_bundle, stop_process

from edge_agent.bundle.store_state import StoreState

pytestmark = pytest.mark.mqtt

YEAR_2100 = 4102444800


@pytest.fixture
def rig(broker, tmp_path):
    r = FleetRig(broker, tmp_path)
    yield r
    r.close()


def test_floor_pushed_to_2100_locks_deploys_out_until_fleet_reset_time_floor(rig):
    bundle = build_sample_bundle(rig.tmp / "bundles", rig.release_key, version=1)
    p = rig.start_agent("dev1")
    assert stop_process(p) == 0
    state_path = rig.tmp / "state-dev1" / "state.json"
    st = StoreState.model_validate(json.loads(state_path.read_bytes())) if state_path.exists() else StoreState()
    st.time_floor = YEAR_2100  # what an agent without the bound was left with
    state_path.write_text(json.dumps(st.model_dump(mode="json")))
    rig.start_agent("dev1")
    locked = rig.push(bundle, ["dev1"], wait=30)
    assert locked.returncode == 1 and "expired" in locked.stdout, locked.stdout + locked.stderr
    res = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "reset-time-floor", "--devices", "dev1", "--config", str(rig.fleet_toml),
         "--reason", "build host clock was wrong", "--wait", "30"],
        capture_output=True, text=True, cwd=str(REPO), timeout=90, check=False)
    assert res.returncode == 0 and "floor reset" in res.stdout, res.stdout + res.stderr
    assert rig.state("dev1")["time_floor"] <= int(time.time()) + 5
    ok = rig.push(bundle, ["dev1"], wait=60)
    assert ok.returncode == 0 and "activated" in ok.stdout, ok.stdout + ok.stderr + rig.logs("dev1")
    assert rig.state("dev1")["active"]["version"] == 1
