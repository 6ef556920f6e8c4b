"""`edge-agent config --config agent.toml [--json]`: the effective configuration.

Prints every setting as the agent uses it: the code's defaults, overridden by `agent.toml`, overridden by
the drop-ins in `agent.toml.d/` (listed first, in merge order).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_agent.config import load_agent_config
from edge_agent.configdir import dropin_files


def _config(args: argparse.Namespace) -> int:
    path = Path(args.config)
    cfg = load_agent_config(path)
    files = [str(path)] + [str(p) for p in dropin_files(path)]
    data = cfg.model_dump(mode="json")
    if args.json:
        print(json.dumps({"files": files, "config": data}, indent=1, sort_keys=True))
        return 0
    print("# files, in merge order: %s" % ", ".join(files))
    for key, value in _flatten(data):
        print("%s = %s" % (key, json.dumps(value)))
    return 0


def _flatten(data: dict, prefix: str = ""):
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict):
            yield from _flatten(value, prefix + key + ".")
        else:
            yield prefix + key, value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `config` command."""
    p = sub.add_parser("config", help="print the effective configuration (defaults, file, drop-ins)",
                       description=__doc__)
    p.add_argument("--config", default="/etc/edge-agent/agent.toml", help="agent.toml (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON: {files, config}")
    p.set_defaults(func=_config)
