"""Device-side probation: each health gate can fail a bundle, a healthy one passes at the window's end."""

from __future__ import annotations

import threading
import time

import pytest

from edge_agent.bundle.manifest import HealthGates
from edge_agent.config import ProbationConfig
from edge_agent.lifecycle.probation import Probation, ProbationVerdict, wait_for_verdict, weighted_median


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def period(requests=100, errors=0, refused=0, p99=10.0):
    return {"requests": requests, "errors": errors, "refused": refused,
            "latency_ms": {"p50": p99 / 3, "p95": p99 / 1.5, "p99": p99}}


def _probation(gates=None, cfg=None, **kw):
    clock = Clock()
    gates = gates or HealthGates(probation_s=60, max_error_rate="0.01", p99_latency_slo_ms="50")
    cfg = cfg or ProbationConfig(window_s=30)
    return Probation(gates, cfg, clock, **kw), clock


def _run(p, clock, periods, step_s=10.0):
    for st in periods:
        clock.t += step_s
        p.observe(st)
        v = p.verdict()
        if v is not None:
            return v
    return None


def test_healthy_bundle_passes_only_when_the_window_has_passed():
    p, clock = _probation()
    assert p.window_s == 60  # the manifest's probation_s is longer than the config's window
    assert _run(p, clock, [period()] * 5) is None
    clock.t += 10
    p.observe(period())
    v = p.verdict()
    assert isinstance(v, ProbationVerdict) and v.passed
    assert "healthy for 60 s" in v.reason and "600 requests" in v.reason
    assert v.measured["requests"] == 600 and v.measured["error_rate"] == 0.0 and v.measured["p99_ms"] == 10.0


def test_error_rate_breach_fails_before_the_window_ends():
    p, clock = _probation()
    v = _run(p, clock, [period(requests=100, errors=5)])
    assert v is not None and not v.passed
    assert "error rate 0.0500 over the gate 0.01" in v.reason and "5 of 100" in v.reason
    assert p.elapsed_s() < p.window_s
    assert v.measured["errors"] == 5


def test_few_requests_do_not_fail_early_but_are_judged_at_the_end():
    p, clock = _probation(cfg=ProbationConfig(window_s=30, early_fail_min_requests=50))
    assert _run(p, clock, [period(requests=10, errors=3)] * 3) is None  # 30 requests: too few to fail early
    clock.t += 40
    v = p.verdict()
    assert v is not None and not v.passed and "error rate 0.3000" in v.reason


def test_one_slow_period_does_not_fail_but_mostly_slow_traffic_does():
    p, clock = _probation()
    v = _run(p, clock, [period(p99=400.0)] + [period()] * 5 + [period()])
    assert v is not None and v.passed
    assert v.measured["p99_max_ms"] == 400.0

    p, clock = _probation()
    v = _run(p, clock, [period(p99=80.0)] * 4 + [period()] * 3)
    assert v is not None and not v.passed
    assert "p99 latency 80.0 ms over the SLO 50.0 ms" in v.reason


def test_p99_of_periods_with_too_few_answers_is_ignored():
    p, clock = _probation(cfg=ProbationConfig(window_s=30, p99_min_requests=20))
    v = _run(p, clock, [period(requests=5, p99=900.0)] * 7)
    assert v is not None and v.passed  # 5 answers a period cannot carry a p99
    assert v.measured["p99_periods"] == 0 and v.measured["p99_ms"] is None


def test_no_slo_in_the_manifest_means_no_latency_gate():
    p, clock = _probation(gates=HealthGates(probation_s=10), cfg=ProbationConfig(window_s=0))
    v = _run(p, clock, [period(p99=5000.0)] * 2)
    assert v is not None and v.passed


def test_too_little_traffic_fails_when_the_manifest_asks_for_a_minimum():
    p, clock = _probation(gates=HealthGates(probation_s=20, min_requests=100), cfg=ProbationConfig(window_s=0))
    v = _run(p, clock, [period(requests=20)] * 2)
    assert v is not None and not v.passed
    assert v.reason == "only 40 requests in the 20 s window; the gate needs 100"


def test_config_minimum_applies_when_the_manifest_has_none():
    p, clock = _probation(gates=HealthGates(probation_s=10), cfg=ProbationConfig(window_s=5, min_requests=500))
    assert p.min_requests == 500 and p.window_s == 10
    v = _run(p, clock, [period()] * 2)
    assert not v.passed and "needs 500" in v.reason


def test_golden_recheck_failure_fails_probation():
    calls = []

    class Report:
        passed = False
        message = "top-1 agreement 0.62 under 0.99"

    def recheck():
        calls.append(1)
        return Report()

    p, clock = _probation(golden_recheck=recheck)
    v = _run(p, clock, [period()] * 6)
    assert v is not None and not v.passed
    assert v.reason == "golden re-check failed: top-1 agreement 0.62 under 0.99"
    assert calls == [1]
    assert p.verdict() is v and calls == [1]  # decided once, not re-run


def test_golden_recheck_that_raises_fails_and_passing_recheck_is_reported():
    def boom():
        raise RuntimeError("engine lost")

    p, clock = _probation(golden_recheck=boom)
    v = _run(p, clock, [period()] * 6)
    assert not v.passed and "RuntimeError: engine lost" in v.reason

    p, clock = _probation(golden_recheck=lambda: (True, "10/10 match"))
    v = _run(p, clock, [period()] * 6)
    assert v.passed and v.reason.endswith("golden re-check passed")


def test_golden_recheck_is_skipped_when_another_gate_failed_or_config_turns_it_off():
    calls = []
    p, clock = _probation(golden_recheck=lambda: calls.append(1) or True)
    v = _run(p, clock, [period(p99=90.0)] * 6)
    assert not v.passed and calls == []

    p, clock = _probation(cfg=ProbationConfig(window_s=0, golden_recheck=False),
                          golden_recheck=lambda: calls.append(1) or False)
    v = _run(p, clock, [period()] * 6)
    assert v.passed and calls == []


def test_verdict_never_changes_once_decided():
    p, clock = _probation()
    v = _run(p, clock, [period(errors=50)])
    assert not v.passed
    p.observe(period(requests=10_000))
    clock.t += 1000
    assert p.verdict() is v and p.requests == 100


def test_garbage_in_stats_is_ignored_not_fatal():
    p, clock = _probation(gates=HealthGates(probation_s=10), cfg=ProbationConfig(window_s=0))
    p.observe(None)
    p.observe({})
    p.observe({"requests": "lots", "errors": None, "latency_ms": {"p99": "slow"}})
    clock.t += 11
    v = p.verdict()
    assert v.passed and v.measured["requests"] == 0


def test_weighted_median():
    assert weighted_median([]) is None
    assert weighted_median([(10.0, 1), (100.0, 3)]) == 100.0
    assert weighted_median([(10.0, 3), (100.0, 1)]) == 10.0
    assert weighted_median([(5.0, 0)]) is None


def test_wait_for_verdict_in_real_time_and_stop():
    gates = HealthGates(probation_s=0, max_error_rate="0.01")
    p = Probation(gates, ProbationConfig(window_s=0.3))
    feed = iter([period()] * 1000)
    t0 = time.monotonic()
    v = wait_for_verdict(p, stop=threading.Event(), poll_s=0.05, get_stats=lambda: next(feed))
    assert v is not None and v.passed and time.monotonic() - t0 >= 0.29

    p = Probation(gates, ProbationConfig(window_s=30))
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    assert wait_for_verdict(p, stop=stop, poll_s=0.05) is None


@pytest.mark.parametrize("errors,passed", [(1, True), (2, False)])
def test_error_rate_exactly_at_the_gate_passes(errors, passed):
    p, clock = _probation(gates=HealthGates(probation_s=10, max_error_rate="0.01"),
                          cfg=ProbationConfig(window_s=0, early_fail_min_requests=1000))
    v = _run(p, clock, [period(requests=100, errors=errors)] * 2)
    assert v.passed is (errors * 2 / 200 <= 0.01) and v.passed is passed


def _manifest_health(**gates):
    from _runtime_helpers import DIGITS, digits_manifest

    m = digits_manifest(DIGITS)
    return m.model_copy(update={"health": HealthGates(**gates)})


def test_probation_hook_fed_by_stats_listeners_rolls_back_on_errors_and_commits_when_healthy():
    from edge_agent.lifecycle.probation import make_probation_hook

    listeners = []
    verdicts = []

    def feed(stats):
        for fn in list(listeners):
            fn(stats)

    hook = make_probation_hook(ProbationConfig(window_s=0.3), stop=threading.Event(), add_listener=listeners.append,
                               remove_listener=listeners.remove, on_verdict=verdicts.append, poll_s=0.02)
    manifest = _manifest_health(probation_s=0, max_error_rate="0.01")
    t = threading.Timer(0.05, feed, args=(period(requests=100, errors=20),))
    t.start()
    reason = hook(None, manifest)
    assert reason is not None and "error rate 0.2000" in reason
    assert listeners == [] and not verdicts[-1].passed

    t = threading.Timer(0.05, feed, args=(period(requests=100),))
    t.start()
    assert hook(None, manifest) is None
    assert verdicts[-1].passed and verdicts[-1].measured["requests"] == 100


def test_probation_hook_runs_the_golden_recheck_with_the_record_and_fails_when_stopped():
    from edge_agent.lifecycle.probation import INTERRUPTED, make_probation_hook

    seen = []
    hook = make_probation_hook(ProbationConfig(window_s=0.05), stop=threading.Event(), get_stats=period,
                               golden_recheck=lambda rec, man: seen.append((rec, man.name)) or (False, "3/10 differ"),
                               poll_s=0.01)
    assert hook("record-1", _manifest_health(probation_s=0)) == "golden re-check failed: 3/10 differ"
    assert seen == [("record-1", "digits")]

    stop = threading.Event()
    stop.set()
    hook = make_probation_hook(ProbationConfig(window_s=60), stop=stop, poll_s=0.01)
    assert hook(None, _manifest_health(probation_s=0)) == INTERRUPTED


def test_config_cap_shortens_a_long_manifest_window():
    p, clock = _probation(gates=HealthGates(probation_s=600), cfg=ProbationConfig(window_s=60, max_window_s=5))
    assert p.window_s == 5
    v = _run(p, clock, [period()], step_s=6)
    assert v is not None and v.passed
