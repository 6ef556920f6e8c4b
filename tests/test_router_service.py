"""The DynamicRouter inside the inference service, on the real sample digit models.

Accuracy at the calibrated τ, adaptive τ on a stream, load shedding and recovery, run-time policy
changes, the linear gate over features and over input statistics, and telemetry-ready statistics.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_agent.config import RuntimeConfig
from edge_agent.protocol.messages import Telemetry
from edge_agent.runtime import calibration
from edge_agent.runtime.errors import RequestTimeoutError, RouterPolicyError
from edge_agent.runtime.router import fit_linear_head, input_stats
from edge_agent.runtime.service import InferenceService
from tests._runtime_helpers import GatedEngine, Models, digits_manifest, digits_models, load_split

ALLOWED_DROP_PTS = 0.5
FAST = RuntimeConfig(max_queue_delay_ms=0, max_queue=256)


@pytest.fixture(scope="module")
def models():
    m = digits_models(max_batch=32)
    yield m
    m.close()


@pytest.fixture(scope="module")
def calib():
    return load_split("calib")


@pytest.fixture(scope="module")
def heldout():
    return load_split("heldout")


def _serve_all(svc, x):
    preds, routes = [], []
    for item in x:
        r = svc.infer_tensor(item)
        preds.append(r.output["top"][0]["index"])
        routes.append(r.route)
    return np.array(preds), np.array(routes)


def test_router_at_calibrated_tau_is_within_allowed_drop_of_large_only_on_heldout(models, calib, heldout, tmp_path):
    # τ is chosen on the calibration split only; accuracy is measured on the held-out split.
    data = calibration.collect(models.small, models.large, *calib, gate="confidence")
    rows = calibration.sweep(data, calibration.candidate_taus(data.scores, 0.5, 0.999))
    best = calibration.recommend(rows, max_drop_pts=ALLOWED_DROP_PTS, key="drop_pts")
    assert best is not None
    tau = best["tau"]
    svc = InferenceService(models, digits_manifest(tmp_path, router={"tau": "%.6f" % tau}), tmp_path, FAST)
    try:
        x, y = heldout
        preds, routes = _serve_all(svc, x)
        router_acc = float((preds == y).mean())
        large_fraction = float((routes == "large").mean())
        svc.set_router(gate="large-only")
        large_preds, large_routes = _serve_all(svc, x)
        large_acc = float((large_preds == y).mean())
    finally:
        svc.close()
    assert set(large_routes) == {"large"}
    assert router_acc >= large_acc - ALLOWED_DROP_PTS / 100.0, (router_acc, large_acc, tau)
    assert large_fraction < 0.25  # the router really keeps most items on the small model


def test_adaptive_tau_holds_the_target_fraction_on_a_stream(models, calib, heldout, tmp_path):
    rng = np.random.default_rng(5)
    stream = np.concatenate([calib[0], heldout[0], calib[0], heldout[0]])[rng.permutation(4 * 360)]
    target = 0.25
    manifest = digits_manifest(tmp_path, router={
        "tau": "0.9", "tau_min": "0.3", "adaptive": True, "target_large_fraction": "%s" % target, "window": 400,
    })
    svc = InferenceService(models, manifest, tmp_path, FAST)
    try:
        _, routes = _serve_all(svc, stream)
        state = svc.router_state()
    finally:
        svc.close()
    assert np.mean(routes[-500:] == "large") == pytest.approx(target, abs=0.05)
    assert 0.3 <= state["tau"] <= 0.999
    assert state["tau"] != 0.9  # it did adapt


def test_load_shedding_kicks_in_when_the_large_queue_passes_its_limit_and_recovers(models, heldout, tmp_path):
    x, _ = heldout
    gated_large = GatedEngine(models.large)
    held = Models(models.small, gated_large, {"small": 32, "large": 4})
    manifest = digits_manifest(tmp_path, router={"tau": "0.999", "tau_min": "0.5", "large_queue_limit": 6})
    svc = InferenceService(held, manifest, tmp_path, RuntimeConfig(max_queue_delay_ms=1, max_queue=64))
    stop = threading.Event()
    answers = {"small": 0, "large": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                # Clients give up after 0.3 s, as real ones do; the stuck large queue then fills up.
                r = svc.infer_tensor(x[i % len(x)], timeout_s=0.3)
            except RequestTimeoutError:
                i += 7
                continue
            with lock:
                answers[r.route] += 1
            i += 7

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(12)]
    try:
        assert svc.router_state()["tau"] == pytest.approx(0.999)
        for t in threads:
            t.start()
        # The large model is stuck: its queue grows past 6, τ must fall to tau_min and small keeps answering.
        deadline = time.monotonic() + 10
        while svc.router_state()["shed_level"] < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        state = svc.router_state()
        assert state["shed_level"] == 1.0 and state["tau"] == pytest.approx(0.5)
        assert state["shed_episodes"] >= 1
        with lock:
            small_before = answers["small"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if answers["small"] > small_before:
                    break
            time.sleep(0.01)
        with lock:
            assert answers["small"] > small_before  # still serving, from the small model
        assert svc.large_batcher.queue_depth() <= 64  # bounded, never a backlog
        # Release the large model and stop the load: τ returns to its base after the release time.
        gated_large.gate.set()
        stop.set()
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + 10  # the release time is 2 s; poll instead of sleeping it out
        while True:
            svc.infer_tensor(x[0])
            state = svc.router_state()
            if state["shed_level"] == 0.0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state["shed_level"] == 0.0 and state["tau"] == pytest.approx(0.999)
        with lock:
            assert answers["large"] > 0
    finally:
        stop.set()
        gated_large.gate.set()
        svc.close()


def test_set_router_at_run_time(models, heldout, tmp_path):
    x, _ = heldout
    svc = InferenceService(models, digits_manifest(tmp_path, router={"tau": "0.9"}), tmp_path, FAST)
    try:
        svc.set_router(gate="small-only")
        assert {svc.infer_tensor(v).route for v in x[:50]} == {"small"}
        state = svc.set_router(gate="confidence", tau="0.999")
        assert state["gate"] == "confidence" and state["tau"] == pytest.approx(0.999)
        before = svc.router_state()
        with pytest.raises(RouterPolicyError, match="no linear head"):
            svc.set_router(gate="linear")
        with pytest.raises(RouterPolicyError, match="outside the bundle's bounds"):
            svc.set_router(tau="0.2")
        with pytest.raises(RouterPolicyError, match="must be numbers"):
            svc.set_router(tau="abc")
        assert svc.router_state() == before
    finally:
        svc.close()


@pytest.mark.parametrize("source", ["features", "input_stats"])
def test_linear_gate_routes_as_calibrated_offline(models, calib, heldout, tmp_path, source):
    xc, yc = calib
    small_out = models.small.infer({"image": xc[:32]})
    assert "features" in small_out
    outs = [models.small.infer({"image": xc[s : s + 32]}) for s in range(0, len(xc), 32)]
    wrong = np.concatenate([o["logits"] for o in outs]).argmax(axis=1) != yc
    v = np.concatenate([o["features"] for o in outs]) if source == "features" else input_stats(xc)
    head = fit_linear_head(v, wrong, source=source)
    head.save(tmp_path / "head.npz")
    x, y = heldout
    data = calibration.collect(models.small, models.large, x, y, gate="linear", head=head)
    tau = float(np.quantile(data.scores, 0.8))  # about 20% to large
    expected = calibration.evaluate(data, tau)
    manifest = digits_manifest(tmp_path, router={
        "gate": "linear", "linear_head": "head.npz", "tau": "%.9f" % tau, "tau_min": "0", "tau_max": "1",
    })
    svc = InferenceService(models, manifest, tmp_path, FAST)
    try:
        preds, routes = _serve_all(svc, x)
        snap = svc.stats_snapshot()
    finally:
        svc.close()
    assert float((routes == "large").mean()) == pytest.approx(expected["large_fraction"], abs=0.01)
    assert float((preds == y).mean()) == pytest.approx(expected["accuracy"], abs=0.01)
    small_items = snap["routes"]["small"]["requests"]
    if source == "input_stats":
        # Decided before any model runs: large-routed items never touch the small model.
        assert snap["routes"]["large"]["requests"] > 0
        assert small_items == len(x) - snap["routes"]["large"]["requests"]


def test_stats_snapshot_builds_a_telemetry_message_and_resets(models, heldout, tmp_path):
    x, _ = heldout
    svc = InferenceService(models, digits_manifest(tmp_path, router={"tau": "0.95"}), tmp_path, FAST)
    try:
        for v in x[:100]:
            svc.infer_tensor(v)
        snap = svc.stats_snapshot()
        hist = snap.pop("latency_histogram")  # for the Prometheus histograms, not part of the MQTT message
        assert sum(hist["total"]["counts"]) == 100
        assert sum(hist["routes"]["small"]["counts"]) + sum(hist["routes"]["large"]["counts"]) == 100
        t = Telemetry(device_id="dev-1", ts=1.0, seq=0, period_s=10.0, uptime_s=5.0, **snap)
        assert t.requests == 100 and t.errors == 0 and t.refused == 0
        assert t.routes["small"].requests + t.routes["large"].requests == 100
        assert 0 < t.large_fraction < 1 and t.tau == pytest.approx(0.95)
        assert t.latency_ms.p99 is not None and t.latency_ms.p50 <= t.latency_ms.p99
        assert t.mean_batch >= 1
        again = svc.stats_snapshot()
        assert again["requests"] == 0 and again["latency_ms"]["p50"] is None
    finally:
        svc.close()


@pytest.mark.parametrize("source", [None, "input_stats"])
def test_a_multi_item_request_answers_each_item_as_single_requests_do(models, calib, heldout, tmp_path, source):
    x, _ = heldout
    router = {"tau": "0.95"}
    if source:
        xc, yc = calib
        wrong = models.small.infer({"image": xc[:32]})["logits"].argmax(axis=1) != yc[:32]
        fit_linear_head(input_stats(xc[:32]), wrong, source=source).save(tmp_path / "head.npz")
        router = {"gate": "linear", "linear_head": "head.npz", "tau": "0.5", "tau_min": "0", "tau_max": "1"}
    svc = InferenceService(models, digits_manifest(tmp_path, router=router), tmp_path, FAST)
    try:
        one_by_one = [svc.infer_tensor(v) for v in x[:100]]
        together = svc.infer_batch(x[:100])
        snap = svc.stats_snapshot()
    finally:
        svc.close()
    assert [r.route for r in together] == [r.route for r in one_by_one]
    assert [r.output for r in together] == [r.output for r in one_by_one]
    assert 0 < sum(r.route == "large" for r in together) < 100
    assert snap["requests"] == 200
    assert snap["routes"]["small"]["requests"] + snap["routes"]["large"]["requests"] == 200


@pytest.mark.parametrize("gate, route", [("large-only", "large"), ("small-only", "small")])
def test_fixed_gates_from_the_bundle_spec_use_one_model_only(models, heldout, tmp_path, gate, route):
    """`router.gate = "large-only"` in the bundle spec: every item is answered by the large model and the
    small model never runs (its batcher sees no item); small-only never escalates."""
    x, _ = heldout
    svc = InferenceService(models, digits_manifest(tmp_path, router={"gate": gate}), tmp_path, FAST)
    try:
        singles = [svc.infer_tensor(v).route for v in x[:20]]
        many = [r.route for r in svc.infer_batch(x[20:52])]
        other = "small" if route == "large" else "large"
        snap_other = svc._batchers[other].snapshot(reset=False)
        snap = svc.stats_snapshot()
    finally:
        svc.close()
    assert set(singles) == set(many) == {route}
    assert snap_other["items"] == 0 and snap_other["batches"] == 0
    assert snap["routes"][route]["requests"] == 52 and snap["routes"][other]["requests"] == 0
    assert svc.router_state()["gate"] == gate


def test_set_router_switches_to_large_only_and_back(models, heldout, tmp_path):
    x, _ = heldout
    svc = InferenceService(models, digits_manifest(tmp_path, router={"tau": "0.6"}), tmp_path, FAST)
    try:
        svc.set_router(gate="large-only")
        svc.small_batcher.snapshot(reset=True)
        assert {svc.infer_tensor(v).route for v in x[:10]} == {"large"}
        assert svc.small_batcher.snapshot(reset=True)["items"] == 0
        svc.set_router(gate="confidence")
        routes = {svc.infer_tensor(v).route for v in x[:50]}
        assert "small" in routes and svc.small_batcher.snapshot(reset=True)["items"] == 50
    finally:
        svc.close()
