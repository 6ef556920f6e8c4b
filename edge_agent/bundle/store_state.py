"""What the bundle store remembers in `state.json`: the active and previous bundle, the highest versions
seen, the trusted time floor, the last command, the deployment in progress; and a store snapshot."""

from __future__ import annotations

from typing import Dict, Optional, Set

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol.messages import SHA256_PATTERN, BundleRef, DeployArgs, DeployState

STATE_FORMAT = 1


class BundleRecord(BaseModel):
    """A bundle the store holds completely: its name, version and manifest object."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    manifest_sha256: str = Field(pattern=SHA256_PATTERN)
    installed_at: float = 0.0

    @property
    def ref(self) -> BundleRef:
        """As a wire `BundleRef`."""
        return BundleRef(name=self.name, version=self.version)


class PendingDeploy(BaseModel):
    """A deployment accepted but not finished; a restarted agent resumes it."""

    model_config = ConfigDict(extra="forbid")

    args: DeployArgs
    command_seq: Optional[int] = None
    source: str = "mqtt"


class StoreState(BaseModel):
    """Everything in `state.json`."""

    model_config = ConfigDict(extra="forbid")

    format: int = STATE_FORMAT
    active: Optional[BundleRecord] = None
    previous: Optional[BundleRecord] = None
    highest_versions: Dict[str, int] = Field(default_factory=dict)
    time_floor: int = 0
    #: newest signed time accepted per signer ("bundle", "command"): protocol/trusted_time.py rule 3
    signed_time_seen: Dict[str, int] = Field(default_factory=dict)
    last_command_seq: int = 0
    last_command_sha256: Optional[str] = None
    deploy: DeployState = DeployState()
    pending: Optional[PendingDeploy] = None


class StoreSnapshot(BaseModel):
    """`state.json` and the names in the store at one moment (BundleStore.snapshot / restore)."""

    state: StoreState
    state_bytes: Optional[bytes] = None
    entries: Set[str] = Field(default_factory=set)
