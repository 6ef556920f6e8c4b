"""Build a TensorRT plan from ONNX in a child process, so a builder crash or OOM kill never takes the agent down.

Parent side: `run_build(request, emit=..., timeout_s=...)` starts
`python -m edge_agent.engines.trt_build REQUEST.json`, turns the child's JSON-line progress on stdout into
`engine-build-*` events, enforces the timeout, and maps a non-zero exit or a signal to `BuildError`.
Child side: `build_plan(request)` — the TENSORRT.md build sketch with a profile over the batch range,
FP16/INT8 where allowed and fast, a workspace limit, and the timing cache loaded and saved.
The plan is written to a temporary name and renamed, so a killed build leaves no half-written plan.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.errors import BuildError
from edge_agent.fsutil import write_atomic

log = logging.getLogger(__name__)

Emit = Callable[[str, str, dict], None]
_MAX_LINE = 64 * 1024
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class BuildRequest:
    """Everything the builder child needs (JSON round-trips through a file)."""

    model: str
    onnx_path: str
    plan_path: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_bytes: int
    timing_cache_path: Optional[str] = None
    calibration_cache_path: Optional[str] = None
    optimization_level: Optional[int] = None
    #: also build a throw-away plan with this max batch to measure device memory at a second profile size
    memory_probe_batch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ValueError("precision must be fp32, fp16 or int8")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need 1 <= min_batch <= opt_batch <= max_batch")
        if self.precision == "int8" and not self.calibration_cache_path:
            raise ValueError("int8 needs a calibration cache")


@dataclass(frozen=True)
class BuildOutcome:
    """What the child built."""

    plan_path: Path
    precision: str
    seconds: float
    notes: List[str]
    #: execution-context device memory (bytes) measured per profile max batch
    device_memory: Dict[int, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ child side


def _out(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """An entropy calibrator that only replays the bundle's calibration cache (no data on the device)."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: List[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return _Calibrator()


def _batch_profile(builder: Any, network: Any, lo: int, opt: int, hi: int) -> Any:
    """An optimization profile over batch min..opt..max for the inputs with a dynamic batch axis, or None when
    every input is static (a static-batch model needs no profile; only dynamic inputs do)."""
    profile = None
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(int(d) for d in t.shape)
        if all(d >= 1 for d in shape):
            continue
        if shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise BuildError("input %s has dynamic axes besides the batch axis: %s" % (t.name, shape))
        rest = shape[1:]
        if profile is None:
            profile = builder.create_optimization_profile()
        profile.set_shape(t.name, (lo, *rest), (opt, *rest), (hi, *rest))
    return profile


def _attach_timing_cache(config: Any, req: BuildRequest, notes: List[str]) -> Any:
    """Load the persisted timing cache into `config`. A cache TensorRT cannot read, or refuses with
    `set_timing_cache(...) == False` (made on another device or TensorRT version), is discarded: the stale
    file is removed and the build starts from an empty cache, which is saved afterwards."""
    path = req.timing_cache_path
    blob = b""
    if path and os.path.exists(path):
        try:
            blob = Path(path).read_bytes()
        except OSError as e:
            log.warning("cannot read timing cache %s (%s): building without it", path, e.strerror)
    timing = config.create_timing_cache(blob) if blob else None
    if blob and (timing is None or not config.set_timing_cache(timing, ignore_mismatch=False)):
        log.warning("timing cache %s does not match this device or TensorRT version: discarded, building cold", path)
        notes.append("stale timing cache discarded: built cold")
        _discard(path)
        timing = None
    if timing is None:
        timing = config.create_timing_cache(b"")
        if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
            notes.append("TensorRT refused an empty timing cache: built without one")
            return None
    return timing


def _discard(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError as e:
            log.warning("cannot remove stale timing cache %s: %s", path, e.strerror)


def build_plan(req: BuildRequest, progress: Callable[[str], None] = lambda s: None) -> BuildOutcome:
    """Build and write the plan (runs in the child). Raises BuildError with TensorRT's own messages.

    With `req.memory_probe_batch`, a second plan with that max batch is built (warm timing cache) and both
    are deserialized here to read their device memory: engine memory is affine in the batch, not linear."""
    from edge_agent.engines.trt import import_tensorrt, shared_logger, trt_major

    trt = import_tensorrt()
    logger = shared_logger(trt)
    logger.begin()
    started = time.monotonic()
    notes: List[str] = []
    builder = trt.Builder(logger)
    flags = 0 if trt_major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress("parsing")
    if not parser.parse_from_file(req.onnx_path):
        raise BuildError("TensorRT cannot parse %s: %s" % (
            Path(req.onnx_path).name, "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))))
    progress("building")
    plan, precision, has_profile = _build_one(trt, builder, network, req, max_batch=req.max_batch, notes=notes)
    write_atomic(Path(req.plan_path), bytes(plan), make_parents=True)
    memory = {}
    probe = req.memory_probe_batch
    if has_profile and probe is not None and 1 <= probe < req.max_batch:
        progress("measuring")
        memory[req.max_batch] = _plan_device_memory(trt, plan)
        probe_plan, _, _ = _build_one(trt, builder, network, req, max_batch=probe, notes=[])
        memory[probe] = _plan_device_memory(trt, probe_plan)
    return BuildOutcome(Path(req.plan_path), precision, time.monotonic() - started, notes, memory)


def _build_one(trt: Any, builder: Any, network: Any, req: BuildRequest, *, max_batch: int,
               notes: List[str]) -> Tuple[Any, str, bool]:
    """One plan with profile batch min..max: (serialized plan, precision built, whether it has a profile)."""
    from edge_agent.engines.trt import shared_logger

    logger = shared_logger(trt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_bytes))
    if req.optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(req.optimization_level)
    lo = min(req.min_batch, max_batch)
    profile = _batch_profile(builder, network, lo, max(lo, min(req.opt_batch, max_batch)), max_batch)
    if profile is not None and config.add_optimization_profile(profile) < 0:
        raise BuildError("TensorRT refused the optimization profile (batch %d..%d)" % (lo, max_batch))
    precision, calibrator = _set_precision(trt, builder, config, profile, req, notes=notes)
    timing = _attach_timing_cache(config, req, notes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT build failed: %s" % ("; ".join(logger.errors[-3:]) or "no message"))
    if req.timing_cache_path and timing is not None:
        cache_obj = config.get_timing_cache()
        if cache_obj is not None:
            write_atomic(Path(req.timing_cache_path), bytes(cache_obj.serialize()), make_parents=True)
    del calibrator  # referenced until the build returned
    return plan, precision, profile is not None


def _set_precision(trt: Any, builder: Any, config: Any, profile: Any, req: BuildRequest, *,
                   notes: List[str]) -> Tuple[str, Any]:
    """Set FP16/INT8 flags where asked for and fast; (precision built, calibrator to keep alive)."""
    precision = req.precision
    calibrator = None
    if precision == "int8":
        if builder.platform_has_fast_int8:
            cache = Path(req.calibration_cache_path or "").read_bytes()
            calibrator = _cache_calibrator(trt, cache)
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator  # keep a reference until the build returns
            if profile is not None:
                config.set_calibration_profile(profile)
            # layers without INT8 kernels fall back to FP16 when that is fast
            if builder.platform_has_fast_fp16:
                config.set_flag(trt.BuilderFlag.FP16)
        else:
            notes.append("no fast INT8 on this GPU: built FP16/FP32 instead")
            precision = "fp16"
    if precision == "fp16":
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            notes.append("no fast FP16 on this GPU: built FP32 instead")
            precision = "fp32"
    return precision, calibrator


def _plan_device_memory(trt: Any, plan: Any) -> int:
    """Deserialize `plan` here (the builder child) and read its execution-context device memory."""
    from edge_agent.engines import _cuda
    from edge_agent.engines.trt import device_memory_bytes, shared_logger

    ctx = _cuda.acquire_context()
    try:
        with ctx.active():
            runtime = trt.Runtime(shared_logger(trt))
            engine = runtime.deserialize_cuda_engine(bytes(plan))
            if engine is None:
                raise BuildError("the freshly built plan does not deserialize: %s"
                                 % "; ".join(shared_logger(trt).errors[-2:]))
            size = device_memory_bytes(engine)
            del engine, runtime
        return size
    finally:
        _cuda.release_context()


_PARENT_ENV = "EDGE_AGENT_BUILD_PARENT_PID"


def _die_with_parent() -> bool:
    """Linux: have the kernel SIGKILL this builder when the agent dies, so an orphaned build never keeps
    eating the memory the restarted agent needs. False when the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    want = os.environ.get(_PARENT_ENV)
    return not (want and want.isdigit() and os.getppid() != int(want))


def child_main(argv: List[str]) -> int:
    """Entry point of the builder child: `python -m edge_agent.engines.trt_build REQUEST.json`."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m edge_agent.engines.trt_build REQUEST.json\n")
        return 2
    if not _die_with_parent():
        return 3
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        req = BuildRequest(**json.loads(Path(argv[0]).read_text()))
        outcome = build_plan(req, progress=lambda stage: _out({"stage": stage}))
    except Exception as e:  # everything becomes one result line; the parent raises BuildError
        _out({"result": "failed", "message": str(e).splitlines()[0] if str(e) else type(e).__name__})
        return 1
    _out({"result": "ok", "plan_path": str(outcome.plan_path), "precision": outcome.precision,
          "seconds": round(outcome.seconds, 3), "notes": outcome.notes,
          "device_memory": {str(k): v for k, v in outcome.device_memory.items()}})
    return 0


# ----------------------------------------------------------------------------------------- parent side


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "signal %d" % -rc
        hint = " (out of memory? the kernel OOM killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
        return "the engine builder was killed by %s%s" % (name, hint)
    return "the engine builder exited with status %d" % rc


def run_build(
    req: BuildRequest,
    *,
    emit: Emit,
    timeout_s: float,
    progress_interval_s: float = 5.0,
    env: Optional[Dict[str, str]] = None,
) -> BuildOutcome:
    """Run the build in a child process; emits engine-build-started/-progress/-done/-failed."""
    data = {"model": req.model, "precision": req.precision, "max_batch": req.max_batch,
            "workspace_mb": req.workspace_bytes // (1024 * 1024)}
    req_file = _write_request(req)
    stderr_file = tempfile.TemporaryFile()
    started = time.monotonic()
    try:
        proc = _start_child(req_file, stderr_file, env)
    except OSError as e:
        os.unlink(req_file)
        stderr_file.close()
        msg = "cannot start the engine builder: %s" % e.strerror
        emit("engine-build-failed", msg, dict(data, error=msg))
        raise BuildError(msg)
    emit("engine-build-started", "building the %s engine (%s, batch 1..%d)" % (req.model, req.precision, req.max_batch),
         dict(data, pid=proc.pid))
    try:
        lines, reader = _start_reader(proc)
        result, failure = _follow_child(proc, lines, req, data=data, emit=emit, started=started,
                                        timeout_s=timeout_s, progress_interval_s=progress_interval_s)
        rc = _reap(proc)
        reader.join(timeout=5)
        if failure is None:
            failure = _child_failure(result, rc, stderr_file)
    finally:
        _clean_up(proc, stderr_file, req_file)
    seconds = time.monotonic() - started
    if failure is not None:
        emit("engine-build-failed", failure, dict(data, error=failure, seconds=round(seconds, 1)))
        raise BuildError(failure)
    assert result is not None
    memory = {int(k): int(v) for k, v in dict(result.get("device_memory") or {}).items()}
    outcome = BuildOutcome(Path(result["plan_path"]), str(result["precision"]), seconds,
                           list(result.get("notes", [])), memory)
    emit("engine-build-done", "built the %s engine in %.1f s" % (req.model, seconds),
         dict(data, precision=outcome.precision, seconds=round(seconds, 2), notes="; ".join(outcome.notes)))
    return outcome


def _write_request(req: BuildRequest) -> str:
    """Write the request as JSON next to the plan (same filesystem as the plan); return its path."""
    workdir = Path(req.plan_path).parent
    workdir.mkdir(parents=True, exist_ok=True)
    fd, req_file = tempfile.mkstemp(dir=str(workdir), prefix=".build-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(req), f)
    return req_file


def _start_child(req_file: str, stderr_file: Any, env: Optional[Dict[str, str]]) -> subprocess.Popen:
    """Start the builder child; it reads REQUEST.json and writes JSON lines to stdout. Raises OSError."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.engines.trt_build", req_file],
        stdout=subprocess.PIPE, stderr=stderr_file, stdin=subprocess.DEVNULL,
        env=dict(os.environ if env is None else env, **{_PARENT_ENV: str(os.getpid())}),
    )


def _start_reader(proc: subprocess.Popen) -> Tuple[queue.Queue, threading.Thread]:
    """A daemon thread that turns the child's stdout into parsed JSON items on a bounded queue; None at EOF.

    Lines longer than _MAX_LINE are cut and then fail to parse; unparsable lines are dropped."""
    lines: queue.Queue = queue.Queue(maxsize=1024)

    def _reader() -> None:
        assert proc.stdout is not None
        for raw in iter(lambda: proc.stdout.readline(_MAX_LINE), b""):
            try:
                lines.put(json.loads(raw.decode("utf-8", "replace")), timeout=5)
            except (ValueError, queue.Full):
                continue
        lines.put(None)

    reader = threading.Thread(target=_reader, name="trt-build-reader", daemon=True)
    reader.start()
    return lines, reader


def _follow_child(
    proc: subprocess.Popen,
    lines: queue.Queue,
    req: BuildRequest,
    *,
    data: Dict[str, Any],
    emit: Emit,
    started: float,
    timeout_s: float,
    progress_interval_s: float,
) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Relay the child's stages as progress events (and a heartbeat every progress_interval_s) until its
    stdout closes or the timeout kills it. Returns (the child's result line or None, timeout failure or None)."""
    result: Optional[Dict[str, Any]] = None
    deadline = started + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            return result, "the engine build of %s took longer than %.0f s and was stopped" % (req.model, timeout_s)
        try:
            item = lines.get(timeout=min(progress_interval_s, remaining))
        except queue.Empty:
            elapsed = time.monotonic() - started
            emit("engine-build-progress", "still building the %s engine (%.0f s)" % (req.model, elapsed),
                 dict(data, stage="building", elapsed_s=round(elapsed, 1)))
            continue
        if item is None:
            return result, None
        if "stage" in item:
            emit("engine-build-progress", "%s: %s" % (req.model, item["stage"]),
                 dict(data, stage=str(item["stage"]), elapsed_s=round(time.monotonic() - started, 1)))
        elif "result" in item:
            result = item


def _reap(proc: subprocess.Popen) -> int:
    """Wait up to 10 s for the child to exit after its stdout closed; kill it if it lingers. Returns its code."""
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _child_failure(result: Optional[Dict[str, Any]], rc: int, stderr_file: Any) -> Optional[str]:
    """The failure message of a child that finished in time: its own 'failed' line, else how it exited
    (with the last stderr line) when it exited non-zero or without a result; None when it succeeded."""
    if result is not None and result.get("result") == "failed":
        return str(result.get("message"))
    if rc != 0 or result is None:
        failure = _describe_exit(rc)
        tail = _tail(stderr_file)
        return failure + ": " + tail if tail else failure
    return None


def _clean_up(proc: subprocess.Popen, stderr_file: Any, req_file: str) -> None:
    """Kill the child if still running, close its pipes and remove the request file (errors ignored)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    stderr_file.close()
    try:
        os.unlink(req_file)
    except OSError:
        pass


def _tail(f: Any) -> str:
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _STDERR_TAIL))
        text = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
