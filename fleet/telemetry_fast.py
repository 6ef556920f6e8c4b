"""A faster first try at validating telemetry: msgspec Structs mirroring the `Telemetry` model, stricter
than it, with the pydantic model deciding everything the mirror does not accept.

`fast_telemetry(payload)` returns a `FastTelemetry` (attribute-compatible with `Telemetry` for what the
fleet view reads: `telemetry_summary`, `health_of`) or None. It is only ever a shortcut, never a second
opinion: every payload it accepts, `Telemetry.model_validate_json` accepts too, with the same values
(tests/test_ingest_fast_telemetry.py runs both over a corpus of valid, edge-case and hostile payloads and
generated ones). Where the two differ, the mirror is the stricter one and returns None, so the caller
asks pydantic, whose answer (and error message) stands:

* msgspec is strict: no string-to-number, float-to-int or number-to-bool coercion (pydantic's lax mode
  allows them), integers only within 64 bits (pydantic: any size), no ``schema_`` spelling of ``schema``;
* `shadow` must be absent or null (shadow / A-B telemetry, a few devices at a time, goes to pydantic);
* the device id and bundle name patterns are checked here with `re.fullmatch` (Python's ``$`` would
  also match before a final newline; pydantic-core's would not) — a mismatch returns None.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Union

import msgspec

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class FastLatencyMs(msgspec.Struct, forbid_unknown_fields=True):
    """`LatencyMs`."""

    p50: Optional[float] = None
    p95: Optional[float] = None
    p99: Optional[float] = None


class FastRouteStats(msgspec.Struct, forbid_unknown_fields=True):
    """`RouteStats`."""

    requests: int = 0
    errors: int = 0
    latency_ms: FastLatencyMs = msgspec.field(default_factory=FastLatencyMs)
    queue_depth: int = 0
    mean_batch: Optional[float] = None


class FastBundleRef(msgspec.Struct, forbid_unknown_fields=True):
    """`BundleRef` (name pattern checked by `fast_telemetry`, version >= 1 here)."""

    name: str
    version: int

    def model_dump(self) -> Dict[str, object]:
        """As `BundleRef.model_dump()`."""
        return {"name": self.name, "version": self.version}


class FastTelemetry(msgspec.Struct, forbid_unknown_fields=True):
    """`Telemetry` without `shadow` (null or absent only)."""

    device_id: str
    ts: float
    seq: int
    period_s: float
    uptime_s: float
    schema_: str = msgspec.field(default="edge-agent/telemetry/1", name="schema")
    qps: Optional[float] = None
    requests: int = 0
    errors: int = 0
    refused: int = 0
    error_rate: Optional[float] = None
    latency_ms: FastLatencyMs = msgspec.field(default_factory=FastLatencyMs)
    queue_depth: Optional[int] = None
    mean_batch: Optional[float] = None
    large_fraction: Optional[float] = None
    tau: Optional[float] = None
    routes: Dict[str, FastRouteStats] = {}
    gpu_util: Optional[float] = None
    gpu_mem_used_mb: Optional[float] = None
    gpu_mem_total_mb: Optional[float] = None
    cpu_percent: Optional[float] = None
    mem_used_mb: Optional[float] = None
    mem_available_mb: Optional[float] = None
    temperatures_c: Dict[str, float] = {}
    power_mw: Optional[float] = None
    throttled: Optional[bool] = None
    bundle: Optional[FastBundleRef] = None
    engine: Optional[Dict[str, Union[str, int, float, None]]] = None
    spool_dropped: int = 0
    malformed_messages: int = 0
    handler_errors: int = 0
    worker_errors: int = 0
    shadow: None = None
    source: Optional[str] = None


_decoder = msgspec.json.Decoder(FastTelemetry)


def fast_telemetry(payload: bytes) -> Optional[FastTelemetry]:
    """The payload as a `FastTelemetry`, or None when the mirror does not accept it (ask pydantic)."""
    try:
        t = _decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if (t.schema_ != "edge-agent/telemetry/1" or t.seq < 0 or _DEVICE_ID.fullmatch(t.device_id) is None
            or (t.bundle is not None and (t.bundle.version < 1 or _NAME.fullmatch(t.bundle.name) is None))):
        return None
    return t
