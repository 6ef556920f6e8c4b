"""Runtime benchmark on the held-out sample digits (ONNX Runtime, CPU), everything through
`InferenceService.infer_tensor` -- the same serving path the HTTP API and the sources use.

1. Router vs large-only: τ calibrated on the calibration split (allowed drop 0.5 points), then the
   held-out split served by C closed-loop client threads, once with the router and once with every
   request sent to the large model. Figures: throughput ratio (target >= 2x) and the accuracy
   difference in points (target <= 0.5).
2. Dynamic batching: the large model (every request routed to it) at concurrency 16 with dynamic
   batching, against serving one request at a time (engine batch 1, no queue delay) -- measured both at
   the same concurrency 16 and as lone sequential requests (concurrency 1). Figures: throughput ratio
   (target >= 3x) and the batched p99 against the single-request p99 (target <= 2x). For context, the
   large engine alone (no serving path) at the same batch against batch 1, measured in the same rounds:
   what batching saves inside the model itself on this hardware (the rest of a serving gain can only
   come from spreading per-request serving costs over a batch).
3. Shadowing: the active model's answer latency (client-side p99, router serving) with a shadow
   candidate mirroring a share of the requests (an identical bundle on its own engines, the agent's
   default mirror settings) against the same service without it, at concurrency 1 (a lightly loaded
   device, where mirrored work runs between requests) and at the main concurrency (a saturated one,
   where it is shed). Short on/off runs alternate many times and latencies are pooled per side.
   Figures: p99 on / p99 off (target <= 1.10), throughput on / off, and the share of requests the
   candidate answered.

Usage: python bench/runtime.py [--quick] [--json PATH] [--concurrency N] [--max-queue-delay-ms MS]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import environment, figure, parser, print_table, run_clients, write_json

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"


def _load(name: str) -> Tuple[np.ndarray, np.ndarray]:
    with np.load(str(DIGITS / ("%s.npz" % name))) as z:
        return z["x"].astype(np.float32), z["y"].astype(np.int64)


class _Models:
    def __init__(self, small, large, batch: int) -> None:
        self.small, self.large, self.batch = small, large, {"small": batch, "large": batch}


def _manifest(tau: float):
    from tests._runtime_helpers import digits_manifest

    return digits_manifest(Path(tempfile.gettempdir()), router={"tau": "%.6f" % tau, "tau_min": "0.5"})


def _drive(svc, x: np.ndarray, y: np.ndarray, *, concurrency: int, passes: int, items: int = 1) -> Dict[str, float]:
    """Closed-loop clients; each serves its share of (x repeated `passes` times), `items` per request.
    Returns items/s, accuracy, large fraction and per-request latency percentiles (client-side)."""
    n = len(x) * passes
    order = np.arange(n) % len(x)
    shares = [order[k::concurrency] for k in range(concurrency)]
    if items > 1:
        return _drive_many(svc, x, y, shares, items)
    lat: List[List[float]] = [[] for _ in range(concurrency)]
    correct = [0] * concurrency
    large = [0] * concurrency
    start = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        start.wait()
        for i in shares[k]:
            t0 = time.perf_counter()
            r = svc.infer_tensor(x[i], timeout_s=60)
            lat[k].append((time.perf_counter() - t0) * 1000.0)
            correct[k] += int(r.output["top"][0]["index"] == y[i])
            large[k] += int(r.route == "large")

    wall = run_clients(client, concurrency, start)
    all_lat = np.concatenate([np.array(v) for v in lat])
    return {
        "rps": n / wall,
        "accuracy": sum(correct) / n,
        "large_fraction": sum(large) / n,
        "p50_ms": float(np.percentile(all_lat, 50)),
        "p99_ms": float(np.percentile(all_lat, 99)),
        "mean_batch": svc.stats_snapshot()["mean_batch"] or 0.0,
    }


def _drive_many(svc, x: np.ndarray, y: np.ndarray, shares: List[np.ndarray], items: int) -> Dict[str, float]:
    concurrency = len(shares)
    lat: List[List[float]] = [[] for _ in range(concurrency)]
    correct = [0] * concurrency
    large = [0] * concurrency
    start = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        start.wait()
        idx = shares[k]
        for s in range(0, len(idx), items):
            part = idx[s : s + items]
            t0 = time.perf_counter()
            rs = svc.infer_batch(x[part], timeout_s=60)
            lat[k].append((time.perf_counter() - t0) * 1000.0)
            correct[k] += sum(int(r.output["top"][0]["index"] == y[i]) for r, i in zip(rs, part))
            large[k] += sum(int(r.route == "large") for r in rs)

    wall = run_clients(client, concurrency, start)
    n = sum(len(s) for s in shares)
    all_lat = np.concatenate([np.array(v) for v in lat])
    return {
        "rps": n / wall,
        "accuracy": sum(correct) / n,
        "large_fraction": sum(large) / n,
        "p50_ms": float(np.percentile(all_lat, 50)),
        "p99_ms": float(np.percentile(all_lat, 99)),
        "mean_batch": svc.stats_snapshot()["mean_batch"] or 0.0,
    }


def _latencies(svc, x: np.ndarray, idx: np.ndarray, concurrency: int) -> Tuple[List[float], float]:
    """Client-side latencies (ms) of single-item requests for x[idx] from closed-loop clients, and the wall time."""
    lat: List[List[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        start.wait()
        for i in idx[k::concurrency]:
            t0 = time.perf_counter()
            svc.infer_tensor(x[i], timeout_s=60)
            lat[k].append((time.perf_counter() - t0) * 1000.0)

    wall = run_clients(client, concurrency, start)
    return [v for part in lat for v in part], wall


def _shadow_pair(svc, shadowed, x: np.ndarray, *, concurrency: int, chunks: int) -> Dict[str, Any]:
    """The active service without and with shadowing, finely interleaved: `chunks` alternating pairs of
    short runs (the order flips every pair), latencies pooled per side. A slow spell of a shared machine
    then falls on both sides alike, which whole-run rounds cannot promise."""
    n = len(x)
    pooled: Dict[str, List[float]] = {"off": [], "on": []}
    wall = {"off": 0.0, "on": 0.0}
    before = shadowed.total_mirrored
    for k in range(chunks):
        for side in (("off", "on") if k % 2 == 0 else ("on", "off")):
            lat, w = _latencies(svc if side == "off" else shadowed, x, np.arange(n), concurrency)
            pooled[side].extend(lat)
            wall[side] += w
    out: Dict[str, Any] = {}
    for side, lat in pooled.items():
        a = np.array(lat)
        out[side] = {"rps": len(a) / wall[side], "p50_ms": float(np.percentile(a, 50)),
                     "p99_ms": float(np.percentile(a, 99))}
    out["answered"] = (shadowed.total_mirrored - before) / float(len(pooled["on"]))
    out["dropped"] = shadowed.total_dropped
    return out


def _engine_gain(engine, batch: int, *, iterations: int) -> float:
    """Items/s of the engine alone at `batch` over batch 1 (no queue, no threads, no pre/post-processing)."""
    from edge_agent.engines.tuner import measure_batches

    by = {m.batch: m.items_per_s for m in measure_batches(engine, sorted({1, batch}), iterations=iterations)}
    return by[batch] / by[1]


def main(argv=None) -> int:
    """Run both parts and print/write the figures."""
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=16, help="client threads, single-item requests (default 16)")
    ap.add_argument("--items", type=int, default=32, help="items per request in the multi-item run (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per model (default 1)")
    ap.add_argument("--max-queue-delay-ms", type=float, default=1.0,
                    help="batcher max queue delay of the batched runs (default 1.0)")
    args = ap.parse_args(argv)

    from edge_agent.config import RuntimeConfig
    from edge_agent.engines.ort import OrtEngine
    from edge_agent.runtime import calibration
    from edge_agent.runtime.service import InferenceService

    passes = 1 if args.quick else 2
    rounds = 3 if args.quick else 7
    c = args.concurrency
    xc, yc = _load("calib")
    xh, yh = _load("heldout")
    small = OrtEngine(DIGITS / "small.onnx", max_batch=32, intra_op_threads=args.threads)
    large = OrtEngine(DIGITS / "large.onnx", max_batch=32, intra_op_threads=args.threads)
    one = OrtEngine(DIGITS / "large.onnx", max_batch=1, intra_op_threads=args.threads)
    # the shadow candidate: the same models on engines of its own, as a device holds them
    cand_small = OrtEngine(DIGITS / "small.onnx", max_batch=32, intra_op_threads=args.threads)
    cand_large = OrtEngine(DIGITS / "large.onnx", max_batch=32, intra_op_threads=args.threads)
    tmp = Path(tempfile.gettempdir())

    # ---- calibrate τ on the calibration split only
    data = calibration.collect(small, large, xc, yc, gate="confidence", batch=32)
    rows = calibration.sweep(data, calibration.candidate_taus(data.scores, 0.5, 0.999))
    # the point estimate (not the confidence bound `fleet router calibrate` uses): this bench measures
    # serving throughput at a typical operating point, the held-out accuracy check is reported below
    best = calibration.recommend(rows, max_drop_pts=0.5, key="drop_pts")
    tau = best["tau"] if best else 0.999
    print("calibrated tau = %.4f on %d calibration items (calib large fraction %.3f); model cost per item at "
          "batch 32: small %.4f ms, large %.4f ms"
          % (tau, len(yc), best["large_fraction"] if best else float("nan"), data.cost_small_ms, data.cost_large_ms))

    # Dynamic batching as served: engine batch = the client concurrency, max queue delay from the options.
    batch = min(c, 32)
    cfg = RuntimeConfig(max_queue_delay_ms=args.max_queue_delay_ms, max_queue=256)
    many_c = max(1, c // 4)
    svc = InferenceService(_Models(small, large, batch), _manifest(tau), tmp, cfg)
    svc_many = InferenceService(_Models(small, large, 32), _manifest(tau), tmp, cfg)
    svc_one = InferenceService(_Models(small, one, 1), _manifest(tau), tmp, RuntimeConfig(max_queue_delay_ms=0.0))
    from edge_agent.config import ShadowConfig
    from edge_agent.runtime.mirror import ShadowService

    shadow_cfg = ShadowConfig()
    svc_cand = InferenceService(_Models(cand_small, cand_large, batch), _manifest(tau), tmp, cfg)
    shadowed = ShadowService(svc, svc_cand, candidate_ref={"name": "digits", "version": 2},
                             fraction=shadow_cfg.mirror_fraction, queue_size=shadow_cfg.mirror_queue,
                             shed_in_flight=shadow_cfg.shed_in_flight)
    # (service, gate, concurrency, items per request) of every configuration measured.
    configs = {
        "router": (svc, "confidence", c, 1),
        "large": (svc, "large-only", c, 1),
        "router_many": (svc_many, "confidence", many_c, args.items),
        "large_many": (svc_many, "large-only", many_c, args.items),
        "one16": (svc_one, "large-only", 16, 1),
        "seq": (svc_one, "large-only", 1, 1),
    }
    # The machine may be shared: configurations are interleaved round by round and each figure is the
    # median over rounds (ratios are taken within a round, so slow spells hit both sides).
    per_round: Dict[str, List[Dict[str, float]]] = {k: [] for k in configs}
    engine_gain: List[float] = []
    try:
        for s, gate, conc, items in configs.values():  # warm-up
            s.set_router(gate=gate)
            _drive(s, xh[:96], yh[:96], concurrency=conc, passes=1, items=items)
        for rnd in range(rounds):
            keys = list(configs)
            keys = keys[rnd % len(keys):] + keys[: rnd % len(keys)]
            for k in keys:
                s, gate, conc, items = configs[k]
                s.set_router(gate=gate)
                per_round[k].append(_drive(s, xh, yh, concurrency=conc, passes=passes, items=items))
            engine_gain.append(_engine_gain(large, batch, iterations=40 if args.quick else 100))
        svc.set_router(gate="confidence")
        shadow = {conc: _shadow_pair(svc, shadowed, xh, concurrency=conc, chunks=12 if args.quick else 40)
                  for conc in (1, c)}
    finally:
        shadowed.close_mirror()
        for s in (svc, svc_many, svc_one):
            s.close()
        for e in (small, large, one, cand_small, cand_large):
            e.close()
    runs = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in per_round.items()}

    def ratio(a: str, b: str, m: str = "rps") -> float:
        return float(np.median([x[m] / y[m] for x, y in zip(per_round[a], per_round[b])]))

    r, lo, rm, lm = runs["router"], runs["large"], runs["router_many"], runs["large_many"]
    b16, one16, seq = runs["large"], runs["one16"], runs["seq"]
    figures = [
        figure("router/large-only throughput, 1 item/request, c=%d" % c, ratio("router", "large"), "x",
               baseline=1.0, target=2.0),
        figure("router/large-only throughput, %d items/request, c=%d" % (args.items, many_c),
               ratio("router_many", "large_many"), "x", baseline=1.0, target=2.0),
        figure("router accuracy loss vs large-only (heldout)", (lo["accuracy"] - r["accuracy"]) * 100, "points",
               baseline=0.0, target=0.5, higher_is_better=False),
        figure("router large fraction (heldout)", r["large_fraction"], "fraction", baseline=1.0,
               higher_is_better=False),
        figure("router throughput, 1 item/request", r["rps"], "items/s", baseline=lo["rps"]),
        figure("router throughput, %d items/request" % args.items, rm["rps"], "items/s", baseline=lm["rps"]),
        figure("router p99, 1 item/request", r["p99_ms"], "ms", baseline=lo["p99_ms"], higher_is_better=False),
        figure("batching gain vs one-at-a-time, both c=16", ratio("large", "one16"), "x", baseline=1.0,
               target=3.0),
        figure("batching gain vs lone sequential requests (c=1)", ratio("large", "seq"), "x", baseline=1.0,
               target=3.0),
        figure("batched p99 (c=16) / single-request p99 (c=1)", ratio("large", "seq", "p99_ms"), "x", baseline=1.0,
               target=2.0, higher_is_better=False),
        figure("batched p99 (c=16) / one-at-a-time p99 (c=16)", ratio("large", "one16", "p99_ms"), "x", baseline=1.0,
               target=2.0, higher_is_better=False),
        figure("batched mean batch (c=16)", b16["mean_batch"], "items", baseline=1.0),
        figure("large engine alone: batch %d / batch 1 throughput (model-side batching gain)" % batch,
               float(np.median(engine_gain)), "x", baseline=1.0),
    ]
    for conc, sh in shadow.items():
        figures += [
            figure("shadowing on/off: active p99, c=%d" % conc, sh["on"]["p99_ms"] / sh["off"]["p99_ms"], "x",
                   baseline=1.0, target=1.10, higher_is_better=False),
            figure("shadowing on/off: throughput, c=%d" % conc, sh["on"]["rps"] / sh["off"]["rps"], "x",
                   baseline=1.0),
            figure("shadowing: requests the candidate answered, c=%d (mirror fraction %.2f)"
                   % (conc, shadow_cfg.mirror_fraction), sh["answered"], "fraction",
                   baseline=shadow_cfg.mirror_fraction),
        ]
    print()
    print_table(figures, "runtime benchmark: %d heldout digits x %d passes x %d interleaved rounds (medians), "
                "ONNX Runtime CPU, %d intra-op thread(s), engine batch %d, max queue delay %.1f ms"
                % (len(yh), passes, rounds, args.threads, batch, cfg.max_queue_delay_ms))
    print()
    names = (("router", r, c, 1), ("large-only", lo, c, 1), ("router", rm, many_c, args.items),
             ("large-only", lm, many_c, args.items), ("one-at-a-time", one16, 16, 1), ("sequential", seq, 1, 1))
    print("%-14s %4s %5s %10s %9s %9s %7s %6s %6s" % ("run", "c", "items", "items/s", "p50 ms", "p99 ms", "acc",
                                                    "large", "batch"))
    for name, m, conc, items in names:
        print("%-14s %4d %5d %10.0f %9.3f %9.3f %7.4f %6.3f %6.2f" % (name, conc, items, m["rps"], m["p50_ms"],
              m["p99_ms"], m["accuracy"], m["large_fraction"], m["mean_batch"]))
    for conc, sh in shadow.items():
        for side in ("off", "on"):
            m = sh[side]
            print("%-14s %4d %5d %10.0f %9.3f %9.3f" % ("shadow " + side, conc, 1, m["rps"], m["p50_ms"], m["p99_ms"]))
    write_json(args.json, figures, environment(
        onnxruntime=_ort_version(), tau=tau, concurrency=c, multi_item_concurrency=many_c, items_per_request=args.items,
        passes=passes, rounds=rounds, intra_op_threads=args.threads, max_queue_delay_ms=cfg.max_queue_delay_ms,
        engine_batch=batch,
        cost_small_ms_per_item=data.cost_small_ms, cost_large_ms_per_item=data.cost_large_ms,
        runs=runs, engine_gain_per_round=engine_gain, cpu_count=os.cpu_count(),
        shadow_mirror_fraction=shadow_cfg.mirror_fraction, shadow_shed_in_flight=shadow_cfg.shed_in_flight,
        shadow=shadow,
    ))
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    raise SystemExit(main())
