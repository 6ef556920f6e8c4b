"""TOML loading with the tomli fallback for Python < 3.11."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised on Python 3.8 in CI
    import tomli as _toml

TOMLDecodeError = _toml.TOMLDecodeError


def load_toml(path: Path) -> Dict[str, Any]:
    """Parse a TOML file; raises OSError or TOMLDecodeError."""
    with open(path, "rb") as f:
        return _toml.load(f)


def loads_toml(text: str) -> Dict[str, Any]:
    """Parse TOML text."""
    return _toml.loads(text)
