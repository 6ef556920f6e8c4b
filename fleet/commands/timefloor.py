"""`fleet reset-time-floor --devices ID[,ID...] --config fleet.toml`: repair devices whose trusted time
floor was pushed ahead (every bundle "expired", every command refused).

Each device gets a signed `reset-time-floor` command (controller key, next sequence number, like
`fleet push`); the device checks its expiry against its own clock rather than the floor, sets the floor
to the command's `issued_at` — this host's clock, so check it first — and reports a `time-floor-reset`
event. `--wait S` follows the devices' events until each has answered. See docs/security.md,
"Trusted time".
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Dict

from edge_agent.clikit import CliError
from edge_agent.protocol import boundedjson
from fleet.commands.push import _devices

FINAL = {"time-floor-reset": "floor reset", "command-refused": "refused"}


def _run(args: argparse.Namespace) -> int:
    from edge_agent.mqtt.session import require_connected
    from edge_agent.protocol import topics
    from edge_agent.protocol.messages import ResetTimeFloorArgs
    from fleet.config import load_fleet_config
    from fleet.controller import Controller

    devices = _devices(args.devices)
    cfg = load_fleet_config(Path(args.config))
    ctl = Controller(cfg, key=Controller.load_key(cfg), client_id="fleet-time-floor", serve_chunks=False)
    outcome: Dict[str, str] = {}
    done = threading.Event()

    def _on_event(msg) -> None:
        try:
            ev = boundedjson.loads(msg.payload, max_bytes=cfg.mqtt.max_payload_bytes, what="event")
        except boundedjson.JSONInputError:
            return
        dev = ev.get("device_id") if isinstance(ev, dict) else None
        if dev in devices and dev not in outcome and ev.get("kind") in FINAL:
            outcome[dev] = "%s: %s" % (FINAL[ev["kind"]], ev.get("message", ""))
            print("  %-20s %s" % (dev, outcome[dev]), flush=True)
            if len(outcome) == len(devices):
                done.set()

    if args.wait:
        ctl.session.subscribe(topics.all_devices(cfg.mqtt.prefix, "events"), _on_event)
    ctl.session.start()
    try:
        try:
            require_connected(ctl.session, args.timeout)
        except Exception as e:
            raise CliError(str(e))
        sent = [(dev, ctl.send_command(dev, ResetTimeFloorArgs(reason=args.reason))) for dev in devices]
        failed = [dev for dev, d in sent if not d.wait(args.timeout)]
        if failed:
            raise CliError("the broker did not acknowledge the command for: %s" % ", ".join(failed))
        print("reset-time-floor sent to %d device(s): %s" % (len(devices), ", ".join(devices)))
        if args.wait:
            if not done.wait(args.wait):
                missing = [d for d in devices if d not in outcome]
                raise CliError("no answer within %.0f s from: %s" % (args.wait, ", ".join(missing)))
            if any(not v.startswith(FINAL["time-floor-reset"]) for v in outcome.values()):
                return 1
    finally:
        ctl.session.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `reset-time-floor` command."""
    p = sub.add_parser("reset-time-floor", help="repair devices whose trusted time floor ran ahead",
                       description=__doc__)
    p.add_argument("--devices", required=True, metavar="ID[,ID...]", help="device ids")
    p.add_argument("--config", required=True, help="fleet.toml")
    p.add_argument("--reason", default="operator reset", help="recorded in the devices' events")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S", help="follow device events up to S seconds")
    p.set_defaults(func=_run)
