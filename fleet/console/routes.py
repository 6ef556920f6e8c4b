"""The console's REST API: one route table that both serves requests and generates the OpenAPI document.

Every handler reaches the controller through `Backend.call(method, params)`, which runs the same RPC
method (`RpcServer.dispatch`) the `fleet` CLI reaches over MQTT: one implementation behind both.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from fleet.device_query import FILTERS, SORTS

ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
ROLLOUT_ACTIONS = ("pause", "resume", "abort", "promote")
#: Telemetry windows the device page offers (seconds).
MAX_WINDOW_S = 30 * 86400


class ApiError(Exception):
    """A request the API refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Param(NamedTuple):
    """A query parameter: name, OpenAPI type (string/integer/number/boolean), description, enum."""

    name: str
    type: str
    description: str
    enum: Optional[Tuple[str, ...]] = None


class Route(NamedTuple):
    """One API operation."""

    method: str
    path: str  # OpenAPI form, e.g. /api/v1/devices/{device_id}
    role: str  # viewer or operator
    summary: str
    handler: Callable[..., Any]
    query: Tuple[Param, ...] = ()
    body: Optional[Dict[str, Any]] = None  # JSON schema of the request body
    rpc: str = ""  # the RPC method behind it ("" for none)

    def regex(self) -> re.Pattern[str]:
        """The path as an anchored regex with named groups."""
        return re.compile("^" + re.sub(r"\{(\w+)\}", lambda m: "(?P<%s>%s)" % (m.group(1), ID), self.path) + "$")


def _int(q: Dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    v = q.get(name)
    if v is None or v == "":
        return default
    if not re.match(r"^-?\d{1,12}$", v) or not lo <= int(v) <= hi:
        raise ApiError(400, "query %s must be an integer in [%d, %d]" % (name, lo, hi))
    return int(v)


def _bool(q: Dict[str, str], name: str) -> Optional[bool]:
    v = q.get(name)
    if v is None or v == "":
        return None
    if v not in ("true", "false"):
        raise ApiError(400, "query %s must be true or false" % name)
    return v == "true"


# ---------------------------------------------------------------------------------------- handlers
# Each: handler(backend, path_args, query, body) -> JSON-ready value.

def devices_list(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    page: Dict[str, Any] = {
        "sort": q.get("sort") or "device_id", "order": q.get("order") or "asc",
        "offset": _int(q, "offset", 0, 0, 10 ** 9), "limit": _int(q, "limit", 50, 1, b.max_page_size),
        "online": _bool(q, "online"), "q": q.get("q") or None,
    }
    for k in FILTERS:
        if q.get(k):
            page[k] = _int(q, k, 0, 0, 2 ** 31) if k == "version" else q[k]
    return b.call("devices.list", {"page": page})


def device_show(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return b.call("devices.show", {"device_id": a["device_id"]})


def device_telemetry(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    window = _int(q, "window_s", 3600, 60, MAX_WINDOW_S)
    limit = _int(q, "limit", 1000, 1, 10000)
    return {"device_id": a["device_id"], "window_s": window,
            "points": b.call("telemetry.history", {"device_id": a["device_id"], "since": b.now() - window,
                                                   "limit": limit})}


def device_events(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return b.call("devices.events", {"device_id": a["device_id"], "limit": _int(q, "limit", 200, 1, 1000)})


def summary(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    out = b.call("fleet.summary", {})
    out["controller"] = b.call("controller.status", {})
    return out


def rollouts_list(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return b.call("rollout.list", {"limit": _int(q, "limit", 20, 1, 200)})


def rollout_show(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return b.call("rollout.status", {"rollout_id": a["rollout_id"], "history": _int(q, "history", 50, 0, 500),
                                     "devices": _bool(q, "devices") is not False})


_START_KEYS = ("bundle", "waves", "wave_devices", "devices", "mode", "ab_split", "success_threshold",
               "error_threshold", "device_timeout_s", "manifest_sha256")


def rollout_start(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    params = _object(body, _START_KEYS)
    if not isinstance(params.get("bundle"), dict):
        raise ApiError(400, "body needs bundle {name, version}")
    return b.call("rollout.start", params)


def rollout_action(action: str) -> Callable[..., Any]:
    """The handler of POST /rollouts/{id}/<action>."""
    keys = {"abort": ("rollback",), "promote": ("accept",)}.get(action, ())

    def handler(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
        params = _object(body or {}, keys)
        for k in keys:
            if k in params and not isinstance(params[k], bool):
                raise ApiError(400, "%s must be true or false" % k)
        params["rollout_id"] = a["rollout_id"]
        return b.call("rollout." + action, params)

    handler.__name__ = "rollout_" + action
    return handler


def rollback(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    params = _object(body, ("devices", "to", "reason"))
    devs = params.get("devices")
    if not isinstance(devs, list) or not devs or not all(isinstance(d, str) and re.match("^%s$" % ID, d)
                                                        for d in devs):
        raise ApiError(400, "devices must be a non-empty list of device ids")
    return b.call("rollback", params)


def bundles_list(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return b.call("bundles.list", {"limit": _int(q, "limit", 200, 1, 1000)})


def bundle_show(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    if not a["version"].isdigit():
        raise ApiError(400, "version must be an integer")
    return b.call("bundles.show", {"name": a["name"], "version": int(a["version"])})


def bundle_upload(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return b.upload(body)  # body: the path of the received file (see server.py)


def whoami(b: Any, a: Dict[str, str], q: Dict[str, str], body: Any) -> Any:
    return {"name": b.principal.name, "role": b.principal.role}


def _object(body: Any, keys: Tuple[str, ...]) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    extra = sorted(set(body) - set(keys))
    if extra:
        raise ApiError(400, "unknown field(s): %s" % ", ".join(extra[:5]))
    return dict(body)


# ---------------------------------------------------------------------------------------- the table

_FILTER_PARAMS = tuple(Param(k, "integer" if k == "version" else "string", "only devices whose %s is this" % k)
                       for k in FILTERS)
_START_BODY = {
    "type": "object", "required": ["bundle"], "additionalProperties": False,
    "properties": {
        "bundle": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}},
        "waves": {"type": "array", "items": {"type": "number"}, "description": "cumulative percentages"},
        "wave_devices": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
        "devices": {"type": "array", "items": {"type": "string"}, "description": "targets; default all"},
        "mode": {"type": "string", "enum": ["normal", "shadow", "ab"]},
        "ab_split": {"type": "number"}, "success_threshold": {"type": "number"},
        "error_threshold": {"type": "number"}, "device_timeout_s": {"type": "number"},
        "manifest_sha256": {"type": "string"},
    },
}

ROUTES: List[Route] = [
    Route("GET", "/api/v1/whoami", "viewer", "The token's name and role", whoami),
    Route("GET", "/api/v1/summary", "viewer", "Fleet overview: devices by health, bundle and state; controller "
          "status", summary, rpc="fleet.summary"),
    Route("GET", "/api/v1/devices", "viewer", "One page of devices, sorted and filtered on the server",
          devices_list, (
              Param("sort", "string", "sort key", tuple(sorted(SORTS))),
              Param("order", "string", "sort order", ("asc", "desc")),
              Param("offset", "integer", "first row (0-based)"),
              Param("limit", "integer", "rows per page ([console] max_page_size at most)"),
              Param("online", "boolean", "only online (true) or offline (false) devices"),
              Param("q", "string", "device id contains this (case-insensitive)"), *_FILTER_PARAMS),
          rpc="devices.list"),
    Route("GET", "/api/v1/devices/{device_id}", "viewer", "One device: status, latest telemetry, rollouts",
          device_show, rpc="devices.show"),
    Route("GET", "/api/v1/devices/{device_id}/telemetry", "viewer", "The device's telemetry history over a window",
          device_telemetry, (Param("window_s", "integer", "seconds back from now (60 to 30 days)"),
                             Param("limit", "integer", "points at most (newest kept)")), rpc="telemetry.history"),
    Route("GET", "/api/v1/devices/{device_id}/events", "viewer", "The device's event timeline, newest first",
          device_events, (Param("limit", "integer", "lines at most"),), rpc="devices.events"),
    Route("GET", "/api/v1/rollouts", "viewer", "Recent rollouts, newest first", rollouts_list,
          (Param("limit", "integer", "rollouts at most"),), rpc="rollout.list"),
    Route("POST", "/api/v1/rollouts", "operator", "Start a staged rollout of a stored bundle", rollout_start,
          body=_START_BODY, rpc="rollout.start"),
    Route("GET", "/api/v1/rollouts/{rollout_id}", "viewer", "A rollout: waves, per-device states, history",
          rollout_show, (Param("history", "integer", "history lines"),
                         Param("devices", "boolean", "include the per-device list (default true)")),
          rpc="rollout.status"),
    Route("GET", "/api/v1/rollouts/{rollout_id}/stream", "viewer", "Live rollout status as server-sent events "
          "(text/event-stream; one `data:` JSON document per change)", None, rpc="rollout.status"),
] + [
    Route("POST", "/api/v1/rollouts/{rollout_id}/%s" % act, "operator", "%s the rollout" % act.capitalize(),
          rollout_action(act), body={"type": "object", "additionalProperties": False, "properties": {
              k: {"type": "boolean"} for k in {"abort": ("rollback",), "promote": ("accept",)}.get(act, ())}},
          rpc="rollout." + act)
    for act in ROLLOUT_ACTIONS
] + [
    Route("POST", "/api/v1/rollback", "operator", "Roll devices back to their previous (or a named) bundle",
          rollback, body={"type": "object", "required": ["devices"], "additionalProperties": False, "properties": {
              "devices": {"type": "array", "items": {"type": "string"}},
              "to": {"type": "object"}, "reason": {"type": "string"}}}, rpc="rollback"),
    Route("GET", "/api/v1/bundles", "viewer", "Bundles the controller stores", bundles_list,
          (Param("limit", "integer", "records at most"),), rpc="bundles.list"),
    Route("POST", "/api/v1/bundles", "operator", "Upload a signed bundle file (application/octet-stream); checked "
          "and stored as `fleet push` does", bundle_upload, body={"type": "string", "format": "binary"}),
    Route("GET", "/api/v1/bundles/{name}/{version}", "viewer", "A stored bundle: manifest, signatures, models",
          bundle_show, rpc="bundles.show"),
]


def match(method: str, path: str) -> Tuple[Optional[Route], Dict[str, str], bool]:
    """(route, path args, path known under another method)."""
    known = False
    for r in ROUTES:
        m = _REGEX[r.path].match(path)
        if m:
            if r.method == method:
                return r, m.groupdict(), True
            known = True
    return None, {}, known


_REGEX = {r.path: r.regex() for r in ROUTES}
