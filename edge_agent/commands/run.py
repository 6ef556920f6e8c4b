"""`edge-agent run --config agent.toml`: run the agent until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from edge_agent.config import load_agent_config


def _run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent
    from edge_agent.sdnotify import Notifier

    cfg = load_agent_config(Path(args.config))
    if not args.verbose:
        logging.getLogger().setLevel(cfg.log_level)
    agent = Agent(cfg, notifier=Notifier.from_env())
    agent.build()

    def _stop(signum, frame) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return agent.run()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `run` command."""
    p = sub.add_parser("run", help="run the agent (the systemd service runs this)", description=__doc__)
    p.add_argument("--config", default="/etc/edge-agent/agent.toml", help="agent.toml (default: %(default)s)")
    p.set_defaults(func=_run)
