"""`edge-agent selftest [--config agent.toml] [--backend B] [--require-tensorrt] [--json]`: check this device.

Reports Python, the platform (Jetson model, L4T, TensorRT, CUDA, compute capability, platform key), the
backends that import, and the memory budget; runs the bundled tiny ONNX model with ONNX Runtime and checks
it against outputs computed independently in numpy; when TensorRT and a GPU are present, builds a TensorRT
engine from the same model in a child process, runs it and compares it with ONNX Runtime's answer.

Exit status 0 when every check passes, 1 otherwise (the failing checks are named).
Missing TensorRT is NOT a failure with backend `auto` or `onnxruntime` (a CPU box serves with ONNX
Runtime); it IS a failure with `--require-tensorrt` or backend `tensorrt`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from edge_agent.clikit import EXIT_ERROR, EXIT_OK

if TYPE_CHECKING:  # numpy is imported where a check runs: every edge-agent command imports this module
    import numpy as np

OK, FAIL, SKIP, INFO = "ok", "FAIL", "skip", "info"
_FP32_TOL = 1e-3  # |diff| <= tol * (1 + |ref|): fp32 backends on an 8x8 MLP agree far closer than this


class _Report:
    def __init__(self) -> None:
        self.checks: List[Dict[str, Any]] = []

    def add(self, name: str, status: str, detail: str, **data: Any) -> None:
        self.checks.append(dict(name=name, status=status, detail=detail, **data))

    @property
    def failed(self) -> List[Dict[str, Any]]:
        return [c for c in self.checks if c["status"] == FAIL]


def _max_rel_diff(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]) -> float:
    import numpy as np

    worst = 0.0
    for k, want in ref.items():
        have = got[k]
        if have.shape != want.shape:
            return float("inf")
        worst = max(worst, float((np.abs(have - want) / (1.0 + np.abs(want))).max()))
    return worst


def _engine_config(args: argparse.Namespace) -> Any:
    from edge_agent.config import EngineConfig, load_agent_config

    cfg = load_agent_config(Path(args.config)).engine if args.config else EngineConfig()
    if args.backend:
        cfg = cfg.model_copy(update={"backend": args.backend})
    return cfg


def run_selftest(args: argparse.Namespace) -> _Report:
    """Run every check; never raises for a device problem (it becomes a failed check)."""
    from edge_agent.engines.budget import MIB
    from edge_agent.engines.platform import detect_platform
    from edge_agent.engines.prepare import available_backends, choose_backend, current_budget
    from edge_agent.errors import EdgeAgentError
    from edge_agent.npz import NpzError, load_npz
    from edge_agent.selftest import tiny_model_path, tiny_reference_path

    rep = _Report()
    cfg = _engine_config(args)
    require_trt = bool(args.require_tensorrt) or cfg.backend == "tensorrt"

    py = sys.version_info
    rep.add("python", OK if py >= (3, 8) else FAIL, "Python %d.%d.%d" % py[:3])

    plat = detect_platform()
    rep.add("platform", INFO, ", ".join("%s=%s" % (k, v) for k, v in plat.describe().items() if k != "python"),
            **plat.describe())

    have = available_backends()
    rep.add("onnxruntime", OK if "onnxruntime" in have else FAIL,
            "available" if "onnxruntime" in have else "onnxruntime does not import (pip install onnxruntime)")
    trt_ok = plat.trt_version is not None and plat.has_gpu
    if trt_ok:
        rep.add("tensorrt", OK, "TensorRT %s, GPU %s (sm %s, CUDA driver %s)" % (
            plat.trt_version, plat.gpu_name, "%d%d" % plat.compute_capability, plat.cuda_version))
    else:
        why = plat.trt_error if plat.trt_version is None else "TensorRT %s imports but %s" % (
            plat.trt_version, plat.gpu_error or "no CUDA GPU answered")
        rep.add("tensorrt", FAIL if require_trt else SKIP, "unavailable: %s" % why)
    try:
        backend, reason = choose_backend(cfg.backend, plat)
        rep.add("backend", INFO, "%s (%s)" % (backend, reason), backend=backend)
    except EdgeAgentError as e:
        rep.add("backend", FAIL, str(e))

    try:
        budget = current_budget(cfg, plat, "tensorrt" if trt_ok else "onnxruntime")
        rep.add("memory budget", OK if budget.budget_bytes > 0 else FAIL,
                "%.0f MB (available %.0f MB of %.0f MB via %s, x %.2f - %d MB reserve)" % (
                    budget.budget_bytes / MIB, budget.available_bytes / MIB, budget.total_bytes / MIB, budget.source,
                    budget.fraction, budget.reserve_bytes // MIB), budget_mb=round(budget.budget_bytes / MIB, 1))
    except EdgeAgentError as e:
        rep.add("memory budget", FAIL, str(e))

    try:
        ref = load_npz(tiny_reference_path())
        x = ref.pop("image")
    except (NpzError, KeyError) as e:
        rep.add("reference data", FAIL, "the packaged tiny model's reference is unusable (%s); reinstall "
                "edge-agent" % (e if isinstance(e, NpzError) else "no 'image' array"))
        return rep
    ort_out: Optional[Dict[str, np.ndarray]] = None
    if "onnxruntime" in have:
        from edge_agent.engines.ort import OrtEngine

        try:
            with OrtEngine(tiny_model_path(), max_batch=len(x), intra_op_threads=1) as eng:
                t0 = time.perf_counter()
                ort_out = eng.infer({"image": x})
                ms = (time.perf_counter() - t0) * 1000
            diff = _max_rel_diff(ort_out, ref)
            rep.add("onnxruntime inference", OK if diff <= _FP32_TOL else FAIL,
                    "tiny model, batch %d: max rel diff %.2e vs numpy reference (%.2f ms)" % (len(x), diff, ms),
                    max_rel_diff=diff)
        except EdgeAgentError as e:
            rep.add("onnxruntime inference", FAIL, str(e))

    if trt_ok:
        _check_tensorrt(rep, cfg, x, ort_out if ort_out is not None else ref, args)
    else:
        rep.add("tensorrt inference", FAIL if require_trt else SKIP, "TensorRT unavailable")
    return rep


def _check_tensorrt(
    rep: _Report, cfg: Any, x: np.ndarray, want: Dict[str, np.ndarray], args: argparse.Namespace
) -> None:
    from edge_agent.engines.budget import MIB
    from edge_agent.engines.trt import TrtEngine
    from edge_agent.engines.trt_build import run_build
    from edge_agent.engines.trt_plan import BuildRequest
    from edge_agent.errors import EdgeAgentError
    from edge_agent.selftest import tiny_model_path

    events: List[str] = []
    with tempfile.TemporaryDirectory(prefix="edge-agent-selftest-") as tmp:
        req = BuildRequest(model="selftest", onnx_path=str(tiny_model_path()), plan_path=str(Path(tmp) / "tiny.plan"),
                           precision="fp32", min_batch=1, opt_batch=len(x), max_batch=len(x),
                           workspace_bytes=min(cfg.workspace_max_mb, 256) * MIB,
                           timing_cache_path=str(Path(tmp) / "timing.cache"))
        try:
            outcome = run_build(req, emit=lambda kind, msg, data: events.append(kind),
                                timeout_s=min(cfg.build_timeout_s, float(args.build_timeout_s)))
            rep.add("tensorrt build", OK, "tiny engine built in a child process in %.1f s" % outcome.seconds,
                    build_s=round(outcome.seconds, 2))
        except EdgeAgentError as e:
            rep.add("tensorrt build", FAIL, str(e))
            return
        try:
            with TrtEngine(outcome.plan_path.read_bytes(), name="selftest") as eng:
                t0 = time.perf_counter()
                got = eng.infer({"image": x})
                ms = (time.perf_counter() - t0) * 1000
        except EdgeAgentError as e:
            rep.add("tensorrt inference", FAIL, str(e))
            return
        except Exception as e:  # a library bug must become a failed check with its message, not a traceback
            rep.add("tensorrt inference", FAIL, "%s: %s" % (type(e).__name__, e))
            return
    diff = _max_rel_diff(got, want)
    rep.add("tensorrt inference", OK if diff <= _FP32_TOL else FAIL,
            "tiny engine, batch %d: max rel diff %.2e vs onnxruntime (%.2f ms)" % (len(x), diff, ms),
            max_rel_diff=diff)


def environment() -> Dict[str, Any]:
    """What a bug report needs: versions (TensorRT full, CUDA driver and the CUDA pycuda was built against,
    pycuda, numpy, onnxruntime, Python), board, L4T, SM and memory."""
    from edge_agent.engines.budget import MIB
    from edge_agent.engines.platform import detect_platform
    from edge_agent.sysinfo.meminfo import read_meminfo_bytes

    plat = detect_platform()
    env: Dict[str, Any] = dict(plat.describe())
    import numpy

    env["numpy"] = numpy.__version__
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    try:
        info = read_meminfo_bytes()
        env["ram_total_mb"] = info.get("MemTotal", 0) // MIB
        env["ram_available_mb"] = info.get("MemAvailable", 0) // MIB
        env["swap_total_mb"] = info.get("SwapTotal", 0) // MIB
    except OSError:
        env["ram_total_mb"] = env["ram_available_mb"] = env["swap_total_mb"] = None
    return env


def _run(args: argparse.Namespace) -> int:
    rep = run_selftest(args)
    failed = rep.failed
    if args.json:
        print(json.dumps({"passed": not failed, "environment": environment(), "checks": rep.checks}, indent=2,
                         default=str))
    else:
        for c in rep.checks:
            print("%-22s %-5s %s" % (c["name"], c["status"], c["detail"]))
        print("selftest %s" % ("passed" if not failed else "FAILED: " + "; ".join(
            "%s: %s" % (c["name"], c["detail"]) for c in failed)))
    if failed:
        print("edge-agent: selftest failed: %s" % ", ".join(c["name"] for c in failed), file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `selftest` command."""
    p = sub.add_parser("selftest", help="check Python, platform, backends, memory and a tiny engine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="agent.toml (default: built-in engine settings)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], help="override engine.backend")
    p.add_argument("--require-tensorrt", action="store_true", help="fail when TensorRT or the GPU is unavailable")
    p.add_argument("--build-timeout-s", type=float, default=600.0, help="limit for the tiny engine build")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
