"""The console API's OpenAPI 3.0 document, generated from the route table (fleet/console/routes.py).

``python -m fleet.console.openapi > docs/console-openapi.json`` writes the copy kept in docs/; a test
checks that the copy matches what the server serves.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict

from fleet.console.routes import ROUTES, Route

_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _operation(r: Route) -> Dict[str, Any]:
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
              for n in re.findall(r"\{(\w+)\}", r.path)]
    for p in r.query:
        schema: Dict[str, Any] = {"type": p.type}
        if p.enum:
            schema["enum"] = list(p.enum)
        params.append({"name": p.name, "in": "query", "required": False, "description": p.description,
                       "schema": schema})
    ok_type = "text/event-stream" if r.path.endswith("/stream") else "application/json"
    op: Dict[str, Any] = {
        "summary": r.summary,
        "operationId": (r.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", r.path[len("/api/v1"):])).rstrip("_"),
        "description": "Role: %s.%s" % (
            r.role, (" RPC method: `%s` (the same the CLI runs)." % r.rpc) if r.rpc else ""),
        "parameters": params,
        "responses": {
            "201" if r.path in ("/api/v1/rollouts", "/api/v1/bundles") and r.method == "POST" else "200": {
                "description": "OK", "content": {ok_type: {"schema": {"type": "string" if ok_type.startswith(
                    "text") else "object"}}}},
            "400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "429": _ERR,
        },
    }
    if r.body is not None:
        ctype = "application/octet-stream" if r.body.get("format") == "binary" else "application/json"
        op["requestBody"] = {"required": r.path != "/api/v1/rollouts/{rollout_id}/pause",
                             "content": {ctype: {"schema": r.body}}}
    return op


def document() -> Dict[str, Any]:
    """The OpenAPI document."""
    paths: Dict[str, Dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.0.3",
        "info": {"title": "fleet console API", "version": "1",
                 "description": "REST API of the fleet controller's console (docs/console.md). Every operation "
                                "runs the controller's RPC method the `fleet` CLI runs."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def main() -> None:
    """Print the document (sorted keys, two-space indent)."""
    print(json.dumps(document(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
