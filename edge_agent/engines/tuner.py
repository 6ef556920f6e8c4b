"""Batch sizing and tuning.

Two pure choosers — `max_batch_for_budget` (the largest batch at which *both* models' engine memory fits
the budget) and `choose_batch` (the highest throughput whose p99 latency meets the SLO) — and one
measuring loop, `measure_batches`, that times an engine at candidate batch sizes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from edge_agent.engines.base import Engine, TensorSpec


@dataclass(frozen=True)
class MemoryModel:
    """Engine memory as fixed + per-item bytes (weights and buffers + activations per batch item)."""

    fixed_bytes: int
    per_item_bytes: int

    def bytes_at(self, batch: int) -> int:
        """Memory at `batch`."""
        return int(self.fixed_bytes + self.per_item_bytes * batch)


def max_batch_for_budget(models: Sequence[MemoryModel], budget_bytes: int, limit: int) -> int:
    """Largest batch in 1..limit at which the models together fit in `budget_bytes`; 0 when none does."""
    fixed = sum(m.fixed_bytes for m in models)
    per_item = sum(m.per_item_bytes for m in models)
    if fixed + per_item > budget_bytes:
        return 0
    if per_item <= 0:
        return int(limit)
    return int(min(limit, (budget_bytes - fixed) // per_item))


def candidate_batches(max_batch: int) -> List[int]:
    """1, 2, 4, ... up to max_batch, and max_batch itself."""
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(int(max_batch))
    return out


@dataclass(frozen=True)
class BatchMeasurement:
    """Timing of one batch size."""

    batch: int
    p50_ms: float
    p99_ms: float
    items_per_s: float
    memory_bytes: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class TuneChoice:
    """The chosen batch, why, and the table it was chosen from."""

    batch: int
    slo_met: bool
    reason: str
    table: List[BatchMeasurement]

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready."""
        return {"batch": self.batch, "slo_met": self.slo_met, "reason": self.reason,
                "table": [m.as_dict() for m in self.table]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> TuneChoice:
        """Inverse of `as_dict`."""
        return cls(batch=int(d["batch"]), slo_met=bool(d["slo_met"]), reason=str(d["reason"]),
                   table=[BatchMeasurement(**m) for m in d["table"]])


def choose_batch(table: Sequence[BatchMeasurement], slo_ms: float) -> TuneChoice:
    """Highest throughput among batches whose p99 meets the SLO (smaller batch on a tie); when none
    meets it, the batch with the lowest p99, flagged `slo_met=False`."""
    if not table:
        raise ValueError("no measurements to choose from")
    ok = [m for m in table if m.p99_ms <= slo_ms]
    if ok:
        best = max(ok, key=lambda m: (m.items_per_s, -m.batch))
        return TuneChoice(best.batch, True, "highest throughput (%.0f items/s) with p99 %.2f ms <= SLO %.2f ms"
                          % (best.items_per_s, best.p99_ms, slo_ms), list(table))
    best = min(table, key=lambda m: (m.p99_ms, m.batch))
    return TuneChoice(best.batch, False, "no batch meets the p99 SLO of %.2f ms; lowest p99 is %.2f ms at batch %d"
                      % (slo_ms, best.p99_ms, best.batch), list(table))


def make_feed(specs: Sequence[TensorSpec], batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random inputs of the right names, dtypes and shapes (floats in [0, 1), integers 0)."""
    rng = np.random.RandomState(seed)
    feed = {}
    for s in specs:
        shape = tuple(batch if d == -1 else d for d in s.with_batch(batch))
        dtype = np.dtype(s.dtype)
        feed[s.name] = rng.rand(*shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return feed


def measure_batches(
    engine: Engine,
    batches: Sequence[int],
    *,
    iterations: int,
    warmup: int = 2,
    rounds: int = 5,
    memory_at: Optional[Callable[[int], Optional[int]]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> List[BatchMeasurement]:
    """Time `engine.infer` at each batch size: p50/p99 of per-call latency and items per second.

    The candidates are measured round-robin (`rounds` rounds of about iterations/rounds calls each), so
    a burst of load from elsewhere on the device spreads over all candidates instead of sinking one.
    Throughput is items over the summed wall time of that batch's calls (outliers included).
    """
    batches = [int(b) for b in batches]
    rounds = max(1, min(int(rounds), int(iterations)))
    per_round = -(-int(iterations) // rounds)
    feeds = {b: make_feed(engine.inputs, b, seed=b) for b in batches}
    for b in batches:
        for _ in range(warmup):
            engine.infer(feeds[b])
    times: Dict[int, List[float]] = {b: [] for b in batches}
    wall: Dict[int, float] = {b: 0.0 for b in batches}
    for _ in range(rounds):
        for b in batches:
            feed, sink = feeds[b], times[b]
            t_start = clock()
            for _ in range(per_round):
                t0 = clock()
                engine.infer(feed)
                sink.append(clock() - t0)
            wall[b] += clock() - t_start
    table = []
    for b in batches:
        ms = np.asarray(times[b]) * 1000.0
        table.append(BatchMeasurement(
            batch=b,
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            items_per_s=float(b * len(times[b]) / wall[b]) if wall[b] > 0 else float("inf"),
            memory_bytes=memory_at(b) if memory_at else None,
        ))
    return table


def format_table(choice: TuneChoice, title: str = "") -> str:
    """The tuner table as text: batch, p50, p99, items/s, memory, and the choice."""
    lines = []
    if title:
        lines.append(title)
    lines.append("%6s %10s %10s %12s %10s" % ("batch", "p50 ms", "p99 ms", "items/s", "memory MB"))
    for m in choice.table:
        mem = "%.1f" % (m.memory_bytes / 1048576.0) if m.memory_bytes is not None else "-"
        mark = "  <- chosen" if m.batch == choice.batch else ""
        lines.append("%6d %10.3f %10.3f %12.1f %10s%s" % (m.batch, m.p50_ms, m.p99_ms, m.items_per_s, mem, mark))
    lines.append("choice: batch %d (%s)" % (choice.batch, choice.reason))
    return "\n".join(lines)
