"""Engine benchmark on the sample digit models (ONNX Runtime on CPU here; the same script runs on a Jetson).

1. Engine-path overhead: the agent's `Engine.infer` (input validation + backend) against a raw
   `onnxruntime.InferenceSession.run` on the same model, same session options, same inputs, same batch.
   Calls are interleaved in alternating blocks so drift hits both equally; the figure is the ratio of
   median per-call latencies, as a percentage over raw (target <= 5 %).
2. Batch tuning: `prepare_engines` on the real sample bundle (memory budget from this machine, the
   tuner's measured table and choice), then the large model's throughput at the tuned batch against
   batch 1, both re-measured here (target: the tuned batch is not slower than batch 1).

Usage: python bench/engines.py [--quick] [--json PATH] [--backend onnxruntime|auto]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import environment, figure, parser, print_table, write_json

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"


def _interleaved(a: Callable[[], object], b: Callable[[], object], *, blocks: int, per_block: int) -> Dict[str, float]:
    """Median per-call seconds of `a` and `b`, measured in alternating blocks."""
    ta: List[float] = []
    tb: List[float] = []
    for _ in range(3):
        a()
        b()
    clock = time.perf_counter
    for i in range(blocks):
        order = (a, b) if i % 2 == 0 else (b, a)
        for fn in order:
            sink = ta if fn is a else tb
            for _ in range(per_block):
                t0 = clock()
                fn()
                sink.append(clock() - t0)
    return {"a": statistics.median(ta), "b": statistics.median(tb)}


def overhead(model: str, batch: int, *, blocks: int, per_block: int, threads: int) -> Dict[str, float]:
    """Median latency of the engine path and of a raw session at one batch size."""
    import onnxruntime as ort

    from edge_agent.engines.ort import OrtEngine

    path = DIGITS / ("%s.onnx" % model)
    eng = OrtEngine(path, max_batch=max(batch, 1), intra_op_threads=threads, providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    raw = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).rand(batch, 1, 8, 8).astype(np.float32)
    names = [o.name for o in raw.get_outputs()]
    feed = {"image": x}
    res = _interleaved(lambda: eng.infer(feed), lambda: raw.run(names, feed), blocks=blocks, per_block=per_block)
    eng.close()
    return {"engine_ms": res["a"] * 1000, "raw_ms": res["b"] * 1000}


def tuned_vs_batch1(*, iterations: int, backend: str) -> Dict[str, object]:
    """prepare_engines on the sample bundle; re-measure the large model at batch 1 and the tuned batch."""
    from edge_agent.bundle.archive import unpack_bundle
    from edge_agent.config import EngineConfig
    from edge_agent.engines.prepare import prepare_engines
    from edge_agent.engines.tuner import format_table, measure_batches
    from edge_agent.signing import PrivateKey
    from fleet.bundle_builder import build_bundle

    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        t = Path(tmp)
        manifest = build_bundle(DIGITS / "bundle.toml", PrivateKey.generate("bench"), t / "b.bundle")
        unpack_bundle(t / "b.bundle", t / "u", manifest, max_bundle_bytes=1 << 30)
        cfg = EngineConfig(backend=backend, tune_iterations=iterations)
        models = prepare_engines(bundle_dir=t / "u", manifest=manifest, cfg=cfg, cache_dir=t / "cache",
                                 emit=lambda k, m, d: None, retune=True)
        try:
            print(format_table(models.tuning["large"], "tuner table, large model (%s, max batch %d, budget %.0f MB)"
                               % (models.backend, models.max_batch, models.budget_bytes / 2**20)))
            print()
            tuned = models.batch["large"]
            again = measure_batches(models.large, sorted({1, tuned}), iterations=iterations * 2)
        finally:
            models.close()
    by_batch = {m.batch: m for m in again}
    return {"backend": models.backend, "tuned": tuned, "max_batch": models.max_batch,
            "ips_1": by_batch[1].items_per_s, "ips_tuned": by_batch[tuned].items_per_s,
            "p99_tuned": by_batch[tuned].p99_ms, "slo_ms": cfg.latency_slo_ms}


def main() -> int:
    """Run both parts, print the table, write JSON."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "auto"])
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for the overhead part")
    args = p.parse_args()
    blocks, per_block = (100, 20) if args.quick else (400, 20)
    iterations = 20 if args.quick else 60
    figures = []
    tune = tuned_vs_batch1(iterations=iterations, backend=args.backend)
    cases = [("large", b) for b in sorted({1, 8, int(tune["tuned"])})] + [("small", 1), ("small", 8)]
    for model, batch in cases:
        r = overhead(model, batch, blocks=blocks, per_block=per_block, threads=args.threads)
        figures.append(figure("%s batch %d: engine path median latency" % (model, batch), r["engine_ms"], "ms",
                              baseline=r["raw_ms"], higher_is_better=False))
        figures.append(figure("%s batch %d: engine-path added time per call" % (model, batch),
                              (r["engine_ms"] - r["raw_ms"]) * 1000, "us", baseline=0.0, higher_is_better=False))
        figures.append(figure("%s batch %d: engine-path overhead over raw onnxruntime" % (model, batch),
                              (r["engine_ms"] / r["raw_ms"] - 1) * 100, "%", baseline=0.0, target=5.0,
                              higher_is_better=False))
    figures.append(figure("large: throughput at tuned batch %d" % tune["tuned"], tune["ips_tuned"], "items/s",
                          baseline=tune["ips_1"]))
    figures.append(figure("large: tuned batch throughput / batch 1", tune["ips_tuned"] / tune["ips_1"], "x",
                          baseline=1.0, target=1.0))
    figures.append(figure("large: p99 at tuned batch (SLO)", tune["p99_tuned"], "ms", baseline=None,
                          target=tune["slo_ms"], higher_is_better=False))
    print_table(figures, "engines benchmark (%s)" % tune["backend"])
    import onnxruntime

    write_json(args.json, figures, environment(onnxruntime=onnxruntime.__version__, backend=tune["backend"],
                                               max_batch=tune["max_batch"], quick=bool(args.quick),
                                               intra_op_threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
