"""agent.toml plus agent.toml.d/*.toml: drop-ins merge over the main file in name order, tables key by
key; errors name the file; `edge-agent config` prints the effective result."""

from __future__ import annotations

import json

import pytest

from edge_agent.cli import main
from edge_agent.config import load_agent_config
from edge_agent.configdir import MAX_DROPINS, merge
from edge_agent.errors import ConfigError


def _write(tmp_path, main_text, dropins):
    conf = tmp_path / "agent.toml"
    conf.write_text(main_text)
    d = tmp_path / "agent.toml.d"
    d.mkdir()
    for name, text in dropins.items():
        (d / name).write_text(text)
    return conf


def test_dropins_merge_in_name_order_over_the_main_file(tmp_path):
    conf = _write(tmp_path, 'device_id = "cam-1"\n[mqtt]\nhost = "broker.site"\nport = 8883\n', {
        "50-later.toml": "[mqtt]\nport = 1884\n[telemetry]\nperiod_s = 30.0\n",
        "10-first.toml": "[mqtt]\nport = 9999\nkeepalive_s = 45\n",
        "README": "not toml, ignored",
        ".hidden.toml": "colour = 1\n",
    })
    cfg = load_agent_config(conf)
    assert cfg.device_id == "cam-1"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive_s) == ("broker.site", 1884, 45)
    assert cfg.telemetry.period_s == 30.0
    assert cfg.engine.backend == "auto"  # untouched: the code's default


def test_without_a_dropin_folder_the_main_file_alone_counts(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text("[mqtt]\nport = 1885\n")
    assert load_agent_config(conf).mqtt.port == 1885


def test_arrays_replace_instead_of_appending():
    assert merge({"a": [1, 2], "t": {"x": 1, "y": 2}}, {"a": [3], "t": {"y": 5}}) == {"a": [3], "t": {"x": 1, "y": 5}}


def test_a_bad_dropin_is_named_in_the_error(tmp_path):
    conf = _write(tmp_path, "[mqtt]\nport = 1883\n", {"20-bad.toml": "[mqtt\n"})
    with pytest.raises(ConfigError, match=r"20-bad\.toml is not valid TOML"):
        load_agent_config(conf)


def test_an_unknown_key_in_a_dropin_is_refused_naming_the_files(tmp_path):
    conf = _write(tmp_path, "", {"30-typo.toml": "[mqtt]\nhots = \"x\"\n"})
    with pytest.raises(ConfigError, match=r"30-typo\.toml.*mqtt\.hots"):
        load_agent_config(conf)


def test_too_many_dropins_are_refused(tmp_path):
    conf = _write(tmp_path, "", {"%03d.toml" % i: "" for i in range(MAX_DROPINS + 1)})
    with pytest.raises(ConfigError, match="drop-in files"):
        load_agent_config(conf)


def test_config_command_prints_the_effective_settings(tmp_path, capsys):
    conf = _write(tmp_path, '[mqtt]\nhost = "b"\n', {"10-x.toml": "[telemetry]\nperiod_s = 7.5\n"})
    assert main(["config", "--config", str(conf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == [str(conf), str(tmp_path / "agent.toml.d" / "10-x.toml")]
    assert out["config"]["mqtt"]["host"] == "b" and out["config"]["telemetry"]["period_s"] == 7.5
    assert main(["config", "--config", str(conf)]) == 0
    text = capsys.readouterr().out
    assert 'telemetry.period_s = 7.5' in text and 'mqtt.port = 1883' in text
