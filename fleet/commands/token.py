"""`fleet token add --role viewer|operator --name NAME --config fleet.toml`: a console API token.

The token is printed once; only its sha256 is written to the console tokens file
([console] tokens_file, default <state_dir>/console-tokens). `fleet token list` shows names and roles.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.clikit import CliError
from edge_agent.errors import ConfigError


def tokens_path(cfg) -> Path:
    """Where the console's tokens live for this configuration."""
    return cfg.console.tokens_file or cfg.controller.state_dir / "console-tokens"


def _add(args: argparse.Namespace) -> int:
    from fleet.config import load_fleet_config
    from fleet.console.tokens import add_token

    path = tokens_path(load_fleet_config(Path(args.config)))
    try:
        token = add_token(path, role=args.role, name=args.name)
    except ConfigError as e:
        raise CliError(str(e), code=2)
    print(token)
    print("added %s token %r to %s (shown once; only its hash is stored)" % (args.role, args.name, path))
    return 0


def _list(args: argparse.Namespace) -> int:
    from fleet.config import load_fleet_config
    from fleet.console.tokens import load_tokens

    path = tokens_path(load_fleet_config(Path(args.config)))
    try:
        table = load_tokens(path)
    except ConfigError as e:
        raise CliError(str(e))
    for who in sorted(table.values()):
        print("%-9s %s" % (who.role, who.name))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `token` command group."""
    p = sub.add_parser("token", help="console API tokens", description=__doc__)
    tsub = p.add_subparsers(dest="token_command", metavar="SUBCOMMAND")
    tsub.required = True
    a = tsub.add_parser("add", help="create a token (printed once)")
    a.add_argument("--role", required=True, choices=("viewer", "operator"))
    a.add_argument("--name", required=True, help="who holds it (shown in logs)")
    a.add_argument("--config", required=True, help="fleet.toml")
    a.set_defaults(func=_add)
    ls = tsub.add_parser("list", help="names and roles of the tokens")
    ls.add_argument("--config", required=True, help="fleet.toml")
    ls.set_defaults(func=_list)
