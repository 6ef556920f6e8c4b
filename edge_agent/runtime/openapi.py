"""The OpenAPI 3 document of the local HTTP API, built from the code's own constants.

The agent serves it at ``GET /openapi.json``; `docs/openapi.json` is a copy that a test keeps equal to
it. Regenerate the copy after changing the API::

    python -m edge_agent.runtime.openapi > docs/openapi.json
"""

from __future__ import annotations

import functools
import json
from typing import Any, Dict

from edge_agent.runtime.http_json import KEYS

API_VERSION = "1.1"


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": "#/components/schemas/%s" % name}


def _json_content(schema: Dict[str, Any]) -> Dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, retry_after: bool = False) -> Dict[str, Any]:
    out: Dict[str, Any] = {"description": description, "content": _json_content(_ref("Error"))}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer", "minimum": 1}}}
    return out


def _schemas() -> Dict[str, Any]:
    label = {"type": "string", "nullable": True}
    return {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
                  "properties": {"error": {"type": "string", "description": "one line: what was wrong"}}},
        "Bundle": {"type": "object", "required": ["name", "version"],
                   "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}},
        "Classification": {
            "type": "object", "required": ["kind", "top"], "additionalProperties": False,
            "properties": {
                "kind": {"type": "string", "enum": ["classification"]},
                "top": {"type": "array", "description": "best first", "items": {
                    "type": "object", "required": ["index", "label", "score"], "additionalProperties": False,
                    "properties": {"index": {"type": "integer", "minimum": 0}, "label": label,
                                   "score": {"type": "number"}}}},
            }},
        "Detection": {
            "type": "object", "required": ["kind", "detections"], "additionalProperties": False,
            "properties": {
                "kind": {"type": "string", "enum": ["detection"]},
                "detections": {"type": "array", "description": "best first", "items": {
                    "type": "object", "required": ["box", "score", "class", "label"], "additionalProperties": False,
                    "properties": {
                        "box": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "number"},
                                "description": "x1, y1, x2, y2 in the original image's pixels"},
                        "score": {"type": "number"}, "class": {"type": "integer", "minimum": 0}, "label": label}}},
            }},
        "Raw": {"type": "object", "required": ["kind", "outputs"], "additionalProperties": False,
                "properties": {"kind": {"type": "string", "enum": ["raw"]},
                               "outputs": {"type": "object", "description": "output name -> nested lists",
                                           "additionalProperties": {"type": "array", "items": {}}}}},
        "Output": {"oneOf": [_ref("Classification"), _ref("Detection"), _ref("Raw")]},
        "Route": {"type": "string", "enum": ["small", "large"], "description": "the model that answered"},
        "Answer": {"type": "object", "required": ["route", "latency_ms", "output", "bundle"],
                   "additionalProperties": False,
                   "properties": {"route": _ref("Route"), "latency_ms": {"type": "number", "minimum": 0},
                                  "output": _ref("Output"), "bundle": _ref("Bundle")}},
        "Results": {"type": "object", "required": ["results", "latency_ms", "bundle"], "additionalProperties": False,
                    "properties": {
                        "results": {"type": "array", "description": "one per item, in request order", "items": {
                            "type": "object", "required": ["route", "output"], "additionalProperties": False,
                            "properties": {"route": _ref("Route"), "output": _ref("Output")}}},
                        "latency_ms": {"type": "number", "minimum": 0}, "bundle": _ref("Bundle")}},
        "JsonRequest": {
            "type": "object", "additionalProperties": False,
            "description": "exactly one of image_base64 and tensor (keys: %s)" % ", ".join(KEYS),
            "properties": {
                "image_base64": {"oneOf": [
                    {"type": "string", "format": "byte", "description": "a base64 PNG or JPEG"},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "format": "byte"},
                     "description": "several images, answered as results; at most [runtime] max_queue "
                                    "(256 by default) per request"}]},
                "tensor": {"type": "array", "items": {},
                           "description": "nested lists of numbers: one item of the model input's shape, or "
                                          "[N, *item shape] (N > 1 answered as results, N <= max_queue)"},
                "top_k": {"type": "integer", "minimum": 1,
                          "description": "shorten classification/detection answers (at most the bundle's "
                                         "postprocessing.top_k / max_detections)"},
            },
            "oneOf": [{"required": ["image_base64"]}, {"required": ["tensor"]}],
        },
    }


def _infer_path() -> Dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"post": {
        "summary": "Run the active bundle on one input or a batch",
        "operationId": "infer",
        "parameters": [{"name": "top_k", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1},
                        "description": "as the JSON top_k, for binary bodies"}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("JsonRequest")},
            "image/png": binary, "image/jpeg": binary,
            "application/x-npy": binary, "application/npy": binary}},
        "responses": {
            "200": {"description": "the answer (one input) or results (several)",
                    "content": _json_content({"oneOf": [_ref("Answer"), _ref("Results")]})},
            "400": _error("the client's input is wrong: undecodable image, bad JSON or .npy, wrong shape, "
                          "unsafe dtype, NaN/Inf or out-of-range values; never counted as a model error"),
            "401": _error("missing or wrong bearer token (API bound beyond loopback)"),
            "408": _error("the body did not arrive within read_timeout_s"),
            "411": _error("no Content-Length (chunked bodies are not accepted)"),
            "413": _error("body over max_body_bytes (refused from the header)"),
            "415": _error("content type not accepted"),
            "500": _error("the model failed (engine error, NaN/Inf in its answer)"),
            "503": _error("no model active, queue full, or too many connections", retry_after=True),
            "504": _error("no answer within request_timeout_s"),
        },
    }}


def _get(summary: str, op: str, content: Dict[str, Any], extra: Dict[str, Any], *, open_: bool = False
         ) -> Dict[str, Any]:
    responses = {"200": {"description": summary, "content": content}}
    responses.update(extra)
    get: Dict[str, Any] = {"summary": summary, "operationId": op, "responses": responses}
    if open_:
        get["security"] = []  # never needs the token
    return {"get": get}


@functools.lru_cache(maxsize=1)
def openapi_document() -> Dict[str, Any]:
    """The document as a dict (built once)."""
    ready = {"type": "object", "required": ["ready", "bundle"], "additionalProperties": False,
             "properties": {"ready": {"type": "boolean"},
                            "bundle": {"allOf": [_ref("Bundle")], "nullable": True}}}
    unauthorized = {"401": _error("missing or wrong bearer token (API bound beyond loopback)")}
    return {
        "openapi": "3.0.3",
        "info": {"title": "edge-agent local API", "version": API_VERSION,
                 "description": "Inference on the device's active bundle. Bound to 127.0.0.1 by default; "
                                "bound beyond loopback, every endpoint but /healthz needs "
                                "'Authorization: Bearer <token>'."},
        "paths": {
            "/v1/infer": _infer_path(),
            "/healthz": _get("the process answers", "healthz", _json_content({
                "type": "object", "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok"]}}}), {}, open_=True),
            "/readyz": _get("a verified, self-tested model serves", "readyz", _json_content(ready), dict(
                {"503": {"description": "no model serves yet", "content": _json_content(ready)}}, **unauthorized)),
            "/metrics": _get("Prometheus text format 0.0.4 (docs/telemetry.md)", "metrics",
                             {"text/plain": {"schema": {"type": "string"}}}, unauthorized),
            "/openapi.json": _get("this document", "openapi", _json_content({"type": "object"}), unauthorized),
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token in [api] token_file"}},
        },
        # loopback: no token; beyond loopback: the bearer token (unless allow_unauthenticated)
        "security": [{}, {"bearer": []}],
    }


@functools.lru_cache(maxsize=1)
def openapi_json_bytes() -> bytes:
    """The document as served (sorted keys, indented, newline-terminated), the same bytes as docs/."""
    return (json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n").encode("utf-8")


if __name__ == "__main__":  # pragma: no cover - regenerates docs/openapi.json
    import sys

    sys.stdout.write(openapi_json_bytes().decode("utf-8"))
