"""`edge-agent`: the on-device agent's command line."""

from __future__ import annotations

from typing import List, Optional

from edge_agent import __version__
from edge_agent.clikit import installed_modules, run_main

#: One module per command group, each with register(subparsers).
COMMAND_MODULES = [
    "edge_agent.commands.run",
    "edge_agent.commands.status",
    "edge_agent.commands.install",
    "edge_agent.commands.selftest",
    "edge_agent.commands.bench",
    "edge_agent.commands.telemetry",
    "edge_agent.commands.config",
]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `edge-agent` console script."""
    return run_main(
        "edge-agent",
        "Edge agent for Jetson fleets: pulls signed model bundles, builds engines, serves inference.",
        installed_modules(COMMAND_MODULES),
        __version__,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
