"""The router's pure logic: τ for a fraction, adaptive τ on a stream, load shedding, bounds, heads."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.runtime.errors import RouterPolicyError
from edge_agent.runtime.router import (
    LinearHead,
    TauController,
    fit_linear_head,
    input_stats,
    routes_large,
    tau_for_fraction,
)


@pytest.mark.parametrize("gate", ["confidence", "linear"])
@pytest.mark.parametrize("target", [0.0, 0.05, 0.3, 0.77, 1.0])
def test_tau_for_fraction_sends_exactly_that_fraction(gate, target):
    scores = np.random.default_rng(1).uniform(size=1000)
    tau = tau_for_fraction(gate, scores, target)
    assert routes_large(gate, scores, tau).mean() == pytest.approx(target, abs=1e-3)


def _controller(**kw) -> TauController:
    args = dict(gate="confidence", tau=0.9, tau_min=0.01, tau_max=0.999, window=500, large_queue_limit=8)
    args.update(kw)
    return TauController(**args)


def _confidences(rng, n, shift=0.0):
    # Skewed towards high confidence, like a good classifier's top probability.
    return np.clip(1.0 - rng.beta(1.0, 6.0 + shift, size=n), 0.0, 1.0)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_adaptive_tau_converges_to_the_target_fraction_on_a_stream(target):
    rng = np.random.default_rng(7)
    c = _controller(adaptive=True, target_large_fraction=target)
    routed = [c.decide(s) for s in _confidences(rng, 3000)]
    assert np.mean(routed[-500:]) == pytest.approx(target, abs=0.05)
    # The distribution shifts (the camera's scene changes): τ follows and the fraction holds.
    routed = [c.decide(s) for s in _confidences(rng, 3000, shift=20.0)]
    assert np.mean(routed[-500:]) == pytest.approx(target, abs=0.05)
    assert c.tau_min <= c.tau <= c.tau_max


def test_adaptive_linear_gate_converges_too():
    rng = np.random.default_rng(3)
    c = _controller(gate="linear", tau=0.5, tau_min=0.0, tau_max=1.0, adaptive=True, target_large_fraction=0.2)
    routed = [c.decide(s) for s in rng.uniform(size=3000) ** 3]
    assert np.mean(routed[-500:]) == pytest.approx(0.2, abs=0.05)


def test_fixed_tau_does_not_move_without_adaptation():
    rng = np.random.default_rng(7)
    c = _controller(tau=0.8)
    for s in _confidences(rng, 1000):
        c.decide(s)
    assert c.tau == 0.8


def test_tau_stays_inside_bounds_when_the_target_asks_for_more():
    rng = np.random.default_rng(5)
    # Every score is high; holding 90% large would need τ above tau_max.
    c = _controller(tau=0.9, tau_max=0.95, adaptive=True, target_large_fraction=0.9)
    for s in rng.uniform(0.97, 1.0, size=1000):
        c.decide(s)
        assert c.tau_min <= c.tau <= c.tau_max
    assert c.tau == pytest.approx(0.95)


def test_load_shedding_kicks_in_past_the_queue_limit_and_recovers():
    rng = np.random.default_rng(11)
    scores = _confidences(rng, 4000)
    c = _controller(tau=0.95, tau_min=0.5)
    now = 0.0
    base = np.mean([c.decide(s) for s in scores[:1000]])
    assert base > 0.2
    # The large queue passes its limit: τ drops to tau_min within the attack time and fewer go large.
    for _ in range(20):
        now += 0.02
        assert c.update_load(now, large_queue_depth=8, large_p99_ms=None)
    assert c.tau == pytest.approx(0.5)
    assert c.shed_episodes == 1
    shed = np.mean([c.decide(s) for s in scores[1000:2000]])
    assert shed < base / 3
    # Pressure gone: τ climbs back to its base over the release time.
    for _ in range(150):
        now += 0.02
        assert not c.update_load(now, large_queue_depth=0, large_p99_ms=None)
    assert c.tau == pytest.approx(0.95)
    again = np.mean([c.decide(s) for s in scores[2000:3000]])
    assert again == pytest.approx(base, abs=0.05)


def test_p99_over_slo_sheds_and_linear_gate_sheds_upwards():
    c = _controller(gate="linear", tau=0.5, tau_min=0.1, tau_max=0.9, large_p99_slo_ms=20.0)
    assert not c.update_load(0.0, large_queue_depth=0, large_p99_ms=15.0)
    for i in range(1, 20):
        c.update_load(i * 0.05, large_queue_depth=0, large_p99_ms=35.0)
    assert c.tau == pytest.approx(0.9)  # linear: a higher τ sends fewer to large
    assert not c.decide(0.85)


def test_shedding_never_leaves_bounds_while_adaptive():
    rng = np.random.default_rng(2)
    c = _controller(tau=0.9, tau_min=0.6, adaptive=True, target_large_fraction=0.5)
    now = 0.0
    for i, s in enumerate(_confidences(rng, 2000)):
        now += 0.001
        c.update_load(now, large_queue_depth=100 if 500 <= i < 900 else 0, large_p99_ms=None)
        c.decide(s)
        assert 0.6 <= c.tau <= 0.999


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tau": 1.5}, "outside the bundle's bounds"),
        ({"gate": "magic"}, "unknown gate"),
        ({"adaptive": True}, "needs target_large_fraction"),
        ({"target_large_fraction": 1.2}, "within \\[0, 1\\]"),
    ],
)
def test_bad_policy_change_is_refused_and_changes_nothing(change, match):
    c = _controller(tau=0.8)
    before = c.state()
    with pytest.raises(RouterPolicyError, match=match):
        c.set_policy(**change)
    assert c.state() == before


def test_policy_change_at_run_time():
    c = _controller(tau=0.8)
    c.set_policy(tau=0.6)
    assert c.tau == 0.6 and not c.decide(0.7)
    c.set_policy(gate="large-only")
    assert c.decide(0.9999) and not c.thresholded
    c.set_policy(gate="small-only")
    assert not c.decide(0.0)


def test_linear_head_round_trip_and_bad_files(tmp_path):
    head = LinearHead(w=np.array([1.0, -2.0]), b=0.5, source="features")
    head.save(tmp_path / "h.npz")
    back = LinearHead.load(tmp_path / "h.npz")
    assert back.source == "features"
    np.testing.assert_allclose(back.scores(np.array([[1.0, 1.0]])), head.scores(np.array([[1.0, 1.0]])), rtol=1e-6)
    np.savez(tmp_path / "nob.npz", w=np.ones(2), source=np.array("features"))
    with pytest.raises(RouterPolicyError, match="lacks b"):
        LinearHead.load(tmp_path / "nob.npz")
    np.savez(tmp_path / "src.npz", w=np.ones(2), b=np.float32(0), source=np.array("pixels"))
    with pytest.raises(RouterPolicyError, match="source must be one of"):
        LinearHead.load(tmp_path / "src.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(RouterPolicyError, match="cannot read linear head"):
        LinearHead.load(tmp_path / "junk.npz")
    with pytest.raises(RouterPolicyError, match="expects 2 values"):
        head.scores(np.ones((1, 3)))


def test_fitted_head_separates_a_learnable_signal():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2000, 5))
    hard = (v[:, 0] + 0.5 * v[:, 3]) > 1.0
    head = fit_linear_head(v, hard, source="features")
    s = head.scores(v)
    assert s[hard].mean() > s[~hard].mean() + 0.4
    assert ((s > 0.5) == hard).mean() > 0.9


def test_input_stats_are_cheap_fixed_size_and_finite():
    x = np.random.default_rng(0).uniform(size=(4, 1, 8, 8)).astype(np.float32)
    st = input_stats(x)
    assert st.shape == (4, 8) and np.all(np.isfinite(st))
    assert np.all(np.isfinite(input_stats(np.zeros((2, 3, 4, 4), np.float32))))
