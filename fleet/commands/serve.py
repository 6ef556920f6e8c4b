"""`fleet serve --config fleet.toml`: run the controller (bundle store and chunk server) until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from edge_agent.clikit import CliError

log = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    from edge_agent.mqtt.session import require_connected
    from fleet.config import load_fleet_config
    from fleet.controller import Controller

    cfg = load_fleet_config(Path(args.config))
    ctl = Controller(cfg, key=Controller.load_key(cfg))
    stop = threading.Event()

    def _stop(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    ctl.start()
    console = None
    try:
        try:
            for session in ctl.sessions():  # main, fetch and reports connections
                require_connected(session, args.connect_timeout)
        except Exception as e:
            raise CliError(str(e))
        print("fleet controller serving on %s:%d (prefix %s, store %s)" % (
            cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.prefix, ctl.store.root), flush=True)
        if cfg.console.enabled:
            console = _start_console(cfg, ctl)
        while not stop.wait(1.0):
            pass
    finally:
        if console is not None:
            console.stop()
        ctl.stop()
    return 0


def _start_console(cfg, ctl):
    """Start the console ([console] enabled) and print its URL."""
    from fleet.commands.token import tokens_path
    from fleet.console.server import ConsoleServer

    try:
        console = ConsoleServer(cfg.console, ctl, tokens_file=tokens_path(cfg))
    except OSError as e:
        raise CliError("console cannot listen on %s:%d: %s" % (cfg.console.host, cfg.console.port, e.strerror))
    console.start()
    print("fleet console on %s" % console.url, flush=True)
    return console


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` command."""
    p = sub.add_parser("serve", help="run the fleet controller", description=__doc__)
    p.add_argument("--config", required=True, help="fleet.toml")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the broker at start")
    p.set_defaults(func=_run)
