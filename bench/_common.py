"""Shared benchmark plumbing: arguments, figures, the environment block, the table and the JSON file.

Every benchmark compares against a baseline measured in the same run and writes::

    {"figures": [{"name", "value", "unit", "baseline", "target", "higher_is_better"}, ...],
     "environment": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the common `--json PATH` and `--quick` options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--quick", action="store_true", help="same measurements, smaller (< 1 minute)")
    return p


def figure(name: str, value: Optional[float], unit: str, *, baseline: Optional[float] = None,
           target: Optional[float] = None, higher_is_better: bool = True) -> Dict[str, Any]:
    """One result row."""
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "target": target,
            "higher_is_better": higher_is_better}


def environment(**extra: Any) -> Dict[str, Any]:
    """Where the numbers were measured."""
    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:
        pass
    env.update(extra)
    return env


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.4g" % v
    return str(v)


def run_clients(client: Callable[[int], None], concurrency: int, start: threading.Barrier) -> float:
    """Run `client(k)` for k in range(concurrency) on threads that all wait on `start` (a barrier for
    concurrency + 1 parties); the wall-clock seconds from the moment they are released until the last ends."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def print_table(figures: List[Dict[str, Any]], title: str = "") -> None:
    """A plain-text table of the figures; a target is marked met or missed."""
    if title:
        print(title)
    head = ("figure", "value", "unit", "baseline", "target", "met")
    rows = []
    for f in figures:
        met = "-"
        if f["target"] is not None and f["value"] is not None:
            ok = f["value"] >= f["target"] if f["higher_is_better"] else f["value"] <= f["target"]
            met = "yes" if ok else "NO"
        rows.append((f["name"], _fmt(f["value"]), f["unit"], _fmt(f["baseline"]), _fmt(f["target"]), met))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def write_json(path: Optional[str], figures: List[Dict[str, Any]], env: Dict[str, Any]) -> None:
    """Write the figures and environment when `path` is given."""
    if not path:
        return
    Path(path).write_text(json.dumps({"figures": figures, "environment": env}, indent=2) + "\n", encoding="utf-8")
