"""The agent's configuration as files: `agent.toml` plus the drop-ins in `agent.toml.d/`.

A site sets the few keys that are its own in `/etc/edge-agent/agent.toml` (a small conffile the package
rarely changes) and can add `*.toml` files in `/etc/edge-agent/agent.toml.d/`. The drop-ins are merged
over the main file in the C-locale order of their names (`10-broker.toml` before `50-engine.toml`):
a table merges key by key, any other value (arrays included) replaces the earlier one. Every default
lives in the code (edge_agent.config), so a package upgrade that changes a default never touches a file
an administrator edited and dpkg never asks about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from edge_agent._toml import TOMLDecodeError, load_toml
from edge_agent.errors import ConfigError

#: At most this many drop-in files are read (a folder of thousands is a mistake, not a configuration).
MAX_DROPINS = 64
#: Largest configuration file read, main file or drop-in.
MAX_FILE_BYTES = 1024 * 1024


def dropin_dir(path: Path) -> Path:
    """`agent.toml` -> `agent.toml.d/` beside it."""
    return path.parent / (path.name + ".d")


def dropin_files(path: Path) -> List[Path]:
    """The drop-ins of `path`, in merge order (none when the folder does not exist)."""
    d = dropin_dir(path)
    if not d.is_dir():
        return []
    files = sorted((p for p in d.iterdir() if p.name.endswith(".toml") and not p.name.startswith(".")),
                   key=lambda p: p.name.encode("utf-8", "surrogateescape"))
    if len(files) > MAX_DROPINS:
        raise ConfigError("%s holds %d drop-in files; at most %d are read" % (d, len(files), MAX_DROPINS))
    return files


def read_toml(path: Path) -> Dict[str, Any]:
    """One TOML file, size-checked; every problem is a one-line ConfigError naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError("config file %s is %d bytes; at most %d are read" % (path, size, MAX_FILE_BYTES))
        return load_toml(path)
    except FileNotFoundError:
        raise ConfigError("config file %s does not exist" % path)
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e.strerror))
    except TOMLDecodeError as e:
        raise ConfigError("config file %s is not valid TOML: %s" % (path, e))


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """`over` on top of `base`: tables merge recursively, other values replace (a new dict)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_with_dropins(path: Path) -> Dict[str, Any]:
    """The main file merged with its drop-ins."""
    raw = read_toml(path)
    for f in dropin_files(path):
        raw = merge(raw, read_toml(f))
    return raw
