"""The local HTTP API on the standard library (bound to 127.0.0.1 unless configured otherwise).

    POST /v1/infer      body: image/png, image/jpeg, application/x-npy or application/json
                        ({"image_base64": str | [str], "top_k"} or {"tensor": nested lists, "top_k"})
                        -> 200 {"route", "latency_ms", "output", "bundle"}
                        N > 1 items (a batch .npy/tensor or a list of images) -> 200 {"results":
                        [{"route", "output"}], "latency_ms", "bundle"}
    GET  /healthz       the process answers
    GET  /readyz        200 only while a verified, self-tested model is active
    GET  /metrics       Prometheus text format
    GET  /openapi.json  the OpenAPI 3 document of all this (`openapi.py`)

Errors are JSON ``{"error": "<one line>"}``: 400 the client's bad input (never a model error), 401,
404, 405, 408 body not received within `read_timeout_s`, 411 no Content-Length, 413 body over
`max_body_bytes` (refused from the header, the body is not read), 415 wrong content type, 503 no model
or overloaded (with Retry-After), 504 timeout, 500 the model's fault. No request can stop the server:
every handler failure is answered and logged.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from edge_agent.config import ApiConfig
from edge_agent.errors import EdgeAgentError, InputError
from edge_agent.runtime.answer import InferResult
from edge_agent.runtime.errors import OverloadedError, RequestTimeoutError, ServiceClosedError
from edge_agent.runtime.http_auth import ApiAccess, api_access
from edge_agent.runtime.http_json import JsonRequest, check_top_k, parse_json_request, query_top_k
from edge_agent.runtime.http_server import CappedHTTPServer
from edge_agent.runtime.openapi import openapi_json_bytes
from edge_agent.runtime.postprocess import scale_boxes, shorten
from edge_agent.runtime.preprocess import read_npy

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg")
NPY_TYPES = ("application/x-npy", "application/npy")
JSON_TYPES = ("application/json",)
BODY_TYPES = IMAGE_TYPES + NPY_TYPES + JSON_TYPES
GET_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json")


class _Handler(BaseHTTPRequestHandler):
    server: CappedHTTPServer
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
        """GET /healthz, /readyz, /metrics, /openapi.json."""
        self._guard(self._authorized(self._get))

    def do_HEAD(self) -> None:
        """HEAD mirrors GET without a body."""
        self._guard(self._authorized(self._get))

    def do_POST(self) -> None:
        """POST /v1/infer."""
        self._guard(self._authorized(self._post))

    def _authorized(self, fn: Callable[[], None]) -> Callable[[], None]:
        """`fn`, or a 401 when the API needs a bearer token and the request lacks the right one."""
        if self.server.api.access.allows(self._path(), self.headers.get("Authorization")):
            return fn

        def refuse() -> None:
            self._drop_body()
            self._error(401, "this API needs 'Authorization: Bearer <token>' (api.token_file)",
                        {"WWW-Authenticate": 'Bearer realm="edge-agent"'})
        return refuse

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
        elif path in GET_PATHS:
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
        elif path == "/openapi.json":
            self._send(200, openapi_json_bytes(), "application/json")
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
            svc, res, many, top_k = self._infer(svc, ctype, body)
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
                "results": [{"route": r.route, "output": shorten(r.output, top_k)} for r in many],
                "latency_ms": many[0].latency_ms, "bundle": many[0].extra.get("bundle") or svc.bundle,
            })
            return
        # An A/B candidate's answers name the candidate bundle (InferResult.extra["bundle"]).
        self._json(200, {"route": res.route, "latency_ms": res.latency_ms, "output": shorten(res.output, top_k),
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
        if ctype not in BODY_TYPES:
            self.close_connection = True
            self._error(415, "content type %r is not one of %s" % (ctype, ", ".join(BODY_TYPES)))
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

    def _infer(self, svc: Any, ctype: str, body: bytes) -> Tuple[Any, Any, Any, Optional[int]]:
        """Run one request on `svc`: (the service that answered, single result or None, batch results or
        None, the top_k asked for). Raises the service's errors (InputError for the client's mistakes)."""
        api = self.server.api
        top_k = query_top_k(self.path)
        for attempt in (1, 2):
            try:
                if ctype in JSON_TYPES:
                    req = parse_json_request(body, max_items=svc.cfg.max_queue,
                                             integer_input=svc.pre.dtype.kind in "iu")
                    top_k = req.top_k if req.top_k is not None else top_k
                    check_top_k(top_k, svc)
                    return (svc, *self._infer_json(svc, req), top_k)
                check_top_k(top_k, svc)
                if ctype in NPY_TYPES:
                    return (svc, *self._infer_tensor(svc, read_npy(body, max_bytes=api.cfg.max_body_bytes)), top_k)
                return svc, svc.infer_image(body, timeout_s=api.infer_timeout_s), None, top_k
            except ServiceClosedError:
                # The model was swapped (activation, promotion, rollback) between taking the service
                # and submitting: answer with the one now serving instead of failing the request.
                fresh = api.get_service()
                if attempt == 2 or fresh is None or fresh is svc:
                    raise
                svc = fresh
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _infer_tensor(self, svc: Any, arr: Any) -> Tuple[Any, Any]:
        """One item (or a batch axis of 1) -> a single answer; N > 1 items -> results."""
        timeout = self.server.api.infer_timeout_s
        if arr.ndim == len(svc.pre.item_shape) + 1 and arr.shape[0] > 1:
            return None, svc.infer_batch(arr, timeout_s=timeout)
        return svc.infer_tensor(arr, timeout_s=timeout), None

    def _infer_json(self, svc: Any, req: JsonRequest) -> Tuple[Any, Any]:
        timeout = self.server.api.infer_timeout_s
        if req.tensor is not None:
            return self._infer_tensor(svc, req.tensor)
        assert req.images is not None
        if not req.many:
            return svc.infer_image(req.images[0], timeout_s=timeout), None
        # A list of images runs as one chunk through the batchers; detection boxes are then scaled
        # back to each image's own size.
        items, sizes = zip(*(svc.pre.from_image_bytes(b) for b in req.images))
        results = svc.infer_batch(np.stack(items), timeout_s=timeout)
        return None, [r if r.output.get("kind") != "detection" else
                      InferResult(r.route, scale_boxes(r.output, svc.pre.size_hw, hw), r.latency_ms, r.extra)
                      for r, hw in zip(results, sizes)]


class ApiServer:
    """The HTTP API in a background thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, cfg: ApiConfig, *, get_service: Callable[[], Any], is_ready: Callable[[], bool],
                 metrics_text: Callable[[], str], infer_timeout_s: Optional[float] = None) -> None:
        self.cfg = cfg
        self.get_service = get_service
        self.is_ready = is_ready
        self.metrics_text = metrics_text
        self.infer_timeout_s = infer_timeout_s
        self._server: Optional[CappedHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.responses: Dict[int, int] = {}
        self.access = ApiAccess(None)

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

        self.access = api_access(self.cfg)  # ConfigError: beyond loopback without a token or an opt-out
        try:
            self._server = CappedHTTPServer((self.cfg.host, self.cfg.port), _Handler, self)
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
