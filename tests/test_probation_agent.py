"""Device-side probation with a real `edge-agent run` process (real mosquitto, `fleet serve`, real ONNX
models on the CPU backend, traffic through the agent's local HTTP API).

Bundle v2 is the sample bundle whose large model gained a branch that yields NaN for inputs brighter
than anything in the golden set (tests/nan_model.py): it passes the golden self-test bit for bit, is
activated, and then fails on an over-exposed camera's frames. Those NaN answers are inference errors,
the error rate breaks the manifest's gate, and the device's own probation rolls it back to v1:
activated → probation-failed → rolled-back, v1 serves again, state.json says so.
"""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
from agent_helpers import SAMPLE_SPEC, FleetRig
from mqtt_broker import free_port
from nan_model import add_nan_branch, golden_max_mean, overexposed

pytestmark = pytest.mark.mqtt

TIMEOUT = 60
DEV = "cam-p"


def _bundle(tmp, key, version: int, *, probation_s: int, large=None):
    """The sample bundle at `version` with its own probation window, optionally another large model."""
    from fleet.bundle_builder import build_bundle

    base = SAMPLE_SPEC.parent
    text = SAMPLE_SPEC.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^version = \d+", "version = %d" % version, text)
    text = re.sub(r"(?m)^probation_s = \d+", "probation_s = %d" % probation_s, text)
    for fname in ("small.onnx", "golden.npz"):
        text = text.replace('"%s"' % fname, '"%s"' % (base / fname))
    text = text.replace('"large.onnx"', '"%s"' % (large or base / "large.onnx"))
    spec = tmp / ("spec-%d.toml" % version)
    spec.write_text(text, encoding="utf-8")
    out = tmp / ("digits-%d.bundle" % version)
    build_bundle(spec, key, out)
    return out


def _post(port: int, x: np.ndarray):
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32))
    req = urllib.request.Request("http://127.0.0.1:%d/v1/infer" % port, data=buf.getvalue(), method="POST",
                                 headers={"Content-Type": "application/x-npy"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _seen(w, kind, version):
    return [e for e in w.find(DEV, kind) if (e.get("bundle") or {}).get("version") == version]


def test_bundle_passing_golden_but_breaking_the_error_rate_gate_is_rolled_back_by_probation(broker, tmp_path):
    from _runtime_helpers import load_split

    rig = FleetRig(broker, tmp_path)
    try:
        key = rig.release_key
        bad_large = add_nan_branch(SAMPLE_SPEC.parent / "large.onnx", tmp_path / "large-nan.onnx",
                                   golden_max_mean(SAMPLE_SPEC.parent / "golden.npz"))
        v1 = _bundle(tmp_path, key, 1, probation_s=1)
        v2 = _bundle(tmp_path, key, 2, probation_s=60, large=bad_large)
        port = free_port()
        cfg = rig.agent_config(DEV)
        text = cfg.read_text().replace("enabled = false", 'enabled = true\nhost = "127.0.0.1"\nport = %d' % port)
        cfg.write_text(text.replace("max_window_s = 0\n", ""))  # the manifest's window, not the rig's 0
        rig.start_agent(DEV)
        w = rig.watcher

        res = rig.push(v1, [DEV], wait=TIMEOUT)
        assert res.returncode == 0, res.stdout + res.stderr + rig.logs(DEV)
        w.wait_for(lambda: _seen(w, "probation-passed", 1), TIMEOUT, "v1 probation passed")

        res = rig.push(v2, [DEV], wait=TIMEOUT)  # returns once v2 is activated: it passed its golden test
        assert res.returncode == 0, res.stdout + res.stderr + rig.logs(DEV)
        assert _seen(w, "selftest-passed", 2) and _seen(w, "activated", 2)

        # Traffic: the usual digits and the same digits from an over-exposed camera.
        x, _ = load_split("heldout")
        statuses = []
        for i in range(200):
            if _seen(w, "rolled-back", 1):
                break
            item = x[i % 100] if i % 2 else overexposed(x[i % 100])
            code, body = _post(port, item[None])
            statuses.append(code)
            if code == 500:
                assert "non-finite value (NaN or Inf)" in body["error"]
        assert statuses.count(500) >= 5, statuses
        assert statuses.count(200) > statuses.count(500)  # normal frames kept being answered
        w.wait_for(lambda: _seen(w, "rolled-back", 1), TIMEOUT, "rollback to v1")

        kinds = [(e["kind"], (e.get("bundle") or {}).get("version")) for e in w.events if e["device_id"] == DEV]
        after = kinds[kinds.index(("activated", 2)):]
        assert [k for k in after if k[0] in ("activated", "probation-failed", "probation-passed", "rolled-back")] == [
            ("activated", 2), ("probation-failed", 2), ("rolled-back", 1)]
        reason = _seen(w, "probation-failed", 2)[0]["message"]
        assert reason.startswith("error rate") and "over the gate 0.01" in reason

        # v1 serves again: over-exposed frames are answered (its large model has no NaN branch).
        for item in overexposed(x[:20]):
            code, body = _post(port, item[None])
            assert code == 200, body
            assert body["bundle"] == {"name": "digits", "version": 1}
        st = rig.state(DEV)
        assert (st["active"]["version"], st["previous"]["version"]) == (1, 2)
        assert st["deploy"]["state"] == "rolled-back" and st["deploy"]["bundle"]["version"] == 1
        assert st["pending"] is None and st["highest_versions"] == {"digits": 2}  # v2 cannot come back
        w.wait_for(lambda: (w.status[DEV].get("deploy") or {}).get("state") == "rolled-back", 10, "status")
        assert w.status[DEV]["active"]["version"] == 1 and w.status[DEV]["ready"]
    finally:
        rig.close()
