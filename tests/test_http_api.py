"""The local HTTP API: answers, every error case, and a server that survives bad clients."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

from edge_agent.config import ApiConfig, RuntimeConfig
from edge_agent.runtime.http_api import ApiServer
from edge_agent.runtime.service import InferenceService
from tests._runtime_helpers import GatedEngine, Models, digits_manifest, digits_models, load_split

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def models():
    m = digits_models(max_batch=8)
    yield m
    m.close()


@pytest.fixture(scope="module")
def heldout():
    return load_split("heldout")


class Api:
    """An ApiServer on a free loopback port around a swappable service."""

    def __init__(self, service, *, max_body_bytes: int = 64 * 1024) -> None:
        self.service = service
        self.ready = True
        self.server = ApiServer(
            ApiConfig(host="127.0.0.1", port=0, max_body_bytes=max_body_bytes),
            get_service=lambda: self.service,
            is_ready=lambda: self.ready,
            metrics_text=lambda: "# TYPE edge_agent_requests_total counter\nedge_agent_requests_total 3\n",
        )
        self.server.start()

    def request(self, method: str, path: str, body: bytes = b"", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()


@pytest.fixture()
def api(models, tmp_path):
    svc = InferenceService(models, digits_manifest(tmp_path, router={"tau": "0.9"}), tmp_path, RuntimeConfig())
    a = Api(svc)
    yield a
    a.server.stop()
    svc.close()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _png(img: np.ndarray, ext: str = ".png") -> bytes:
    ok, enc = cv2.imencode(ext, img)
    assert ok
    return enc.tobytes()


def test_infer_npy_answers_route_latency_output_and_bundle(api, heldout):
    x, y = heldout
    status, headers, body = api.request("POST", "/v1/infer", _npy(x[0]), {"Content-Type": "application/x-npy"})
    assert status == 200, body
    doc = json.loads(body)
    assert set(doc) == {"route", "latency_ms", "output", "bundle"}
    assert doc["route"] in ("small", "large")
    assert doc["latency_ms"] > 0
    assert doc["bundle"] == {"name": "digits", "version": 1}
    assert doc["output"]["top"][0]["label"] == str(y[0])
    assert headers["Content-Type"] == "application/json"


def test_infer_png_and_jpeg_match_the_tensor_answer(api, heldout):
    x, _ = heldout
    for i in range(5):
        want = api.service.infer_tensor(x[i]).output["top"][0]["index"]
        gray = np.rint(x[i, 0] * 16).astype(np.uint8)  # preprocessing scale is 1/16: digits pixels are 0..16
        status, _, body = api.request("POST", "/v1/infer", _png(gray), {"Content-Type": "image/png"})
        assert status == 200, body
        assert json.loads(body)["output"]["top"][0]["index"] == want
    # A larger colour JPEG is converted to gray and resized to 8x8 without error.
    big = cv2.resize(cv2.cvtColor(np.rint(x[0, 0] * 16).astype(np.uint8), cv2.COLOR_GRAY2BGR), (64, 64))
    status, _, body = api.request("POST", "/v1/infer", _png(big, ".jpg"), {"Content-Type": "image/jpeg"})
    assert status == 200, body


def test_undecodable_image_is_400_with_reason(api):
    status, _, body = api.request("POST", "/v1/infer", b"\x89PNG not really", {"Content-Type": "image/png"})
    assert status == 400
    assert "not a decodable JPEG or PNG" in json.loads(body)["error"]


def test_wrong_tensor_shape_is_400_with_reason(api):
    status, _, body = api.request(
        "POST", "/v1/infer", _npy(np.zeros((1, 9, 9), np.float32)), {"Content-Type": "application/x-npy"}
    )
    assert status == 400
    assert "shape (1, 9, 9)" in json.loads(body)["error"]


def test_npy_that_needs_pickle_is_400(api):
    status, _, body = api.request(
        "POST", "/v1/infer", _npy_object(), {"Content-Type": "application/x-npy"}
    )
    assert status == 400
    assert "dtype object is not accepted" in json.loads(body)["error"]


def _npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_wrong_content_type_is_415(api):
    status, _, body = api.request("POST", "/v1/infer", b"a=1", {"Content-Type": "multipart/form-data"})
    assert status == 415
    assert "multipart/form-data" in json.loads(body)["error"] and "application/json" in json.loads(body)["error"]


def test_body_over_limit_is_413_without_reading_it(api):
    # Announce 1 GB, send a few bytes only: the answer must come from the header alone.
    with socket.create_connection(("127.0.0.1", api.server.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000000\r\n\r\nabc"
        )
        t0 = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 413"), data[:80]
    assert b"over the 65536 byte limit" in data
    assert took < 2.0  # answered and closed, not waiting for a gigabyte


def test_missing_content_length_is_411(api):
    with socket.create_connection(("127.0.0.1", api.server.port), timeout=5) as s:
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 411")


def test_no_active_model_is_503_with_retry_after(api, heldout):
    api.service_saved, api.service = api.service, None
    try:
        status, headers, body = api.request(
            "POST", "/v1/infer", _npy(heldout[0][0]), {"Content-Type": "application/x-npy"}
        )
    finally:
        api.service = api.service_saved
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert "no model" in json.loads(body)["error"]


def test_overload_is_503_with_retry_after_and_server_keeps_serving(models, tmp_path, heldout):
    x, _ = heldout
    gated = GatedEngine(models.small)
    slow = Models(gated, models.large, {"small": 1, "large": 8})
    svc = InferenceService(
        slow, digits_manifest(tmp_path, router={"gate": "confidence", "tau": "0.5"}), tmp_path,
        RuntimeConfig(max_queue=2, max_queue_delay_ms=0),
    )
    api = Api(svc)
    try:
        results = []

        def call() -> None:
            results.append(api.request("POST", "/v1/infer", _npy(x[0]), {"Content-Type": "application/x-npy"}))

        first = threading.Thread(target=call)
        first.start()
        assert gated.entered.wait(5)  # one request is running and holds the worker
        waiting = [threading.Thread(target=call) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 5
        while svc.small_batcher.queue_depth() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert svc.small_batcher.queue_depth() == 2
        status, headers, body = api.request("POST", "/v1/infer", _npy(x[0]), {"Content-Type": "application/x-npy"})
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert "queue is full" in json.loads(body)["error"]
        gated.gate.set()
        for t in [first, *waiting]:
            t.join(10)
        assert sorted(r[0] for r in results) == [200, 200, 200]
        assert svc.stats_snapshot()["refused"] == 1
        status, _, _ = api.request("POST", "/v1/infer", _npy(x[1]), {"Content-Type": "application/x-npy"})
        assert status == 200
    finally:
        gated.gate.set()
        api.server.stop()
        svc.close()


def test_readyz_follows_is_ready_and_healthz_always_answers(api):
    status, _, body = api.request("GET", "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    api.ready = False
    status, headers, body = api.request("GET", "/readyz")
    assert status == 503 and json.loads(body)["ready"] is False
    assert "Retry-After" in headers
    assert api.request("GET", "/healthz")[0] == 200


def test_metrics_is_prometheus_text(api):
    status, headers, body = api.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"edge_agent_requests_total 3" in body


def test_unknown_path_is_404_and_wrong_method_is_405(api):
    assert api.request("GET", "/nope")[0] == 404
    status, headers, _ = api.request("GET", "/v1/infer")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = api.request("POST", "/healthz", b"x", {"Content-Type": "image/png"})
    assert status == 405 and "GET" in headers["Allow"]
    assert api.request("DELETE", "/v1/infer")[0] == 405


def test_garbage_and_half_requests_do_not_stop_the_server(api, heldout):
    for junk in (b"\x00\x01\x02garbage\r\n\r\n", b"GET /healthz HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", api.server.port), timeout=5) as s:
            s.sendall(junk)
            try:
                s.recv(4096)
            except OSError:
                pass
    # A client that announces a body and hangs up half-way.
    with socket.create_connection(("127.0.0.1", api.server.port), timeout=5) as s:
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\nabc")
    status, _, _ = api.request("POST", "/v1/infer", _npy(heldout[0][0]), {"Content-Type": "application/x-npy"})
    assert status == 200
    assert api.request("GET", "/healthz")[0] == 200


def test_npy_batch_answers_every_item_in_order(api, heldout):
    x, y = heldout
    status, _, body = api.request("POST", "/v1/infer", _npy(x[:20]), {"Content-Type": "application/x-npy"})
    assert status == 200, body
    doc = json.loads(body)
    assert len(doc["results"]) == 20 and doc["bundle"]["name"] == "digits"
    labels = [int(r["output"]["top"][0]["label"]) for r in doc["results"]]
    assert np.mean(np.array(labels) == y[:20]) >= 0.9
    status, _, body = api.request("POST", "/v1/infer", _npy(np.zeros((300, 1, 8, 8), np.float16)),
                                  {"Content-Type": "application/x-npy"})
    assert status == 400 and "1 to 256 items" in json.loads(body)["error"]


def test_a_request_that_outlives_its_timeout_is_504_and_the_server_recovers(models, tmp_path, heldout):
    x, _ = heldout
    gated = GatedEngine(models.small)
    svc = InferenceService(
        Models(gated, models.large, {"small": 4, "large": 4}),
        digits_manifest(tmp_path, router={"tau": "0.5"}), tmp_path,
        # every request through the worker: with inline_when_idle the first would run the hung engine itself
        RuntimeConfig(max_queue_delay_ms=0, request_timeout_s=0.2, inline_when_idle=False),
    )
    api = Api(svc)
    try:
        t0 = time.monotonic()
        status, _, body = api.request("POST", "/v1/infer", _npy(x[0]), {"Content-Type": "application/x-npy"})
        assert status == 504 and "within the timeout" in json.loads(body)["error"]
        assert time.monotonic() - t0 < 3
        gated.gate.set()
        status, _, _ = api.request("POST", "/v1/infer", _npy(x[1]), {"Content-Type": "application/x-npy"})
        assert status == 200
        assert svc.stats_snapshot()["errors"] == 1
    finally:
        gated.gate.set()
        api.server.stop()
        svc.close()


def test_with_inline_runs_requests_behind_a_hung_engine_still_get_504(models, tmp_path, heldout):
    """The request running inline waits for the engine; the ones behind it queue and are cut at the
    request timeout, and the server answers /healthz meanwhile."""
    x, _ = heldout
    gated = GatedEngine(models.small)
    svc = InferenceService(
        Models(gated, models.large, {"small": 4, "large": 4}),
        digits_manifest(tmp_path, router={"tau": "0.5"}), tmp_path,
        RuntimeConfig(max_queue_delay_ms=0, request_timeout_s=0.2, inline_when_idle=True),
    )
    api = Api(svc)
    first = []
    hung = threading.Thread(target=lambda: first.append(
        api.request("POST", "/v1/infer", _npy(x[0]), {"Content-Type": "application/x-npy"})))
    try:
        hung.start()
        assert gated.entered.wait(5)
        status, _, body = api.request("POST", "/v1/infer", _npy(x[1]), {"Content-Type": "application/x-npy"})
        assert status == 504 and "within the timeout" in json.loads(body)["error"]
        assert api.request("GET", "/healthz")[0] == 200
        gated.gate.set()
        hung.join(10)
        assert first and first[0][0] == 200
    finally:
        gated.gate.set()
        api.server.stop()
        svc.close()


def test_a_request_racing_a_model_swap_is_answered_by_the_new_model(models, heldout, tmp_path):
    """The handler took the old service just before an activation closed it: the request is served by the
    model now active, not refused."""
    manifest = digits_manifest(tmp_path, router={"tau": "0.9"})
    old = InferenceService(models, manifest, tmp_path, RuntimeConfig())
    new = InferenceService(models, manifest, tmp_path, RuntimeConfig())
    old.close()
    calls = []

    def get_service():
        calls.append(1)
        return old if len(calls) == 1 else new

    server = ApiServer(ApiConfig(host="127.0.0.1", port=0), get_service=get_service, is_ready=lambda: True,
                       metrics_text=lambda: "")
    server.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/infer", body=_npy(heldout[0][0]), headers={"Content-Type": "application/x-npy"})
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
    finally:
        server.stop()
        new.close()
    assert r.status == 200, body
    assert body["route"] in ("small", "large") and len(calls) == 2


def test_keep_alive_connection_answers_many_requests_on_the_same_socket(api, heldout):
    """A persistent client (requests.Session, httpx, wrk) sends request after request on one connection:
    every answer arrives on it and the server never asks to close it. (Latency is measured in
    bench/serving.py, not asserted here.)"""
    x, _ = heldout
    conn = http.client.HTTPConnection("127.0.0.1", api.server.port, timeout=10)
    try:
        conn.connect()
        sock = conn.sock
        local = sock.getsockname()
        for i in range(40):
            if i % 4 == 3:
                conn.request("GET", "/healthz")
            else:
                conn.request("POST", "/v1/infer", body=_npy(x[i]), headers={"Content-Type": "application/x-npy"})
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, body
            assert r.getheader("Connection") is None
            assert conn.sock is sock and sock.getsockname() == local  # no reconnect happened
    finally:
        conn.close()


def test_server_sockets_have_tcp_nodelay_and_each_answer_is_one_write(api, heldout):
    """The accepted socket has Nagle switched off and every answer (headers and body) leaves in a single
    write, so a small answer is never held back waiting for the client's ACK of its own headers."""
    from edge_agent.runtime.http_api import _Handler

    x, _ = heldout
    nodelay, writes = [], []
    orig = _Handler.setup

    class CountingWriter:
        def __init__(self, inner):
            self.inner = inner

        def write(self, b):
            writes.append(len(b))
            return self.inner.write(b)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def setup(self):
        orig(self)
        nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.wfile = CountingWriter(self.wfile)

    _Handler.setup = setup
    try:
        conn = http.client.HTTPConnection("127.0.0.1", api.server.port, timeout=10)
        for path, body in (("/healthz", None), ("/v1/infer", _npy(x[0])), ("/nope", None)):
            conn.request("POST" if body else "GET", path, body=body, headers={"Content-Type": "application/x-npy"})
            r = conn.getresponse()
            r.read()
        conn.close()
    finally:
        _Handler.setup = orig
    assert len(nodelay) == 1 and nodelay[0] != 0
    assert len(writes) == 3, writes
