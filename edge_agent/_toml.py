"""TOML loading with the tomli fallback for Python < 3.11."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised on Python 3.8 in CI
    import tomli as _toml


class TOMLDecodeError(ValueError):
    """A TOML document that is not UTF-8 or does not parse; the message is one line."""


def loads_toml(text: str) -> Dict[str, Any]:
    """Parse TOML text; raises TOMLDecodeError."""
    try:
        return _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        raise TOMLDecodeError(str(e).splitlines()[0] if str(e) else "invalid TOML") from None


def load_toml(path: Path) -> Dict[str, Any]:
    """Parse a TOML file; raises OSError or TOMLDecodeError (also for bytes that are not UTF-8, which
    the TOML parsers let escape as UnicodeDecodeError)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TOMLDecodeError("not UTF-8 (byte %d)" % e.start) from None
    return loads_toml(text)
