"""`edge-agent status/install` and `fleet push` argument and error handling, run in-process."""

from __future__ import annotations

import json

from edge_agent.cli import main as agent_main
from fleet.cli import main as fleet_main


def _agent_toml(tmp_path, extra=""):
    p = tmp_path / "agent.toml"
    p.write_text('device_id = "dev1"\nstate_dir = "%s"\n%s' % (tmp_path / "state", extra))
    return p


def test_status_offline_on_a_fresh_device(tmp_path, capsys):
    rc = agent_main(["status", "--config", str(_agent_toml(tmp_path)), "--offline", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["active"] is None and out["deploy"]["state"] == "idle" and out["broker"] is None
    assert not (tmp_path / "state").exists()  # status never creates or writes state


def test_status_table_shows_unreachable_broker(tmp_path, capsys):
    from mqtt_broker import free_port

    cfg = _agent_toml(tmp_path, "[mqtt]\nport = %d\n" % free_port())
    rc = agent_main(["status", "--config", str(cfg), "--timeout", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "UNREACHABLE" in out and "active" in out


def test_status_with_bad_config_is_one_line_usage_error(tmp_path, capsys):
    p = tmp_path / "agent.toml"
    p.write_text("[mqtt]\nport = 'x'\n")
    rc = agent_main(["status", "--config", str(p), "--offline"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "mqtt.port" in err


def test_install_missing_bundle_is_one_line_error(tmp_path, capsys):
    rc = agent_main(["install", str(tmp_path / "nope.bundle"), "--config", str(_agent_toml(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist" in err and "Traceback" not in err


def test_install_of_a_non_bundle_file_refused_and_state_untouched(tmp_path, capsys):
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"this is not a tar archive" * 100)
    rc = agent_main(["install", str(junk), "--config", str(_agent_toml(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("edge-agent: error:")
    assert not list((tmp_path / "state" / "objects" / "sha256").iterdir())
    assert not (tmp_path / "state" / "state.json").exists()


def test_push_refuses_bad_device_ids_and_missing_files(tmp_path, capsys):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('[controller]\nstate_dir = "%s"\n' % (tmp_path / "ctl"))
    rc = fleet_main(["push", str(tmp_path / "b.bundle"), "--devices", "ok,bad/id", "--config", str(cfg)])
    assert rc == 1 and "invalid device id" in capsys.readouterr().err
    rc = fleet_main(["push", str(tmp_path / "b.bundle"), "--devices", "ok", "--config", str(cfg)])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


def test_push_without_controller_key_says_how_to_make_one(tmp_path, capsys):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('[controller]\nstate_dir = "%s"\nkey_file = "%s"\n' % (tmp_path / "ctl", tmp_path / "none.key"))
    bundle = tmp_path / "b.bundle"
    bundle.write_bytes(b"x")
    rc = fleet_main(["push", str(bundle), "--devices", "dev1", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 1 and "fleet keygen" in err and err.count("\n") == 1
