"""Every JSON payload on the wire, as a pydantic model with a ``schema`` version field.

The ``schema`` field names the message and its major version (``edge-agent/status/1``); a receiver
refuses a message whose schema it does not know. ``docs/schemas/*.json`` is generated from these models
(``fleet schema --out docs/schemas``) and a test fails when they drift.

Chunk *responses* are not JSON: the payload is the raw bytes, the metadata travels in MQTT 5 user
properties (see ``CHUNK_PROPERTIES``).

This module stays over 400 lines: it is the whole wire contract in one place, one short model per
message, in sections, and the JSON Schemas in docs/schemas are generated from it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import EdgeAgentError
from edge_agent.protocol import boundedjson


class MessageError(EdgeAgentError):
    """A payload that is not valid JSON or does not match its model."""


SHA256_PATTERN = r"^[0-9a-f]{64}$"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields, serialised with the ``schema`` key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with the wire field names."""
        return self.model_dump_json(by_alias=True).encode("utf-8")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict with the wire field names."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json(cls, payload: Union[bytes, str], *, max_bytes: int = 1 << 20):
        """Parse and validate; every failure is a MessageError with a one-line reason."""
        try:
            data = boundedjson.loads(payload, max_bytes=max_bytes, what="%s payload" % cls.__name__)
        except boundedjson.JSONInputError as e:
            raise MessageError(str(e)) from None
        return cls.from_obj(data)

    @classmethod
    def from_obj(cls, data: Any):
        """Validate an already-decoded JSON value."""
        if not isinstance(data, dict):
            raise MessageError("%s payload must be a JSON object" % cls.__name__)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise MessageError("%s: %s: %s" % (cls.__name__, loc, first["msg"]))


class BundleRef(BaseModel):
    """A bundle by name and version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)


# ----------------------------------------------------------------------------------------------- status


class PlatformInfo(BaseModel):
    """What the device is: enough for the controller to pick a prebuilt engine."""

    model_config = ConfigDict(extra="forbid")

    machine: str
    python: str
    jetson_model: Optional[str] = None
    l4t: Optional[str] = None
    jetpack: Optional[str] = None
    tensorrt: Optional[str] = None
    cuda: Optional[str] = None
    compute_capability: Optional[str] = None
    platform_key: Optional[str] = None
    memory_total_mb: Optional[int] = None
    backend: Optional[str] = None


DeployStateName = Literal[
    "idle", "fetching", "verifying", "preparing", "self-testing", "activating", "probation", "shadow", "ab",
    "active", "failed", "rolled-back",
]


class DeployState(BaseModel):
    """Where the current (or last) deployment stands."""

    model_config = ConfigDict(extra="forbid")

    state: DeployStateName = "idle"
    bundle: Optional[BundleRef] = None
    rollout_id: Optional[str] = None
    detail: Optional[str] = None
    since: float = 0.0


class Status(Message):
    """Retained `{p}/devices/{id}/status`; the Last Will publishes it with ``online: false``."""

    schema_: Literal["edge-agent/status/1"] = Field("edge-agent/status/1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    online: bool
    ts: float
    agent_version: Optional[str] = None
    platform: Optional[PlatformInfo] = None
    active: Optional[BundleRef] = None
    previous: Optional[BundleRef] = None
    deploy: Optional[DeployState] = None
    ready: bool = False
    last_command_seq: int = 0


# -------------------------------------------------------------------------------------------- telemetry


class LatencyMs(BaseModel):
    """Latency percentiles over the period, milliseconds."""

    model_config = ConfigDict(extra="forbid")

    p50: Optional[float] = None
    p95: Optional[float] = None
    p99: Optional[float] = None


class RouteStats(BaseModel):
    """Per-route counters over the period."""

    model_config = ConfigDict(extra="forbid")

    requests: int = 0
    errors: int = 0
    latency_ms: LatencyMs = LatencyMs()
    queue_depth: int = 0
    mean_batch: Optional[float] = None


class ShadowWindow(BaseModel):
    """The shadow window so far: what the promotion gates are decided on."""

    model_config = ConfigDict(extra="forbid")

    elapsed_s: float = 0.0
    window_s: float = 0.0
    compared: int = 0
    agreement: Optional[float] = None
    candidate_errors: int = 0
    candidate_p99_ms: Optional[float] = None
    active_p99_ms: Optional[float] = None


class ShadowStats(BaseModel):
    """Candidate-vs-active comparison over the period (shadow or A/B deployments)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["shadow", "ab"]
    candidate: BundleRef
    mirrored: int = Field(0, description="shadow: inputs the candidate ran this period")
    dropped: int = Field(0, description="shadow: sampled inputs shed (mirror queue full or active model busy)")
    fraction: Optional[float] = Field(None, description="shadow: share of requests sampled for mirroring")
    compared: int = Field(0, description="shadow: inputs both models answered (agreement is over these)")
    agreement: Optional[float] = Field(None, description="top-1 agreement (classifiers) or matched-box F1 (detectors)")
    candidate_errors: int = 0
    candidate_latency_ms: LatencyMs = LatencyMs()
    active_latency_ms: LatencyMs = Field(LatencyMs(), description="the active model on the same inputs (shadow) or "
                                         "its arm (A/B)")
    split: Optional[float] = Field(None, description="A/B: percent of requests served by the candidate")
    candidate_share: Optional[float] = Field(None, description="A/B: measured share of requests the candidate served")
    arms: Dict[str, RouteStats] = Field(default_factory=dict, description="A/B: per-arm figures (active, candidate)")
    window: Optional[ShadowWindow] = None


class Telemetry(Message):
    """`{p}/devices/{id}/telemetry`, every period. Fields the device cannot measure are null."""

    schema_: Literal["edge-agent/telemetry/1"] = Field("edge-agent/telemetry/1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    ts: float
    seq: int = Field(ge=0)
    period_s: float
    uptime_s: float
    qps: Optional[float] = None
    requests: int = 0
    errors: int = 0
    refused: int = 0
    error_rate: Optional[float] = None
    latency_ms: LatencyMs = LatencyMs()
    queue_depth: Optional[int] = None
    mean_batch: Optional[float] = None
    large_fraction: Optional[float] = None
    tau: Optional[float] = None
    routes: Dict[str, RouteStats] = Field(default_factory=dict)
    gpu_util: Optional[float] = None
    gpu_mem_used_mb: Optional[float] = Field(None, description="discrete GPUs (nvidia-smi); null on Jetson")
    gpu_mem_total_mb: Optional[float] = None
    cpu_percent: Optional[float] = None
    mem_used_mb: Optional[float] = None
    mem_available_mb: Optional[float] = None
    temperatures_c: Dict[str, float] = Field(default_factory=dict)
    power_mw: Optional[float] = None
    throttled: Optional[bool] = None
    bundle: Optional[BundleRef] = None
    engine: Optional[Dict[str, Union[str, int, float, None]]] = None
    spool_dropped: int = 0
    malformed_messages: int = 0
    handler_errors: int = Field(0, description="received MQTT messages whose handler failed (logged; the "
                                "session goes on), since the agent started")
    worker_errors: int = Field(0, description="agent work items (commands, hand-overs) that failed on an "
                               "unexpected error (logged, reported as an error event), since the agent started")
    shadow: Optional[ShadowStats] = None
    source: Optional[str] = None


# ----------------------------------------------------------------------------------------------- events

EventKind = Literal[
    "agent-started", "agent-stopping", "command-refused", "command-accepted",
    "fetch-started", "fetch-progress", "fetch-done", "fetch-failed",
    "bundle-refused", "bundle-installed", "deploy-failed",
    "engine-build-started", "engine-build-progress", "engine-build-done", "engine-build-failed",
    "engine-loaded", "batch-tuned",
    "selftest-passed", "selftest-failed",
    "activated", "probation-passed", "probation-failed", "rolled-back", "rollback-failed",
    "shadow-started", "shadow-report", "promoted", "candidate-refused",
    "source-connected", "source-lost", "router-changed", "time-floor-reset", "error",
]


class Event(Message):
    """`{p}/devices/{id}/events`: a transition or an error, with structured details in `data`."""

    schema_: Literal["edge-agent/event/1"] = Field("edge-agent/event/1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    ts: float
    seq: int = Field(ge=0)
    kind: EventKind
    level: Literal["info", "warning", "error"] = "info"
    message: str
    bundle: Optional[BundleRef] = None
    rollout_id: Optional[str] = None
    command_seq: Optional[int] = None
    data: Dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- results


class Result(Message):
    """`{p}/devices/{id}/results`: the answer for one frame of a configured source."""

    schema_: Literal["edge-agent/result/1"] = Field("edge-agent/result/1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    ts: float
    source: str
    frame: int = Field(ge=0)
    route: Literal["small", "large"]
    latency_ms: float
    bundle: Optional[BundleRef] = None
    output: Dict[str, Any]


# --------------------------------------------------------------------------------------------- commands


class DeployArgs(BaseModel):
    """Fetch, verify, prepare, self-test and activate a bundle."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["deploy"] = "deploy"
    bundle: BundleRef
    manifest_sha256: str = Field(pattern=SHA256_PATTERN)
    manifest_size: int = Field(ge=1)
    mode: Literal["normal", "shadow", "ab"] = "normal"
    ab_split: Optional[str] = Field(
        None, pattern=r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?)$",
        description="ab mode: percent of requests the candidate serves, a decimal string (signed documents carry "
                    "no floats)")
    rollout_id: Optional[str] = None


class RollbackArgs(BaseModel):
    """Return to the previous bundle (or a named version still held)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["rollback"] = "rollback"
    to: Optional[BundleRef] = None
    reason: str = ""
    rollout_id: Optional[str] = None


class SetRouterArgs(BaseModel):
    """Change the router policy at run time."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["set-router"] = "set-router"
    gate: Optional[Literal["confidence", "linear", "small-only", "large-only"]] = None
    tau: Optional[str] = Field(None, description="decimal string (signed documents carry no floats)")
    target_large_fraction: Optional[str] = None
    adaptive: Optional[bool] = None


class RetuneArgs(BaseModel):
    """Re-run the batch tuner."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["retune"] = "retune"


class PingArgs(BaseModel):
    """Liveness check; answered with an event."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ping"] = "ping"
    nonce: str = ""


class PromoteArgs(BaseModel):
    """Promote (or drop) the shadow / A-B candidate."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["promote"] = "promote"
    accept: bool = True
    reason: str = ""
    rollout_id: Optional[str] = None


class ResetTimeFloorArgs(BaseModel):
    """Recovery: set the device's trusted time floor to this command's `issued_at` (the controller's
    signed time). Its expiry is checked against the device clock, not the floor it repairs."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["reset-time-floor"] = "reset-time-floor"
    reason: str = ""


CommandArgs = Union[DeployArgs, RollbackArgs, SetRouterArgs, RetuneArgs, PingArgs, PromoteArgs, ResetTimeFloorArgs]


class CommandBody(BaseModel):
    """The signed part of a command. Times are integer Unix seconds (signed documents carry no floats)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["edge-agent/command/1"] = Field("edge-agent/command/1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    seq: int = Field(ge=1, description="strictly increasing per device; a seq not above the last seen is a replay")
    issued_at: int = Field(ge=0)
    expires_at: int = Field(ge=0)
    args: CommandArgs = Field(discriminator="kind")


class SignatureEntry(BaseModel):
    """One Ed25519 signature over the canonical JSON of `signed`."""

    model_config = ConfigDict(extra="forbid")

    keyid: str = Field(pattern=SHA256_PATTERN)
    sig: str = Field(max_length=200)


class CommandEnvelope(Message):
    """`{p}/devices/{id}/commands`: a command signed by a controller key the device trusts."""

    signed: CommandBody
    signatures: List[SignatureEntry] = Field(max_length=16)


# ----------------------------------------------------------------------------------------------- chunks


class ChunkRequest(Message):
    """`{p}/devices/{id}/fetch`: a device asks for one range of one file (or of the manifest).

    `device_id` must be the topic's id; the MQTT 5 response topic must be the device's own chunks topic; the
    correlation data is echoed.
    """

    schema_: Literal["edge-agent/chunk-request/1"] = Field("edge-agent/chunk-request/1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    bundle: BundleRef
    sha256: str = Field(pattern=SHA256_PATTERN, description="the manifest's own sha256, or a file's")
    offset: int = Field(ge=0)
    length: int = Field(ge=1, le=1 << 20)


#: MQTT 5 user properties on a chunk response (values are strings).
CHUNK_PROPERTIES = ("sha256", "offset", "length", "total", "error")


# -------------------------------------------------------------------------------------------------- RPC


class RpcRequest(Message):
    """`{p}/fleet/rpc`: a CLI request to the controller (response topic + correlation data in MQTT 5)."""

    schema_: Literal["edge-agent/rpc-request/1"] = Field("edge-agent/rpc-request/1", alias="schema")
    method: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")
    params: Dict[str, Any] = Field(default_factory=dict)
    issued_at: Optional[int] = Field(
        None, ge=0, le=2**40, description="Unix seconds when the CLI sent it; the controller refuses requests "
        "without it or older than its rpc.max_age_s")


class RpcResponse(Message):
    """The controller's answer on the request's response topic."""

    schema_: Literal["edge-agent/rpc-response/1"] = Field("edge-agent/rpc-response/1", alias="schema")
    ok: bool
    result: Any = None
    error: Optional[str] = None


#: Every JSON message, by the file name of its generated schema.
ALL_MESSAGES = {
    "status": Status,
    "telemetry": Telemetry,
    "event": Event,
    "result": Result,
    "command": CommandEnvelope,
    "chunk-request": ChunkRequest,
    "rpc-request": RpcRequest,
    "rpc-response": RpcResponse,
}
