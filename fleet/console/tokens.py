"""API tokens of the console: random secrets handed to people once, stored only as sha256 hashes.

The tokens file holds one token a line, ``<role> <sha256 hex of the token> <name>``; ``#`` starts a
comment. A token is 32 random bytes (URL-safe base64), so an unsalted sha256 is enough: there is no
dictionary to try against it. Roles: ``viewer`` (read) and ``operator`` (read and act).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Dict, NamedTuple, Optional

from edge_agent.errors import ConfigError

ROLES = ("viewer", "operator")
#: Longest token accepted in a request (ours are 43 characters).
MAX_TOKEN_CHARS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class Principal(NamedTuple):
    """Who a request comes from."""

    name: str
    role: str

    def may_act(self) -> bool:
        """True for operators (start, pause, abort, upload …)."""
        return self.role == "operator"


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def load_tokens(path: Path) -> Dict[str, Principal]:
    """hash -> Principal from the tokens file; an absent file is an empty table. ConfigError on a bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError("console tokens file %s cannot be read: %s" % (path, e.strerror))
    out: Dict[str, Principal] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ROLES or not _HEX.match(parts[1]) or not _NAME.match(parts[2]):
            raise ConfigError("console tokens file %s line %d: expected '<viewer|operator> <sha256> <name>'"
                              % (path, n))
        out[parts[1]] = Principal(parts[2], parts[0])
    return out


def add_token(path: Path, *, role: str, name: str) -> str:
    """Create a token for `name` with `role`, append its hash to the file (mode 0600) and return the token."""
    if role not in ROLES:
        raise ConfigError("role must be one of %s" % ", ".join(ROLES))
    if not _NAME.match(name):
        raise ConfigError("token name %r: 1-64 of A-Z a-z 0-9 _ . @ -" % name)
    if any(p.name == name for p in load_tokens(path).values()):
        raise ConfigError("a token named %s exists already in %s" % (name, path))
    token = secrets.token_urlsafe(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write("%s %s %s\n" % (role, token_hash(token), name))
    return token


class TokenTable:
    """The tokens file, re-read when it changes (a token added or removed takes effect without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: Optional[float] = None
        self._table: Dict[str, Principal] = {}

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            mtime = None
        if mtime != self._mtime:
            self._table = load_tokens(self.path) if mtime is not None else {}
            self._mtime = mtime

    def lookup(self, token: Optional[str]) -> Optional[Principal]:
        """The principal of a presented token, or None."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        self._refresh()
        h = token_hash(token)
        for stored, who in self._table.items():
            if hmac.compare_digest(stored, h):
                return who
        return None
