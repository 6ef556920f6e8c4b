"""The local HTTP API on the standard library (bound to 127.0.0.1 unless configured otherwise).

    POST /v1/infer   body: image/png, image/jpeg or application/x-npy
                     -> 200 {"route", "latency_ms", "output", "bundle"}
                     an .npy of N > 1 items (N, *input shape) -> 200 {"results": [{"route", "output"}],
                     "latency_ms", "bundle"}
    GET  /healthz    the process answers
    GET  /readyz     200 only while a verified, self-tested model is active
    GET  /metrics    Prometheus text format

Errors are JSON ``{"error": "<one line>"}``: 400 bad input, 404, 405, 411 no Content-Length,
413 body over `max_body_bytes` (refused from the header, the body is not read), 415 wrong content type,
503 no model or overloaded (with Retry-After), 504 timeout, 500 anything else. No request can stop the
server: every handler failure is answered and logged.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from edge_agent.config import ApiConfig
from edge_agent.errors import EdgeAgentError, InputError
from edge_agent.runtime.errors import OverloadedError, RequestTimeoutError, ServiceClosedError
from edge_agent.runtime.preprocess import read_npy

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg")
NPY_TYPES = ("application/x-npy", "application/npy")


#: Threads answering connections over `max_connections` with a 503, and how many such connections may
#: wait for them (beyond that a connection is closed unanswered: the last resort, never the first).
_REJECT_THREADS = 2
_REJECT_QUEUE = 256
#: Seconds a refused connection gets to deliver its request head and to read the 503.
_REJECT_TIMEOUT_S = 1.0
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: 57\r\n\r\n"
    b'{"error":"too many connections to the API; retry later"}\n'
)


class _Server(ThreadingHTTPServer):
    """A thread per connection up to `max_connections`; connections beyond it are answered 503 by a
    small fixed pool (reading their request first, so closing never resets them)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: Any, handler: Any, api: ApiServer) -> None:
        self.api = api
        self.request_queue_size = api.cfg.listen_backlog  # read by server_activate's listen()
        self._slots = threading.BoundedSemaphore(api.cfg.max_connections)
        self._rejects: Deque[Any] = collections.deque()
        self._reject_cv = threading.Condition()
        self.busy_refused = 0
        self._closing = False
        super().__init__(addr, handler)
        for i in range(_REJECT_THREADS):
            threading.Thread(target=self._reject_loop, name="http-api-busy-%d" % i, daemon=True).start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("HTTP connection from %s failed", client_address, exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in its own thread while a slot is free, else queue it for a 503."""
        if self._slots.acquire(blocking=False):
            try:
                super().process_request(request, client_address)
            except Exception:
                self._slots.release()
                raise
            return
        self.busy_refused += 1
        with self._reject_cv:
            if len(self._rejects) < _REJECT_QUEUE:
                self._rejects.append(request)
                self._reject_cv.notify()
                return
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        """Close the socket and stop the 503 threads (connections still waiting for them are closed)."""
        super().server_close()
        with self._reject_cv:
            self._closing = True
            self._reject_cv.notify_all()

    def _reject_loop(self) -> None:
        while True:
            with self._reject_cv:
                while not self._rejects and not self._closing:
                    self._reject_cv.wait()
                if self._closing:
                    for r in self._rejects:
                        self.shutdown_request(r)
                    self._rejects.clear()
                    return
                request = self._rejects.popleft()
            try:
                _answer_busy(request)
            except OSError:
                pass
            finally:
                self.shutdown_request(request)


def _answer_busy(sock: socket.socket) -> None:
    """Read what the client sent (so closing does not reset it), answer 503, then wait for its close."""
    deadline = time.monotonic() + _REJECT_TIMEOUT_S
    sock.settimeout(_REJECT_TIMEOUT_S)
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    sock.sendall(_BUSY_ANSWER)
    sock.shutdown(socket.SHUT_WR)
    while time.monotonic() < deadline:  # drain a body until the client closes
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        if not sock.recv(65536):
            break


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "edge-agent"
    sys_version = ""
    # Answers go out in one send (see `_send`); without TCP_NODELAY a small answer on a kept-alive
    # connection would still wait for the client's delayed ACK of the previous one (Nagle).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        """Apply the configured read timeout (a stalled or idle client is cut after it)."""
        self.timeout = self.server.api.cfg.read_timeout_s
        super().setup()

    # ------------------------------------------------------------------------------------------ helpers
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: two small writes would be two segments, and with Nagle the
        # second waits for the ACK of the first (up to the client's delayed-ACK timer, ~40 ms).
        buf = getattr(self, "_headers_buffer", None)
        if buf is None:  # an HTTP/0.9 request: no headers at all
            buf = self._headers_buffer = []
        else:
            buf.append(b"\r\n")
        if self.command != "HEAD":
            buf.append(body)
        self.flush_headers()

    def _json(self, code: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(code, (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8"), "application/json", headers)

    def _error(self, code: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.server.api._count_error(code)
        self._json(code, {"error": message.splitlines()[0] if message else "error"}, headers)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # the server must survive anything a request does
            log.exception("unhandled error answering %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._error(500, "internal error")
            except OSError:
                pass

    # ------------------------------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        """GET /healthz, /readyz, /metrics."""
        self._guard(self._get)

    def do_HEAD(self) -> None:
        """HEAD mirrors GET without a body."""
        self._guard(self._get)

    def do_POST(self) -> None:
        """POST /v1/infer."""
        self._guard(self._post)

    def do_PUT(self) -> None:
        """Not allowed anywhere."""
        self._guard(self._not_allowed)

    do_DELETE = do_PUT
    do_PATCH = do_PUT

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _not_allowed(self) -> None:
        self._drop_body()
        path = self._path()
        if path == "/v1/infer":
            self._error(405, "use POST for /v1/infer", {"Allow": "POST"})
        elif path in ("/healthz", "/readyz", "/metrics"):
            self._error(405, "use GET for %s" % path, {"Allow": "GET, HEAD"})
        else:
            self._error(404, "no such endpoint %s" % path)

    def _drop_body(self) -> None:
        # A body we will not read would be parsed as the next request: close instead.
        if self.headers.get("Content-Length") not in (None, "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _get(self) -> None:
        api = self.server.api
        path = self._path()
        if path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/readyz":
            ready = bool(api.is_ready())
            svc = api.get_service() if ready else None
            body = {"ready": ready, "bundle": svc.bundle if svc is not None else None}
            self._json(200 if ready else 503, body, None if ready else {"Retry-After": "5"})
        elif path == "/metrics":
            text = api.metrics_text()
            self._send(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/infer":
            self._error(405, "use POST for /v1/infer", {"Allow": "POST"})
        else:
            self._error(404, "no such endpoint %s" % path)

    def _post(self) -> None:
        api = self.server.api
        if self._path() != "/v1/infer":
            self._not_allowed()
            return
        request = self._read_infer_body()
        if request is None:
            return
        ctype, body = request
        svc = api.get_service()
        if svc is None:
            self._error(503, "no model is active yet", {"Retry-After": "5"})
            return
        try:
            svc, res, many = self._infer(svc, ctype, body)
        except InputError as e:
            self._error(400, str(e))
            return
        except OverloadedError as e:
            self._error(503, str(e), {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})
            return
        except ServiceClosedError as e:
            self._error(503, str(e), {"Retry-After": "1"})
            return
        except RequestTimeoutError as e:
            self._error(504, str(e))
            return
        except EdgeAgentError as e:
            log.warning("inference failed: %s", e)
            self._error(500, str(e))
            return
        api._count_ok()
        if many is not None:
            self._json(200, {
                "results": [{"route": r.route, "output": r.output} for r in many],
                "latency_ms": many[0].latency_ms, "bundle": many[0].extra.get("bundle") or svc.bundle,
            })
            return
        # An A/B candidate's answers name the candidate bundle (InferResult.extra["bundle"]).
        self._json(200, {"route": res.route, "latency_ms": res.latency_ms, "output": res.output,
                         "bundle": res.extra.get("bundle") or svc.bundle})

    def _read_infer_body(self) -> Optional[Tuple[str, bytes]]:
        """Check the framing, size and type of an infer request and read its body: (content type, body),
        or None after answering 400/408/411/413/415 (closing the connection, as the body is left unread)."""
        cfg = self.server.api.cfg
        limit = cfg.max_body_bytes
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "chunked bodies are not accepted; send Content-Length")
            return None
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            self.close_connection = True
            self._error(411, "Content-Length is required")
            return None
        try:
            length = int(raw_len)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(400, "Content-Length %r is not a byte count" % raw_len[:40])
            return None
        if length > limit:
            self.close_connection = True  # the body is never read
            self._error(413, "body of %d bytes is over the %d byte limit" % (length, limit))
            return None
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype not in IMAGE_TYPES + NPY_TYPES:
            self.close_connection = True
            self._error(415, "content type %r is not one of %s" % (ctype, ", ".join(IMAGE_TYPES + NPY_TYPES)))
            return None
        try:
            body = self.rfile.read(length)
        except socket.timeout:  # TimeoutError from 3.10; socket.timeout on 3.8
            self.close_connection = True
            self._error(408, "the body did not arrive within %g s (read_timeout_s)" % cfg.read_timeout_s)
            return None
        if len(body) != length:
            self.close_connection = True
            self._error(400, "body ended after %d of %d bytes" % (len(body), length))
            return None
        return ctype, body

    def _infer(self, svc: Any, ctype: str, body: bytes) -> Tuple[Any, Any, Any]:
        """Run one request on `svc`: (the service that answered, single result or None, batch results or None).

        A batch .npy (leading dimension > 1) goes through infer_batch. Raises the service's errors."""
        api = self.server.api
        for attempt in (1, 2):
            try:
                if ctype in NPY_TYPES:
                    arr = read_npy(body, max_bytes=api.cfg.max_body_bytes)
                    if arr.ndim == len(svc.pre.item_shape) + 1 and arr.shape[0] > 1:
                        return svc, None, svc.infer_batch(arr, timeout_s=api.infer_timeout_s)
                    return svc, svc.infer_tensor(arr, timeout_s=api.infer_timeout_s), None
                return svc, svc.infer_image(body, timeout_s=api.infer_timeout_s), None
            except ServiceClosedError:
                # The model was swapped (activation, promotion, rollback) between taking the service
                # and submitting: answer with the one now serving instead of failing the request.
                fresh = api.get_service()
                if attempt == 2 or fresh is None or fresh is svc:
                    raise
                svc = fresh
        raise AssertionError("unreachable: the second attempt returns or raises")


class ApiServer:
    """The HTTP API in a background thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, cfg: ApiConfig, *, get_service: Callable[[], Any], is_ready: Callable[[], bool],
                 metrics_text: Callable[[], str], infer_timeout_s: Optional[float] = None) -> None:
        self.cfg = cfg
        self.get_service = get_service
        self.is_ready = is_ready
        self.metrics_text = metrics_text
        self.infer_timeout_s = infer_timeout_s
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.responses: Dict[int, int] = {}

    def _count_ok(self) -> None:
        self._count_error(200)

    def _count_error(self, code: int) -> None:
        with self._lock:
            self.responses[code] = self.responses.get(code, 0) + 1

    @property
    def port(self) -> int:
        """The bound TCP port (0 before `start`)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    def start(self) -> None:
        """Bind and serve in a daemon thread; an address that cannot be bound is a ConfigError."""
        from edge_agent.errors import ConfigError

        try:
            self._server = _Server((self.cfg.host, self.cfg.port), _Handler, self)
        except OSError as e:
            raise ConfigError("cannot listen on %s:%d: %s" % (self.cfg.host, self.cfg.port, e.strerror or e))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="http-api", daemon=True
        )
        self._thread.start()
        log.info("HTTP API on http://%s:%d", self.cfg.host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket. Safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
