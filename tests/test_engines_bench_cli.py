"""`edge-agent bench --config`: prints the tuner table and the choice for a real bundle (ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.cli import main

pytest.importorskip("onnxruntime")

SPEC = Path(__file__).resolve().parents[1] / "samples" / "digits" / "bundle.toml"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from edge_agent.bundle.archive import unpack_bundle
    from edge_agent.signing import PrivateKey
    from fleet.bundle_builder import build_bundle

    tmp = tmp_path_factory.mktemp("b")
    manifest = build_bundle(SPEC, PrivateKey.generate("t"), tmp / "d.bundle")
    unpack_bundle(tmp / "d.bundle", tmp / "u", manifest, max_bundle_bytes=1 << 30)
    return tmp / "u"


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text('device_id = "bench-test"\nstate_dir = "%s"\n\n[engine]\nbackend = "onnxruntime"\n'
                 'max_batch_limit = 16\nlatency_slo_ms = 1000.0\n' % (tmp_path / "state"))
    return p


def test_bench_prints_table_and_choice(bundle_dir, tmp_path, capsys):
    (tmp_path / "state").mkdir()
    rc = main(["bench", "--config", str(_config(tmp_path)), "--bundle", str(bundle_dir), "--iterations", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backend onnxruntime" in out and "max batch 16" in out
    assert out.count("choice: batch") == 2 and out.count("<- chosen") == 2
    for b in (1, 2, 4, 8, 16):
        assert "\n%6d " % b in out
    # the choice is persisted in the state dir's engine cache like a retune
    assert len(list((tmp_path / "state" / "engines" / "tuning").glob("*.json"))) == 2


def test_bench_json(bundle_dir, tmp_path, capsys):
    (tmp_path / "state").mkdir()
    rc = main(["bench", "--config", str(_config(tmp_path)), "--bundle", str(bundle_dir), "--iterations", "3",
               "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["engine"]["backend"] == "onnxruntime"
    assert data["tuning"]["large"]["batch"] == data["engine"]["batch_large"]
    assert [m["batch"] for m in data["tuning"]["large"]["table"]] == [1, 2, 4, 8, 16]


def test_bench_without_active_bundle_says_what_to_do(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    rc = main(["bench", "--config", str(_config(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1
    assert "no active bundle" in err and "--bundle" in err


def test_bench_with_missing_bundle_dir_is_one_line_error(tmp_path, capsys):
    rc = main(["bench", "--config", str(_config(tmp_path)), "--bundle", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot read" in err and "Traceback" not in err
