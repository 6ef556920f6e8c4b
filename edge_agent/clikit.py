"""The small command-line framework both `edge-agent` and `fleet` use.

Each command lives in its own module with ``register(subparsers)``; it sets ``func`` on its parser.
User mistakes raise `CliError` (or any `EdgeAgentError`): one line on stderr, a non-zero exit code,
no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional, Sequence, Tuple

from edge_agent.errors import ConfigError, EdgeAgentError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def print_rows(rows: Sequence[Tuple[str, str]]) -> None:
    """Print `key  value` lines with the keys aligned."""
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print("%-*s  %s" % (width, k, v))


def installed_modules(modules: Sequence[str]) -> List[str]:
    """The command modules of `modules` that can be imported here (optional command groups may be absent
    from a given install); nothing is imported, only looked up."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is not None]


def build_parser(prog: str, description: str, modules: Sequence[str], version: str) -> argparse.ArgumentParser:
    """A parser with one sub-command per module."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version="%s %s" % (prog, version))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def run_main(
    prog: str, description: str, modules: Sequence[str], version: str, argv: Optional[List[str]] = None
) -> int:
    """Parse, dispatch, and turn our errors into one-line messages and exit codes."""
    parser = build_parser(prog, description, modules, version)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        rc = args.func(args)
    except CliError as e:
        print("%s: error: %s" % (prog, e.message), file=sys.stderr)
        return e.code
    except ConfigError as e:
        print("%s: error: %s" % (prog, e), file=sys.stderr)
        return EXIT_USAGE
    except EdgeAgentError as e:
        print("%s: error: %s" % (prog, e), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("%s: interrupted" % prog, file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK if rc is None else int(rc)
