"""Build a TensorRT plan from ONNX in a child process, so a builder crash or OOM kill never takes the agent down.

Parent side: `run_build(request, emit=..., timeout_s=...)` starts
`python -m edge_agent.engines.trt_build REQUEST.json`, turns the child's JSON-line progress on stdout into
`engine-build-*` events, enforces the timeout, and maps a non-zero exit or a signal to `BuildError`.
Child side: `child_main` runs `trt_plan.build_plan(request)` (the TensorRT build itself) and reports
its stages and result as JSON lines; it dies with its parent.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.engines.trt_plan import BuildOutcome, BuildRequest, build_plan
from edge_agent.errors import BuildError

Emit = Callable[[str, str, dict], None]
_MAX_LINE = 64 * 1024
_STDERR_TAIL = 2000


# ------------------------------------------------------------------------------------------ child side


def _out(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


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
