"""Hostile HTTP to a live `ApiServer` around a real InferenceService (the sample models on ONNX
Runtime), with hypothesis: random methods, paths, content types, Content-Length values (missing,
negative, garbage, too small, too big, over the limit) and bodies (random bytes, broken .npy and image
headers, wrong shapes and dtypes). Every request gets an answer that is 2xx, 4xx or 503 (501 only for a
method token HTTP does not define for this server), never a 500, and the server stays healthy:
`/healthz` answers and a real inference still works afterwards.
"""

from __future__ import annotations

import io
import os
import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import ApiConfig, RuntimeConfig
from edge_agent.runtime.http_api import ApiServer
from edge_agent.runtime.service import InferenceService
from tests._runtime_helpers import digits_manifest, digits_models, load_split

FUZZ = settings(max_examples=int(os.environ.get("EDGE_AGENT_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_BODY = 64 * 1024
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")


def _npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class LiveApi:
    def __init__(self, tmp) -> None:
        self.models = digits_models(max_batch=8)
        self.service = InferenceService(self.models, digits_manifest(tmp), tmp, RuntimeConfig())
        self.server = ApiServer(ApiConfig(host="127.0.0.1", port=0, max_body_bytes=MAX_BODY),
                                get_service=lambda: self.service, is_ready=lambda: True,
                                metrics_text=lambda: "edge_agent_up 1\n", infer_timeout_s=5.0)
        self.server.start()
        self.x, _ = load_split("heldout")

    def raw(self, data: bytes, timeout_s: float = 10.0) -> bytes:
        """Send raw bytes, close our sending side, read the whole answer."""
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=timeout_s) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may close early (e.g. 413 without reading the body)
            chunks = []
            while True:
                try:
                    b = s.recv(65536)
                except (ConnectionResetError, socket.timeout):
                    break
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks)

    def close(self) -> None:
        self.server.stop()
        self.service.close()
        self.models.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    a = LiveApi(tmp_path_factory.mktemp("fuzz-http"))
    yield a
    a.close()


def _statuses(answer: bytes):
    """Status codes of every response in `answer` (keep-alive may carry several)."""
    codes = []
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1."):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                codes.append(int(parts[1]))
    return codes


paths = st.one_of(st.sampled_from(["/v1/infer", "/healthz", "/readyz", "/metrics", "/", "/v1/infer?x=1", "//v1/infer",
                                   "/v1/infer/../healthz", "/%00", "*", "/" + "a" * 5000]),
                  st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
                      lambda t: "/" + t))
ctypes = st.one_of(st.none(), st.sampled_from(["application/x-npy", "application/npy", "image/png", "image/jpeg",
                                               "IMAGE/PNG; charset=x", "text/plain", "application/json", ""]),
                   st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30))


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["bytes", "npy-shape", "npy-dtype", "npy-header", "png-header", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=4096))
    if kind == "npy-shape":
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5))
        return _npy(np.zeros(shape, dtype=np.float32))
    if kind == "npy-dtype":
        dt = draw(st.sampled_from(["float64", "int8", "uint16", "complex64", "bool", "<U3"]))
        return _npy(np.zeros((1, 1, 8, 8), dtype=dt))
    if kind == "npy-header":
        good = _npy(np.zeros((1, 1, 8, 8), dtype=np.float32))
        i = draw(st.integers(0, 127))
        return good[:i] + draw(st.binary(min_size=1, max_size=8)) + good[i + 1:]
    if kind == "png-header":
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", draw(st.integers(0, 2 ** 32 - 1))) + b"IHDR" + draw(
            st.binary(max_size=64))
    return b""


@st.composite
def requests(draw):
    method = draw(st.one_of(st.sampled_from(KNOWN_METHODS), st.sampled_from(["OPTIONS", "TRACE", "CONNECT", "get",
                                                                            "BREW"])))
    path = draw(paths)
    body = draw(bodies())
    headers = []
    ct = draw(ctypes)
    if ct is not None:
        headers.append("Content-Type: %s" % ct)
    cl = draw(st.sampled_from(["exact", "none", "short", "long", "negative", "garbage", "huge", "over-limit"]))
    length = {"exact": str(len(body)), "short": str(max(0, len(body) - 7)), "long": str(len(body) + 100),
              "negative": "-5", "garbage": "12abc", "huge": str(10 ** 30), "over-limit": str(MAX_BODY + 1),
              "none": None}[cl]
    if length is not None:
        headers.append("Content-Length: %s" % length)
    if draw(st.booleans()):
        headers.append("Transfer-Encoding: chunked")
    if draw(st.booleans()):
        headers.append("X-Junk: %s" % draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                                   max_size=100)))
    head = "%s %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (method, path, "".join(h + "\r\n" for h in headers))
    return method, head.encode("latin-1") + body


@FUZZ
@given(req=requests())
def test_http_api_hostile_requests_get_2xx_4xx_or_503_never_500(live, req):
    method, data = req
    answer = live.raw(data)
    codes = _statuses(answer)
    assert codes, "no HTTP answer to %r" % data[:200]
    allowed_5xx = (503,) if method in KNOWN_METHODS else (501, 503)
    for code in codes:
        assert 200 <= code < 500 or code in allowed_5xx, (code, data[:300], answer[:300])
    assert 500 not in live.server.responses, live.server.responses


@FUZZ
@given(data=st.binary(max_size=2048))
def test_http_api_random_bytes_on_the_socket_never_hurt_the_server(live, data):
    answer = live.raw(data)
    for code in _statuses(answer):
        assert code != 500 and (code < 500 or code in (501, 503, 505)), code


def test_http_api_healthy_after_the_fuzzing(live):
    ok = live.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _statuses(ok) == [200]
    body = _npy(live.x[0])
    answer = live.raw(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nContent-Length: %d"
                      b"\r\n\r\n" % len(body) + body)
    assert _statuses(answer) == [200], answer[:300]
    assert b'"route"' in answer
    assert live.server._thread is not None and live.server._thread.is_alive()
    assert 500 not in live.server.responses
