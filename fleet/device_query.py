"""One page of the device registry, sorted and filtered in the database: the ``devices.list`` RPC
method with ``page`` parameters (the console's devices table and REST API; the CLI asks for all rows).

Only indexed-or-cheap columns sort and filter, so a page of a 10,000-device fleet costs one
``COUNT(*)`` and one ``LIMIT/OFFSET`` query, not 10,000 decoded rows.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from fleet.registry import _DEVICE_COLUMNS, _device_row
from fleet.rollouts.states import RolloutError

#: Sort keys and the column (or expression) each one orders by.
SORTS = {
    "device_id": "device_id",
    "last_seen": "last_seen",
    "health": "health",
    "state": "deploy_state",
    "bundle": "active_name",
    "version": "active_version",
    "agent_version": "agent_version",
    "online": "online",
}
#: Filters and the column each one compares for equality (``q`` is a device-id substring).
FILTERS = {"health": "health", "state": "deploy_state", "bundle": "active_name", "version": "active_version"}
MAX_QUERY_CHARS = 64


def _where(params: Dict[str, Any]) -> Tuple[str, List[Any]]:
    clauses: List[str] = []
    args: List[Any] = []
    online = params.get("online")
    if online is not None:
        clauses.append("online = ?")
        args.append(1 if online else 0)
    for key, col in FILTERS.items():
        v = params.get(key)
        if v is None or v == "":
            continue
        if key == "version":
            if isinstance(v, bool) or not isinstance(v, int):
                raise RolloutError("filter version must be an integer")
        elif not isinstance(v, str) or len(v) > MAX_QUERY_CHARS:
            raise RolloutError("filter %s must be a string of at most %d characters" % (key, MAX_QUERY_CHARS))
        if key == "health" and v == "unknown":
            clauses.append("(health = 'unknown' OR health IS NULL)")
            continue
        clauses.append("%s = ?" % col)
        args.append(v)
    q = params.get("q")
    if q:
        if not isinstance(q, str) or len(q) > MAX_QUERY_CHARS:
            raise RolloutError("q must be a string of at most %d characters" % MAX_QUERY_CHARS)
        esc = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append("LOWER(device_id) LIKE ? ESCAPE '\\'")
        args.append("%" + esc + "%")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def page_devices(registry: Any, params: Dict[str, Any], *, max_limit: int = 500) -> Dict[str, Any]:
    """``{"total", "offset", "limit", "sort", "order", "devices": [...]}`` for `params` (sort, order,
    offset, limit and the FILTERS). RolloutError (a bad request) on an unknown sort or a bad value."""
    sort = params.get("sort") or "device_id"
    if sort not in SORTS:
        raise RolloutError("sort must be one of %s" % ", ".join(sorted(SORTS)))
    order = params.get("order") or "asc"
    if order not in ("asc", "desc"):
        raise RolloutError("order must be asc or desc")
    offset, limit = params.get("offset", 0), params.get("limit", 50)
    for name, v, hi in (("offset", offset, 10 ** 9), ("limit", limit, max_limit)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi or (name == "limit" and v < 1):
            raise RolloutError("%s must be an integer in [%d, %d]" % (name, 1 if name == "limit" else 0, hi))
    where, args = _where(params)
    total = int(registry.read("SELECT COUNT(*) AS n FROM devices" + where, args)[0]["n"])
    col = SORTS[sort]
    nulls = "CASE WHEN %s IS NULL THEN 1 ELSE 0 END" % col
    # Sort on the narrow columns first, then read the page's full rows (their JSON) by id: sorting whole
    # rows would carry every device's telemetry through the sort.
    sql = "SELECT device_id FROM devices%s ORDER BY %s, %s %s, device_id %s LIMIT ? OFFSET ?" % (
        where, nulls, col, order.upper(), order.upper())
    ids = [r["device_id"] for r in registry.read(sql, [*args, limit, offset])]
    rows = {}
    if ids:
        full = registry.read("SELECT %s FROM devices WHERE device_id IN (%s)" % (
            ", ".join(_DEVICE_COLUMNS), ",".join("?" * len(ids))), ids)
        rows = {r["device_id"]: r for r in full}
    return {"total": total, "offset": offset, "limit": limit, "sort": sort, "order": order,
            "devices": [_device_row(rows[i]) for i in ids if i in rows]}


def fleet_summary(registry: Any) -> Dict[str, Any]:
    """Device counts by health, by active bundle and by deploy state, and online/offline (the overview)."""
    def counts(expr: str) -> Dict[str, int]:
        rows = registry.read("SELECT %s AS k, COUNT(*) AS n FROM devices GROUP BY %s" % (expr, expr))
        return {("none" if r["k"] is None else str(r["k"])): int(r["n"]) for r in rows}

    bundles = registry.read(
        "SELECT active_name AS name, active_version AS version, COUNT(*) AS n FROM devices "
        "GROUP BY active_name, active_version ORDER BY n DESC LIMIT 50")
    return {
        "devices": registry.device_count(),
        "online": counts("online"),
        "health": counts("health"),
        "state": counts("deploy_state"),
        "bundles": [{"name": r["name"], "version": r["version"], "devices": int(r["n"])} for r in bundles],
    }
