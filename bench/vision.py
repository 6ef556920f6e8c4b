"""Benchmark on the vision-sized samples: samples/digits96 (96x96 classifiers) and samples/shapes (128x128
detectors), each built into a signed bundle and unpacked as a device does, served by `InferenceService`
on ONNX Runtime (CPU, one intra-op thread per model, engine batch 16).

1. Model cost: ms per item of each model alone at batch 1 and batch 16 (what one CPU core pays).
2. Router vs large-only over the HTTP API (`ApiServer`, loopback, one `.npy` item per POST, keep-alive
   connections) at concurrency C: τ is the one `fleet router calibrate` recommends for the bundle on the
   generated calib split (3,000 items; its defaults: 0.5-point budget met by the exact 95 % bound,
   30 % of the data held out to check it), the generated held-out split (3,000 other items, glyphs
   never trained on) is served once per round with the router and once with every request sent to the
   large model. Figures: throughput ratio (target >= 2.5x) and the accuracy difference on held-out data
   in points (target <= 0.5; one item is 0.033 points).
3. Dynamic batching: the large model (all requests routed to it) at concurrency 16 through
   `infer_tensor`, batched (engine batch 16, max queue delay 2 ms) against one request at a time (engine
   batch 1, no queue delay), and the same two engines alone (batch 16 calls on the batched service's
   engine, batch 1 calls on the one-at-a-time service's engine, same items, one intra-op thread). Each
   round measures all four back to back over the same number of items, in an order that alternates;
   the figure is the median over rounds of that round's served gain / engine gain: target >= 0.9.
4. Detector through a source: a folder of held-out scenes read by `SourceRunner` (OpenCV decode), served
   by the router, by the small model only and by the large model only; frames/s and matched-box F1
   against the scene ground truth (IoU >= 0.5, same class). The full run generates 1,000 scenes the
   detectors never saw (its own seed); --quick plays the committed 100 of samples/shapes/heldout.

Rounds interleave the configurations and each figure is the median over rounds, so the slow spells of a
shared machine fall on both sides of a ratio.

Usage: python bench/vision.py [--quick] [--json PATH] [--concurrency N]
"""

from __future__ import annotations

import http.client
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "samples"))

import harness  # noqa: E402  (samples/harness.py)

from bench._common import environment, figure, parser, print_table, run_clients, write_json  # noqa: E402

MAX_DROP_PTS = 0.5
ENGINE_BATCH = 16
#: Held-out scenes the full run generates for the detector (seeded apart from samples/shapes' training,
#: calib and heldout scenes); --quick plays the committed samples/shapes/heldout (100 scenes).
BENCH_SCENES = 1000
BENCH_SCENE_SEED = 20240607 + 12


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x[None], np.float32), allow_pickle=False)
    return buf.getvalue()


def model_costs(models: Any, x: np.ndarray, *, iterations: int) -> Dict[str, float]:
    """Per item of each engine alone at batch 1 and ENGINE_BATCH: CPU ms of the calling thread (with one
    intra-op thread ONNX Runtime computes in the caller's thread: what one core pays, whatever else the
    machine runs) and wall ms (which a busy machine inflates)."""
    out: Dict[str, float] = {}
    for name in ("small", "large"):
        engine = getattr(models, name)
        feed_name = engine.inputs[0].name
        for batch in (1, ENGINE_BATCH):
            feed = {feed_name: np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])), np.float32)}
            for _ in range(3):  # warm-up (the first runs of a session cost far more)
                engine.infer(feed)
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(iterations):
                engine.infer(feed)
            out["%s_b%d_cpu_ms" % (name, batch)] = (time.thread_time() - c0) * 1000.0 / iterations / batch
            out["%s_b%d_ms" % (name, batch)] = (time.perf_counter() - t0) * 1000.0 / iterations / batch
    return out


def calibrate_tau(bundle_dir: Path, xc: np.ndarray, yc: np.ndarray, work: Path) -> Tuple[float, Dict[str, Any]]:
    """The τ `fleet router calibrate` recommends for the bundle on (xc, yc) with its default settings
    (0.5-point budget, exact 95 % bound, 30 % held out); the bundle's tau_max (all but certain items go
    large) when it recommends none."""
    import contextlib
    import json

    from fleet.cli import main as fleet_main

    data, out = work / "calib96.npz", work / "calib96.json"
    np.savez(data, x=xc, y=yc)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = fleet_main(["router", "calibrate", str(bundle_dir), "--data", str(data), "--json", str(out),
                         "--max-accuracy-drop", str(MAX_DROP_PTS)])
    data.unlink()
    doc = json.loads(out.read_text()) if out.exists() else {}
    best = doc.get("recommended")
    if rc != 0 or not best:
        return 0.999, {"refused": True, "rc": rc}
    check = doc.get("heldout_check") or {}
    return float(best["tau"]), {"large_fraction": best["large_fraction"], "drop_upper_pts": best["drop_upper_pts"],
                                "drop_pts": best["drop_pts"], "items": doc["calibration_items"],
                                "check_drop_pts": check.get("drop_pts"), "check_items": doc["heldout_items"]}


def http_drive(port: int, bodies: List[bytes], labels: np.ndarray, *, concurrency: int) -> Dict[str, float]:
    """Closed-loop HTTP clients (one keep-alive connection each) POSTing every body once."""
    import json

    shares = [list(range(k, len(bodies), concurrency)) for k in range(concurrency)]
    correct = [0] * concurrency
    large = [0] * concurrency
    failed = [0] * concurrency
    start = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        for i in shares[k]:
            conn.request("POST", "/v1/infer", body=bodies[i], headers={"Content-Type": "application/x-npy"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                failed[k] += 1
                continue
            ans = json.loads(data)
            correct[k] += int(ans["output"]["top"][0]["index"] == labels[i])
            large[k] += int(ans["route"] == "large")
        conn.close()

    wall = run_clients(client, concurrency, start)
    n = len(bodies)
    return {"rps": n / wall, "accuracy": sum(correct) / n, "large_fraction": sum(large) / n,
            "failed": float(sum(failed))}


def inproc_drive(svc: Any, x: np.ndarray, *, concurrency: int) -> float:
    """Items/s of closed-loop `infer_tensor` clients serving every item of x once."""
    start = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        start.wait()
        for i in range(k, len(x), concurrency):
            svc.infer_tensor(x[i], timeout_s=60)

    return len(x) / run_clients(client, concurrency, start)


def engine_drive(engine: Any, x: np.ndarray, batch: int) -> float:
    """Items/s of the engine alone over x in calls of `batch` items (the caller's thread)."""
    name = engine.inputs[0].name
    t0 = time.perf_counter()
    for s in range(0, len(x) - batch + 1, batch):
        engine.infer({name: x[s : s + batch]})
    return (len(x) // batch * batch) / (time.perf_counter() - t0)


def batching_round(svc: Any, svc_one: Any, models: Any, one: Any, x: np.ndarray, *, rnd: int) -> Dict[str, float]:
    """One round: served batched / one-at-a-time and the engines alone at batch 16 / 1, on the same items,
    back to back (order alternating by round). Returns the four items/s and both gains."""
    steps = [("batched", lambda: inproc_drive(svc, x, concurrency=16)),
             ("single", lambda: inproc_drive(svc_one, x, concurrency=16)),
             ("engine_b16", lambda: engine_drive(models.large, x, ENGINE_BATCH)),
             ("engine_b1", lambda: engine_drive(one.large, x, 1))]
    out = {k: f() for k, f in (steps if rnd % 2 == 0 else steps[::-1])}
    out["served_gain"] = out["batched"] / out["single"]
    out["engine_gain"] = out["engine_b16"] / out["engine_b1"]
    out["share"] = out["served_gain"] / out["engine_gain"]
    return out


def source_run(svc: Any, folder: Path, truth: Dict[str, Any]) -> Dict[str, float]:
    """Play the folder once through a SourceRunner; frames/s, F1 and the share routed to large."""
    from edge_agent.config import SourceConfig
    from edge_agent.runtime.sources import SourceRunner

    got: List[Any] = []
    runner = SourceRunner(SourceConfig(name="bench", uri=str(folder)), get_service=lambda: svc,
                          publish=got.append, device_id="bench-device")
    t0 = time.perf_counter()
    runner.start()
    if not runner.done.wait(300):
        runner.stop()
        raise RuntimeError("the source did not finish within 300 s")
    wall = time.perf_counter() - t0
    tp, fp, fn = harness.detection_counts(((r.output["file"], r.output) for r in got), truth)
    return {"fps": len(got) / wall, "f1": harness.synth.f1_score(tp, fp, fn), "frames": float(len(got)),
            "large_fraction": sum(r.route == "large" for r in got) / max(1, len(got))}


def _median(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}


def _ratio(a: List[Dict[str, float]], b: List[Dict[str, float]], key: str) -> float:
    return float(np.median([x[key] / y[key] for x, y in zip(a, b)]))


def batching_rounds_per_round(args: Any) -> int:
    """Batching measurements after each HTTP round (short ones, so more of them)."""
    return 1 if args.quick else 3


def classifier_part(work: Path, args: Any, rounds: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Parts 1-3 on digits96."""
    from edge_agent.config import ApiConfig, RuntimeConfig
    from edge_agent.runtime.http_api import ApiServer
    from edge_agent.runtime.service import InferenceService

    bdir, manifest = harness.build_unpacked(harness.DIGITS96, work)
    xc, yc = harness.load_split("calib")
    xh, yh = harness.load_split("heldout")
    models = harness.ort_models(bdir, manifest, batch=ENGINE_BATCH)
    one = harness.ort_models(bdir, manifest, batch=1)
    iters = 5 if args.quick else 30
    costs = model_costs(models, xc[:64], iterations=iters)
    tau, cal = calibrate_tau(bdir, xc, yc, work)
    print("digits96: tau %.4f recommended by `fleet router calibrate` on %d calib items (%s); CPU ms per item on one "
          "core: small %.3f (batch 1) / %.3f (batch 16), large %.3f / %.3f"
          % (tau, len(yc), cal, costs["small_b1_cpu_ms"], costs["small_b16_cpu_ms"], costs["large_b1_cpu_ms"],
             costs["large_b16_cpu_ms"]), flush=True)
    svc = InferenceService(models, manifest, bdir, RuntimeConfig(max_queue_delay_ms=2.0, max_queue=256))
    svc_one = InferenceService(one, manifest, bdir, RuntimeConfig(max_queue_delay_ms=0.0, max_queue=256))
    api = ApiServer(ApiConfig(host="127.0.0.1", port=0), get_service=lambda: svc, is_ready=lambda: True,
                    metrics_text=lambda: "")
    api.start()
    n = 160 if args.quick else len(yh)
    bodies = [_npy(x) for x in xh[:n]]
    xb = xh[: 96 if args.quick else 320]  # items per batching measurement
    per: Dict[str, List[Dict[str, float]]] = {"router": [], "large": [], "batching": []}
    try:
        svc.set_router(gate="large-only")
        svc_one.set_router(gate="large-only")
        http_drive(api.port, bodies[:32], yh, concurrency=args.concurrency)  # warm-up
        batching_round(svc, svc_one, models, one, xb[:32], rnd=0)
        for rnd in range(rounds):
            for gate in (("confidence", "large-only") if rnd % 2 == 0 else ("large-only", "confidence")):
                svc.set_router(gate=gate, tau=tau)
                per["router" if gate == "confidence" else "large"].append(
                    http_drive(api.port, bodies, yh[:n], concurrency=args.concurrency))
            svc.set_router(gate="large-only")
            for k in range(batching_rounds_per_round(args)):
                per["batching"].append(batching_round(svc, svc_one, models, one, xb, rnd=rnd + k))
    finally:
        api.stop()
        svc.close()
        svc_one.close()
        models.close()
        one.close()
    r, lo = _median(per["router"]), _median(per["large"])
    bat = _median(per["batching"])
    c = args.concurrency
    figures = [
        figure("digits96 small: CPU ms per item, batch 1, one core", costs["small_b1_cpu_ms"], "ms",
               higher_is_better=False),
        figure("digits96 large: CPU ms per item, batch 1, one core", costs["large_b1_cpu_ms"], "ms",
               higher_is_better=False),
        figure("digits96 large: CPU ms per item, batch 16, one core", costs["large_b16_cpu_ms"], "ms",
               baseline=costs["large_b1_cpu_ms"], higher_is_better=False),
        figure("router/large-only throughput over HTTP, c=%d" % c, _ratio(per["router"], per["large"], "rps"), "x",
               baseline=1.0, target=2.5),
        figure("router accuracy loss vs large-only over HTTP (heldout)", (lo["accuracy"] - r["accuracy"]) * 100,
               "points", baseline=0.0, target=MAX_DROP_PTS, higher_is_better=False),
        figure("router large fraction (heldout)", r["large_fraction"], "fraction", baseline=1.0,
               higher_is_better=False),
        figure("router throughput over HTTP, c=%d" % c, r["rps"], "items/s", baseline=lo["rps"]),
        figure("batching gain served (c=16, batched / one-at-a-time)", bat["served_gain"], "x", baseline=1.0),
        figure("large engine alone: batch 16 / batch 1 items/s", bat["engine_gain"], "x", baseline=1.0),
        figure("served batching gain / engine batching gain", bat["share"], "x", baseline=1.0, target=0.9),
        figure("router accuracy (heldout)", r["accuracy"], "fraction", baseline=lo["accuracy"]),
        figure("router tau recommended by fleet router calibrate", tau, "tau"),
    ]
    env = {"digits96_tau": tau, "digits96_costs_ms": costs, "digits96_calib": cal, "http_runs": {"router": r,
           "large": lo}, "batching_rounds": per["batching"], "calib_items": len(yc),
           "heldout_items": n, "failed_requests": r["failed"] + lo["failed"]}
    return figures, env


def detector_part(work: Path, args: Any, rounds: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Part 4 on shapes: the held-out scenes through a folder source."""
    from edge_agent.config import RuntimeConfig
    from edge_agent.runtime.service import InferenceService

    bdir, manifest = harness.build_unpacked(harness.SHAPES, work)
    folder = harness.SHAPES / "heldout"
    if not args.quick:  # more held-out scenes than the committed 100: finer F1, steadier frames/s
        folder = work / "scenes"
        harness.write_scenes(folder, BENCH_SCENES, BENCH_SCENE_SEED)
    truth = harness.folder_truth(folder)
    models = harness.ort_models(bdir, manifest, batch=ENGINE_BATCH)
    costs = model_costs(models, np.zeros((1, 3, 128, 128), np.float32), iterations=5 if args.quick else 15)
    svc = InferenceService(models, manifest, bdir, RuntimeConfig(max_queue_delay_ms=0.0))
    per: Dict[str, List[Dict[str, float]]] = {"router": [], "small-only": [], "large-only": []}
    gates = list(per)
    try:
        for gate in gates:  # warm-up: the first runs of a session cost far more
            svc.set_router(gate="confidence" if gate == "router" else gate)
            source_run(svc, folder, truth)
        for rnd in range(rounds):
            for gate in gates[rnd % 3:] + gates[: rnd % 3]:
                svc.set_router(gate="confidence" if gate == "router" else gate)
                per[gate].append(source_run(svc, folder, truth))
    finally:
        svc.close()
        models.close()
    runs = {k: _median(v) for k, v in per.items()}
    tau = manifest.router.tau
    figures = [
        figure("shapes small: CPU ms per frame, batch 1, one core", costs["small_b1_cpu_ms"], "ms",
               higher_is_better=False),
        figure("shapes large: CPU ms per frame, batch 1, one core", costs["large_b1_cpu_ms"], "ms",
               higher_is_better=False),
        figure("detector frames/s through a folder source, router", runs["router"]["fps"], "frames/s",
               baseline=runs["large-only"]["fps"]),
        figure("detector F1 through a folder source, router (heldout)", runs["router"]["f1"], "F1",
               baseline=runs["large-only"]["f1"]),
        figure("detector F1, small only (heldout)", runs["small-only"]["f1"], "F1"),
        figure("detector F1, large only (heldout)", runs["large-only"]["f1"], "F1"),
        figure("detector router large fraction (heldout)", runs["router"]["large_fraction"], "fraction",
               baseline=1.0, higher_is_better=False),
    ]
    return figures, {"shapes_tau": tau, "shapes_costs_ms": costs, "source_runs": runs, "detector_scenes": len(truth),
                     "detector_objects": int(sum(len(c) for _, c in truth.values()))}


def main(argv=None) -> int:
    """Run every part and print/write the figures."""
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=16, help="HTTP client threads (default 16)")
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        f1, env1 = classifier_part(Path(tmp), args, rounds)
        f2, env2 = detector_part(Path(tmp), args, 1 if args.quick else 3)
    figures = f1 + f2
    print()
    print_table(figures, "vision benchmark: %d interleaved rounds (medians), ONNX Runtime CPU, 1 intra-op thread "
                "per model, engine batch %d" % (rounds, ENGINE_BATCH))
    env = environment(onnxruntime=_ort_version(), concurrency=args.concurrency, rounds=rounds, quick=args.quick,
                      cpu_count=os.cpu_count(), **env1, **env2)
    write_json(args.json, figures, env)
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    raise SystemExit(main())
