"""Bearer-token access to the local HTTP API once it is bound beyond loopback.

Policy (decided once, at start, by `api_access`):

* loopback host (127.0.0.0/8, ::1, localhost) and no `token_file`: open, as before;
* `[api] token_file` set: every request but ``GET /healthz`` needs ``Authorization: Bearer <token>``;
  the token is kept only as its SHA-256 and compared in constant time;
* beyond loopback without a token file: refused at start (ConfigError) unless
  `[api] allow_unauthenticated = true`, which serves openly and logs a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)

#: Shortest token accepted (characters), and the most read from the file (bytes).
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096
#: Paths answered without a token (liveness only; it says nothing about the device).
OPEN_PATHS = ("/healthz",)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the API on this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class ApiAccess:
    """The decided policy: `token_sha256` None means open."""

    token_sha256: Optional[bytes]

    def allows(self, path: str, authorization: Optional[str]) -> bool:
        """Whether a request for `path` with this Authorization header may proceed."""
        if self.token_sha256 is None or path in OPEN_PATHS:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
        return hmac.compare_digest(given, self.token_sha256)


def read_token(path: Path) -> bytes:
    """The SHA-256 of the token in `path` (one line, at least MIN_TOKEN_CHARS characters)."""
    try:
        st = os.stat(str(path))
        with open(str(path), "rb") as f:
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError("cannot read api.token_file %s: %s" % (path, e.strerror or e))
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError("api.token_file %s is over %d bytes; it should hold one token" % (path, MAX_TOKEN_FILE_BYTES))
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError("api.token_file %s is not UTF-8 text" % path)
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError("api.token_file %s must hold one token of at least %d characters without spaces"
                          % (path, MIN_TOKEN_CHARS))
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("api.token_file %s is readable by other users (chmod 600 it)", path)
    return hashlib.sha256(token.encode("utf-8")).digest()


def api_access(cfg: ApiConfig) -> ApiAccess:
    """Decide the access policy for `cfg` (see the module docstring); ConfigError when unsafe."""
    if cfg.token_file:
        return ApiAccess(read_token(Path(cfg.token_file)))
    if is_loopback(cfg.host):
        return ApiAccess(None)
    if not cfg.allow_unauthenticated:
        raise ConfigError(
            "api.host %r is reachable beyond this machine: set api.token_file (clients send 'Authorization: "
            "Bearer <token>') or, to serve it openly, api.allow_unauthenticated = true" % cfg.host)
    log.warning("HTTP API on %s without authentication (api.allow_unauthenticated = true): anyone who can "
                "reach it can run inference and read /metrics", cfg.host)
    return ApiAccess(None)
