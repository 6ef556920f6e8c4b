"""Shadow and A/B deployments end to end with real parts: mosquitto, `fleet serve`, `fleet push` /
`fleet rollout` and `edge-agent run` processes on the CPU backend, live traffic through each agent's
HTTP API, real signed bundles. The disagreeing candidate is a real ONNX model whose output classes are
permuted. Shadow windows are short (the bundles' own `health.shadow_*` gates)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from io import BytesIO
from typing import Dict, List, Optional

import numpy as np
import pytest
from _runtime_helpers import load_split
from agent_helpers import FleetRig, build_sample_bundle
from mqtt_broker import free_port
from shadow_helpers import DIGITS, build_bundle, permuted_model

from edge_agent.protocol.messages import PromoteArgs

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

FAST_GATES = {"shadow_window_s": 2, "shadow_min_inputs": 40, "shadow_min_agreement": 0.98,
              "shadow_max_latency_ratio": 3.0}
X, _ = load_split("heldout")


def _npy(x: np.ndarray) -> bytes:
    buf = BytesIO()
    np.save(buf, x.astype(np.float32))
    return buf.getvalue()


class Client:
    """Posts tensors to one agent's HTTP API and keeps every answer."""

    def __init__(self, port: int) -> None:
        self.url = "http://127.0.0.1:%d/v1/infer" % port
        self.answers: List[dict] = []
        self.codes: Dict[int, int] = {}
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def infer(self, i: int) -> Optional[dict]:
        req = urllib.request.Request(self.url, data=_npy(X[i % len(X)]), method="POST",
                                     headers={"Content-Type": "application/x-npy"})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                body = json.loads(r.read())
                code = r.status
        except urllib.error.HTTPError as e:
            body, code = None, e.code
        self.codes[code] = self.codes.get(code, 0) + 1
        if body is not None:
            body["i"] = i % len(X)
            self.answers.append(body)
        return body

    def start(self, threads: int = 1, pause_s: float = 0.0) -> None:
        def loop(k: int) -> None:
            i = k
            while not self._stop.is_set():
                self.infer(i)
                i += threads
                if pause_s:
                    time.sleep(pause_s)

        for k in range(threads):
            t = threading.Thread(target=loop, args=(k,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self._threads = []
        self._stop.clear()


@pytest.fixture
def rig(broker, tmp_path):
    r = FleetRig(broker, tmp_path)
    yield r
    r.close()


def start_agent(rig: FleetRig, device_id: str, shadow: str = "") -> int:
    """An agent with its HTTP API on a free port and a [shadow] section; returns the port."""
    port = free_port()
    cfg = rig.agent_config(device_id, "[shadow]\n" + shadow)
    text = cfg.read_text().replace("[api]\nenabled = false", "[api]\nenabled = true\nport = %d" % port)
    cfg.write_text(text)
    rig.start_agent(device_id)
    return port


def push(rig: FleetRig, bundle, devices, *args: str, wait: float = 90):
    import subprocess
    import sys

    from agent_helpers import REPO

    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", "push", str(bundle), "--devices", ",".join(devices),
         "--config", str(rig.fleet_toml), "--wait", str(wait), *args],
        check=False, capture_output=True, text=True, cwd=str(REPO), timeout=wait + 60)


def telemetry_listener(rig: FleetRig):
    """A real MQTT client keeping every telemetry message."""
    from edge_agent.config import MqttConfig
    from edge_agent.mqtt.session import MqttSession

    got: List[dict] = []
    s = MqttSession(MqttConfig(host=rig.broker.host, port=rig.broker.port), client_id="tele-%d" % time.time())
    s.subscribe("edge/v1/devices/+/telemetry", lambda m: got.append(json.loads(m.payload)))
    s.start()
    assert s.wait_connected(10) and s.wait_subscribed(10)
    return s, got


def _wait_until(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def _wait_telemetry_after(tele: List[dict], t: float) -> None:
    """Until a telemetry message of a period ending after wall time `t` arrived (it counts the last requests)."""
    _wait_until(lambda: any(m["ts"] > t for m in list(tele)), 15, "a telemetry period after the load")


def test_identical_candidate_is_promoted_automatically_and_the_shadow_rollout_advances_its_waves(
        rig, tmp_path, capsys):
    from fleet.cli import main

    devs = ["edge-a", "edge-b"]
    # The candidate is identical, so the verdict must come from agreement; the latency gate (tested in
    # test_shadow_logic) gets a wide slack: on a shared CI machine a 2 s window's p99 of a sub-millisecond
    # model spiked to 5.5 ms once (vs 0.9 ms active) and refused the twin.
    ports = {d: start_agent(rig, d, "mirror_fraction = 0.5\nreport_interval_s = 1.0\nlatency_slack_ms = 50.0\n")
             for d in devs}
    key = rig.release_key
    v1 = build_sample_bundle(tmp_path / "b", key, version=1)
    res = push(rig, v1, devs)
    assert res.returncode == 0, res.stdout + res.stderr
    v2 = build_bundle(tmp_path / "b", key, version=2, health=FAST_GATES)
    clients = {d: Client(ports[d]) for d in devs}
    for c in clients.values():
        c.start(threads=2, pause_s=0.005)
    try:
        capsys.readouterr()
        rc = main(["rollout", "start", str(v2), "--mode", "shadow", "--waves", "50,100", "--config",
                   str(rig.fleet_toml), "--watch", "--interval", "0.5", "--watch-timeout", "120"])
        out = capsys.readouterr()[0]
        assert rc == 0, out + "".join(rig.logs(d) for d in devs)
        rid = out.split("started rollout ")[1].split()[0]
        capsys.readouterr()
        assert main(["rollout", "status", rid, "--config", str(rig.fleet_toml)]) == 0
        table = capsys.readouterr()[0]
    finally:
        for c in clients.values():
            c.stop()
    for d in devs:
        kinds = rig.watcher.kinds(d)
        i = kinds.index("shadow-started")
        assert "promoted" in kinds[i:] and "candidate-refused" not in kinds[i:], kinds
        (prom,) = rig.watcher.find(d, "promoted")
        assert prom["rollout_id"] == rid and "automatically" in prom["message"]
        assert prom["data"]["agreement"] == 1.0 and prom["data"]["compared"] >= FAST_GATES["shadow_min_inputs"]
        st = rig.state(d)
        assert st["active"]["version"] == 2 and st["previous"]["version"] == 1 and st["pending"] is None
        # after the promotion the device serves v2
        assert clients[d].infer(0)["bundle"] == {"name": "digits", "version": 2}
        assert clients[d].codes.get(200, 0) > 50 and set(clients[d].codes) == {200}
    # wave 2 was sent only after wave 1's device was promoted
    first = rig.watcher.find(devs[0], "promoted")[0]["ts"]
    second = rig.watcher.find(devs[1], "shadow-started")[0]["ts"]
    assert second > first
    assert "AGREEMENT" in table and "1.0000" in table and "promoted" in table, table


def test_disagreeing_candidate_is_refused_and_never_serves_a_request(rig, tmp_path):
    dev = "edge-a"
    port = start_agent(rig, dev, "mirror_fraction = 1.0\n")
    key = rig.release_key
    res = push(rig, build_sample_bundle(tmp_path / "b", key, version=1), [dev])
    assert res.returncode == 0, res.stdout + res.stderr
    small = permuted_model(DIGITS / "small.onnx", tmp_path / "perm-small.onnx")
    large = permuted_model(DIGITS / "large.onnx", tmp_path / "perm-large.onnx")
    bad = build_bundle(tmp_path / "b", key, version=2, health=FAST_GATES, small=small, large=large)
    client = Client(port)
    baseline = {i: client.infer(i)["output"] for i in range(40)}
    client.answers.clear()
    sess, tele = telemetry_listener(rig)
    client.start(threads=2, pause_s=0.005)
    try:
        res = push(rig, bad, [dev], "--mode", "shadow")
    finally:
        client.stop()
        sess.stop()
    assert res.returncode == 1 and "candidate refused" in res.stdout, res.stdout + res.stderr + rig.logs(dev)
    (ev,) = rig.watcher.find(dev, "candidate-refused")
    assert "agreement 0.0000" in ev["message"] and ev["data"]["by"] == "gates", ev
    assert "promoted" not in rig.watcher.kinds(dev)
    # every answer during the shadow window came from v1, and is v1's answer
    assert len(client.answers) > 40
    for a in client.answers:
        assert a["bundle"] == {"name": "digits", "version": 1}
        if a["i"] in baseline:
            assert a["output"] == baseline[a["i"]]
    shadow = [t["shadow"] for t in tele if t.get("shadow")]
    assert shadow and sum(s["mirrored"] for s in shadow) >= FAST_GATES["shadow_min_inputs"]
    assert all(s["agreement"] in (None, 0.0) for s in shadow)
    st = rig.state(dev)
    assert st["active"]["version"] == 1 and st["pending"] is None and st["deploy"]["state"] == "failed"
    assert client.infer(1)["bundle"] == {"name": "digits", "version": 1}


def test_ab_split_serves_the_share_with_the_candidate_until_promoted(rig, tmp_path, capsys):
    """`fleet rollout start --mode ab --split 30`, then `fleet rollout promote ID`, through the controller."""
    from fleet.cli import main

    dev = "edge-a"
    port = start_agent(rig, dev)
    key = rig.release_key
    assert push(rig, build_sample_bundle(tmp_path / "b", key, version=1), [dev]).returncode == 0
    v2 = build_bundle(tmp_path / "b", key, version=2)
    capsys.readouterr()
    rc = main(["rollout", "start", str(v2), "--mode", "ab", "--split", "30", "--waves", "100", "--config",
               str(rig.fleet_toml), "--watch", "--interval", "0.5", "--watch-timeout", "90"])
    out = capsys.readouterr()[0]
    assert rc == 0, out + rig.logs(dev)
    rid = out.split("started rollout ")[1].split()[0]
    (started,) = rig.watcher.find(dev, "shadow-started")
    assert started["rollout_id"] == rid and started["data"]["split"] == 30.0
    sess, tele = telemetry_listener(rig)
    client = Client(port)
    client.start(threads=3)
    _wait_until(lambda: len(client.answers) >= 400, 60, "400 answers")
    client.stop()
    _wait_telemetry_after(tele, time.time())
    sess.stop()
    n = len(client.answers)
    share = 100.0 * sum(a["bundle"]["version"] == 2 for a in client.answers) / n
    assert n >= 300 and abs(share - 30.0) <= 3.0, (n, share)
    arms = [t["shadow"]["arms"] for t in tele if t.get("shadow") and t["shadow"]["mode"] == "ab"]
    cand = sum(a["candidate"]["requests"] for a in arms)
    act = sum(a["active"]["requests"] for a in arms)
    assert cand + act >= n and abs(100.0 * cand / (cand + act) - 30.0) <= 3.0
    assert rig.state(dev)["active"]["version"] == 1
    table = ""

    def status_shows_the_share() -> bool:  # once the controller has ingested the arms' telemetry
        nonlocal table
        capsys.readouterr()
        assert main(["rollout", "status", rid, "--config", str(rig.fleet_toml)]) == 0
        table = capsys.readouterr()[0]
        return "CAND SHARE" in table

    _wait_until(status_shows_the_share, 20, "the candidate's share in rollout status")
    assert "30%" in table, table
    assert main(["rollout", "promote", rid, "--config", str(rig.fleet_toml)]) == 0
    rig.watcher.wait_for(lambda: rig.watcher.find(dev, "promoted"), 30, "promoted")
    assert rig.watcher.find(dev, "promoted")[0]["rollout_id"] == rid
    assert rig.state(dev)["active"]["version"] == 2
    assert all(client.infer(i)["bundle"]["version"] == 2 for i in range(20))


def test_shadow_traffic_is_shed_first_under_overload(rig, tmp_path):
    """Eight clients flood the agent: live requests keep being answered and none is refused for the
    candidate's sake, while the mirrored share is dropped (counted in telemetry)."""
    dev = "edge-a"
    port = start_agent(rig, dev, "mirror_fraction = 1.0\nshed_in_flight = 0\n")
    key = rig.release_key
    assert push(rig, build_sample_bundle(tmp_path / "b", key, version=1), [dev]).returncode == 0
    slow_gates = dict(FAST_GATES, shadow_window_s=600)
    res = push(rig, build_bundle(tmp_path / "b", key, version=2, health=slow_gates), [dev], "--mode", "shadow",
               wait=0)
    assert res.returncode == 0
    rig.watcher.wait_for(lambda: rig.watcher.find(dev, "shadow-started"), 60, "shadow-started")
    sess, tele = telemetry_listener(rig)
    client = Client(port)
    client.start(threads=8)
    # Load until the live traffic is well past the assertion below and telemetry shows shedding.
    _wait_until(lambda: client.codes.get(200, 0) > 400 and any(
        (t.get("shadow") or {}).get("dropped", 0) for t in list(tele)), 60, "live answers and dropped mirrors")
    client.stop()
    _wait_telemetry_after(tele, time.time())
    sess.stop()
    shadow = [t for t in tele if t.get("shadow")]
    dropped = sum(t["shadow"]["dropped"] for t in shadow)
    mirrored = sum(t["shadow"]["mirrored"] for t in shadow)
    refused = sum(t["refused"] for t in tele)
    assert client.codes.get(200, 0) > 200 and set(client.codes) == {200}, client.codes
    assert refused == 0
    assert dropped > 0 and dropped + mirrored <= client.codes[200] + 5, (dropped, mirrored)
    assert rig.state(dev)["active"]["version"] == 1


def test_agent_killed_mid_shadow_resumes_the_window_and_operator_decides(rig, tmp_path):
    """kill -9 during a long shadow window: the restarted agent restores v1, prepares the candidate again
    and shadows anew (pending kept); the operator's promote then makes it active at once. A later
    candidate is dropped by a rollback command, and v1... stays reachable through `previous`."""
    from edge_agent.protocol.messages import RollbackArgs

    dev = "edge-a"
    port = start_agent(rig, dev)
    key = rig.release_key
    assert push(rig, build_sample_bundle(tmp_path / "b", key, version=1), [dev]).returncode == 0
    long_gates = dict(FAST_GATES, shadow_window_s=600)
    v2 = build_bundle(tmp_path / "b", key, version=2, health=long_gates)
    assert push(rig, v2, [dev], "--mode", "shadow", wait=0).returncode == 0
    rig.watcher.wait_for(lambda: rig.watcher.find(dev, "shadow-started"), 60, "shadow-started")
    assert rig.state(dev)["pending"]["args"]["mode"] == "shadow"
    rig.agents[dev].kill()
    rig.agents[dev].wait(10)
    rig.start_agent(dev)
    rig.watcher.wait_for(lambda: len(rig.watcher.find(dev, "shadow-started")) == 2, 60, "shadow restarted")
    client = Client(port)
    assert client.infer(0)["bundle"]["version"] == 1  # the active bundle serves, the candidate shadows
    assert rig.pusher().send_command(dev, PromoteArgs(accept=True)).wait(5)
    rig.watcher.wait_for(lambda: rig.watcher.find(dev, "promoted"), 30, "promoted")
    st = rig.state(dev)
    assert st["active"]["version"] == 2 and st["pending"] is None
    assert "by the operator" in rig.watcher.find(dev, "promoted")[0]["message"]
    assert client.infer(0)["bundle"]["version"] == 2

    # a v3 candidate is running when a rollback arrives: it is dropped, then the rollback runs
    v3 = build_bundle(tmp_path / "b", key, version=3, health=long_gates)
    assert push(rig, v3, [dev], "--mode", "shadow", wait=0).returncode == 0
    rig.watcher.wait_for(lambda: any(e["bundle"]["version"] == 3 for e in rig.watcher.find(dev, "shadow-started")),
                         60, "v3 shadow-started")
    assert rig.pusher().send_command(dev, RollbackArgs(reason="test")).wait(5)
    rig.watcher.wait_for(lambda: rig.watcher.find(dev, "rolled-back"), 60, "rolled-back")
    (ref,) = rig.watcher.find(dev, "candidate-refused")
    assert ref["bundle"]["version"] == 3 and "rollback" in ref["message"]
    st = rig.state(dev)
    assert st["active"]["version"] == 1 and st["pending"] is None
    assert client.infer(0)["bundle"]["version"] == 1
