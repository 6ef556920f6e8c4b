"""Error hierarchy of the agent, split by whose fault it is.

    EdgeAgentError
    ├── BundleError            the publisher's fault: the bundle or its manifest is not acceptable
    │   ├── SignatureError     missing, untrusted or too few valid signatures
    │   ├── ExpiredError       manifest expired (against the trusted clock)
    │   ├── RollbackError      version not above the highest trusted version for the name
    │   ├── IntegrityError     a file's size or sha256 differs from the manifest
    │   ├── ArchiveError       unsafe or malformed archive member (links, devices, .., absolute paths)
    │   └── ManifestError      manifest does not parse or does not validate
    ├── CommandError           a controller command is unsigned, badly signed, expired or replayed
    ├── TransportError         the network's fault: broker unreachable, timeouts, bad chunks
    ├── ResourceError          local resources: disk full, quota, memory budget, unwritable state dir
    ├── EngineError            engine build/load/inference failures
    │   ├── BuildError
    │   └── InferenceError
    ├── InputError             a caller's input does not match an engine's input specs
    └── ConfigError            the configuration file is wrong

Every error carries a one-line message that says what was wrong and, where it helps, what to do.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base class of every error raised on purpose by edge_agent and fleet."""


class BundleError(EdgeAgentError):
    """The bundle is not acceptable (the publisher's fault)."""


class SignatureError(BundleError):
    """Missing, untrusted or too few valid signatures."""


class ExpiredError(BundleError):
    """The manifest expired against the trusted clock."""


class RollbackError(BundleError):
    """The version is not above the highest trusted version for this bundle name."""


class IntegrityError(BundleError):
    """A file's size or sha256 differs from what the manifest pins."""


class ArchiveError(BundleError):
    """An unsafe or malformed archive member."""


class ManifestError(BundleError):
    """The manifest does not parse or does not validate."""


class CommandError(EdgeAgentError):
    """A controller command is unsigned, badly signed, expired or replayed."""


class TransportError(EdgeAgentError):
    """Broker unreachable, timeouts, bad chunks (the network's fault)."""


class ResourceError(EdgeAgentError):
    """Disk full, quota exceeded, memory budget too small, state dir unwritable."""


class EngineError(EdgeAgentError):
    """An engine could not be built, loaded or run."""


class BuildError(EngineError):
    """An engine build failed."""


class InferenceError(EngineError):
    """Inference failed inside a backend."""


class InputError(EdgeAgentError):
    """A caller's input does not match the engine's input specs."""


class ConfigError(EdgeAgentError):
    """The configuration is wrong."""
