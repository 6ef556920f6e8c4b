"""The JSON API ({"image_base64"} / {"tensor"}, top_k) and the OpenAPI document: every answer of the
live server is validated against the document with openapi-core, and docs/openapi.json is the code's."""

from __future__ import annotations

import base64
import http.client
import io
import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import ApiConfig, RuntimeConfig
from edge_agent.runtime.http_api import ApiServer
from edge_agent.runtime.openapi import openapi_document, openapi_json_bytes
from edge_agent.runtime.service import InferenceService
from tests._runtime_helpers import digits_manifest, digits_models, load_split

cv2 = pytest.importorskip("cv2")
openapi_core = pytest.importorskip("openapi_core")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    m = digits_models(max_batch=8)
    yield m
    m.close()


@pytest.fixture(scope="module")
def heldout():
    return load_split("heldout")


@pytest.fixture(scope="module")
def validator():
    return openapi_core.OpenAPI.from_dict(openapi_document())


class Client:
    """Talks to a live server and validates every request and answer against the OpenAPI document."""

    def __init__(self, port: int, validator) -> None:
        self.port = port
        self.validator = validator
        self.seen = set()

    def call(self, method: str, path: str, body: bytes = b"", ctype: str = "application/json"):
        from openapi_core.testing import MockRequest, MockResponse

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body or None, headers={"Content-Type": ctype} if body else {})
            r = conn.getresponse()
            data = r.read()
            headers = dict(r.getheaders())
        finally:
            conn.close()
        base, _, query = path.partition("?")
        args = dict(kv.split("=", 1) for kv in query.split("&")) if query else None
        req = MockRequest("http://127.0.0.1:%d" % self.port, method.lower(), base, args=args,
                          data=body or None, content_type=ctype if body else "application/json")
        res = MockResponse(data, status_code=r.status, headers=headers,
                           content_type=headers.get("Content-Type", "").split(";")[0])
        self.validator.validate_response(req, res)  # raises on any mismatch with the document
        self.seen.add((base, r.status))
        return r.status, headers, data


@pytest.fixture()
def client(models, tmp_path, validator):
    svc = InferenceService(models, digits_manifest(tmp_path, router={"tau": "0.9"}), tmp_path, RuntimeConfig())
    api = ApiServer(ApiConfig(host="127.0.0.1", port=0), get_service=lambda: svc, is_ready=lambda: True,
                    metrics_text=lambda: "# TYPE edge_agent_requests_total counter\nedge_agent_requests_total 3\n")
    api.start()
    yield Client(api.port, validator)
    api.stop()
    svc.close()


def _png(img: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", img)
    assert ok
    return enc.tobytes()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _img(x: np.ndarray) -> np.ndarray:
    """A digits item (1, 8, 8) in [0, 1] as the 8x8 grayscale picture it came from."""
    return np.clip(np.rint(x[0] * 255.0), 0, 255).astype(np.uint8)


def test_json_image_base64_answers_like_the_binary_png(client, heldout):
    x, _ = heldout
    png = _png(_img(x[0]))
    s1, _, b1 = client.call("POST", "/v1/infer", json.dumps({"image_base64": base64.b64encode(png).decode()}).encode())
    s2, _, b2 = client.call("POST", "/v1/infer", png, "image/png")
    assert s1 == s2 == 200
    a1, a2 = json.loads(b1), json.loads(b2)
    assert a1["output"] == a2["output"] and a1["route"] == a2["route"] and a1["bundle"] == a2["bundle"]


def test_json_list_of_images_gives_results_in_order(client, heldout):
    x, _ = heldout
    pngs = [_png(_img(v)) for v in x[:5]]
    body = json.dumps({"image_base64": [base64.b64encode(p).decode() for p in pngs], "top_k": 2}).encode()
    status, _, out = client.call("POST", "/v1/infer", body)
    assert status == 200
    results = json.loads(out)["results"]
    assert len(results) == 5
    for p, r in zip(pngs, results):
        _, _, one = client.call("POST", "/v1/infer", p, "image/png")
        single = json.loads(one)["output"]
        assert [t["index"] for t in r["output"]["top"]] == [t["index"] for t in single["top"][:2]]
        assert len(r["output"]["top"]) == 2


def test_json_tensor_matches_the_npy_answer_and_top_k_shortens_it(client, heldout):
    x, _ = heldout
    s1, _, b1 = client.call("POST", "/v1/infer", json.dumps({"tensor": x[3].tolist(), "top_k": 1}).encode())
    s2, _, b2 = client.call("POST", "/v1/infer?top_k=1", _npy(x[3]), "application/x-npy")
    assert s1 == s2 == 200
    o1, o2 = json.loads(b1)["output"], json.loads(b2)["output"]
    assert len(o1["top"]) == 1 and o1["top"][0]["index"] == o2["top"][0]["index"]
    assert o1["top"][0]["score"] == pytest.approx(o2["top"][0]["score"], abs=1e-6)
    status, _, out = client.call("POST", "/v1/infer", json.dumps({"tensor": x[:4].tolist()}).encode())
    assert status == 200 and len(json.loads(out)["results"]) == 4


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be an object"),
    (b'{"image_base64": "abc", "tensor": [1]}', "exactly one of"),
    (b'{}', "exactly one of"),
    (b'{"image": "x"}', "unknown key"),
    (b'{"image_base64": "%%%"}', "not valid base64"),
    (b'{"image_base64": "aGVsbG8="}', "not a decodable JPEG or PNG"),
    (b'{"image_base64": []}', "1 to 256 images"),
    (b'{"tensor": [[1, 2], [3]]}', "rectangular"),
    (b'{"tensor": [["a"]]}', "numbers"),
    (b'{"tensor": [NaN]}', "not a number"),
    (b'{"tensor": [1e999]}', "NaN or infinite"),
    (b'{"tensor": [[[1.0]]]}', "shape"),
    (b'{"tensor": [[[1.0]]], "top_k": 0}', "top_k"),
    (b'{"tensor": [[[1.0]]], "top_k": 99}', "over this bundle"),
    (b'[' * 100000 + b']' * 100000, "nested too deeply"),
])
def test_bad_json_is_400_with_a_reason(client, body, reason):
    status, _, out = client.call("POST", "/v1/infer", body)
    assert status == 400, out
    assert reason in json.loads(out)["error"]


def test_every_endpoint_answers_as_the_document_says(client, heldout):
    x, _ = heldout
    client.call("GET", "/healthz")
    client.call("GET", "/readyz")
    client.call("GET", "/metrics")
    status, _, doc = client.call("GET", "/openapi.json")
    assert status == 200 and json.loads(doc) == openapi_document()
    client.call("POST", "/v1/infer", _npy(x[:3]), "application/x-npy")
    client.call("POST", "/v1/infer", b"x" * 10, "text/plain")
    client.call("POST", "/v1/infer", b"\x93NUMPY", "application/x-npy")
    assert {("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/openapi.json", 200), ("/v1/infer", 200),
            ("/v1/infer", 415), ("/v1/infer", 400)} <= client.seen


def test_the_validator_is_not_a_rubber_stamp(validator):
    """An answer missing `bundle` fails validation (so the checks above can fail)."""
    from openapi_core.testing import MockRequest, MockResponse

    req = MockRequest("http://127.0.0.1", "post", "/v1/infer", data=b'{"tensor": [1]}')
    bad = MockResponse(b'{"route": "small", "latency_ms": 1.0, "output": {"kind": "raw", "outputs": {}}}')
    from openapi_core.exceptions import OpenAPIError

    with pytest.raises(OpenAPIError):
        validator.validate_response(req, bad)
    ok = MockResponse(b'{"route": "small", "latency_ms": 1.0, "output": {"kind": "raw", "outputs": {}},'
                      b' "bundle": {"name": "d", "version": 1}}')
    validator.validate_response(req, ok)


def test_docs_copy_equals_the_served_document():
    from openapi_spec_validator import validate

    assert (ROOT / "docs" / "openapi.json").read_bytes() == openapi_json_bytes(), (
        "docs/openapi.json is stale: python -m edge_agent.runtime.openapi > docs/openapi.json")
    validate(openapi_document())
