"""Splitting a rollout's target devices into waves (cumulative percentages or explicit lists)."""

from __future__ import annotations

import math
from typing import List, Sequence

from fleet.rollouts.states import RolloutError


def resolve_waves(targets: Sequence[str], percents: Sequence[float]) -> List[List[str]]:
    """Split `targets` (in order) into cumulative percentage waves: 10,30,100 over 20 devices gives
    2, 4 and 14 devices. Every wave gets at least one device; waves that would be empty are dropped."""
    if not targets:
        raise RolloutError("no target devices")
    if not percents:
        raise RolloutError("no waves given")
    last = 0.0
    for p in percents:
        if not 0 < p <= 100:
            raise RolloutError("wave percentages must be in (0, 100], got %g" % p)
        if p <= last:
            raise RolloutError("wave percentages must increase (they are cumulative), got %g after %g" % (p, last))
        last = p
    if percents[-1] != 100:
        raise RolloutError("the last wave must be 100%% (got %g%%); devices would be left out" % percents[-1])
    n = len(targets)
    waves: List[List[str]] = []
    done = 0
    for p in percents:
        upto = min(n, max(done + 1, math.ceil(p * n / 100.0 - 1e-9)))
        if upto > done:
            waves.append(list(targets[done:upto]))
            done = upto
    return waves


def check_explicit_waves(waves: Sequence[Sequence[str]]) -> List[List[str]]:
    """Validate explicit device-list waves: non-empty, no device twice."""
    seen = set()
    out = []
    for i, w in enumerate(waves):
        if not w:
            raise RolloutError("wave %d is empty" % (i + 1))
        for d in w:
            if d in seen:
                raise RolloutError("device %s is in more than one wave" % d)
            seen.add(d)
        out.append(list(w))
    if not out:
        raise RolloutError("no waves given")
    return out
