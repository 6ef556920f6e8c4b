"""Live rollout status as server-sent events: the rollout's status (``rollout.status``) is read every
`stream_interval_s` and sent when it changed, until the rollout ends, the client goes, the server
stops, or `stream_max_s` passes (the browser's reader reconnects). At most `max_streams` at once."""

from __future__ import annotations

import json
import time
from typing import Any

from fleet.console.routes import ApiError
from fleet.rollouts.states import FINAL_STATES

#: A comment line this often keeps proxies from closing an idle stream (seconds).
KEEPALIVE_S = 15.0


def stream_rollout(h: Any, backend: Any, rollout_id: str) -> None:
    """Serve one event stream on handler `h`."""
    console = h.console
    first = backend.call("rollout.status", {"rollout_id": rollout_id, "history": 20})  # 404 before streaming
    if not console.streams.acquire(blocking=False):
        raise ApiError(503, "%d live streams are open already; retry later" % console.cfg.max_streams)
    try:
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-store")
        h.send_header("X-Accel-Buffering", "no")
        h.end_headers()
        _loop(h, backend, rollout_id, first)
    finally:
        console.streams.release()


def _loop(h: Any, backend: Any, rollout_id: str, status: Any) -> None:
    cfg = h.console.cfg
    deadline = time.monotonic() + cfg.stream_max_s
    last_text = None
    last_sent = time.monotonic()
    while True:
        text = json.dumps(status, separators=(",", ":"), sort_keys=True, default=str)
        if text != last_text:
            h.wfile.write(b"event: status\ndata: " + text.encode() + b"\n\n")
            h.wfile.flush()
            last_text, last_sent = text, time.monotonic()
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            h.wfile.write(b": keepalive\n\n")
            h.wfile.flush()
            last_sent = time.monotonic()
        if status.get("state") in FINAL_STATES or time.monotonic() > deadline:
            h.wfile.write(b"event: end\ndata: {}\n\n")
            h.wfile.flush()
            return
        if h.console.stopping.wait(cfg.stream_interval_s):
            return
        status = backend.call("rollout.status", {"rollout_id": rollout_id, "history": 20})
