"""Controller configuration (`fleet.toml`): one pydantic model per section, unknown keys refused.

`configs/fleet.toml` documents every field; a test checks that it parses into `FleetConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.config import KIB, MIB, MqttConfig, load_model_from_toml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControllerSection(_Section):
    """Who the controller is and where it keeps its state."""

    client_id: str = Field("fleet-controller", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    key_file: Path = Path("/etc/fleet/keys/controller.key")
    state_dir: Path = Path("/var/lib/fleet")
    command_ttl_s: int = Field(300, ge=10, le=86400)
    shared_group: Optional[str] = Field("fleet", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class ChunkServerSection(_Section):
    """The chunk server answering devices' fetch requests."""

    max_chunk_bytes: int = Field(1 * MIB, ge=4 * KIB, le=1 * MIB)
    max_bytes_per_s: Optional[int] = Field(None, ge=1 * KIB, description="total serving rate cap; none = unlimited")
    queue: int = Field(4096, ge=16, description="fetch requests waiting, all devices together")
    device_queue: int = Field(64, ge=1, description="fetch requests waiting per device (served in turn)")
    max_request_bytes: int = Field(4 * KIB, ge=256, description="larger fetch requests are dropped unparsed")
    device_requests_per_s: float = Field(400.0, gt=0, description="fetch requests per second per device")
    device_request_burst: int = Field(400, ge=1, description="fetch requests a device may send at once")
    max_inflight_bytes: int = Field(32 * MIB, ge=1 * MIB, description="chunk bytes awaiting the broker's ack")
    send_timeout_s: float = Field(5.0, gt=0, description="wait for room under max_inflight_bytes, then drop")


class BundleTrustSection(_Section):
    """Checks `fleet push` makes on a bundle before storing and announcing it."""

    bundle_keys_dir: Optional[Path] = None
    signature_threshold: int = Field(1, ge=1)
    max_manifest_bytes: int = Field(1 * MIB, ge=1 * KIB)
    max_bundle_bytes: int = Field(4096 * MIB, ge=1)


class RolloutSection(_Section):
    """The registry and the defaults of staged rollouts (`fleet rollout start` may override each)."""

    registry_file: Optional[Path] = Field(None, description="SQLite registry; default <state_dir>/registry.sqlite")
    waves: List[float] = Field(default_factory=lambda: [10.0, 30.0, 100.0], min_length=1)
    success_threshold: float = Field(0.9, gt=0, le=1, description="fraction of a wave that must pass")
    error_threshold: float = Field(0.1, ge=0, lt=1, description="halt when failures exceed this fraction")
    device_timeout_s: float = Field(1800.0, gt=0, description="time to pass self-test and probation")
    unhealthy_error_rate: float = Field(0.05, ge=0, le=1, description="telemetry error rate shown as unhealthy")
    tick_interval_s: float = Field(1.0, gt=0, le=60, description="how often rollout timeouts are checked")
    resend_grace_s: float = Field(15.0, ge=0, le=3600, description="after a restart or takeover: wait for a "
                                  "device to show it got its last command, then send it again")
    telemetry_flush_s: float = Field(5.0, gt=0, le=3600, description="telemetry summaries to the registry")
    ingest_backlog: int = Field(20000, ge=100, description="telemetry messages waiting to be parsed; more dropped")


class RegistrySection(_Section):
    """Where the registry lives, and what controllers sharing it agree on."""

    url: Optional[str] = Field(
        None, pattern=r"^postgres(ql)?://", description="PostgreSQL shared by several controllers; none = SQLite"
    )
    pool_max: int = Field(8, ge=1, le=100, description="PostgreSQL connections per controller")
    reconnect_s: float = Field(30.0, ge=0, le=3600, description="how long a lost database is retried per call")
    lease_s: float = Field(10.0, ge=1, le=600, description="rollout lease; a dead owner's rollouts move after it")
    inbox_poll_s: float = Field(0.25, gt=0, le=10, description="how often an owner takes forwarded requests")
    forward_timeout_s: float = Field(5.0, gt=0, le=60, description="wait for the owner's answer to a forward")
    history_interval_s: float = Field(300.0, ge=1, le=86400, description="seconds between history points")
    history_retention_s: float = Field(7 * 86400.0, ge=0, description="telemetry history kept; 0 = none kept")
    store_cache_bytes: int = Field(8192 * MIB, ge=1 * MIB, description="local copies of shared bundle objects; "
                                   "least recently used evicted beyond it")


class IngestSection(_Section):
    """Bounds on device reports (status, telemetry, events) before the controller parses them."""

    max_report_bytes: int = Field(128 * KIB, ge=4 * KIB, le=2 * MIB, description="larger reports dropped unparsed")
    device_reports_per_s: float = Field(20.0, gt=0, description="reports per second per device, all channels")
    device_report_burst: int = Field(200, ge=1, description="reports a device may send at once")
    backlog_bytes: int = Field(32 * MIB, ge=1 * MIB, description="bytes of reports waiting to be parsed")
    receiver: Literal["native", "paho"] = Field("native", description="the reports connection's MQTT client")


class RpcSection(_Section):
    """Bounds on operator CLI requests (``{p}/fleet/rpc``)."""

    requests_per_s: float = Field(20.0, gt=0, description="requests per second per operator (reply-topic name)")
    request_burst: int = Field(40, ge=1, description="requests an operator may send at once")
    max_age_s: float = Field(120.0, gt=0, description="older requests (issued_at, allowing clock skew) refused")
    backlog: int = Field(64, ge=1, description="requests waiting for the worker; more are answered 'busy'")


class ConsoleSection(_Section):
    """The operator console and REST API in `fleet serve` (docs/console.md)."""

    enabled: bool = Field(False, description="serve the console, the REST API and /metrics")
    host: str = Field("127.0.0.1", description="listen address; loopback unless TLS or a reverse proxy is in front")
    port: int = Field(8780, ge=0, le=65535, description="listen port (0: any free port)")
    tokens_file: Optional[Path] = Field(None, description="hashed API tokens; default <state_dir>/console-tokens")
    tls_cert_file: Optional[Path] = Field(None, description="PEM certificate chain; with tls_key_file: HTTPS")
    tls_key_file: Optional[Path] = None
    max_connections: int = Field(64, ge=1, le=4096, description="connections served at once; more wait in backlog")
    max_body_bytes: int = Field(1 * MIB, ge=1 * KIB, le=64 * MIB, description="largest JSON request body")
    max_upload_bytes: int = Field(512 * MIB, ge=1 * KIB, description="largest bundle upload")
    max_page_size: int = Field(500, ge=1, le=10000, description="devices per page at most")
    max_streams: int = Field(16, ge=1, le=1024, description="live update streams (server-sent events) at once")
    stream_interval_s: float = Field(1.0, gt=0, le=60, description="how often a live stream checks for changes")
    stream_max_s: float = Field(3600.0, gt=0, description="a live stream is closed after this long (reconnects)")
    requests_per_s: float = Field(50.0, gt=0, description="API requests per second per token")
    request_burst: int = Field(100, ge=1, description="API requests a token may send at once")
    metrics_public: bool = Field(False, description="serve /metrics without a token (loopback scrapers)")


class FleetConfig(_Section):
    """The whole controller configuration (`fleet.toml`)."""

    mqtt: MqttConfig = MqttConfig()
    controller: ControllerSection = ControllerSection()
    chunks: ChunkServerSection = ChunkServerSection()
    trust: BundleTrustSection = BundleTrustSection()
    rollouts: RolloutSection = RolloutSection()
    registry: RegistrySection = RegistrySection()
    ingest: IngestSection = IngestSection()
    rpc: RpcSection = RpcSection()
    console: ConsoleSection = ConsoleSection()


def load_fleet_config(path: Path) -> FleetConfig:
    """Load `fleet.toml` (relative paths are relative to the file)."""
    cfg = load_model_from_toml(FleetConfig, path)
    assert isinstance(cfg, FleetConfig)
    return cfg
