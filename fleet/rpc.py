"""CLI ↔ controller request/response over MQTT 5, so an operator needs nothing but broker access.

The client publishes an `RpcRequest` on ``{p}/fleet/rpc`` with the MQTT 5 *response topic* set to its
own reply topic (``{p}/fleet/rpc-reply/{username}/{client id}``) and a random *correlation data*; the controller
answers with an `RpcResponse` on that topic, echoing the correlation data. Controllers subscribe
through the shared subscription ``$share/fleet-rpc/{p}/fleet/rpc``, so with several controllers on a
clustered broker exactly one of them answers each request.

`RpcServer` runs handlers on its own worker thread (never in the MQTT network thread), with a bounded
queue: a flood of requests is refused with an error answer, not buffered without limit, and each operator
(the name in its reply topic) has a request rate; requests over it are dropped unanswered.

Requests never replay. A *retained* request (which the broker would hand to every controller that
subscribes, after every restart) is ignored and cleared (an empty retained message on the topic). Every
request carries `issued_at`; the server refuses one without it or older than `max_age_s` (also when it
is that far in the future: a clock that wrong needs fixing), and the client also sets the MQTT 5 message
expiry to its own timeout, so the broker drops a request no controller took in time.
`RpcClient.call` waits at most `timeout_s` and then says plainly that no controller answered.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent.errors import ConfigError, EdgeAgentError, TransportError
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession, require_connected
from edge_agent.protocol import topics
from edge_agent.protocol.messages import MessageError, RpcRequest, RpcResponse
from fleet.config import RpcSection
from fleet.ratelimit import KeyedRate

log = logging.getLogger(__name__)

SHARE_GROUP = "fleet-rpc"
MAX_RPC_BYTES = 256 * 1024
#: Largest answer the server sends (a devices list of a big fleet is a few MB; the broker allows about 1.1 MB).
MAX_RESPONSE_BYTES = 1_000_000

Handler = Callable[[Dict[str, Any]], Any]


class RpcError(EdgeAgentError):
    """The controller answered with an error (its message is the reason)."""


class RpcTimeout(TransportError):
    """No controller answered within the timeout."""


def reply_topic(prefix: str, username: Optional[str], client_id: str) -> str:
    """Where a CLI client receives its answers: ``{p}/fleet/rpc-reply/{username}/{client id}`` (the broker
    ACL lets each user read only the replies under its own name; ``anonymous`` without a username)."""
    return "%s/fleet/rpc-reply/%s/%s" % (prefix, username or "anonymous", client_id)


def certificate_cn(cert_file: Any) -> str:
    """The subject CN of a PEM (or DER) client certificate: the MQTT username a broker with
    `use_identity_as_username` gives its holder. ConfigError when unreadable or without a usable CN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        data = open(str(cert_file), "rb").read()
    except OSError as e:
        raise ConfigError("mqtt.tls.cert_file %s cannot be read: %s" % (cert_file, e.strerror))
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise ConfigError("mqtt.tls.cert_file %s is not an X.509 certificate: %s" % (cert_file, e))
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if not cn or any(c in cn for c in "/+#\x00"):
        raise ConfigError("mqtt.tls.cert_file %s has no common name usable in a topic (%r); set mqtt.username to "
                          "the identity the broker gives this certificate" % (cert_file, cn))
    return cn


def rpc_username(cfg: Any) -> Optional[str]:
    """The username that names a CLI's reply topic: `mqtt.username`, else the client certificate's CN
    (the broker ignores a username sent with a certificate and uses the CN), else None (anonymous)."""
    if cfg.username:
        return cfg.username
    tls = getattr(cfg, "tls", None)
    if tls is not None and tls.cert_file is not None:
        return certificate_cn(tls.cert_file)
    return None


class RpcServer:
    """Answers `RpcRequest`s with registered handlers, one worker thread, bounded backlog."""

    def __init__(self, session: MqttSession, *, prefix: str, share: bool = True,
                 limits: Optional[RpcSection] = None, clock: Callable[[], float] = time.time) -> None:
        limits = limits or RpcSection()
        self.session = session
        self.prefix = prefix
        self.share = share
        self.limits = limits
        self.clock = clock
        self._handlers: Dict[str, Handler] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=limits.backlog)
        self._rate = KeyedRate(limits.requests_per_s, limits.request_burst)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = {"requests": 0, "malformed": 0, "refused_busy": 0, "errors": 0, "retained_cleared": 0,
                      "rate_limited": 0, "expired": 0}

    def register(self, method: str, handler: Handler) -> None:
        """Answer `method` with `handler(params) -> JSON-ready result` (EdgeAgentError → error answer)."""
        self._handlers[method] = handler

    @property
    def methods(self) -> List[str]:
        """The registered method names."""
        return sorted(self._handlers)

    def subscription(self) -> str:
        """The topic filter this server listens on."""
        base = topics.fleet_rpc(self.prefix)
        return "$share/%s/%s" % (SHARE_GROUP, base) if self.share else base

    def start(self) -> None:
        """Subscribe and start the worker thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="fleet-rpc", daemon=True)
        self._thread.start()
        # Retain-as-published: a request published retained shows its retain flag also when delivered live.
        self.session.subscribe(self.subscription(), self._on_request, qos=1, retain_as_published=True)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (requests still queued are dropped; their clients time out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # The network thread only parses and queues.
    def _on_request(self, msg: Inbound) -> None:
        if msg.retain:
            # A retained request would run again on every controller start: never run it, and remove it.
            self.stats["retained_cleared"] += 1
            log.warning("retained RPC request on %s ignored and cleared", msg.topic)
            if msg.payload:
                self.session.publish(msg.topic, b"", qos=1, retain=True)
            return
        if not msg.response_topic:
            self.stats["malformed"] += 1
            log.warning("RPC request without a response topic ignored")
            return
        if not msg.response_topic.startswith(self.prefix + "/fleet/rpc-reply/"):
            self.stats["malformed"] += 1
            log.warning("RPC request with a foreign response topic %r ignored", msg.response_topic)
            return
        sender = msg.response_topic[len(self.prefix + "/fleet/rpc-reply/"):].split("/", 1)[0]
        if not self._rate.allow(sender):
            self.stats["rate_limited"] += 1
            return
        try:
            req = RpcRequest.from_json(msg.payload, max_bytes=MAX_RPC_BYTES)
        except MessageError as e:
            self.stats["malformed"] += 1
            self._answer(msg, RpcResponse(ok=False, error="malformed request: %s" % e))
            return
        stale = self._staleness(req)
        if stale is not None:
            self.stats["expired"] += 1
            self._answer(msg, RpcResponse(ok=False, error=stale))
            return
        try:
            self._queue.put_nowait((req, msg))
        except queue.Full:
            self.stats["refused_busy"] += 1
            self._answer(
                msg, RpcResponse(ok=False, error="controller busy (%d requests queued); retry" % self._queue.maxsize)
            )

    def _staleness(self, req: RpcRequest) -> Optional[str]:
        """Why a request is too old (or dated too far ahead) to run; None when it is fresh."""
        if req.issued_at is None:
            return "request carries no issued_at; use a fleet CLI of this version"
        age = self.clock() - req.issued_at
        if abs(age) > self.limits.max_age_s:
            return "request issued %.0f s %s; refused (rpc.max_age_s = %.0f; check the clocks)" % (
                abs(age), "ago" if age > 0 else "in the future", self.limits.max_age_s)
        return None

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                req, msg = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._answer(msg, self.dispatch(req.method, req.params))

    def dispatch(self, method: str, params: Dict[str, Any]) -> RpcResponse:
        """Run one request (also usable without MQTT, e.g. in tests)."""
        self.stats["requests"] += 1
        handler = self._handlers.get(method)
        if handler is None:
            return RpcResponse(ok=False, error="unknown method %r (known: %s)" % (method, ", ".join(self.methods)))
        try:
            return RpcResponse(ok=True, result=handler(params))
        except EdgeAgentError as e:
            return RpcResponse(ok=False, error=str(e))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            # OverflowError: a number too big for the registry (SQLite integers are 64-bit).
            return RpcResponse(ok=False, error="bad parameters for %s: %s" % (method, _one_line(e)))
        except Exception as e:  # never let a handler bug kill the worker
            self.stats["errors"] += 1
            log.exception("RPC %s failed", method)
            return RpcResponse(ok=False, error="internal error in %s: %s" % (method, type(e).__name__))

    def _answer(self, msg: Inbound, resp: RpcResponse) -> None:
        payload = resp.to_json()
        if len(payload) > MAX_RESPONSE_BYTES:
            payload = RpcResponse(
                ok=False, error="answer of %d bytes is too large for one message; narrow the request" % len(payload)
            ).to_json()
        self.session.publish(msg.response_topic, payload, qos=1, correlation_data=msg.correlation_data)


class RpcClient:
    """The CLI side: one MQTT session, `call(method, params)` with a timeout."""

    def __init__(self, session: MqttSession, *, prefix: str, client_id: str, username: Optional[str] = None) -> None:
        self.session = session
        self.prefix = prefix
        self.reply_topic = reply_topic(prefix, username, client_id)
        self._waiting: Dict[bytes, Tuple[threading.Event, List[RpcResponse]]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        session.subscribe(self.reply_topic, self._on_reply, qos=1)

    @classmethod
    def connect(cls, cfg: Any, *, prefix: Optional[str] = None, connect_timeout_s: float = 10.0) -> RpcClient:
        """Open a session to the broker in `cfg` (an `MqttConfig`) and return a ready client."""
        client_id = "fleet-cli-%s" % os.urandom(6).hex()
        session = MqttSession(cfg, client_id=client_id, name="fleet-cli")
        client = cls(session, prefix=prefix or cfg.prefix, client_id=client_id, username=rpc_username(cfg))
        session.start()
        try:
            require_connected(session, connect_timeout_s)
        except TransportError:
            session.stop(timeout_s=1.0)
            raise
        return client

    def close(self) -> None:
        """Disconnect."""
        self.session.stop(timeout_s=2.0)

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_reply(self, msg: Inbound) -> None:
        key = msg.correlation_data or b""
        with self._lock:
            slot = self._waiting.get(key)
        if slot is None:
            return  # a late answer to a call that timed out
        try:
            resp = RpcResponse.from_json(msg.payload, max_bytes=MAX_RESPONSE_BYTES + 1024)
        except MessageError as e:
            resp = RpcResponse(ok=False, error="controller sent a malformed answer: %s" % e)
        slot[1].append(resp)
        slot[0].set()

    def call(self, method: str, params: Optional[Dict[str, Any]] = None, *, timeout_s: float = 10.0) -> Any:
        """Send one request and wait for the answer; its result, or RpcError / RpcTimeout."""
        req = RpcRequest(method=method, params=params or {}, issued_at=int(time.time()))
        corr = os.urandom(16)
        done = threading.Event()
        box: List[RpcResponse] = []
        with self._lock:
            self._waiting[corr] = (done, box)
        try:
            deadline = time.monotonic() + timeout_s
            delivery = self.session.publish(
                topics.fleet_rpc(self.prefix),
                req.to_json(),
                qos=1,
                response_topic=self.reply_topic,
                correlation_data=corr,
                expiry_s=max(1, int(timeout_s + 0.999)),
            )
            if not delivery.wait(max(0.1, deadline - time.monotonic())):
                raise RpcTimeout(
                    "the broker did not accept the request%s" % (": " + delivery.error if delivery.error else "")
                )
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise RpcTimeout(
                    "no controller answered %s on %s within %.0f s; is `fleet serve` running and connected to "
                    "this broker?" % (method, topics.fleet_rpc(self.prefix), timeout_s)
                )
        finally:
            with self._lock:
                self._waiting.pop(corr, None)
        resp = box[0]
        if not resp.ok:
            raise RpcError(resp.error or "the controller refused %s" % method)
        return resp.result


def _one_line(e: Exception) -> str:
    """An error as one line: a pydantic ValidationError's first error (where: what), else the message with
    its whitespace collapsed."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return "%s: %s" % (".".join(str(p) for p in first["loc"]) or "(top level)", first["msg"])
        except (TypeError, LookupError, AttributeError):
            pass
    return " ".join(str(e).split())
