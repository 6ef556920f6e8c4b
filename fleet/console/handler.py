"""One HTTP connection of the console: routing, authentication, bounded bodies, answers.

Errors are split by whose fault: 400/404/405/409/413/415/422/429 for the client's request, 401 for a
missing or unknown token, 403 for a viewer asking to act, 500 for the controller's own failure (logged,
never ending the server), 503 when live streams are all taken.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

from edge_agent.protocol import boundedjson
from fleet.console.backend import Backend
from fleet.console.routes import ApiError, Route, match
from fleet.console.tokens import Principal

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2048
MAX_QUERY_FIELDS = 20
#: Seconds a connection may stay silent (slow clients are dropped, not waited for).
SOCKET_TIMEOUT_S = 30.0
_STATIC_FILES = {"app.js", "app.css", "charts.js", "index.html", "favicon.svg"}
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
)


class ConsoleHandler(BaseHTTPRequestHandler):
    """Routes a request to the static UI, the OpenAPI document, /metrics or an API route."""

    protocol_version = "HTTP/1.1"
    server_version = "fleet-console"
    timeout = SOCKET_TIMEOUT_S

    def setup(self) -> None:
        """Answers go out at once (no Nagle delay between the head and the body of a kept-alive answer)."""
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    @property
    def console(self) -> Any:
        return self.server.console  # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    # ----------------------------------------------------------------------------------- entry points

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        try:
            self._route(method)
        except ApiError as e:
            self._drain_body()
            self.send_json(e.status, {"error": e.message})
        except (ConnectionError, TimeoutError, OSError) as e:
            log.debug("console client went away: %s", e)
            self.close_connection = True
        except Exception:  # a handler bug answers 500; the server goes on
            log.exception("console %s %s failed", method, self.path)
            self.close_connection = True
            try:
                self.send_json(500, {"error": "internal error; see the controller log"})
            except OSError:
                pass

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if len(parts.query) > MAX_QUERY_CHARS:
            raise ApiError(414, "query string longer than %d characters" % MAX_QUERY_CHARS)
        if method == "GET" and (path == "/" or path.startswith("/static/")):
            return self._static(path)
        if method == "GET" and path == "/api/v1/openapi.json":
            from fleet.console.openapi import document

            return self.send_json(200, document())
        if method == "GET" and path == "/metrics":
            return self._metrics()
        route, args, known = match(method, path)
        if route is None:
            raise ApiError(405 if known else 404, "%s %s is not an API operation" % (method, path))
        who = self._authorize(route.role)
        query = self._query(parts.query)
        if route.handler is None:  # the live stream
            from fleet.console.stream import stream_rollout

            return stream_rollout(self, Backend(self.console.controller, who, max_page_size=1), args["rollout_id"])
        body = self._body(route)
        backend = Backend(self.console.controller, who, max_page_size=self.console.cfg.max_page_size)
        started = time.monotonic()
        try:
            result = route.handler(backend, args, query, body)
        finally:
            if route.path == "/api/v1/bundles" and isinstance(body, str):
                from fleet.console.server import remove_quietly

                remove_quietly(body)
        if route.method == "POST":
            log.info("console: %s %s by %s (%s) in %.0f ms", method, path, who.name, who.role,
                     (time.monotonic() - started) * 1000)
        created = route.method == "POST" and route.path in ("/api/v1/rollouts", "/api/v1/bundles")
        self.send_json(201 if created else 200, result)

    # ----------------------------------------------------------------------------------- inputs

    def _authorize(self, role: str) -> Principal:
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        who = self.console.tokens.lookup(token)
        if who is None:
            raise ApiError(401, "a valid token is needed (Authorization: Bearer TOKEN; `fleet token add`)")
        if role == "operator" and not who.may_act():
            raise ApiError(403, "token %s is a viewer; this needs an operator token" % who.name)
        if not self.console.rate.allow(who.name):
            raise ApiError(429, "more than %.0f requests per second for token %s" % (
                self.console.cfg.requests_per_s, who.name))
        return who

    def _query(self, text: str) -> Dict[str, str]:
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            raise ApiError(400, "more than %d query fields" % MAX_QUERY_FIELDS)
        out: Dict[str, str] = {}
        for k, v in pairs:
            if k in out:
                raise ApiError(400, "query field %s given twice" % k)
            out[k] = v
        return out

    def _length(self, limit: int) -> int:
        raw = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send a Content-Length (chunked bodies are not taken)")
        if raw is None or not raw.isdigit() or len(raw) > 15:
            if raw is None:
                return 0
            raise ApiError(400, "bad Content-Length")
        n = int(raw)
        if n > limit:
            self.close_connection = True
            raise ApiError(413, "body of %d bytes is over the limit of %d" % (n, limit))
        return n

    def _body(self, route: Route) -> Any:
        if route.method != "POST":
            return None
        if route.path == "/api/v1/bundles":
            return self._upload()
        n = self._length(self.console.cfg.max_body_bytes)
        if n == 0:
            return None
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        data = self.rfile.read(n)
        if ctype != "application/json":
            raise ApiError(415, "send the body as application/json")
        try:
            return boundedjson.loads(data, max_bytes=self.console.cfg.max_body_bytes, what="request body")
        except boundedjson.JSONInputError as e:
            raise ApiError(400, str(e))

    def _upload(self) -> str:
        n = self._length(self.console.cfg.max_upload_bytes)
        if n == 0:
            raise ApiError(400, "the upload is empty; send the bundle file as the body")
        f = self.console.new_upload()
        try:
            with f:
                left = n
                while left:
                    block = self.rfile.read(min(left, 1 << 20))
                    if not block:
                        raise ApiError(400, "the upload ended after %d of %d bytes" % (n - left, n))
                    f.write(block)
                    left -= len(block)
        except BaseException:
            from fleet.console.server import remove_quietly

            remove_quietly(f.name)
            raise
        return f.name

    def _drain_body(self) -> None:
        """After an early refusal, skip a small unread body so the connection can serve the next request."""
        raw = self.headers.get("Content-Length") if self.headers else None
        if raw and raw.isdigit() and int(raw) <= 64 * 1024 and not self.close_connection:
            try:
                self.rfile.read(int(raw))
            except OSError:
                self.close_connection = True
        elif raw:
            self.close_connection = True

    # ----------------------------------------------------------------------------------- outputs

    def _static(self, path: str) -> None:
        from fleet.console.server import STATIC_DIR

        name = "index.html" if path == "/" else path[len("/static/"):]
        if name not in _STATIC_FILES and not (name.startswith("vendor/") and name.count("/") == 1):
            raise ApiError(404, "no such file")
        f = (STATIC_DIR / name).resolve()
        if STATIC_DIR not in f.parents or not f.is_file():
            raise ApiError(404, "no such file")
        ctype = mimetypes.guess_type(str(f))[0] or "application/octet-stream"
        if name.endswith(".js"):
            ctype = "text/javascript"
        self.send_bytes(200, f.read_bytes(), ctype + ("; charset=utf-8" if ctype.startswith("text") else ""),
                        cache="no-cache")

    def _metrics(self) -> None:
        if not self.console.cfg.metrics_public:
            self._authorize("viewer")
        from fleet.console.metrics import render

        b = Backend(self.console.controller, Principal("metrics", "viewer"), max_page_size=1)
        text = render(b.call("devices.list", {}), b.call("controller.status", {}),
                      b.call("rollout.list", {"limit": 20}))
        self.send_bytes(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def send_json(self, status: int, obj: Any) -> None:
        """Answer with a JSON document."""
        data = json.dumps(obj, separators=(",", ":"), default=str).encode()
        self.send_bytes(status, data, "application/json")

    def send_bytes(self, status: int, data: bytes, ctype: str, cache: str = "no-store",
                   extra: Optional[Tuple[Tuple[str, str], ...]] = None) -> None:
        """Answer with `data`."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        for k, v in _SECURITY_HEADERS + (extra or ()):
            self.send_header(k, v)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="fleet"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
