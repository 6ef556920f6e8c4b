"""`edge-agent selftest` run in-process: passes on a CPU box, fails clearly when asked for TensorRT or when
a backend disagrees, and runs the whole TensorRT path through the double."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.cli import main

pytest.importorskip("onnxruntime")


def _run(capsys, *argv):
    rc = main(["selftest", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _checks(stdout):
    return {c["name"]: c for c in json.loads(stdout)["checks"]}


def test_cpu_box_passes_and_reports_tensorrt_unavailable(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # as on a box without TensorRT
    rc, out, _ = _run(capsys, "--json")
    checks = _checks(out)
    assert rc == 0
    assert checks["tensorrt"]["status"] == "skip" and "unavailable" in checks["tensorrt"]["detail"]
    assert checks["onnxruntime inference"]["status"] == "ok"
    assert checks["onnxruntime inference"]["max_rel_diff"] < 1e-5
    assert checks["memory budget"]["status"] == "ok"
    assert checks["backend"]["backend"] == "onnxruntime"


def test_require_tensorrt_without_tensorrt_fails_with_reason(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    rc, out, err = _run(capsys, "--require-tensorrt")
    assert rc == 1
    assert "selftest failed: tensorrt" in err
    assert "unavailable" in out


def test_backend_tensorrt_configured_without_tensorrt_fails(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    rc, out, _ = _run(capsys, "--backend", "tensorrt", "--json")
    assert rc == 1
    assert _checks(out)["backend"]["status"] == "FAIL"


def test_wrong_onnxruntime_answer_fails_the_selftest(capsys, monkeypatch, tmp_path):
    from edge_agent import selftest

    ref = dict(np.load(str(selftest.tiny_reference_path())))
    ref["logits"] = ref["logits"] + 0.5
    bad = tmp_path / "ref.npz"
    np.savez(str(bad), **ref)
    monkeypatch.setattr(selftest, "tiny_reference_path", lambda: bad)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    rc, out, err = _run(capsys, "--json")
    assert rc == 1
    assert _checks(out)["onnxruntime inference"]["status"] == "FAIL"
    assert "onnxruntime inference" in err


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"", None])
def test_unreadable_reference_file_is_a_failed_check_not_a_traceback(capsys, monkeypatch, tmp_path, content):
    from edge_agent import selftest

    bad = tmp_path / "ref.npz"
    if content is None:  # a valid npz without the inputs
        ref = dict(np.load(str(selftest.tiny_reference_path())))
        del ref["image"]
        np.savez(str(bad), **ref)
    else:
        bad.write_bytes(content)
    monkeypatch.setattr(selftest, "tiny_reference_path", lambda: bad)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    rc, out, err = _run(capsys, "--json")
    assert rc == 1
    check = _checks(out)["reference data"]
    assert check["status"] == "FAIL" and "reinstall" in check["detail"] and "\n" not in check["detail"]
    assert "Traceback" not in err and "reference data" in err


def test_reference_file_is_read_through_the_bounded_loader(capsys, monkeypatch):
    import edge_agent.npz

    calls = []
    real = edge_agent.npz.load_npz
    monkeypatch.setattr(edge_agent.npz, "load_npz", lambda p, **kw: calls.append(p) or real(p, **kw))
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    rc, out, _ = _run(capsys, "--json")
    assert rc == 0 and _checks(out)["onnxruntime inference"]["status"] == "ok"
    assert len(calls) == 1 and calls[0].name == "tiny_reference.npz"


def test_tensorrt_path_builds_runs_and_matches_onnxruntime(capsys, trt_double):
    rc, out, _ = _run(capsys, "--require-tensorrt", "--json")
    checks = _checks(out)
    assert rc == 0, out
    assert checks["tensorrt"]["status"] == "ok"
    assert checks["tensorrt build"]["status"] == "ok"
    assert checks["tensorrt inference"]["status"] == "ok"
    assert checks["tensorrt inference"]["max_rel_diff"] < 1e-5
    assert checks["backend"]["backend"] == "tensorrt"
    assert checks["platform"]["platform_key"] == "trt8.5.2.2-sm72"


def test_tensorrt_build_failure_fails_the_selftest(capsys, trt_double, monkeypatch):
    monkeypatch.setenv("TRT_DOUBLE_BUILD_FAIL", "1")
    rc, out, _ = _run(capsys, "--json")
    assert rc == 1
    assert "double told to fail" in _checks(out)["tensorrt build"]["detail"]
