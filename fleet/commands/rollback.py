"""`fleet rollback --devices ID,...`: tell devices to return to their previous bundle (or `--to NAME@VERSION`,
a version they still hold). The controller signs and sends the commands; progress shows in `fleet devices`."""

from __future__ import annotations

import argparse
import json

from edge_agent.clikit import CliError
from fleet.commands._connect import add_connection_args, rpc_call, split_ids
from fleet.commands.rollout import _REF


def _run(args: argparse.Namespace) -> int:
    devices = split_ids(args.devices)
    if not devices:
        raise CliError("name the devices to roll back with --devices ID[,ID...]")
    params = {"devices": devices, "reason": args.reason}
    if args.to:
        m = _REF.match(args.to)
        if not m:
            raise CliError("--to %r: expected NAME@VERSION" % args.to)
        params["to"] = {"name": m.group(1), "version": int(m.group(2))}
    r = rpc_call(args, "rollback", params)
    if args.json:
        print(json.dumps(r, sort_keys=True))
    else:
        for d in r.get("sent", []):
            print("rollback sent to %s" % d)
        for d, why in sorted((r.get("failed") or {}).items()):
            print("NOT sent to %s: %s" % (d, why))
    return 1 if r.get("failed") else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `rollback` command."""
    p = sub.add_parser("rollback", help="roll devices back to their previous bundle", description=__doc__)
    p.add_argument("--devices", action="append", metavar="ID[,ID...]", required=True, help="devices to roll back")
    p.add_argument("--to", metavar="NAME@VERSION", help="a bundle version the devices still hold")
    p.add_argument("--reason", default="operator rollback", help="recorded in the devices' events")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_connection_args(p)
    p.set_defaults(func=_run)
