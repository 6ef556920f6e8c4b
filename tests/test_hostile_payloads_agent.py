"""Unsigned hostile payloads on a device's commands topic, against a real mosquitto and a real
`edge-agent run` process: deep nesting (`"[" * 5000` used to raise RecursionError in the worker and end
the agent with exit 1; published retained it crash-looped), huge payloads, deep objects, invalid UTF-8.
Each is refused and counted, the process stays alive, nothing on disk changes, and the agent still obeys
a valid signed command afterwards."""

from __future__ import annotations

import json

import pytest
from agent_helpers import FleetRig, stop_process

from edge_agent.protocol import topics
from edge_agent.protocol.messages import PingArgs

pytestmark = pytest.mark.mqtt

HOSTILE = {
    "nested-array": b"[" * 5000,
    "nested-object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "nested-inside-envelope": b'{"signed":' + b"[" * 100000 + b"]" * 100000 + b',"signatures":[]}',
    "huge": b"[" * (1 << 20),
    "huge-digits": b'{"signed":{"seq":' + b"9" * 60000 + b"}}",
    "invalid-utf8": b'{"signed":"\xff\xfe\xc3\x28"}',
}


@pytest.fixture
def rig(broker, tmp_path):
    r = FleetRig(broker, tmp_path)
    yield r
    r.close()


def _ping(rig, dev: str, nonce: str) -> int:
    """Send a valid signed ping and wait until the agent accepts it; returns its sequence number."""
    raw = rig.pusher().sign(dev, PingArgs(nonce=nonce))
    seq = json.loads(raw)["signed"]["seq"]
    rig.publish_raw_command(dev, raw)
    w = rig.watcher
    w.wait_for(lambda: any(e["command_seq"] == seq for e in w.find(dev, "command-accepted")), 30,
               "signed ping seq %d accepted" % seq)
    return seq


def _state_files(rig, dev: str) -> bytes:
    return (rig.tmp / ("state-" + dev) / "state.json").read_bytes()


def test_unsigned_deeply_nested_huge_and_non_utf8_commands_do_not_crash_the_agent(rig):
    p = rig.start_agent("dev1")
    _ping(rig, "dev1", "before")
    before = _state_files(rig, "dev1")
    w = rig.watcher
    refused_before = len(w.find("dev1", "command-refused"))
    for payload in HOSTILE.values():
        rig.publish_raw_command("dev1", payload)
    w.wait_for(lambda: len(w.find("dev1", "command-refused")) >= refused_before + len(HOSTILE), 30,
               "every hostile payload refused")
    reasons = [e["data"]["reason"] for e in w.find("dev1", "command-refused")[refused_before:]]
    assert any("nests 5000 levels deep" in r for r in reasons), reasons
    assert any("not UTF-8" in r for r in reasons), reasons
    assert any("over the" in r for r in reasons), reasons
    assert p.poll() is None, rig.logs("dev1")
    assert _state_files(rig, "dev1") == before  # a refusal changes nothing on disk
    assert not w.find("dev1", "error"), w.find("dev1", "error")  # refused by the loader, not caught as a bug
    _ping(rig, "dev1", "after")
    assert p.poll() is None
    assert "RecursionError" not in rig.logs("dev1") and "Traceback" not in rig.logs("dev1")


def test_retained_nested_command_does_not_crash_loop_the_agent(rig):
    topic = topics.commands("edge/v1", "dev1")
    session = rig.pusher().session
    assert session.publish(topic, b"[" * 5000, qos=1, retain=True).wait(5)
    try:
        w = rig.watcher
        for start in range(2):  # the retained payload arrives again on every start
            p = rig.start_agent("dev1")
            w.wait_for(lambda n=start + 1: len(w.find("dev1", "command-refused")) >= n, 30, "retained payload refused")
            assert p.poll() is None, rig.logs("dev1")
            _ping(rig, "dev1", "start-%d" % start)
            assert p.poll() is None, rig.logs("dev1")
            assert stop_process(p) == 0
    finally:
        session.publish(topic, b"", qos=1, retain=True).wait(5)
