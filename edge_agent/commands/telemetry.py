"""`edge-agent telemetry --config agent.toml [--json]`: what this device reports, and its offline spool.

Takes one system reading the way the agent does (jtop, tegrastats, /proc, sysfs, psutil, nvidia-smi),
says which sources answered, and shows the telemetry spool in the state dir (read-only: safe while the
service runs). Useful to check a Jetson's jtop set-up before enrolling it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from edge_agent.clikit import print_rows
from edge_agent.config import load_agent_config

SPOOL_DIR = "spool"


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "%.1f%s" % (v, unit)
    return "%s%s" % (v, unit)


def _run(args: argparse.Namespace) -> int:
    from edge_agent.telemetry.spool import Spool
    from edge_agent.telemetry.system_collector import SystemCollector

    cfg = load_agent_config(Path(args.config))
    t = cfg.telemetry
    collector = SystemCollector(use_jtop=t.use_jtop, jtop_interval_s=t.jtop_interval_s, jtop_retry_s=t.jtop_retry_s,
                                nvidia_smi_timeout_s=t.nvidia_smi_timeout_s)
    try:
        system = collector.collect()
    finally:
        collector.close()
    spool = Spool(cfg.state_dir / SPOOL_DIR, t.spool_max_messages, max_bytes=t.spool_max_bytes, readonly=True)
    out: Dict[str, Any] = {"device_id": cfg.device_id, "system": system, "spool": spool.summary(),
                           "period_s": t.period_s}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    s = system
    temps = ", ".join("%s %.1f°C" % kv for kv in sorted(s["temperatures_c"].items())) or "-"
    sp = out["spool"]
    rows = [
        ("device", cfg.device_id),
        ("sources", s["source"] or "none answered"),
        ("cpu", _fmt(s["cpu_percent"], " %")),
        ("gpu", _fmt(s["gpu_util"], " %")),
        ("memory used", _fmt(s["mem_used_mb"], " MiB")),
        ("memory available", _fmt(s["mem_available_mb"], " MiB")),
        ("gpu memory", "-" if s["gpu_mem_total_mb"] is None else "%s / %s" % (
            _fmt(s["gpu_mem_used_mb"], " MiB"), _fmt(s["gpu_mem_total_mb"], " MiB"))),
        ("power", _fmt(s["power_mw"], " mW")),
        ("throttled", _fmt(s["throttled"])),
        ("temperatures", temps),
        ("spool", "%d message(s), %d bytes held; %d dropped so far (bounds %d messages / %d bytes)" % (
            sp["messages"], sp["bytes"], sp["dropped"], sp["max_messages"], sp["max_bytes"])),
    ]
    print_rows(rows)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `telemetry` command."""
    p = sub.add_parser("telemetry", help="show this device's system reading and its telemetry spool",
                       description=__doc__)
    p.add_argument("--config", default="/etc/edge-agent/agent.toml", help="agent.toml (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
