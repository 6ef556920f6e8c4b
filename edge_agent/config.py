"""Agent configuration: one pydantic model per TOML section.

Every limit is a named field with its unit in the name. `configs/agent.toml` documents each field;
a test checks that every field there exists here (unknown keys are refused).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import List, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.errors import ConfigError

KIB = 1024
MIB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Section):
    """TLS to the broker: CA file, and optionally a client certificate (identity = certificate CN)."""

    ca_file: Path
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    insecure_skip_hostname_check: bool = False


class MqttConfig(_Section):
    """Broker connection."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = "edge/v1"
    username: Optional[str] = None
    password_file: Optional[Path] = None
    tls: Optional[TlsConfig] = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    max_queued_messages: int = Field(1000, ge=1)
    max_payload_bytes: int = Field(2 * MIB, ge=64 * KIB)

    @field_validator("prefix")
    @classmethod
    def _prefix_has_no_wildcards(cls, v: str) -> str:
        if not v or any(c in v for c in "#+") or v.startswith("/") or v.endswith("/"):
            raise ValueError("prefix must be a non-empty topic path without wildcards or outer slashes")
        return v


class TrustConfig(_Section):
    """Which keys the device trusts for bundles and for controller commands."""

    bundle_keys_dir: Path = Path("/etc/edge-agent/keys")
    signature_threshold: int = Field(1, ge=1)
    command_keys: List[Path] = Field(default_factory=lambda: [Path("/etc/edge-agent/command-keys/controller.pub")])
    max_command_age_s: int = Field(600, ge=1)
    max_clock_skew_s: int = Field(
        3600, ge=0, description="a signed time (bundle created, command issued_at) further ahead of a plausible "
                                "device clock is refused, and the trusted time floor never passes clock + this")


class LimitsConfig(_Section):
    """Size limits checked before anything is downloaded or unpacked."""

    max_manifest_bytes: int = Field(1 * MIB, ge=1 * KIB)
    max_file_bytes: int = Field(2048 * MIB, ge=1)
    max_bundle_bytes: int = Field(4096 * MIB, ge=1)
    store_quota_bytes: Optional[int] = Field(None, ge=1)


class TransferConfig(_Section):
    """Chunked pull of bundle files over MQTT."""

    chunk_bytes: int = Field(256 * KIB, ge=4 * KIB, le=1 * MIB)
    window: int = Field(8, ge=1, le=64)
    chunk_timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(8, ge=0)
    progress_interval_s: float = Field(1.0, gt=0)
    checkpoint_interval_s: float = Field(
        1.0, gt=0, description="save the chunk map (after syncing the data) this often; a crash re-fetches less"
    )


class EngineConfig(_Section):
    """Engine backend, memory budget and batch tuning."""

    backend: str = Field("auto", pattern="^(auto|onnxruntime|tensorrt)$")
    precision: str = Field("fp16", pattern="^(fp32|fp16|int8)$")
    memory_fraction: float = Field(0.6, gt=0, le=1)
    memory_reserve_mb: int = Field(512, ge=0)
    allow_swap: bool = False
    workspace_max_mb: int = Field(2048, ge=16)
    max_batch_limit: int = Field(64, ge=1)
    latency_slo_ms: float = Field(50.0, gt=0)
    tune_iterations: int = Field(30, ge=3)
    retune_memory_change: float = Field(0.25, gt=0)
    ort_intra_op_threads: int = Field(0, ge=0)
    build_timeout_s: float = Field(1800.0, gt=0)
    #: MB the TensorRT backend takes once per process besides its engines: the CUDA context and the
    #: TensorRT/cuBLAS/cuDNN handles (check yours with the `gpu` tests' memory report)
    trt_overhead_mb: int = Field(300, ge=0)


class RuntimeConfig(_Section):
    """Dynamic batching and routing."""

    max_queue_delay_ms: float = Field(
        2.0, ge=0, description="longest a partial batch waits for more while its engine is busy (idle: runs at once)")
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)
    inline_when_idle: bool = Field(
        True, description="a request finding its model idle runs in the caller's thread (no hand-off); it then "
        "waits for the engine call itself, so a hung engine is not cut at request_timeout_s for that request")
    engine_hang_s: float = Field(
        120.0, gt=0, description="seconds one engine call may run before it counts as hung: under systemd the "
        "watchdog pings then stop and the service is restarted (a hung driver call cannot be cut short)")


class ApiConfig(_Section):
    """The local HTTP API."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * MIB, ge=1 * KIB)
    listen_backlog: int = Field(128, ge=1, description="connections the kernel holds before accept (listen(2))")
    max_connections: int = Field(
        64, ge=1, description="connections served at once (one thread each); more are answered 503, not reset")
    read_timeout_s: float = Field(
        10.0, gt=0, description="seconds a client may pause while sending a request (408) or idle between two")
    token_file: Optional[str] = Field(
        None, description="file holding the bearer token clients must send when the API is bound beyond loopback")
    allow_unauthenticated: bool = Field(
        False, description="serve without a token on a non-loopback address (logged as a warning at start)")


class TelemetryConfig(_Section):
    """Periodic telemetry and the offline spool."""

    period_s: float = Field(10.0, gt=0)
    qos: int = Field(0, ge=0, le=1, description="telemetry QoS; 1 closes the loss window of a silently dead link")
    spool_max_messages: int = Field(10000, ge=1)
    spool_max_bytes: int = Field(64 * MIB, ge=64 * KIB)
    flush_batch: int = Field(50, ge=1, description="spooled messages sent per batch before the spool is trimmed")
    max_pending: int = Field(1000, ge=1, description="messages waiting in memory for the publishing thread")
    use_jtop: bool = True
    jtop_interval_s: float = Field(1.0, gt=0)
    jtop_retry_s: float = Field(60.0, gt=0, description="how long to use /proc before trying jtop again")
    nvidia_smi_timeout_s: float = Field(2.0, gt=0)


class ProbationConfig(_Section):
    """Device-side probation after activating a bundle (the manifest's health gates may tighten it)."""

    window_s: float = Field(60.0, ge=0)
    min_requests: int = Field(0, ge=0)
    early_fail_min_requests: int = Field(
        50, ge=1, description="requests seen before an error-rate breach fails probation ahead of the window's end")
    p99_min_requests: int = Field(20, ge=1, description="answered requests a period needs for its p99 to count")
    golden_recheck: bool = True
    max_window_s: Optional[float] = Field(
        None, ge=0, description="cap on the window whatever the manifest asks (development rigs, tests)")


class ShadowConfig(_Section):
    """Shadow and A/B deployments: a candidate bundle runs beside the active one until promoted or refused."""

    mirror_fraction: float = Field(0.2, gt=0, le=1, description="share of requests mirrored to a shadow candidate")
    mirror_queue: int = Field(64, ge=1, description="mirrored inputs waiting for the candidate; more are dropped")
    shed_in_flight: int = Field(
        1, ge=0, description="mirrored inputs are dropped while more requests than this are in the active model "
                             "(queued or being served)")
    latency_slack_ms: float = Field(
        1.0, ge=0, description="a candidate p99 at most this much above the active one passes the latency-ratio gate")
    max_window_s: Optional[float] = Field(
        None, ge=0, description="cap on the manifest's shadow window (development rigs and tests only)")
    report_interval_s: float = Field(60.0, gt=0, description="seconds between shadow-report events")


class SourceConfig(_Section):
    """An input source read with OpenCV: video file, RTSP URL, camera index or image folder."""

    name: str
    uri: str
    max_fps: Optional[float] = Field(None, gt=0)
    publish_results: bool = True
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)


class AgentConfig(_Section):
    """The whole agent configuration (`agent.toml`)."""

    device_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    mqtt: MqttConfig = MqttConfig()
    trust: TrustConfig = TrustConfig()
    limits: LimitsConfig = LimitsConfig()
    transfer: TransferConfig = TransferConfig()
    engine: EngineConfig = EngineConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    api: ApiConfig = ApiConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    probation: ProbationConfig = ProbationConfig()
    shadow: ShadowConfig = ShadowConfig()
    sources: List[SourceConfig] = Field(default_factory=list)


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, `section.field: message`."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append("%s: %s" % (loc, err["msg"]))
    return "; ".join(parts)


def load_model_from_toml(model: type, path: Path) -> BaseModel:
    """Load and validate a TOML file into `model`; every problem becomes a one-line ConfigError."""
    from edge_agent.configdir import read_toml  # the one size-checked TOML reader

    path = Path(path)
    raw = read_toml(path)
    try:
        cfg = model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("config file %s: %s" % (path, format_validation_error(e)))
    return _resolve_relative_paths(cfg, path.parent.resolve())


def _resolve_relative_paths(cfg: BaseModel, base: Path) -> BaseModel:
    """Relative paths in a config file are relative to the file's folder, not the working directory."""
    updates = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base / value
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_relative_paths(value, base)
        elif isinstance(value, list) and value and isinstance(value[0], Path):
            updates[name] = [p if p.is_absolute() else base / p for p in value]
    return cfg.model_copy(update=updates) if updates else cfg


def load_agent_config(path: Path) -> AgentConfig:
    """Load `agent.toml` merged with its drop-ins in `agent.toml.d/` (edge_agent.configdir)."""
    from edge_agent.configdir import dropin_files, load_with_dropins

    path = Path(path)
    raw = load_with_dropins(path)
    try:
        cfg = AgentConfig.model_validate(raw)
    except ValidationError as e:
        names = ", ".join(str(p) for p in [path, *dropin_files(path)])
        raise ConfigError("config %s: %s" % (names, format_validation_error(e)))
    return _resolve_relative_paths(cfg, path.parent.resolve())
