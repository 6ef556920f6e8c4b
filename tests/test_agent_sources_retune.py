"""A real `edge-agent run` process with `[[sources]]` and the `retune` command (real mosquitto, real
`fleet serve`, real ONNX models on the CPU backend).

* An image-folder source (held-out digits written as PNG files) is read once a model serves; every
  image's answer arrives on `{p}/devices/{id}/results` as a `Result`, and the answers are right.
* A signed `retune` command re-measures the serving engines' batch sizes: one `batch-tuned` event per
  model, and the device keeps serving.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from agent_helpers import REPO, FleetRig, build_sample_bundle, stop_process

from edge_agent.protocol import topics
from edge_agent.protocol.messages import Result, RetuneArgs

pytestmark = pytest.mark.mqtt

N_IMAGES = 20
TIMEOUT = 60


def _write_pngs(folder, n):
    import cv2

    data = np.load(str(REPO / "samples" / "digits" / "heldout.npz"))
    x, y = data["x"][:n], data["y"][:n]
    folder.mkdir()
    labels = {}
    for i in range(n):
        name = "digit-%03d.png" % i
        img = np.clip(np.rint(x[i, 0] * 255.0), 0, 255).astype(np.uint8)  # 8x8 grayscale, as the bundle expects
        assert cv2.imwrite(str(folder / name), img)
        labels[name] = int(y[i])
    return labels


class _Results:
    """Collects `Result` messages from every device (a real MQTT subscriber)."""

    def __init__(self, broker) -> None:
        from edge_agent.config import MqttConfig
        from edge_agent.mqtt.session import MqttSession

        self.items = []
        self.lock = threading.Lock()
        self.session = MqttSession(MqttConfig(host=broker.host, port=broker.port), client_id="results-watch")
        self.session.subscribe("edge/v1/devices/+/results", self._on, qos=0)
        self.session.start()
        assert self.session.wait_connected(10)

    def _on(self, msg) -> None:
        r = Result.from_json(msg.payload)
        assert msg.topic == topics.results("edge/v1", r.device_id)
        with self.lock:
            self.items.append(r)

    def wait(self, n, timeout_s):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.items) >= n:
                    return list(self.items)
            time.sleep(0.1)
        with self.lock:
            return list(self.items)


@pytest.fixture
def rig(broker, tmp_path):
    r = FleetRig(broker, tmp_path)
    yield r
    r.close()


def test_image_folder_source_results_arrive_on_the_broker(rig, broker, tmp_path):
    labels = _write_pngs(tmp_path / "frames", N_IMAGES)
    bundle = build_sample_bundle(tmp_path / "build", rig.release_key, version=1)
    results = _Results(broker)
    try:
        proc = rig.start_agent(
            "cam-1", extra='[[sources]]\nname = "digits-folder"\nuri = "%s"\n' % (tmp_path / "frames"))
        res = rig.push(bundle, ["cam-1"], wait=TIMEOUT)
        assert res.returncode == 0, res.stdout + res.stderr + rig.logs("cam-1")
        got = results.wait(N_IMAGES, TIMEOUT)
        time.sleep(0.5)  # nothing more than one answer per image
        got = list(results.items)
    finally:
        results.session.stop()
    assert len(got) == N_IMAGES, rig.logs("cam-1")
    assert sorted(r.frame for r in got) == list(range(N_IMAGES))
    assert {r.output["file"] for r in got} == set(labels)
    for r in got:
        assert r.device_id == "cam-1" and r.source == "digits-folder" and r.route in ("small", "large")
        assert (r.bundle.name, r.bundle.version) == ("digits", 1) and r.latency_ms > 0
    right = sum(int(r.output["top"][0]["label"]) == labels[r.output["file"]] for r in got)
    assert right >= N_IMAGES - 2, [(r.output["file"], r.output["top"][0]) for r in got]
    assert rig.watcher.find("cam-1", "source-connected")
    # SIGTERM: the source is stopped with the agent, which exits cleanly.
    assert stop_process(proc) == 0, rig.logs("cam-1")


def test_retune_command_reports_batch_tuned_per_model_and_keeps_serving(rig, tmp_path):
    bundle = build_sample_bundle(tmp_path / "build", rig.release_key, version=1)
    rig.start_agent("dev-rt")
    res = rig.push(bundle, ["dev-rt"], wait=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr + rig.logs("dev-rt")
    w = rig.watcher
    before = len(w.find("dev-rt", "batch-tuned"))
    cmd = rig.pusher().sign("dev-rt", RetuneArgs())
    seq = json.loads(cmd)["signed"]["seq"]
    rig.publish_raw_command("dev-rt", cmd)
    w.wait_for(lambda: len(w.find("dev-rt", "batch-tuned")) >= before + 2, TIMEOUT, "batch-tuned after retune")
    tuned = w.find("dev-rt", "batch-tuned")[before:]
    assert sorted(e["data"]["model"] for e in tuned) == ["large", "small"]
    assert all(1 <= e["data"]["batch"] <= e["data"]["max_batch"] for e in tuned)
    accepted = [e for e in w.find("dev-rt", "command-accepted") if e["command_seq"] == seq]
    assert accepted and accepted[0]["data"]["kind"] == "retune"
    assert not [e for e in w.find("dev-rt", "command-refused") if e["command_seq"] == seq]
    w.wait_for(lambda: w.status["dev-rt"].get("last_command_seq") == seq, 10, "status after retune")
    st = w.status["dev-rt"]
    assert st["ready"] and st["active"]["version"] == 1
