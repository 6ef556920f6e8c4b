"""The HTTP API under overload and hostile bodies: bursts get answers or 503s (never resets), a stalled
body gets 408, `.npy` headers are checked before anything is allocated."""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from edge_agent.config import ApiConfig, RuntimeConfig
from edge_agent.runtime.http_api import ApiServer
from edge_agent.runtime.service import InferenceService
from tests._runtime_helpers import digits_manifest, digits_models, load_split


@pytest.fixture(scope="module")
def models():
    m = digits_models(max_batch=8)
    yield m
    m.close()


@pytest.fixture()
def service(models, tmp_path):
    svc = InferenceService(models, digits_manifest(tmp_path), tmp_path, RuntimeConfig(max_queue_delay_ms=0))
    yield svc
    svc.close()


def _server(service, **cfg):
    api = ApiServer(ApiConfig(host="127.0.0.1", port=0, **cfg), get_service=lambda: service,
                    is_ready=lambda: True, metrics_text=lambda: "")
    api.start()
    return api


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _post(port: int, body: bytes, ctype: str = "application/x-npy"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_burst_of_200_concurrent_clients_gets_answers_or_503_never_resets(service):
    x, _ = load_split("heldout")
    api = _server(service, max_connections=16, listen_backlog=256)
    outcomes = []
    start = threading.Barrier(200)

    def client(i: int) -> None:
        start.wait(10)
        try:
            outcomes.append(_post(api.port, _npy(x[i % 50]))[0])
        except OSError as e:
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 200
        assert set(outcomes) <= {200, 503}, sorted(set(map(str, outcomes)))
        assert outcomes.count(200) >= 16
        assert _post(api.port, _npy(x[0]))[0] == 200
    finally:
        api.stop()


def test_connections_over_the_cap_are_answered_503_with_retry_after(service):
    x, _ = load_split("heldout")
    api = _server(service, max_connections=4)
    held = []
    try:
        for _ in range(4):  # four kept-alive clients hold every slot
            c = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
            c.request("GET", "/healthz")
            assert c.getresponse().read()
            held.append(c)
        for _ in range(5):
            status, headers, body = _post(api.port, _npy(x[0]))
            assert status == 503 and headers["Retry-After"] == "1"
            assert "too many connections" in json.loads(body)["error"]
        held.pop().close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the slot frees once the server sees the close
            if _post(api.port, _npy(x[0]))[0] == 200:
                break
            time.sleep(0.02)
        else:
            pytest.fail("a freed slot was never reused")
        for c in held:  # the held connections still work
            c.request("GET", "/healthz")
            assert c.getresponse().status == 200
    finally:
        for c in held:
            c.close()
        api.stop()


def test_listen_backlog_comes_from_the_config(service):
    api = _server(service, listen_backlog=300)
    try:
        out = subprocess.run(["ss", "-ltnH", "sport = :%d" % api.port], check=False, capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            pytest.skip("ss cannot list listening sockets here")
        # For a listening socket ss shows the backlog as Send-Q (capped by net.core.somaxconn).
        send_q = int(out.stdout.split()[2])
        with open("/proc/sys/net/core/somaxconn") as f:
            assert send_q == min(300, int(f.read()))
    finally:
        api.stop()


def test_short_body_then_stall_is_408_and_the_server_goes_on(service):
    x, _ = load_split("heldout")
    api = _server(service, read_timeout_s=0.2)
    try:
        s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b"\x93NUMPY" + b"\0" * 40)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 408 "), data[:80]
        assert b"read_timeout_s" in data and b"Connection: close" in data
        assert _post(api.port, _npy(x[0]))[0] == 200
        assert api.responses.get(500, 0) == 0
    finally:
        api.stop()


def _npy_header(shape, dtype="<f4") -> bytes:
    header = ("{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, tuple(shape))).encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize("body, reason", [
    (_npy_header((160000, 1, 8, 8, 1800)) + b"\0" * 256, "declares shape"),  # ~74 GiB claimed
    (_npy_header((1, 1, 8, 8)) + b"\0" * 255, "declares shape"),  # one byte short
    (b"PK\x03\x04" + b"\0" * 200, "not a .npy tensor"),  # a zip/npz archive
    (_npy_header((1, 1, 8, 8), "|O") + b"\0" * 512, "not accepted"),  # objects (pickles)
    (_npy_header((1,) * 12) + b"\0" * 4, "at most 8 dimensions"),
])
def test_hostile_npy_bodies_are_400_before_any_allocation(service, body, reason):
    api = _server(service)
    try:
        status, _, out = _post(api.port, body)
        assert status == 400, out
        assert reason in json.loads(out)["error"]
        assert api.responses.get(500, 0) == 0
    finally:
        api.stop()


def test_fortran_order_npy_is_read_correctly(service):
    from edge_agent.runtime.preprocess import read_npy

    x, _ = load_split("heldout")
    item = np.asfortranarray(x[:3])
    out = read_npy(_npy(item), max_bytes=1 << 20)
    assert np.array_equal(out, x[:3])


@pytest.mark.parametrize("arr", [
    np.zeros((1, 8, 8), np.float32), np.arange(24, dtype=">i2").reshape(2, 3, 4), np.ones(3, np.uint8),
    np.array(2.5, np.float64), np.zeros((0, 4), np.float32), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.array([True, False]),
])
def test_npy_bodies_from_np_save_take_the_fast_header_path_and_match_numpy(arr):
    from edge_agent.runtime.preprocess import _fast_npy_header, read_npy

    body = _npy(arr)
    parsed = _fast_npy_header(body)
    assert parsed is not None  # what np.save writes never needs the slow parser
    out = read_npy(body, max_bytes=1 << 20)
    ref = np.load(io.BytesIO(body), allow_pickle=False)
    assert out.dtype == ref.dtype and out.shape == ref.shape and np.array_equal(out, ref)


def test_npy_headers_in_other_forms_are_read_by_numpys_parser():
    from edge_agent.runtime.preprocess import _fast_npy_header, read_npy

    header = b"{'shape': (2,), 'fortran_order': False, 'descr': '<f4'}"  # keys in another order
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + np.float32([1, 2]).tobytes()
    assert _fast_npy_header(body) is None
    assert read_npy(body, max_bytes=1 << 20).tolist() == [1.0, 2.0]


def test_connection_threads_are_reused_not_started_per_connection(service):
    """Ten connections one after another are served by one pool thread (starting a thread per
    connection cost more than answering it), and stopping the server ends the pool."""
    import threading as th

    from edge_agent.runtime.http_api import _Handler

    x, _ = load_split("heldout")
    api = _server(service)
    name = "http-api-conn-%d" % api.port
    seen = []
    orig = _Handler.setup

    def setup(self):
        seen.append(th.current_thread().ident)
        orig(self)

    _Handler.setup = setup
    try:
        for i in range(10):
            assert _post(api.port, _npy(x[i]))[0] == 200
            deadline = time.monotonic() + 5  # the thread goes back to the pool once the server sees the close
            while api._server._idle < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
    finally:
        _Handler.setup = orig
        api.stop()
    assert len(seen) == 10 and len(set(seen)) == 1
    deadline = time.monotonic() + 5
    while any(t.name == name for t in th.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == name for t in th.enumerate())
