"""The console's HTTP server in `fleet serve`: static UI, REST API, server-sent events, ``/metrics``.

Stdlib only: `CappedHTTPServer` (the agent's bounded thread pool: `max_connections` served at once,
503 beyond) with optional TLS. Every input is bounded before it is parsed: request line and headers
(http.server), query string (size and field count), JSON bodies (`max_body_bytes`, nesting depth),
uploads (`max_upload_bytes`, streamed to disk). Requests need a token (``Authorization: Bearer``),
except the static UI and the OpenAPI document; viewers read, operators also act.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from edge_agent.errors import ConfigError
from edge_agent.runtime.http_server import CappedHTTPServer
from fleet.config import ConsoleSection
from fleet.console.handler import ConsoleHandler
from fleet.console.tokens import TokenTable
from fleet.ratelimit import KeyedRate

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


class ConsoleServer:
    """The listener, its thread, and what handlers share (controller, tokens, limits, stream slots)."""

    def __init__(self, cfg: ConsoleSection, controller: Any, *, tokens_file: Path) -> None:
        self.cfg = cfg
        self.controller = controller
        self.tokens = TokenTable(tokens_file)
        self.rate = KeyedRate(cfg.requests_per_s, cfg.request_burst)
        self.streams = threading.BoundedSemaphore(cfg.max_streams)
        self.upload_dir = Path(controller.cfg.controller.state_dir) / "uploads"
        self.stopping = threading.Event()
        shim = SimpleNamespace(cfg=SimpleNamespace(listen_backlog=128, max_connections=cfg.max_connections))
        self.httpd = CappedHTTPServer((cfg.host, cfg.port), ConsoleHandler, shim)
        self.httpd.console = self  # type: ignore[attr-defined]
        self.tls = self._tls_context()
        if self.tls is not None:
            # Handshake in the connection's own thread (first read), never in the accept loop.
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self._thread: Optional[threading.Thread] = None

    def _tls_context(self) -> Optional[ssl.SSLContext]:
        c = self.cfg
        if c.tls_cert_file is None and c.tls_key_file is None:
            return None
        if c.tls_cert_file is None or c.tls_key_file is None:
            raise ConfigError("console.tls_cert_file and console.tls_key_file go together")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(c.tls_cert_file), str(c.tls_key_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("console TLS certificate %s / key %s: %s" % (c.tls_cert_file, c.tls_key_file, e))
        return ctx

    @property
    def url(self) -> str:
        """Where the console answers."""
        host, port = self.httpd.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return "%s://%s:%d/" % ("https" if self.tls else "http", shown, port)

    def start(self) -> None:
        """Serve on a thread of its own."""
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fleet-console", daemon=True)
        self._thread.start()
        log.info("console serving on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, end live streams, close the socket."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)

    def new_upload(self) -> tempfile._TemporaryFileWrapper[bytes]:
        """A temporary file for an upload, in the state directory (not /tmp: bundles are large)."""
        return tempfile.NamedTemporaryFile(prefix="upload-", suffix=".bundle", dir=str(self.upload_dir),
                                           delete=False)


def remove_quietly(path: str) -> None:
    """Remove a temporary file, ignoring its absence."""
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["ConsoleServer", "STATIC_DIR", "remove_quietly", "socket"]
