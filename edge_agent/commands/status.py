"""`edge-agent status --config agent.toml [--json]`: active and previous bundle, deploy state, broker.

Reads `state.json` (never writes it) and, unless `--offline`, asks the broker for the device's retained
status to show whether the running agent is connected.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from edge_agent.clikit import CliError, print_rows
from edge_agent.config import load_agent_config


def _retained_status(cfg, timeout_s: float) -> Dict[str, Any]:
    """The retained status on the broker, {"reachable": bool, "status": dict|None}."""
    from edge_agent.mqtt.session import MqttSession
    from edge_agent.protocol import boundedjson, topics

    got: Dict[str, Any] = {}
    ev = threading.Event()

    def _on(msg) -> None:
        try:
            got["status"] = boundedjson.loads(msg.payload, max_bytes=cfg.mqtt.max_payload_bytes,
                                              what="status") if msg.payload else None
        except boundedjson.JSONInputError:
            got["status"] = None
        ev.set()

    s = MqttSession(cfg.mqtt, client_id="%s-status-cli" % cfg.device_id[:40], name="status-cli")
    s.subscribe(topics.status(cfg.mqtt.prefix, cfg.device_id), _on)
    s.start()
    try:
        if not s.wait_connected(timeout_s):
            return {"reachable": False, "error": s.last_error}
        ev.wait(min(timeout_s, 2.0))
        return {"reachable": True, "status": got.get("status")}
    finally:
        s.stop()


def _ref(r: Optional[Dict[str, Any]]) -> str:
    return "%s v%d" % (r["name"], r["version"]) if r else "-"


def _run(args: argparse.Namespace) -> int:
    from edge_agent.bundle.store import BundleStore

    cfg = load_agent_config(Path(args.config))
    path = cfg.state_dir / "state.json"
    if path.exists():
        try:
            st = BundleStore(cfg.state_dir)._load_state()
        except Exception as e:
            raise CliError(str(e))
        state = st.model_dump(mode="json")
    else:
        state = {"active": None, "previous": None, "deploy": {"state": "idle"}, "last_command_seq": 0,
                 "highest_versions": {}, "pending": None}
    broker = None if args.offline else _retained_status(cfg, args.timeout)
    out = {
        "device_id": cfg.device_id,
        "state_dir": str(cfg.state_dir),
        "active": state.get("active"),
        "previous": state.get("previous"),
        "deploy": state.get("deploy"),
        "pending": state.get("pending"),
        "highest_versions": state.get("highest_versions"),
        "last_command_seq": state.get("last_command_seq"),
        "broker": None if broker is None else {
            "address": "%s:%d" % (cfg.mqtt.host, cfg.mqtt.port),
            "reachable": broker["reachable"],
            "agent_online": bool(broker.get("status") and broker["status"].get("online")),
            "ready": bool(broker.get("status") and broker["status"].get("ready")),
        },
    }
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    dep = out["deploy"] or {}
    rows = [
        ("device", out["device_id"]),
        ("active", _ref(out["active"])),
        ("previous", _ref(out["previous"])),
        ("deploy", "%s%s%s" % (dep.get("state", "idle"), (" " + _ref(dep.get("bundle"))) if dep.get("bundle") else "",
                              (" (%s)" % dep["detail"]) if dep.get("detail") else "")),
        ("command seq", str(out["last_command_seq"])),
    ]
    if out["broker"] is not None:
        b = out["broker"]
        rows.append(("broker", "%s %s" % (b["address"], "reachable" if b["reachable"] else "UNREACHABLE")))
        rows.append(("agent", "online" if b["agent_online"] else "offline"))
    print_rows(rows)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `status` command."""
    p = sub.add_parser("status", help="show active/previous bundle, deploy state, broker connection",
                       description=__doc__)
    p.add_argument("--config", default="/etc/edge-agent/agent.toml", help="agent.toml (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--offline", action="store_true", help="do not contact the broker")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker (default 3)")
    p.set_defaults(func=_run)
