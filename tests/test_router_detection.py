"""The confidence gate's score for detection bundles: `detection_certainty` (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.runtime.router import detection_certainty, routes_large


def test_no_candidate_box_is_full_certainty():
    assert detection_certainty(np.array([]), 0.4) == 1.0


def test_a_box_on_the_threshold_is_no_certainty():
    assert detection_certainty(np.array([0.95, 0.4]), 0.4) == pytest.approx(0.0)


def test_margins_are_shares_of_the_room_on_each_side():
    t = 0.4
    assert detection_certainty(np.array([1.0]), t) == pytest.approx(1.0)
    assert detection_certainty(np.array([0.7]), t) == pytest.approx(0.5)  # (0.7 - 0.4) / 0.6
    assert detection_certainty(np.array([0.2]), t) == pytest.approx(0.5)  # (0.4 - 0.2) / 0.4
    assert detection_certainty(np.array([0.0]), t) == pytest.approx(1.0)


def test_the_least_decided_box_decides_the_frame():
    t = 0.5
    sure = np.array([0.98, 0.97, 0.02])
    assert detection_certainty(sure, t) > 0.9
    doubtful = np.append(sure, 0.55)
    assert detection_certainty(doubtful, t) == pytest.approx(0.1)
    # under the confidence rule (large when score < tau) only the doubtful frame escalates at tau = 0.5
    scores = np.array([detection_certainty(sure, t), detection_certainty(doubtful, t)])
    assert routes_large("confidence", scores, 0.5).tolist() == [False, True]


def test_certainty_falls_as_a_box_nears_the_threshold():
    t = 0.3
    vals = [detection_certainty(np.array([0.9, s]), t) for s in (0.95, 0.8, 0.6, 0.4, 0.31)]
    assert vals == sorted(vals, reverse=True)
    assert all(0.0 <= v <= 1.0 for v in vals)
