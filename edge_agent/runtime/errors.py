"""Errors of the serving runtime.

    ResourceError (edge_agent.errors)
    ├── OverloadedError        a bounded queue is full: the request is refused at once (HTTP 503)
    ├── RequestTimeoutError    the answer did not come within the caller's timeout
    └── ServiceClosedError     the service was closed (model swap, shutdown) before the answer
    ConfigError (edge_agent.errors)
    └── RouterPolicyError      a router change that the active bundle cannot honour
"""

from __future__ import annotations

from edge_agent.errors import ConfigError, ResourceError


class OverloadedError(ResourceError):
    """A queue is full; the caller should retry after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ResourceError):
    """No answer within the caller's timeout (the request is abandoned, not left to run)."""


class ServiceClosedError(ResourceError):
    """The service stopped before the request was answered."""


class RouterPolicyError(ConfigError):
    """A router policy the active bundle cannot honour (τ out of bounds, linear gate without a head...)."""
