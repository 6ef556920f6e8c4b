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
from pathlib import Path
from typing import Optional

from fleet.commands._follow import EventFollower, send_and_follow
from fleet.commands.push import _devices

FINAL = {"time-floor-reset": "floor reset", "command-refused": "refused"}


def _run(args: argparse.Namespace) -> int:
    from edge_agent.protocol import topics
    from edge_agent.protocol.messages import ResetTimeFloorArgs
    from fleet.config import load_fleet_config
    from fleet.controller import Controller

    devices = _devices(args.devices)
    cfg = load_fleet_config(Path(args.config))
    ctl = Controller(cfg, key=Controller.load_key(cfg), client_id="fleet-time-floor", serve_chunks=False)

    def _final(ev) -> Optional[str]:
        if ev.get("kind") in FINAL:
            return "%s: %s" % (FINAL[ev["kind"]], ev.get("message", ""))
        return None

    follower = EventFollower(devices, max_bytes=cfg.mqtt.max_payload_bytes, final=_final)
    outcome = send_and_follow(ctl, follower, lambda dev: ResetTimeFloorArgs(reason=args.reason),
                              what="reset-time-floor command", timeout_s=args.timeout, wait_s=args.wait,
                              events_topic=topics.all_devices(cfg.mqtt.prefix, "events"))
    if any(not v.startswith(FINAL["time-floor-reset"]) for v in outcome.values()):
        return 1
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
