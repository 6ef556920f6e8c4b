"""`fleet router calibrate` and `fleet router fit-head`, run in-process on a real signed sample bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.runtime.router import LinearHead
from fleet.cli import main as fleet_main
from tests._runtime_helpers import DIGITS


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    assert fleet_main(["keygen", "--out", str(d), "--name", "release"]) == 0
    out = d / "digits.bundle"
    rc = fleet_main(
        ["bundle", "build", str(DIGITS / "bundle.toml"), "--key", str(d / "release.key"), "--out", str(out)]
    )
    assert rc == 0
    return out


def test_calibrate_prints_a_table_recommends_tau_by_its_bound_and_checks_it_on_held_out_data(bundle, tmp_path,
                                                                                            capsys):
    plot, js = tmp_path / "curve.png", tmp_path / "sweep.json"
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "calib.npz"),
                     "--max-accuracy-drop", "3", "--plot", str(plot), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "large fraction" in out and "drop bound" in out and "<- recommended" in out
    assert "recommended tau =" in out and "95% upper bound" in out
    assert "held-out check (108 items never used to choose tau)" in out and "95% interval on the loss" in out
    assert "note: the 95% confidence bound binds" in out  # the point estimate alone would pick fewer large calls
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    best = doc["recommended"]
    assert doc["calibration_items"] == 252 and doc["heldout_items"] == 108 and best["items"] == 252
    assert best["drop_upper_pts"] <= 3.0 and best["drop_upper_pts"] >= best["drop_pts"]
    assert 0.5 <= best["tau"] <= 0.999
    # The recommendation is the cheapest row whose *bound* qualifies: every row with fewer large calls misses it.
    cheaper = [r for r in doc["rows"] if r["large_fraction"] < best["large_fraction"]]
    assert cheaper and all(r["drop_upper_pts"] > 3.0 for r in cheaper)
    assert any(r["drop_pts"] <= 3.0 for r in cheaper)  # ...although some of them meet it by the point estimate
    check = doc["heldout_check"]
    lo, hi = check["loss_interval_pts"]
    assert check["items"] == 108 and 0.0 <= lo <= check["losses"] / 108 * 100 <= hi
    # Large fraction grows with τ for the confidence gate.
    fr = [r["large_fraction"] for r in sorted(doc["rows"], key=lambda r: r["tau"])]
    assert fr == sorted(fr)


def test_a_budget_the_data_cannot_certify_is_refused_with_the_data_needed(bundle, capsys):
    """360 items cannot bound a 0.5-point loss at 95 % (a loss-free bound needs 598): the old point-estimate
    choice overfitted exactly here; now the tool says so instead of recommending."""
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "calib.npz"),
                     "--max-accuracy-drop", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "bound on the accuracy drop within 0.5 points" in err and "needs 598 items" in err


def test_a_tighter_accuracy_bound_sends_more_to_large(bundle, tmp_path):
    picks = []
    for drop in ("3.0", "2.0"):
        js = tmp_path / ("s%s.json" % drop)
        assert fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "calib.npz"),
                           "--max-accuracy-drop", drop, "--json", str(js)]) == 0
        picks.append(json.loads(js.read_text())["recommended"])
    assert picks[1]["large_fraction"] > picks[0]["large_fraction"]
    assert picks[1]["drop_upper_pts"] < picks[0]["drop_upper_pts"]


def test_clopper_pearson_matches_scipy_and_the_split_is_disjoint():
    from scipy.stats import beta

    from edge_agent.runtime.calibration import binomial_interval, binomial_upper, split_holdout

    for k, n in ((0, 252), (3, 252), (17, 1000), (1, 5)):
        assert binomial_upper(k, n, 0.05) == pytest.approx(beta.ppf(0.95, k + 1, n - k), abs=1e-9)
        lo, hi = binomial_interval(k, n, 0.95)
        assert hi == pytest.approx(beta.ppf(0.975, k + 1, n - k), abs=1e-9)
        assert lo == (0.0 if k == 0 else pytest.approx(beta.ppf(0.025, k, n - k + 1), abs=1e-9))
    cal, val = split_holdout(360, 0.3, seed=4)
    assert len(val) == 108 and len(cal) == 252 and not set(cal) & set(val) and len(set(cal) | set(val)) == 360


def test_binding_notes_name_the_tau_bound_that_decided():
    """Synthetic scores where every item is one the small model gets right except low-confidence ones:
    the best τ lies under the bundle's tau_min, which the note must say."""
    from edge_agent.runtime.calibration import CalibrationData, binding_notes, candidate_taus, recommend, sweep

    rng = np.random.default_rng(1)
    scores = rng.uniform(0.3, 1.0, 2000)
    small_ok = scores > 0.32
    data = CalibrationData(gate="confidence", scores=scores, small_correct=small_ok,
                           large_correct=np.ones(2000, bool), cost_small_ms=0.1, cost_large_ms=1.0,
                           small_always_runs=True)
    rows = sweep(data, candidate_taus(scores, 0.6, 0.99))
    best = recommend(rows, max_drop_pts=1.0)
    notes = binding_notes(data, best, tau_min=0.6, tau_max=0.99, max_drop_pts=1.0, confidence=0.95)
    assert best is not None and best["tau"] == 0.6
    assert any(n.startswith("the bundle's tau_min = 0.6 binds") for n in notes), notes


def test_bad_data_files_are_one_line_errors(bundle, tmp_path, capsys):
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(tmp_path / "nolabels.npz")])
    err = capsys.readouterr().err
    assert rc == 1 and "needs arrays `x`" in err and "Traceback" not in err
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 9), np.float32), y=np.zeros(4, np.int64))
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(tmp_path / "shape.npz")])
    assert rc == 1 and "the model input wants (1, 8, 8)" in capsys.readouterr().err
    rc = fleet_main(["router", "calibrate", str(tmp_path / "missing.bundle"), "--data", str(DIGITS / "calib.npz")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.bundle").write_bytes(b"not a tar" * 100)
    rc = fleet_main(["router", "calibrate", str(tmp_path / "junk.bundle"), "--data", str(DIGITS / "calib.npz")])
    assert rc == 1 and "junk.bundle" in capsys.readouterr().err


def test_linear_gate_needs_a_head_then_calibrates_with_a_fitted_one(bundle, tmp_path, capsys):
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "calib.npz"), "--gate", "linear"])
    assert rc == 1 and "needs a head" in capsys.readouterr().err
    head = tmp_path / "head.npz"
    assert fleet_main(["router", "fit-head", str(bundle), "--data", str(DIGITS / "calib.npz"), "--out", str(head)]) == 0
    assert "wrote" in capsys.readouterr().out
    h = LinearHead.load(head)
    assert h.source == "features" and h.dim == 16
    js = tmp_path / "lin.json"
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "heldout.npz"), "--gate", "linear",
                     "--head", str(head), "--json", str(js)])
    assert rc in (0, 1)  # a bound this head cannot meet is reported as an error line, not a crash
    doc = json.loads(js.read_text())
    assert doc["gate"] == "linear" and len(doc["rows"]) > 10
    # On held-out data the head must rank the small model's mistakes above its correct answers.
    from edge_agent.engines.ort import OrtEngine

    with np.load(str(DIGITS / "heldout.npz")) as z:
        x, y = z["x"], z["y"]
    small = OrtEngine(DIGITS / "small.onnx", max_batch=len(x))
    out = small.infer({"image": x})
    small.close()
    wrong = out["logits"].argmax(axis=1) != y
    s = h.scores(out["features"])
    assert wrong.any() and s[wrong].mean() > s[~wrong].mean() + 0.1


def test_unpacked_bundle_folder_works_too(bundle, tmp_path):
    from edge_agent.bundle.archive import read_bundle, unpack_bundle
    from edge_agent.bundle.verify import read_unverified

    raw, reader = read_bundle(bundle, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
    reader.close()
    folder = unpack_bundle(bundle, tmp_path / "b", read_unverified(raw, max_manifest_bytes=1 << 20),
                           max_bundle_bytes=1 << 30)
    assert (Path(folder) / "manifest.json").exists()
    assert fleet_main(["router", "calibrate", str(folder), "--data", str(DIGITS / "calib.npz"),
                       "--max-accuracy-drop", "3"]) == 0


def test_negative_accuracy_drop_is_a_usage_error(bundle, capsys):
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "calib.npz"),
                     "--max-accuracy-drop", "-1"])
    assert rc == 2 and "must be >= 0" in capsys.readouterr().err
    rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(DIGITS / "calib.npz"), "--holdout", "1"])
    assert rc == 2 and "--holdout" in capsys.readouterr().err
