"""`fleet bundles [NAME@VERSION] --config fleet.toml`: the bundles the controller stores, or one of them
(manifest, signatures, models), from the running controller — the `bundles.list` / `bundles.show` RPC
methods the console's bundle pages use."""

from __future__ import annotations

import argparse
import json

from edge_agent.clikit import CliError
from fleet.commands._connect import add_connection_args, rpc_call


def _run(args: argparse.Namespace) -> int:
    if args.bundle:
        name, _, version = args.bundle.partition("@")
        if not name or not version.isdigit():
            raise CliError("expected NAME@VERSION, e.g. digits@3", code=2)
        b = rpc_call(args, "bundles.show", {"name": name, "version": int(version)})
        if args.json:
            print(json.dumps(b, indent=2, sort_keys=True))
            return 0
        print("bundle %s version %d  manifest sha256 %s" % (b["name"], b["version"], b["record"]["manifest_sha256"]))
        print("signatures: %s" % (", ".join(s["keyid"][:16] for s in b["signatures"]) or "none"))
        for m, spec in sorted(b["models"].items()):
            print("model %s: %s  engines: %s" % (m, spec["path"], ", ".join(spec["engines"]) or "none"))
        print("%d files, %d bytes" % (len(b["files"]), b["total_size"]))
        return 0
    rows = rpc_call(args, "bundles.list", {"limit": args.limit})
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for r in rows:
        print("%-24s v%-6d %s  %d bytes" % (r["name"], r["version"], r["manifest_sha256"][:16], r["manifest_size"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bundles` command."""
    p = sub.add_parser("bundles", help="bundles the controller stores", description=__doc__)
    p.add_argument("bundle", nargs="?", metavar="NAME@VERSION", help="show this one")
    p.add_argument("--limit", type=int, default=200, help="records at most (default 200)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_connection_args(p)
    p.set_defaults(func=_run)
