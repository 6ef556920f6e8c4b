"""HTTP serving benchmark: the agent's local API against a FastAPI + uvicorn server calling ONNX Runtime on
the same model files, started in the same run.

Servers (each its own process, one ONNX Runtime intra-op thread per model):

* ``agent router``: `edge_agent.runtime.http_api.ApiServer` over `InferenceService` with the sample
  bundle's confidence gate (τ = 0.9): the small model answers most items, the large one the rest;
* ``agent large-only``: the same server with ``gate = "large-only"`` (the small model never runs);
* ``peer``: FastAPI + uvicorn (with uvloop and httptools when installed, as its ``standard`` extra
  does), one ``async def`` endpoint reading the ``.npy`` body and running the large model's
  ``InferenceSession`` (the usual minimal deployment of the accurate model).

Clients: closed-loop threads in this process on raw sockets, 1 item per request (held-out digits as
``application/x-npy``), at concurrency 1 and 16, on kept-alive connections and on a new connection per
request (``Connection: close``). Figures: requests/s and client-side p50/p99 per cell, the agent/peer
ratios (targets: >= 1.0 at c=16, >= 0.7 at c=1), and the serving path's added p50 over the raw engine
call at c=1, measured in-process (`InferenceService.infer_tensor` vs `Engine.infer` of the same model;
target < 0.3 ms). The HTTP-level figures include this process's client cost, the same for both servers.

    python bench/serving.py [--quick] [--json out.json] [--seconds S] [--rounds N]

Each cell runs `--rounds` times, interleaved with the other servers; the round with the median req/s is
reported (a shared machine's load moves by the second).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402

DIGITS = ROOT / "samples" / "digits"
TAU = "0.9"


# ------------------------------------------------------------------------------------------ servers
def _serve_agent(port: int, gate: str) -> None:
    """Run the agent's API on `port` until killed."""
    from edge_agent.config import ApiConfig, RuntimeConfig
    from edge_agent.engines.ort import OrtEngine
    from edge_agent.runtime.http_api import ApiServer
    from edge_agent.runtime.service import InferenceService
    from tests._runtime_helpers import digits_manifest

    class Models:
        small = OrtEngine(DIGITS / "small.onnx", max_batch=16, intra_op_threads=1)
        large = OrtEngine(DIGITS / "large.onnx", max_batch=16, intra_op_threads=1)
        batch = {"small": 16, "large": 16}

    tmp = Path("/tmp")
    router = {"tau": TAU} if gate == "router" else {"gate": "large-only"}
    svc = InferenceService(Models, digits_manifest(tmp, router=router), tmp, RuntimeConfig())
    api = ApiServer(ApiConfig(host="127.0.0.1", port=port), get_service=lambda: svc, is_ready=lambda: True,
                    metrics_text=lambda: "")
    api.start()
    print("ready", flush=True)
    threading.Event().wait()


def _serve_peer(port: int) -> None:
    """FastAPI + uvicorn running the large model with ONNX Runtime, until killed."""
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(DIGITS / "large.onnx"), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    app = FastAPI()

    async def infer(request: Request) -> JSONResponse:
        x = np.load(io.BytesIO(await request.body()), allow_pickle=False).astype(np.float32)
        logits = sess.run(None, {name: x[None] if x.ndim == 3 else x})[0][0]
        e = np.exp(logits - logits.max())
        p = e / e.sum()
        top = np.argsort(-p)[:3]
        return JSONResponse({"output": {"kind": "classification", "top": [
            {"index": int(i), "label": str(int(i)), "score": round(float(p[i]), 6)} for i in top]}})

    # this module's `from __future__ import annotations` leaves strings FastAPI cannot resolve here
    infer.__annotations__ = {"request": Request, "return": JSONResponse}
    app.post("/v1/infer")(infer)
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, **_uvicorn_impl())


def _uvicorn_impl() -> Dict[str, str]:
    """uvicorn's fastest installed loop and HTTP parser (uvloop, httptools: its `standard` extra)."""
    import importlib.util

    out = {}
    if importlib.util.find_spec("uvloop") is not None:
        out["loop"] = "uvloop"
    if importlib.util.find_spec("httptools") is not None:
        out["http"] = "httptools"
    return out


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start(kind: str) -> Tuple[subprocess.Popen, int]:
    port = _free_port()
    p = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("%s server did not start: %s" % (kind, p.stderr.read() if p.stderr else ""))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # uvicorn binds after printing
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError("%s server never listened on %d" % (kind, port))


# ------------------------------------------------------------------------------------------ clients
def _request(body: bytes, close: bool) -> bytes:
    return (b"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-npy\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"Connection: close\r\n" if close else b"")) + body


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one response from `sock` (leftovers in `buf`); returns the status code."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    while len(buf) < end + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        buf += chunk
    del buf[: end + length]
    return status


def _client(port: int, bodies: List[bytes], keep_alive: bool, *, stop_at: float, warm_until: float,
            lat: List[float], errors: List[int]) -> None:
    reqs = [_request(b, not keep_alive) for b in bodies]
    i = 0
    sock: Optional[socket.socket] = None
    buf = bytearray()
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            break
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = bytearray()
            t0 = time.perf_counter()
            sock.sendall(reqs[i % len(reqs)])
            status = _read_response(sock, buf)
            t1 = time.perf_counter()
        except OSError:
            errors.append(1)
            if sock is not None:
                sock.close()
            sock = None
            continue
        i += 1
        if not keep_alive:
            sock.close()
            sock = None
        if status != 200:
            errors.append(status)
        elif t0 >= warm_until:
            lat.append(t1 - t0)
    if sock is not None:
        sock.close()


def _drive(port: int, bodies: List[bytes], *, concurrency: int, keep_alive: bool, seconds: float) -> Dict[str, float]:
    warm = min(0.5, seconds / 4)
    start = time.perf_counter()
    warm_until, stop_at = start + warm, start + warm + seconds
    lats: List[List[float]] = [[] for _ in range(concurrency)]
    errors: List[int] = []
    threads = [threading.Thread(target=_client, args=(port, bodies[k::concurrency] or bodies, keep_alive),
                                kwargs={"stop_at": stop_at, "warm_until": warm_until, "lat": lats[k],
                                        "errors": errors}) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_lat = np.concatenate([np.asarray(v) for v in lats]) * 1000.0
    return {"rps": len(all_lat) / seconds, "p50_ms": float(np.percentile(all_lat, 50)) if all_lat.size else None,
            "p99_ms": float(np.percentile(all_lat, 99)) if all_lat.size else None, "errors": len(errors)}


# ------------------------------------------------------------------------------------ in-process path
def _added_latency(x: np.ndarray, n: int) -> Dict[str, float]:
    """p50 of InferenceService.infer_tensor vs the raw Engine.infer of the model on that path, c=1."""
    from edge_agent.config import RuntimeConfig
    from edge_agent.engines.ort import OrtEngine
    from edge_agent.runtime.service import InferenceService
    from tests._runtime_helpers import digits_manifest

    class Models:
        small = OrtEngine(DIGITS / "small.onnx", max_batch=16, intra_op_threads=1)
        large = OrtEngine(DIGITS / "large.onnx", max_batch=16, intra_op_threads=1)
        batch = {"small": 16, "large": 16}

    def p50(fn) -> float:
        for i in range(min(200, n)):
            fn(i)
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1000.0

    out: Dict[str, float] = {}
    items = [x[i % len(x)] for i in range(n)]
    out["raw_small_ms"] = p50(lambda i: Models.small.infer({"image": items[i][None]}))
    out["raw_large_ms"] = p50(lambda i: Models.large.infer({"image": items[i][None]}))
    tmp = Path("/tmp")
    for label, router in (("router", {"tau": TAU}), ("large_only", {"gate": "large-only"})):
        svc = InferenceService(Models, digits_manifest(tmp, router=router), tmp, RuntimeConfig())
        try:
            out["svc_%s_ms" % label] = p50(lambda i, s=svc: s.infer_tensor(items[i]))
            if label == "router":
                out["router_large_fraction"] = svc.stats_snapshot()["large_fraction"] or 0.0
        finally:
            svc.close()
    Models.small.close()
    Models.large.close()
    return out


# ------------------------------------------------------------------------------------------- main
def _bodies() -> Tuple[List[bytes], np.ndarray]:
    with np.load(str(DIGITS / "heldout.npz")) as z:
        x = z["x"].astype(np.float32)
    bodies = []
    for v in x:
        buf = io.BytesIO()
        np.save(buf, v, allow_pickle=False)
        bodies.append(buf.getvalue())
    return bodies, x


def _measure(seconds: float, rounds: int) -> Dict[Tuple[str, str, int], Dict[str, float]]:
    """Every cell `rounds` times, the servers interleaved cell by cell and round by round (so the slow
    drifts of a shared machine hit all of them alike); per cell the round with the median req/s."""
    bodies, _ = _bodies()
    runs: Dict[Tuple[str, str, int], List[Dict[str, float]]] = {}
    procs = {}
    try:
        for kind in ("agent-router", "agent-large-only", "peer"):
            procs[kind] = _start(kind)
        for rnd in range(rounds):
            for keep_alive in (True, False):
                for c in (1, 16):
                    for kind, (_, port) in procs.items():
                        mode = "keep-alive" if keep_alive else "new-conn"
                        r = _drive(port, bodies, concurrency=c, keep_alive=keep_alive, seconds=seconds)
                        runs.setdefault((kind, mode, c), []).append(r)
                        print("round %d  %-17s %-10s c=%-2d  %8.0f req/s  p50 %6.3f ms  p99 %7.3f ms  errors %d"
                              % (rnd + 1, kind, mode, c, r["rps"], r["p50_ms"] or -1, r["p99_ms"] or -1,
                                 r["errors"]), flush=True)
    finally:
        for p, _ in procs.values():
            p.kill()
            p.wait(10)
    return {k: sorted(v, key=lambda r: r["rps"])[len(v) // 2] for k, v in runs.items()}


def _figures(res: Dict[Tuple[str, str, int], Dict[str, float]], added: Dict[str, float]) -> List[Dict[str, Any]]:
    figs: List[Dict[str, Any]] = []
    for mode in ("keep-alive", "new-conn"):
        for c in (1, 16):
            peer = res[("peer", mode, c)]
            for kind in ("agent-router", "agent-large-only"):
                a = res[(kind, mode, c)]
                name = "%s / peer req/s, %s, c=%d" % (kind, mode, c)
                figs.append(figure(name, round(a["rps"] / peer["rps"], 3) if peer["rps"] else None, "x",
                                   baseline=round(peer["rps"], 1), target=1.0 if c == 16 else 0.7))
            for kind in ("agent-router", "agent-large-only", "peer"):
                r = res[(kind, mode, c)]
                figs.append(figure("%s req/s, %s, c=%d" % (kind, mode, c), round(r["rps"], 1), "req/s"))
                figs.append(figure("%s p50, %s, c=%d" % (kind, mode, c), _r(r["p50_ms"]), "ms",
                                   higher_is_better=False))
                figs.append(figure("%s p99, %s, c=%d" % (kind, mode, c), _r(r["p99_ms"]), "ms",
                                   higher_is_better=False))
                if r["errors"]:
                    figs.append(figure("%s errors, %s, c=%d" % (kind, mode, c), r["errors"], "requests",
                                       target=0, higher_is_better=False))
    figs.append(figure("router added p50 over the raw small-model call, in-process, c=1",
                       _r(added["svc_router_ms"] - added["raw_small_ms"]), "ms", baseline=_r(added["raw_small_ms"]),
                       target=0.3, higher_is_better=False))
    figs.append(figure("large-only added p50 over the raw large-model call, in-process, c=1",
                       _r(added["svc_large_only_ms"] - added["raw_large_ms"]), "ms",
                       baseline=_r(added["raw_large_ms"]), target=0.3, higher_is_better=False))
    ka = res[("agent-large-only", "keep-alive", 1)]
    figs.append(figure("agent large-only HTTP p50 over the raw large-model call, keep-alive, c=1 (incl. client)",
                       _r(ka["p50_ms"] - added["raw_large_ms"]), "ms", baseline=_r(added["raw_large_ms"]),
                       higher_is_better=False))
    return figs


def _r(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(float(v), 4)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per cell (default 3, quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all cells, median kept (default 3, quick 1)")
    p.add_argument("--serve", choices=["agent-router", "agent-large-only", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int)
    args = p.parse_args()
    if args.serve:  # a server process of this benchmark
        if args.serve == "peer":
            _serve_peer(args.port)
        else:
            _serve_agent(args.port, "router" if args.serve == "agent-router" else "large-only")
        return 0
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    _, x = _bodies()
    added = _added_latency(x, 2000 if args.quick else 5000)
    print("in-process p50 (ms): raw small %.4f, raw large %.4f, service router %.4f (large fraction %.3f), "
          "service large-only %.4f" % (added["raw_small_ms"], added["raw_large_ms"], added["svc_router_ms"],
                                       added["router_large_fraction"], added["svc_large_only_ms"]), flush=True)
    res = _measure(seconds, rounds)
    figs = _figures(res, added)
    print()
    print_table(figs, "HTTP serving: agent vs FastAPI + uvicorn + onnxruntime (same model files, same run)")
    import fastapi
    import onnxruntime
    import uvicorn

    env = environment(seconds_per_cell=seconds, rounds=rounds, load_average=os.getloadavg(),
                      onnxruntime=onnxruntime.__version__, fastapi=fastapi.__version__,
                      uvicorn=uvicorn.__version__, client="closed-loop threads on raw sockets in the bench process",
                      uvicorn_impl=_uvicorn_impl() or "asyncio + h11", tau=TAU, cpu_count=os.cpu_count())
    if args.json:
        write_json(args.json, figs, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
