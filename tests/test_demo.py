"""The README's demo command runs the whole loop and ends with the broken bundle halted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def test_demo_rolls_out_serves_and_halts_the_broken_bundle():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--devices", "3"],
        cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False,
    )
    out = r.stdout
    assert r.returncode == 0, out[-4000:]
    assert "SUCCEEDED" in out and "all 3 waves passed" in out
    assert "HALTED" in out and "probation-failed" in out
    assert "demo finished" in out
    assert re.search(r"web console: http://127\.0\.0\.1:\d+/  \(operator token: \S{40,}\)", out)
    # every device ends on v1: the one that took v2 rolled back, the others never received it
    tail = out.split("digits96 v2 declares")[1]
    assert tail.count("digits96 v1") >= 3 and "digits96 v2  active" not in tail
