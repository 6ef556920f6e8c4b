"""Command keys and bundle keys stay separate: a controller key that could also sign bundles is refused.

Every `*.pub` in `trust.bundle_keys_dir` may sign bundles, so a command key there (or one key in both
sets) would let whoever holds the controller's key publish models to the fleet.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from agent_helpers import REPO, write_key

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError
from edge_agent.protocol.commands import sign_command
from edge_agent.protocol.messages import PingArgs


def _cfg(tmp_path, command_keys) -> AgentConfig:
    return AgentConfig.model_validate({
        "device_id": "dev1", "state_dir": str(tmp_path / "state"),
        "trust": {"bundle_keys_dir": str(tmp_path / "bundle-keys"), "command_keys": [str(p) for p in command_keys]},
        "engine": {"backend": "onnxruntime"}, "api": {"enabled": False},
    })


def test_agent_refuses_to_start_when_a_command_key_is_also_a_bundle_key(tmp_path):
    write_key(tmp_path / "bundle-keys", "release")
    # The same public key, under another name in a separate folder: the key id gives it away.
    (tmp_path / "command-keys").mkdir()
    shutil.copy(str(tmp_path / "bundle-keys" / "release.pub"), str(tmp_path / "command-keys" / "controller.pub"))
    conf = tmp_path / "agent.toml"
    conf.write_text(
        'device_id = "dev1"\nstate_dir = "%s"\n[trust]\nbundle_keys_dir = "%s"\ncommand_keys = ["%s"]\n'
        "[api]\nenabled = false\n[mqtt]\nport = 1\n"
        % (tmp_path / "state", tmp_path / "bundle-keys", tmp_path / "command-keys" / "controller.pub")
    )
    (tmp_path / "state").mkdir()
    proc = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(conf)], check=False,
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    # One line (Python 3.8 may add cryptography's deprecation warning before it).
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("edge-agent")]
    assert len(err) == 1 and "trusted both for controller commands and for bundles" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "state").iterdir()) == []  # refused before the store was touched


def test_command_key_path_inside_bundle_keys_dir_is_refused_before_the_file_exists(tmp_path):
    write_key(tmp_path / "bundle-keys", "release")
    cfg = _cfg(tmp_path, [tmp_path / "bundle-keys" / "controller.pub"])  # would become a bundle key
    with pytest.raises(ConfigError, match=r"inside trust\.bundle_keys_dir"):
        Agent(cfg).build(with_mqtt=False)
    assert not (tmp_path / "state").exists()
    # The folder itself listed as a command key is the same mistake.
    with pytest.raises(ConfigError, match=r"inside trust\.bundle_keys_dir"):
        Agent(_cfg(tmp_path, [tmp_path / "bundle-keys"])).build(with_mqtt=False)


def test_separate_key_folders_start(tmp_path):
    write_key(tmp_path / "bundle-keys", "release")
    write_key(tmp_path / "command-keys", "controller")
    agent = Agent(_cfg(tmp_path, [tmp_path / "command-keys" / "controller.pub"])).build(with_mqtt=False)
    try:
        assert agent.store.state.last_command_seq == 0
    finally:
        agent.shutdown(timeout_s=1)


def test_bundle_key_added_after_start_makes_commands_refused(tmp_path):
    write_key(tmp_path / "bundle-keys", "release")
    controller = write_key(tmp_path / "command-keys", "controller")
    agent = Agent(_cfg(tmp_path, [tmp_path / "command-keys" / "controller.pub"])).build(with_mqtt=False)
    events = []
    agent.emit = lambda kind, message, **kw: events.append((kind, message))
    try:
        now = int(time.time())
        agent.handle_command(sign_command(PingArgs(nonce="a"), device_id="dev1", seq=1, keys=[controller], now=now))
        assert [k for k, _ in events] == ["command-accepted"] and agent.store.state.last_command_seq == 1
        # An administrator drops the controller key into the bundle-key folder while the agent runs.
        shutil.copy(str(tmp_path / "command-keys" / "controller.pub"), str(tmp_path / "bundle-keys" / "oops.pub"))
        events.clear()
        agent.handle_command(sign_command(PingArgs(nonce="b"), device_id="dev1", seq=2, keys=[controller], now=now))
        assert [k for k, _ in events] == ["command-refused"]
        assert "also a trusted bundle key" in events[0][1]
        assert agent.store.state.last_command_seq == 1  # nothing changed but the event
    finally:
        agent.shutdown(timeout_s=1)
