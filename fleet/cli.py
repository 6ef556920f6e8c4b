"""`fleet`: the operator's command line and controller."""

from __future__ import annotations

from typing import List, Optional

from edge_agent import __version__
from edge_agent.clikit import installed_modules, run_main

#: One module per command group, each with register(subparsers).
COMMAND_MODULES = [
    "fleet.commands.keygen",
    "fleet.commands.bundle",
    "fleet.commands.schema",
    "fleet.commands.serve",
    "fleet.commands.push",
    "fleet.commands.devices",
    "fleet.commands.rollout",
    "fleet.commands.rollback",
    "fleet.commands.timefloor",
    "fleet.commands.telemetry",
    "fleet.commands.router",
    "fleet.commands.broker",
    "fleet.commands.token",
    "fleet.commands.stored",
]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `fleet` console script."""
    return run_main(
        "fleet",
        "Fleet controller for edge-agent devices: sign bundles, roll them out, watch the fleet.",
        installed_modules(COMMAND_MODULES),
        __version__,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
