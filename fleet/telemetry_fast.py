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
* every float field is bounded to magnitudes below 1e18: pydantic-core before 2.30 (what Python 3.8 gets)
  refuses an integer literal of 19 digits or more for a float field, newer ones accept it;
* `shadow` must be absent or null (shadow / A-B telemetry, a few devices at a time, goes to pydantic);
* the device id and bundle name patterns are checked here with `re.fullmatch` (Python's ``$`` would
  also match before a final newline; pydantic-core's would not) — a mismatch returns None.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Union

import msgspec
from typing_extensions import Annotated

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

#: A float field's values in the mirror (stricter than pydantic's; see the module docstring).
Num = Annotated[float, msgspec.Meta(gt=-1e18, lt=1e18)]


class FastLatencyMs(msgspec.Struct, forbid_unknown_fields=True):
    """`LatencyMs`."""

    p50: Optional[Num] = None
    p95: Optional[Num] = None
    p99: Optional[Num] = None


class FastRouteStats(msgspec.Struct, forbid_unknown_fields=True):
    """`RouteStats`."""

    requests: int = 0
    errors: int = 0
    latency_ms: FastLatencyMs = msgspec.field(default_factory=FastLatencyMs)
    queue_depth: int = 0
    mean_batch: Optional[Num] = None


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
    ts: Num
    seq: int
    period_s: Num
    uptime_s: Num
    schema_: str = msgspec.field(default="edge-agent/telemetry/1", name="schema")
    qps: Optional[Num] = None
    requests: int = 0
    errors: int = 0
    refused: int = 0
    error_rate: Optional[Num] = None
    latency_ms: FastLatencyMs = msgspec.field(default_factory=FastLatencyMs)
    queue_depth: Optional[int] = None
    mean_batch: Optional[Num] = None
    large_fraction: Optional[Num] = None
    tau: Optional[Num] = None
    routes: Dict[str, FastRouteStats] = {}
    gpu_util: Optional[Num] = None
    gpu_mem_used_mb: Optional[Num] = None
    gpu_mem_total_mb: Optional[Num] = None
    cpu_percent: Optional[Num] = None
    mem_used_mb: Optional[Num] = None
    mem_available_mb: Optional[Num] = None
    temperatures_c: Dict[str, Num] = {}
    power_mw: Optional[Num] = None
    throttled: Optional[bool] = None
    bundle: Optional[FastBundleRef] = None
    engine: Optional[Dict[str, Union[str, int, Num, None]]] = None
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
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        # msgspec 0.18 (the last for Python 3.8) raises UnicodeDecodeError for invalid UTF-8 in a string
        return None
    if (t.schema_ != "edge-agent/telemetry/1" or t.seq < 0 or _DEVICE_ID.fullmatch(t.device_id) is None
            or (t.bundle is not None and (t.bundle.version < 1 or _NAME.fullmatch(t.bundle.name) is None))):
        return None
    return t


_encoder = msgspec.json.Encoder(order="sorted")


def summary_json(summary: Dict[str, object]) -> str:
    """A telemetry summary as the registry's JSON text: compact, keys sorted, UTF-8 (about six times
    cheaper than `json.dumps`; a non-finite float, which strict JSON has no spelling for, becomes null)."""
    return _encoder.encode(summary).decode("utf-8")
