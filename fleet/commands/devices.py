"""`fleet devices`: the fleet as the controller's registry sees it (one row per device)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

from fleet._table import age, bundle_text, percent, render_table
from fleet.commands._connect import add_connection_args, rpc_call, split_ids

HEADERS = (
    "DEVICE",
    "ONLINE",
    "HEALTH",
    "BUNDLE",
    "STATE",
    "AGENT",
    "PLATFORM",
    "QPS",
    "P99 MS",
    "ERRORS",
    "GPU%",
    "MEM FREE MB",
    "SEEN",
)


def _platform(p: Any) -> str:
    if not isinstance(p, dict):
        return "-"
    if p.get("jetpack"):
        return "JP%s" % p["jetpack"]
    return p.get("backend") or p.get("machine") or "-"


def device_rows(devices: List[Dict[str, Any]], now: float) -> List[List[Any]]:
    """Table rows for a devices list."""
    rows = []
    for d in devices:
        t = d.get("telemetry") or {}
        rows.append(
            [
                d["device_id"],
                d.get("online"),
                d.get("health"),
                bundle_text(d.get("active")),
                d.get("deploy_state"),
                d.get("agent_version"),
                _platform(d.get("platform")),
                t.get("qps"),
                t.get("p99_ms"),
                percent(t.get("error_rate")) if t else None,
                t.get("gpu_util"),
                t.get("mem_available_mb"),
                age(d.get("last_seen"), now),
            ]
        )
    return rows


def _run(args: argparse.Namespace) -> int:
    params: Dict[str, Any] = {}
    if args.online:
        params["online"] = True
    if args.offline:
        params["online"] = False
    ids = split_ids(args.device)
    if ids:
        params["devices"] = ids
    devices = rpc_call(args, "devices.list", params)
    if args.json:
        print(json.dumps(devices, indent=2, sort_keys=True))
        return 0
    if not devices:
        print("no devices yet (devices appear when their agent publishes its status)")
        return 0
    print(render_table(HEADERS, device_rows(devices, time.time()), numeric=(7, 8, 9, 10, 11, 12)))
    online = sum(1 for d in devices if d.get("online"))
    unhealthy = sum(1 for d in devices if d.get("health") == "unhealthy")
    print("\n%d devices, %d online, %d unhealthy" % (len(devices), online, unhealthy))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `devices` command."""
    p = sub.add_parser("devices", help="list the devices the controller knows", description=__doc__)
    p.add_argument("--json", action="store_true", help="print the registry rows as JSON")
    p.add_argument("--device", action="append", metavar="ID[,ID...]", help="only these devices")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--online", action="store_true", help="only devices that are online")
    g.add_argument("--offline", action="store_true", help="only devices that are offline")
    add_connection_args(p)
    p.set_defaults(func=_run)
