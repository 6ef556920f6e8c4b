"""The HTTP server under the local API: a thread per connection up to `[api] max_connections`, the
listen backlog from `[api] listen_backlog`, and a 503 (never a reset) for connections over the cap."""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
import time
from http.server import HTTPServer
from typing import Any, Deque

log = logging.getLogger(__name__)

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


class CappedHTTPServer(HTTPServer):
    """A thread per connection up to `max_connections`, taken from a pool that keeps finished threads
    for the next connection (starting a thread per connection costs more than the request); connections
    beyond the cap are answered 503 by a small fixed pool (reading their request first, so closing never
    resets them)."""

    allow_reuse_address = True

    def __init__(self, addr: Any, handler: Any, api: Any) -> None:
        self.api = api
        self.request_queue_size = api.cfg.listen_backlog  # read by server_activate's listen()
        self._cap = api.cfg.max_connections
        self._pool_lock = threading.Lock()
        self._busy = 0  # connections being served
        self._idle = 0  # pool threads waiting for a connection
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
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
        """Hand the connection to a pool thread while under the cap (starting one when none is idle),
        else queue it for a 503."""
        with self._pool_lock:
            admitted = self._busy < self._cap
            spawn = admitted and self._idle == 0
            if admitted:
                self._busy += 1
                if not spawn:
                    self._idle -= 1
        if admitted:
            self._jobs.put((request, client_address))
            if spawn:
                threading.Thread(target=self._serve_loop, name="http-api-conn-%d" % self.server_address[1],
                                 daemon=True).start()
            return
        self.busy_refused += 1
        with self._reject_cv:
            if len(self._rejects) < _REJECT_QUEUE:
                self._rejects.append(request)
                self._reject_cv.notify()
                return
        self.shutdown_request(request)

    def _serve_loop(self) -> None:
        """A pool thread: serve connections one after another until the server closes."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self._pool_lock:
                    self._busy -= 1
                    self._idle += 1

    def server_close(self) -> None:
        """Close the socket and stop the 503 threads (connections still waiting for them are closed)."""
        super().server_close()
        with self._pool_lock:
            threads = self._busy + self._idle
        for _ in range(threads):
            self._jobs.put(None)
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
