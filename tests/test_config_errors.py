"""Configuration mistakes found by the attack exercise, run through the real commands: a config file
that is not UTF-8 gave a traceback from `edge-agent` and `fleet serve` (now one line and the exit
code of a configuration error, 2); `trust.command_keys` naming a folder without any key started
silently and then refused every command (now the agent refuses to start and says why)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import REPO, agent_toml, write_key

from edge_agent.clikit import EXIT_USAGE

NOT_UTF8 = b'device_id = "dev1"\n# caf\xe9 \xff\xfe\n'


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=str(REPO),
                          check=False, timeout=60, stdin=subprocess.DEVNULL)


def _one_line_config_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == EXIT_USAGE, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr


@pytest.mark.parametrize("command", [["run"], ["status"], ["config"]])
def test_non_utf8_agent_config_is_a_one_line_config_error(tmp_path, command):
    cfg = tmp_path / "agent.toml"
    cfg.write_bytes(NOT_UTF8)
    res = _cli("edge_agent.cli", *command, "--config", str(cfg))
    _one_line_config_error(res, str(cfg), "not UTF-8")


def test_non_utf8_agent_config_drop_in_is_a_one_line_config_error(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "dev1"\n', encoding="utf-8")
    (tmp_path / "agent.toml.d").mkdir()
    dropin = tmp_path / "agent.toml.d" / "50-site.toml"
    dropin.write_bytes(NOT_UTF8)
    _one_line_config_error(_cli("edge_agent.cli", "run", "--config", str(cfg)), str(dropin), "not UTF-8")


def test_non_utf8_fleet_config_is_a_one_line_config_error(tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_bytes(b"[mqtt]\nhost = \"\xff\"\n")
    _one_line_config_error(_cli("fleet.cli", "serve", "--config", str(cfg)), str(cfg), "not UTF-8")


def test_command_keys_folder_without_a_key_refuses_to_start(tmp_path):
    write_key(tmp_path / "bundle-keys", "release")
    empty = tmp_path / "command-keys"
    empty.mkdir()
    cfg = agent_toml(tmp_path / "agent.toml", device_id="dev1", state_dir=tmp_path / "state", port=1,
                     bundle_keys=tmp_path / "bundle-keys", command_key=empty)
    res = _cli("edge_agent.cli", "run", "--config", str(cfg))
    _one_line_config_error(res, str(empty), "without any *.pub key")
    # With the key installed, the same configuration passes this check.
    write_key(empty, "controller")
    from edge_agent.agent_commands import check_key_separation
    from edge_agent.config import load_agent_config

    check_key_separation(load_agent_config(Path(cfg)).trust)


def test_oversized_fleet_config_is_a_one_line_config_error(tmp_path):
    from edge_agent.configdir import MAX_FILE_BYTES

    cfg = tmp_path / "fleet.toml"
    cfg.write_bytes(b"# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    _one_line_config_error(_cli("fleet.cli", "serve", "--config", str(cfg)), str(cfg), "at most %d" % MAX_FILE_BYTES)
