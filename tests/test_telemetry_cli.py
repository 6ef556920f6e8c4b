"""`edge-agent telemetry`: the device's system reading and a read-only look at its spool."""

from __future__ import annotations

import json

from edge_agent.cli import main
from edge_agent.telemetry.spool import Spool


def _config(tmp_path, **telemetry) -> str:
    lines = ['device_id = "cli-box"', 'state_dir = "%s"' % (tmp_path / "state"), "[telemetry]", "use_jtop = false"]
    lines += ["%s = %s" % kv for kv in telemetry.items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_json_shows_system_reading_and_spool_without_touching_it(tmp_path, capsys):
    cfg = _config(tmp_path, spool_max_messages=3)
    spool = Spool(tmp_path / "state" / "spool", 3)
    for i in range(5):
        spool.append("edge/v1/devices/cli-box/telemetry", b'{"seq": %d}' % i, 0)
    spool.close()
    seg = sorted((tmp_path / "state" / "spool").glob("seg-*"))[-1]
    with open(seg, "ab") as f:
        f.write(b"ESP1\x00")  # a torn record, as after a crash
    before = {p.name: p.read_bytes() for p in (tmp_path / "state" / "spool").iterdir()}

    assert main(["telemetry", "--config", cfg, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device_id"] == "cli-box"
    assert out["system"]["mem_available_mb"] > 0 and "proc" in out["system"]["source"]
    assert out["spool"]["messages"] == 3 and out["spool"]["dropped"] == 2
    assert out["spool"]["oldest_seq"] == 2 and out["spool"]["corrupt_records"] == 1
    after = {p.name: p.read_bytes() for p in (tmp_path / "state" / "spool").iterdir()}
    assert after == before  # read-only: the torn tail is the agent's to trim


def test_table_output_without_a_spool(tmp_path, capsys):
    assert main(["telemetry", "--config", _config(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "memory available" in text and "0 message(s)" in text
    assert not (tmp_path / "state" / "spool").exists()


def test_missing_config_is_a_one_line_error(tmp_path, capsys):
    assert main(["telemetry", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
