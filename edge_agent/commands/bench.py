"""`edge-agent bench --config agent.toml [--bundle DIR] [--json]`: size and tune the engines, print the table.

Prepares both models of the active bundle (or of an unpacked bundle directory given with `--bundle`) the
way the agent does — backend choice, memory budget, max batch, engine cache — then measures every
candidate batch size and prints batch, p50, p99, items/s and memory per model, and the chosen batch (the
highest throughput whose p99 meets `engine.latency_slo_ms`). The choice is saved like a `retune`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Tuple

from edge_agent.clikit import CliError


def _bundle(args: argparse.Namespace, cfg: Any) -> Tuple[Path, Any]:
    from edge_agent.bundle.manifest import MANIFEST_NAME
    from edge_agent.bundle.verify import read_unverified

    if args.bundle:
        bundle_dir = Path(args.bundle)
        path = bundle_dir / MANIFEST_NAME
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CliError("cannot read %s: %s" % (path, e.strerror))
        return bundle_dir, read_unverified(raw, max_manifest_bytes=cfg.limits.max_manifest_bytes)
    from edge_agent.bundle.store import BundleStore

    store = BundleStore(cfg.state_dir)
    state = store._load_state()
    if state.active is None:
        raise CliError("no active bundle in %s: deploy one, or pass --bundle DIR" % cfg.state_dir)
    manifest = store.load_manifest(state.active.manifest_sha256)
    return store.bundle_dir(state.active.name, state.active.version), manifest


def _cache_dir(args: argparse.Namespace, cfg: Any) -> Tuple[Path, str]:
    if args.cache_dir:
        return Path(args.cache_dir), "given"
    path = cfg.state_dir / "engines"
    probe = path if path.exists() else cfg.state_dir
    if probe.exists() and os.access(str(probe), os.W_OK):
        return path, "state dir"
    return Path(tempfile.mkdtemp(prefix="edge-agent-bench-")), "temporary (state dir not writable)"


def _run(args: argparse.Namespace) -> int:
    from edge_agent.config import load_agent_config
    from edge_agent.engines.prepare import prepare_engines
    from edge_agent.engines.tuner import format_table

    cfg = load_agent_config(Path(args.config))
    ecfg = cfg.engine
    updates = {}
    if args.backend:
        updates["backend"] = args.backend
    if args.iterations:
        updates["tune_iterations"] = args.iterations
    if updates:
        ecfg = ecfg.model_copy(update=updates)
    bundle_dir, manifest = _bundle(args, cfg)
    cache_dir, cache_note = _cache_dir(args, cfg)
    events = []
    models = prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=ecfg, cache_dir=cache_dir,
                             emit=lambda kind, msg, data: events.append((kind, msg)), retune=True)
    try:
        desc = models.describe()
        if args.json:
            print(json.dumps({"engine": desc, "bundle": {"name": manifest.name, "version": manifest.version},
                              "tuning": {n: c.as_dict() for n, c in models.tuning.items()}}, indent=2))
            return 0
        print("bundle %s v%d, backend %s (%s), precision %s" % (manifest.name, manifest.version, models.backend,
                                                               models.backend_reason, models.precision))
        print("memory budget %.0f MB -> max batch %d; latency SLO p99 <= %.1f ms; engine cache: %s"
              % (desc["budget_mb"], models.max_batch, ecfg.latency_slo_ms, cache_note))
        for kind, msg in events:
            if kind.startswith("engine-build") and kind != "engine-build-progress":
                print("  %s: %s" % (kind, msg))
        for name in ("small", "large"):
            print()
            print(format_table(models.tuning[name], "%s model" % name))
    finally:
        models.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` command."""
    p = sub.add_parser("bench", help="size and tune the engines; print the batch table and the choice",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="agent.toml")
    p.add_argument("--bundle", help="an unpacked bundle directory (default: the active bundle)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], help="override engine.backend")
    p.add_argument("--iterations", type=int, help="override engine.tune_iterations")
    p.add_argument("--cache-dir", help="engine cache (default: <state_dir>/engines)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
