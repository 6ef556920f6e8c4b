"""`edge-agent install BUNDLE --config agent.toml`: side-load a bundle file (air-gapped sites).

The bundle goes through the same checks as one pulled over MQTT: signatures, version above the
highest trusted one, expiry, size limits, every file's sha256, then prepare, self-test and activate.
Run it while the agent service is stopped (both take the state directory's lock); the service picks the new
active bundle up when it starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.clikit import CliError
from edge_agent.config import load_agent_config


def _run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise CliError("bundle file %s does not exist" % bundle)
    cfg = load_agent_config(Path(args.config))
    agent = Agent(cfg)
    agent.build(with_mqtt=False)  # takes the state dir's lock: refused while the service runs
    try:
        rec = agent.deployer.install_file(bundle, max_bundle_bytes=cfg.limits.max_bundle_bytes)
    finally:
        agent.shutdown(timeout_s=1.0)
    print("installed %s v%d (manifest %s…) — active" % (rec.name, rec.version, rec.manifest_sha256[:12]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `install` command."""
    p = sub.add_parser("install", help="side-load a bundle file through the normal verify path",
                       description=__doc__)
    p.add_argument("bundle", help="bundle file (from `fleet bundle build`)")
    p.add_argument("--config", default="/etc/edge-agent/agent.toml", help="agent.toml (default: %(default)s)")
    p.set_defaults(func=_run)
