"""The vision-sized samples: samples/digits96 (96x96 classifiers) and samples/shapes (YOLO-layout detectors).

Valid ONNX with a dynamic batch axis, golden outputs that reproduce, held-out accuracy and F1 above
stated bounds, and the detector end to end: a signed bundle built and unpacked, ONNX Runtime engines,
the YOLO decode and NMS, a folder source read with OpenCV, the router's detection gate, and the results
published over a real mosquitto and scored against the scenes' ground truth.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("cv2")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
sys.path.insert(0, str(SAMPLES))

import harness  # noqa: E402

DIGITS96 = SAMPLES / "digits96"
SHAPES = SAMPLES / "shapes"

#: Held-out bounds, set under the figures samples/*/README.md record (measured when the models were trained).
SMALL_MIN_ACCURACY = 0.97
LARGE_MIN_ACCURACY = 0.98
#: The router's budget at the bundle's τ (points of accuracy lost against large-only on the heldout split).
ROUTER_MAX_DROP_PTS = 0.5
DETECTOR_MIN_F1 = {"small-only": 0.92, "large-only": 0.93, "router": 0.93}


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, x: np.ndarray):
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"image": x})))


MODELS = [
    (DIGITS96, "small", (1, 96, 96), {"logits": (10,), "features": (64,)}),
    (DIGITS96, "large", (1, 96, 96), {"logits": (10,)}),
    (SHAPES, "small", (3, 128, 128), {"detections": (256, 8)}),
    (SHAPES, "large", (3, 128, 128), {"detections": (256, 8)}),
]


@pytest.mark.parametrize("folder,model,in_shape,outputs", MODELS,
                         ids=["digits96-small", "digits96-large", "shapes-small", "shapes-large"])
def test_onnx_models_are_valid_with_a_dynamic_batch_axis(folder, model, in_shape, outputs):
    import onnx

    path = folder / ("%s.onnx" % model)
    assert path.stat().st_size < 4 << 20
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [13] and m.ir_version == 7
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == list(outputs)
    for vi in list(m.graph.input) + list(m.graph.output):
        assert vi.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    for batch in (1, 5):
        got = _run(path, np.random.default_rng(batch).random((batch, *in_shape), dtype=np.float32))
        assert {k: v.shape for k, v in got.items()} == {k: (batch, *s) for k, s in outputs.items()}


@pytest.mark.parametrize("folder", [DIGITS96, SHAPES], ids=["digits96", "shapes"])
def test_golden_outputs_reproduce(folder):
    with np.load(str(folder / "golden.npz")) as z:
        x = z["image"]
    with np.load(str(folder / "golden_outputs.npz")) as z:
        ref = {k: z[k] for k in z.files}
    assert x.dtype == np.float32 and len(x) >= 4
    for model in ("small", "large"):
        got = _run(folder / ("%s.onnx" % model), x)
        for k, v in got.items():
            np.testing.assert_allclose(v, ref["%s.%s" % (model, k)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["small", "large"])
def test_dynamic_batch_gives_the_same_answers_as_one_at_a_time(model):
    x, _ = harness.load_split("heldout")
    x = x[:9]
    sess = _session(DIGITS96 / ("%s.onnx" % model))
    whole = sess.run(["logits"], {"image": x})[0]
    single = np.concatenate([sess.run(["logits"], {"image": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(whole, single, rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=1)
def _heldout_logits():
    x, y = harness.load_split("heldout")
    return _run(DIGITS96 / "small.onnx", x)["logits"], _run(DIGITS96 / "large.onnx", x)["logits"], y


def test_digits96_heldout_accuracy_is_above_the_stated_bounds():
    small_logits, large_logits, y = _heldout_logits()
    small = float((small_logits.argmax(1) == y).mean())
    large = float((large_logits.argmax(1) == y).mean())
    assert len(y) == harness.SPLIT_ITEMS
    assert small >= SMALL_MIN_ACCURACY
    assert large >= LARGE_MIN_ACCURACY
    assert large > small  # escalating is worth something


def test_digits96_router_at_the_bundle_tau_keeps_within_its_budget_on_heldout():
    from edge_agent._toml import load_toml
    from edge_agent.runtime.router import confidence_scores, routes_large

    small_logits, large_logits, y = _heldout_logits()
    tau = float(load_toml(DIGITS96 / "bundle.toml")["router"]["tau"])
    up = routes_large("confidence", confidence_scores(small_logits), tau)
    routed = np.where(up, large_logits.argmax(1), small_logits.argmax(1))
    drop_pts = (float((large_logits.argmax(1) == y).mean()) - float((routed == y).mean())) * 100.0
    assert drop_pts <= ROUTER_MAX_DROP_PTS
    assert 0.0 < up.mean() < 0.5  # it escalates, and most items stay on the small model


def test_digits96_generated_splits_are_deterministic_and_disjoint_from_training():
    train_glyphs = {g.tobytes() for g in harness.glyph_splits()["train"][0]}
    for name in ("calib", "heldout"):
        x, y = harness.rendered_split(name)
        assert x.dtype == np.uint8 and x.shape == (harness.SPLIT_ITEMS, 1, 96, 96) and y.dtype == np.int64
        assert np.bincount(y, minlength=10).min() >= harness.SPLIT_ITEMS // 10 - 30  # stratified
        assert not train_glyphs & {g.tobytes() for g in harness.glyph_splits()[name][0]}
        again, y_again = harness.rendered_split(name, 40)  # a fresh rendering (another cache entry)
        assert again.tobytes() == x[:40].tobytes() and y_again.tolist() == y[:40].tolist()
    with np.load(str(DIGITS96 / "golden.npz")) as z:
        g = z["image"]
    calib, _ = harness.load_split("calib")
    assert g.shape == (20, 1, 96, 96)
    assert {r.tobytes() for r in g} <= {r.tobytes() for r in calib}  # golden inputs are calib items


def test_digits96_large_costs_many_times_the_small_flops():
    small = harness.count_flops(DIGITS96 / "small.onnx")
    large = harness.count_flops(DIGITS96 / "large.onnx")
    assert large >= 10 * small
    assert large >= 200_000_000  # camera-sized: hundreds of MFLOPs per item


def test_scene_ground_truth_matches_the_files():
    for split in ("calib", "heldout"):
        truth = harness.scene_truth(split)
        files = sorted(p.name for p in (SHAPES / split).glob("*.jpg"))
        assert files == sorted(truth) and len(files) == 100
        n = sum(len(c) for _, c in truth.values())
        assert n >= 100  # scenes hold objects, not just background


def test_f1_matching_counts_by_class_and_iou():
    gt_b = np.array([[10, 10, 30, 30], [50, 50, 80, 80]], np.float32)
    gt_c = np.array([0, 1])
    pred_b = np.array([[11, 11, 31, 31], [50, 50, 80, 80], [0, 0, 5, 5]], np.float32)
    assert harness.synth.match_counts(pred_b, np.array([0, 1, 2]), np.array([0.9, 0.8, 0.7]), gt_b, gt_c) == (2, 1, 0)
    # right box, wrong class: a false positive and a miss
    assert harness.synth.match_counts(pred_b[:1], np.array([1]), np.array([0.9]), gt_b[:1], gt_c[:1]) == (0, 1, 1)
    assert harness.synth.f1_score(2, 1, 0) == pytest.approx(0.8)


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    return harness.build_unpacked(SHAPES, tmp_path_factory.mktemp("shapes"))


class _Collector:
    """Subscribes to a device's results topic and keeps every Result payload."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.got = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="results-watch", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.got.append(json.loads(msg.payload))

    def wait_count(self, n: int, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return list(self.got)
            time.sleep(0.05)
        raise AssertionError("got %d of %d results" % (len(self.got), n))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _publisher(port: int):
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device-results", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    return c


@pytest.mark.mqtt
@pytest.mark.parametrize("gate", ["router", "small-only", "large-only"])
def test_detector_end_to_end_through_a_source_and_mqtt_meets_its_f1_bound(broker, shapes_bundle, gate):
    from edge_agent.config import RuntimeConfig, SourceConfig
    from edge_agent.protocol import topics
    from edge_agent.runtime.service import InferenceService
    from edge_agent.runtime.sources import SourceRunner

    bdir, manifest = shapes_bundle
    assert manifest.postprocessing.kind == "detection" and manifest.router.gate == "confidence"
    truth = harness.scene_truth("heldout")
    topic = topics.results("edge/v1", "cam-01")
    watch = _Collector(broker.port, topic)
    pub = _publisher(broker.port)
    models = harness.ort_models(bdir, manifest, batch=8)
    svc = InferenceService(models, manifest, bdir, RuntimeConfig(max_queue_delay_ms=0.0))
    if gate != "router":
        svc.set_router(gate=gate)
    runner = SourceRunner(SourceConfig(name="cam", uri=str(SHAPES / "heldout")), get_service=lambda: svc,
                          publish=lambda r: pub.publish(topic, r.to_json(), qos=1).wait_for_publish(10),
                          device_id="cam-01")
    try:
        assert watch.ready.wait(10)
        runner.start()
        assert runner.done.wait(180)
        got = watch.wait_count(len(truth), 30)
    finally:
        runner.stop()
        svc.close()
        models.close()
        pub.disconnect()
        pub.loop_stop()
        watch.close()
    assert runner.stats["errors"] == 0 and runner.stats["published"] == len(truth)
    assert sorted(r["output"]["file"] for r in got) == sorted(truth)
    assert all(r["schema"] == "edge-agent/result/1" and r["output"]["kind"] == "detection" for r in got)
    boxes = [d for r in got for d in r["output"]["detections"]]
    assert boxes and all(d["label"] in ("circle", "square", "triangle") for d in boxes)
    tp, fp, fn = harness.detection_counts(((r["output"]["file"], r["output"]) for r in got), truth)
    f1 = harness.synth.f1_score(tp, fp, fn)
    assert f1 >= DETECTOR_MIN_F1[gate], (gate, f1, tp, fp, fn)
    routes = {r["route"] for r in got}
    if gate == "router":
        large = sum(r["route"] == "large" for r in got)
        assert 0 < large < len(got) // 2  # the gate escalates some frames, and saves most of the large work
    else:
        assert routes == {gate.split("-")[0]}


def test_detection_gate_escalates_the_frames_the_small_detector_gets_wrong(shapes_bundle):
    """Through the service (decode, NMS, `detection_certainty`, the bundle's τ): the frames the gate keeps
    on the small detector are ones it answers correctly far more often than the frames it escalates."""
    from edge_agent.config import RuntimeConfig
    from edge_agent.runtime.service import InferenceService

    bdir, manifest = shapes_bundle
    truth = harness.scene_truth("calib")
    models = harness.ort_models(bdir, manifest, batch=8)
    svc = InferenceService(models, manifest, bdir, RuntimeConfig(max_queue_delay_ms=0.0))
    try:
        routed, small = {}, {}
        for name in sorted(truth):
            data = (SHAPES / "calib" / name).read_bytes()
            svc.set_router(gate="confidence")
            routed[name] = svc.infer_image(data).route
            svc.set_router(gate="small-only")
            small[name] = svc.infer_image(data).output
    finally:
        svc.close()
        models.close()

    def wrong(name: str) -> bool:  # any false positive or miss in this frame
        _, fp, fn = harness.detection_counts([(name, small[name])], truth)
        return fp + fn > 0

    up = [n for n in truth if routed[n] == "large"]
    stay = [n for n in truth if routed[n] == "small"]
    assert up and stay
    wrong_up = sum(map(wrong, up)) / len(up)
    wrong_stay = sum(map(wrong, stay)) / len(stay)
    assert wrong_stay <= 0.5 * wrong_up, (wrong_stay, wrong_up)
