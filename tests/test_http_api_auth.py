"""The local API bound beyond loopback: a bearer token is required (hashed, constant-time compare) unless
the operator explicitly opts out, which is logged as a warning."""

from __future__ import annotations

import http.client
import io
import json
import logging

import numpy as np
import pytest

from edge_agent.config import ApiConfig, RuntimeConfig
from edge_agent.errors import ConfigError
from edge_agent.runtime.http_api import ApiServer
from edge_agent.runtime.http_auth import is_loopback
from edge_agent.runtime.service import InferenceService
from tests._runtime_helpers import digits_manifest, digits_models, load_split

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    models = digits_models(max_batch=8)
    d = tmp_path_factory.mktemp("bundle")
    svc = InferenceService(models, digits_manifest(d), d, RuntimeConfig())
    yield svc
    svc.close()
    models.close()


def _server(service, **cfg) -> ApiServer:
    api = ApiServer(ApiConfig(port=0, **cfg), get_service=lambda: service, is_ready=lambda: True,
                    metrics_text=lambda: "")
    api.start()
    return api


def _npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _call(port, method, path, body=None, *, token=None, scheme="Bearer"):
    headers = {"Content-Type": "application/x-npy"} if body else {}
    if token is not None:
        headers["Authorization"] = "%s %s" % (scheme, token)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_binding_beyond_loopback_without_a_token_is_refused_at_start(service):
    api = ApiServer(ApiConfig(host="0.0.0.0", port=0), get_service=lambda: service, is_ready=lambda: True,
                    metrics_text=lambda: "")
    with pytest.raises(ConfigError, match=r"token_file.*allow_unauthenticated"):
        api.start()
    assert api.port == 0  # nothing was bound


def test_explicit_opt_out_serves_openly_with_a_warning(service, caplog):
    x, _ = load_split("heldout")
    with caplog.at_level(logging.WARNING, logger="edge_agent.runtime.http_auth"):
        api = _server(service, host="0.0.0.0", allow_unauthenticated=True)
    try:
        assert any("without authentication" in r.getMessage() for r in caplog.records)
        assert _call(api.port, "POST", "/v1/infer", _npy(x[0]))[0] == 200
    finally:
        api.stop()


def test_with_a_token_every_endpoint_but_healthz_needs_it(service, tmp_path):
    x, _ = load_split("heldout")
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    tf.chmod(0o600)
    api = _server(service, host="0.0.0.0", token_file=str(tf))
    try:
        for path, method, body in (("/v1/infer", "POST", _npy(x[0])), ("/metrics", "GET", None),
                                   ("/readyz", "GET", None), ("/openapi.json", "GET", None)):
            status, headers, out = _call(api.port, method, path, body)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
            assert "Authorization: Bearer" in json.loads(out)["error"]
            assert _call(api.port, method, path, body, token="wrong-token-0123456789")[0] == 401
            assert _call(api.port, method, path, body, token=TOKEN, scheme="Basic")[0] == 401
            assert _call(api.port, method, path, body, token=TOKEN)[0] == 200, path
        assert _call(api.port, "GET", "/healthz")[0] == 200
        # a refused request with a body closes the connection (its body is never read as a request)
        assert _call(api.port, "POST", "/v1/infer", _npy(x[0]))[1].get("Connection") == "close"
    finally:
        api.stop()


@pytest.mark.parametrize("content, reason", [("short", "at least 16"), ("two words-0123456789", "without spaces"),
                                             ("", "at least 16")])
def test_a_bad_token_file_is_a_config_error(service, tmp_path, content, reason):
    tf = tmp_path / "token"
    tf.write_text(content)
    with pytest.raises(ConfigError, match=reason):
        _server(service, host="0.0.0.0", token_file=str(tf))
    with pytest.raises(ConfigError, match="cannot read"):
        _server(service, host="0.0.0.0", token_file=str(tmp_path / "missing"))


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "jetson.local", ""))
