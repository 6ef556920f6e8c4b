"""Shadow / A-B deployments, the parts that need no broker: agreement measures, the deterministic split,
the promotion gates, the memory refusal, the mirror and split services over the real sample models,
and the rollout planner's shadow rules."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from _runtime_helpers import DIGITS, GatedEngine, Models, digits_manifest, digits_models, load_split
from shadow_helpers import permuted_model

from edge_agent.bundle.manifest import HealthGates
from edge_agent.config import RuntimeConfig
from edge_agent.lifecycle.candidate import candidate_weight_bytes, check_candidate_memory
from edge_agent.lifecycle.deploy import CandidateRefusedError
from edge_agent.lifecycle.shadow import ShadowGates, ShadowJudge, Split, agreement, matched_box_f1
from edge_agent.runtime.ab import SplitService
from edge_agent.runtime.mirror import ShadowService
from edge_agent.runtime.service import InferenceService
from fleet.rollouts.actions import Note, SendDeploy, SendPromote, SendRollback
from fleet.rollouts.classify import classify_event, classify_status
from fleet.rollouts.plan import Rollout
from fleet.rollouts.states import (
    ABORTED,
    D_PROGRESS,
    D_SKIPPED,
    HALTED,
    OBS_FAILURE,
    OBS_PROGRESS,
    OBS_SUCCESS,
    RolloutError,
)

CAND = {"name": "digits", "version": 2}


def _cls(i: int) -> dict:
    return {"kind": "classification", "top": [{"index": i, "label": str(i), "score": 0.9}]}


def _det(*boxes) -> dict:
    return {"kind": "detection", "detections": [{"box": list(b[:4]), "score": b[4], "class": b[5]} for b in boxes]}


# ----------------------------------------------------------------------------------------- agreement


def test_top1_agreement_counts_only_the_first_class():
    assert agreement(_cls(3), _cls(3)) == 1.0
    assert agreement(_cls(3), _cls(4)) == 0.0
    assert agreement(_cls(3), _det()) == 0.0  # different kinds never agree


def test_matched_box_f1_matches_same_class_boxes_by_iou():
    a = _det((0, 0, 10, 10, 0.9, 1), (20, 20, 30, 30, 0.8, 2))
    assert agreement(a, a) == 1.0
    shifted = _det((1, 1, 11, 11, 0.9, 1), (20, 20, 30, 30, 0.8, 2))  # IoU 0.68 still matches
    assert agreement(a, shifted) == 1.0
    wrong_class = _det((0, 0, 10, 10, 0.9, 7), (20, 20, 30, 30, 0.8, 2))
    assert agreement(a, wrong_class) == pytest.approx(0.5)
    missing_one = _det((0, 0, 10, 10, 0.9, 1))
    assert agreement(a, missing_one) == pytest.approx(2 * 1 / 3)
    far = _det((50, 50, 60, 60, 0.9, 1))
    assert matched_box_f1(a["detections"], far["detections"]) == 0.0
    assert agreement(_det(), _det()) == 1.0
    # one candidate box cannot match two active boxes
    dup = _det((0, 0, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 1))
    assert agreement(dup, _det((0, 0, 10, 10, 0.9, 1))) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("pct", [0.0, 3.0, 37.5, 50.0, 99.0, 100.0])
def test_split_is_exact_and_evenly_spread(pct):
    s = Split(pct)
    picks = np.array([s.take() for _ in range(10000)])
    assert picks.sum() == round(pct * 100)
    # any 200 consecutive calls are within one call of the share
    sums = np.convolve(picks.astype(int), np.ones(200, dtype=int), mode="valid")
    assert np.all(np.abs(sums - pct * 2) <= 1)


def test_split_refuses_a_share_out_of_range():
    with pytest.raises(ValueError):
        Split(101)


# ----------------------------------------------------------------------------------------------- gates


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _gates(**kw) -> ShadowGates:
    base = dict(min_agreement=0.98, min_inputs=100, window_s=10.0, max_latency_ratio=1.5, max_error_rate=0.01,
                latency_slack_ms=0.5)
    base.update(kw)
    return ShadowGates(**base)


def test_judge_waits_for_both_the_window_and_the_minimum_inputs_then_promotes():
    clock = Clock()
    j = ShadowJudge(_gates(), clock)
    for _ in range(150):
        j.observe(1.0, 2.0, 2.0)
    assert j.verdict() is None  # window not over
    clock.t = 11
    j2 = ShadowJudge(_gates(), clock)
    clock.t = 30
    for _ in range(99):
        j2.observe(1.0, 2.0, 2.0)
    assert j2.verdict() is None  # window over, one input short
    j2.observe(1.0, 2.0, 2.0)
    v = j2.verdict()
    assert v is not None and v.promote and v.measured["compared"] == 100 and v.measured["agreement"] == 1.0
    assert j.verdict().promote
    j2.observe(0.0, 2.0, 2.0)
    assert j2.verdict() is v  # final once decided


def test_judge_refuses_a_disagreeing_candidate_and_says_why():
    clock = Clock()
    j = ShadowJudge(_gates(), clock)
    for i in range(200):
        j.observe(1.0 if i % 10 else 0.0, 2.0, 2.0)  # 90 % agreement
    clock.t = 10
    v = j.verdict()
    assert not v.promote and "agreement 0.9000" in v.reason and "0.98" in v.reason


def test_judge_latency_gate_uses_ratio_and_slack():
    clock = Clock()
    slow = ShadowJudge(_gates(), clock)
    close = ShadowJudge(_gates(), clock)
    for _ in range(200):
        slow.observe(1.0, 10.0, 4.0)   # 2.5 x and 6 ms over: refused
        close.observe(1.0, 0.9, 0.4)   # 2.25 x but only 0.5 ms over: within the slack
    clock.t = 10
    assert not slow.verdict().promote and "p99" in slow.verdict().reason
    assert close.verdict().promote


def test_judge_refuses_a_failing_candidate():
    clock = Clock()
    j = ShadowJudge(_gates(), clock)
    for _ in range(100):
        j.observe(1.0, 1.0, 1.0)
    for _ in range(5):
        j.observe_error()
    clock.t = 10
    v = j.verdict()
    assert not v.promote and "error rate" in v.reason and v.measured["candidate_errors"] == 5


def test_gates_come_from_the_manifest_with_a_window_cap():
    h = HealthGates(shadow_min_agreement="0.95", shadow_min_inputs=50, shadow_window_s=300,
                    shadow_max_latency_ratio="2", max_error_rate="0.02")
    g = ShadowGates.from_health(h, max_window_s=3)
    assert (g.min_agreement, g.min_inputs, g.window_s, g.max_latency_ratio, g.max_error_rate) == (0.95, 50, 3, 2, 0.02)


# ---------------------------------------------------------------------------------------------- memory


def test_candidate_whose_weights_exceed_the_budget_is_refused_with_the_figures(tmp_path):
    m = digits_manifest(tmp_path)
    need = candidate_weight_bytes(m)
    assert need == (DIGITS / "small.onnx").stat().st_size + (DIGITS / "large.onnx").stat().st_size
    with pytest.raises(CandidateRefusedError) as ei:
        check_candidate_memory(need_bytes=need, budget_bytes=need // 2, active_bytes=300 << 20, name="digits v2")
    msg = str(ei.value)
    assert "not enough memory" in msg and "digits v2" in msg and "300.0 MB" in msg
    check_candidate_memory(need_bytes=need, budget_bytes=need, active_bytes=0, name="x")  # fits exactly


# ---------------------------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def permuted(tmp_path_factory):
    d = tmp_path_factory.mktemp("perm")
    return (permuted_model(DIGITS / "small.onnx", d / "small.onnx"),
            permuted_model(DIGITS / "large.onnx", d / "large.onnx"))


def _service(tmp_path, models=None, **rt) -> InferenceService:
    cfg = RuntimeConfig(**dict(dict(max_queue_delay_ms=1.0, max_queue=256), **rt))
    return InferenceService(models or digits_models(max_batch=16), digits_manifest(tmp_path), tmp_path, cfg)


def _perm_models(permuted) -> Models:
    from edge_agent.engines.ort import OrtEngine

    return Models(OrtEngine(permuted[0], max_batch=16, intra_op_threads=1),
                  OrtEngine(permuted[1], max_batch=16, intra_op_threads=1), {"small": 16, "large": 16})


def _wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_mirror_of_an_identical_candidate_agrees_and_never_changes_the_answer(tmp_path):
    x, _ = load_split("heldout")
    active, cand = _service(tmp_path), _service(tmp_path)
    plain = _service(tmp_path)
    judge = ShadowJudge(_gates(min_inputs=1, window_s=0, max_latency_ratio=100.0))  # latency: see the judge tests
    svc = ShadowService(active, cand, candidate_ref=CAND, fraction=0.5, queue_size=1000, shed_in_flight=1000,
                        judge=judge)
    try:
        for i in range(200):
            got = svc.infer_tensor(x[i])
            assert got.output == plain.infer_tensor(x[i]).output
        _wait(lambda: svc.total_mirrored + svc.total_dropped >= 100)
        st = svc.stats_snapshot()["shadow"]
        assert st["mirrored"] == 100 and st["dropped"] == 0 and st["agreement"] == 1.0
        assert st["candidate_latency_ms"]["p99"] is not None and st["active_latency_ms"]["p99"] is not None
        assert judge.verdict().promote
    finally:
        svc.close()
        plain.close()


def test_mirror_of_a_permuted_candidate_measures_full_disagreement(tmp_path, permuted):
    x, _ = load_split("heldout")
    active, cand = _service(tmp_path), _service(tmp_path, _perm_models(permuted))
    judge = ShadowJudge(_gates(min_inputs=50, window_s=0))
    svc = ShadowService(active, cand, candidate_ref=CAND, fraction=1.0, queue_size=1000, shed_in_flight=1000,
                        judge=judge)
    try:
        labels = set()
        for i in range(60):
            labels.add(svc.infer_tensor(x[i]).output["top"][0]["index"])
        _wait(lambda: svc.total_mirrored >= 60)
        assert svc.shadow_stats()["agreement"] == 0.0
        v = judge.verdict()
        assert not v.promote and "agreement 0.0000" in v.reason
        assert len(labels) > 1
    finally:
        svc.close()


class SlowEngine:
    """A real engine that takes at least `delay_s` per batch (a busy device)."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.inputs, self.outputs, self.max_batch = inner.inputs, inner.outputs, inner.max_batch

    def infer(self, feed):
        time.sleep(self.delay_s)
        return self.inner.infer(feed)

    def close(self) -> None:
        self.inner.close()


def test_mirrored_traffic_is_shed_first_when_the_active_model_is_busy(tmp_path):
    """Eight clients keep a slow active model's queue busy: every live request is answered (none
    refused), while the inputs sampled for the mirror are dropped instead of adding work; once the load
    is gone, mirroring resumes."""
    x, _ = load_split("heldout")
    models = digits_models(max_batch=2)
    active = _service(tmp_path, Models(SlowEngine(models.small, 0.004), models.large, {"small": 2, "large": 2}))
    cand = _service(tmp_path)
    svc = ShadowService(active, cand, candidate_ref=CAND, fraction=1.0, queue_size=1000, shed_in_flight=1)
    answered = []
    stop = time.monotonic() + 1.5

    def client(k):
        i = k
        while time.monotonic() < stop:
            answered.append(svc.infer_tensor(x[i % len(x)], timeout_s=20).route)
            i += 8

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        _wait(lambda: svc.total_mirrored + svc.total_dropped == len(answered))
        busy = svc.stats_snapshot()
        assert busy["refused"] == 0 and busy["errors"] == 0 and len(answered) > 100
        sh = busy["shadow"]
        assert sh["dropped"] >= 0.8 * len(answered), sh  # shed, not queued behind live traffic
        for i in range(20):  # idle again: each request is mirrored
            svc.infer_tensor(x[i])
            _wait(lambda: svc.queue_len() == 0)
        _wait(lambda: svc.total_mirrored + svc.total_dropped == len(answered) + 20)
        assert svc.shadow_stats()["mirrored"] == 20
    finally:
        svc.close()


def test_full_mirror_queue_drops_and_counts(tmp_path):
    x, _ = load_split("heldout")
    active = _service(tmp_path)
    models = digits_models(max_batch=4)
    gated = GatedEngine(models.small)
    cand = _service(tmp_path, Models(gated, models.large, {"small": 4, "large": 4}))
    svc = ShadowService(active, cand, candidate_ref=CAND, fraction=1.0, queue_size=5, shed_in_flight=1000)
    try:
        for i in range(30):
            svc.infer_tensor(x[i])  # answered at once although the candidate is stuck
        _wait(gated.entered.is_set)
        st = svc.shadow_stats(reset=False)
        assert st["dropped"] >= 30 - 5 - 1 and svc.queue_len() <= 5
        gated.gate.set()
    finally:
        svc.close()


def test_ab_split_serves_the_share_with_the_candidate_and_reports_each_arm(tmp_path, permuted):
    x, _ = load_split("heldout")
    active, cand = _service(tmp_path), _service(tmp_path, _perm_models(permuted))
    cand.bundle = dict(CAND)
    svc = SplitService(active, cand, candidate_ref=CAND, split=25.0)
    try:
        by_cand = 0
        for i in range(400):
            r = svc.infer_tensor(x[i % len(x)])
            if r.extra.get("bundle") == CAND:
                by_cand += 1
        many = svc.infer_batch(x[:8])
        snap = svc.stats_snapshot()
        assert by_cand == 100
        sh = snap["shadow"]
        assert sh["mode"] == "ab" and sh["split"] == 25.0
        assert sh["arms"]["candidate"]["requests"] + sh["arms"]["active"]["requests"] == 408
        assert snap["requests"] == 408 and len(many) == 8
        assert sh["arms"]["candidate"]["latency_ms"]["p99"] is not None
    finally:
        svc.close()


# ----------------------------------------------------------------------------------------- rollout plan


def _shadow_rollout(devs, waves=None):
    r = Rollout.create(rollout_id="r1", bundle=CAND, manifest_sha256="a" * 64, manifest_size=1,
                       waves=waves or [devs], mode="shadow", now=0)
    r.start(0)
    return r


def _obs(r, kind):
    return classify_event(r, kind=kind, bundle=CAND, rollout_id="r1")


def test_shadow_rollout_advances_waves_on_promotion_not_on_shadow_start():
    r = _shadow_rollout(None, waves=[["a"], ["b"]])
    r.observe("a", _obs(r, "shadow-started"), "", 1)
    assert r.current_wave == 0 and r.devices["a"].state == D_PROGRESS
    acts = r.observe("a", _obs(r, "promoted"), "", 2)
    assert r.current_wave == 1 and any(a.device_id == "b" for a in acts if not isinstance(a, Note))


def test_shadow_rollout_halts_when_a_candidate_is_refused():
    r = _shadow_rollout(None, waves=[["a"], ["b"]])
    acts = r.observe("a", _obs(r, "candidate-refused"), "agreement too low", 1)
    assert r.state == HALTED and r.devices["b"].state == D_SKIPPED
    assert [a.device_id for a in acts if isinstance(a, SendRollback)] == []  # a failed device is not rolled back


def test_shadow_status_counts_as_success_only_once_the_candidate_is_active():
    r = _shadow_rollout(["a"])
    kw = dict(online=True, deploy_bundle=CAND, deploy_rollout_id="r1")
    assert classify_status(r, active={"name": "digits", "version": 1}, deploy_state="shadow", **kw) == \
        OBS_PROGRESS
    assert classify_status(r, active=CAND, deploy_state="active", **kw) == OBS_SUCCESS
    assert classify_status(r, active={"name": "digits", "version": 1}, deploy_state="failed", **kw) == \
        OBS_FAILURE


def test_operator_promote_reaches_shadowing_devices_and_drop_aborts_without_rollback():
    r = _shadow_rollout(["a", "b"])
    r.observe("a", _obs(r, "shadow-started"), "", 1)
    acts = r.promote(2)
    assert sorted(a.device_id for a in acts if isinstance(a, SendPromote)) == ["a", "b"]
    assert all(a.accept for a in acts if isinstance(a, SendPromote))
    r2 = _shadow_rollout(["a", "b"])
    acts = r2.promote(2, accept=False)
    assert sorted(a.device_id for a in acts if isinstance(a, SendPromote)) == ["a", "b"]
    assert r2.state == ABORTED and not any(isinstance(a, SendRollback) for a in acts)


def test_ab_rollout_needs_a_split():
    with pytest.raises(RolloutError):
        Rollout.create(rollout_id="r", bundle=CAND, manifest_sha256="a" * 64, manifest_size=1, waves=[["a"]],
                       mode="ab", now=0)


def test_candidate_prepare_checks_the_budget_left_beside_the_active_engines_before_loading(tmp_path, monkeypatch):
    """The agent's candidate prepare reads the budget as it is now (active engines loaded) and refuses a
    candidate whose weights do not fit, naming both figures; nothing is loaded."""
    from types import SimpleNamespace

    from edge_agent.config import AgentConfig
    from edge_agent.engines import prepare
    from edge_agent.engines.budget import MemoryBudget
    from edge_agent.lifecycle.candidate import CandidateManager
    from edge_agent.lifecycle.deploy import Hooks

    loaded = []
    monkeypatch.setattr(prepare, "current_budget", lambda cfg, platform, backend: MemoryBudget(
        source="meminfo", total_bytes=8 << 30, available_bytes=1 << 20, fraction=0.6, reserve_bytes=0,
        budget_bytes=600 << 10))
    monkeypatch.setattr(prepare, "prepare_engines", lambda **kw: loaded.append(kw))
    hooks = Hooks(prepare=lambda d, m: None, selftest=lambda p, d, m: None, activate=lambda p, d, m: None)
    agent = SimpleNamespace(cfg=AgentConfig(device_id="dev", state_dir=tmp_path), deployer=SimpleNamespace(hooks=hooks),
                            _models=SimpleNamespace(platform=None, backend="onnxruntime",
                                                    memory_bytes={"small": 100 << 20, "large": 200 << 20}),
                            _emit_engine=lambda *a: None)
    mgr = CandidateManager(agent)
    assert hooks.prepare_candidate == mgr._prepare and hooks.start_candidate == mgr._start
    with pytest.raises(CandidateRefusedError) as ei:
        mgr._prepare(tmp_path, digits_manifest(tmp_path))
    assert "beside the active bundle" in str(ei.value) and "(300.0 MB)" in str(ei.value)
    assert loaded == []


# ------------------------------------------------------------------------------------- fleet side / metrics


def _shadow_telemetry(mode: str):
    from edge_agent.protocol.messages import Telemetry

    sh = {"mode": mode, "candidate": CAND, "mirrored": 40, "dropped": 3, "compared": 40, "agreement": 0.975,
          "candidate_errors": 1, "candidate_latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
          "active_latency_ms": {"p50": 0.9, "p95": 1.8, "p99": 2.5}}
    if mode == "ab":
        sh.update(split=12.5, candidate_share=0.125, arms={
            "active": {"requests": 70, "latency_ms": {"p99": 2.5}}, "candidate": {"requests": 10,
                                                                                  "latency_ms": {"p99": 3.0}}})
    return Telemetry(device_id="cam-1", ts=1.0, seq=0, period_s=10, uptime_s=10, shadow=sh)


def test_shadow_figures_reach_prometheus_and_the_fleet_summary():
    from prometheus_client.parser import text_string_to_metric_families

    from edge_agent.telemetry.prometheus import render_prometheus
    from fleet.telemetry_view import telemetry_summary

    t = _shadow_telemetry("ab")
    fams = {f.name: f for f in text_string_to_metric_families(render_prometheus(t))}
    (agree,) = fams["edge_agent_shadow_agreement_ratio"].samples
    assert agree.value == 0.975 and agree.labels["candidate_version"] == "2" and agree.labels["mode"] == "ab"
    lat = {(s.labels["side"], s.labels["percentile"]): s.value
           for s in fams["edge_agent_shadow_latency_seconds"].samples}
    assert lat[("candidate", "0.99")] == pytest.approx(0.003) and lat[("active", "0.99")] == pytest.approx(0.0025)
    assert {s.labels["arm"]: s.value for s in fams["edge_agent_shadow_arm_requests"].samples} == {
        "active": 70, "candidate": 10}
    summ = telemetry_summary(t)["shadow"]
    assert summ["agreement"] == 0.975 and summ["arms"]["candidate"]["requests"] == 10
    assert telemetry_summary(t.model_copy(update={"shadow": None}))["shadow"] is None


def test_rollout_status_shows_candidate_against_active_per_device():
    from fleet.commands.rollout import render_rollout
    from fleet.telemetry_view import telemetry_summary

    for mode, expect in (("shadow", ("AGREEMENT", "0.9750", "3.00", "2.50")), ("ab", ("CAND SHARE", "12.5%",
                                                                                     "0.125"))):
        r = Rollout.create(rollout_id="r1", bundle=CAND, manifest_sha256="a" * 64, manifest_size=1,
                           waves=[["cam-1", "cam-2"]], mode=mode, ab_split=12.5 if mode == "ab" else None, now=0)
        r.start(0)
        out = r.summary()
        out["devices"] = [e.to_dict() for e in r.devices.values()]
        out["devices"][0]["shadow"] = telemetry_summary(_shadow_telemetry(mode))["shadow"]
        text = render_rollout(out, now=1)
        for word in expect:
            assert word in text, text
        assert "cam-1" in text.split(expect[0])[1] and "cam-2" not in text.split(expect[0])[1]
    assert "AGREEMENT" not in render_rollout(dict(out, mode="normal"), now=1)


def test_ab_rollout_sends_the_split_as_a_decimal_string_and_promote_names_the_rollout():
    from fleet.rollouts.commands import command_for

    r = Rollout.create(rollout_id="r9", bundle=CAND, manifest_sha256="a" * 64, manifest_size=1, waves=[["a"]],
                       mode="ab", ab_split=12.5, now=0)
    args = command_for(r, SendDeploy("a"))
    assert args.mode == "ab" and args.ab_split == "12.5"
    r.ab_split = 30.0
    assert command_for(r, SendDeploy("a")).ab_split == "30"
    p = command_for(r, SendPromote("a", True, "x"))
    assert p.rollout_id == "r9" and p.accept
