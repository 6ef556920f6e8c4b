"""What the fleet view takes from a device's telemetry message: the one-pass bounded parse, the summary
the registry keeps and the CLI and console show, and the health word a policy gives it. Pure functions of
a `Telemetry` value; `fleet/ingest.py` runs them on the ingest worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from pydantic import ValidationError

from edge_agent.protocol.messages import MessageError, Telemetry
from fleet.telemetry_fast import fast_telemetry


@dataclass(frozen=True)
class HealthPolicy:
    """How a telemetry summary maps to a device's health word."""

    max_error_rate: float = 0.05
    max_p99_ms: Optional[float] = None


def telemetry_summary(t: Telemetry) -> Dict[str, Any]:
    """The few numbers of a telemetry message that the fleet view shows."""
    temps = [v for v in t.temperatures_c.values() if v is not None]
    return {
        "ts": t.ts,
        "seq": t.seq,
        "uptime_s": t.uptime_s,
        "qps": t.qps,
        "requests": t.requests,
        "errors": t.errors,
        "error_rate": t.error_rate,
        "p50_ms": t.latency_ms.p50,
        "p99_ms": t.latency_ms.p99,
        "queue_depth": t.queue_depth,
        "mean_batch": t.mean_batch,
        "large_fraction": t.large_fraction,
        "tau": t.tau,
        "gpu_util": t.gpu_util,
        "cpu_percent": t.cpu_percent,
        "mem_used_mb": t.mem_used_mb,
        "mem_available_mb": t.mem_available_mb,
        "temp_max_c": max(temps) if temps else None,
        "power_mw": t.power_mw,
        "throttled": t.throttled,
        "bundle": t.bundle.model_dump() if t.bundle else None,
        "spool_dropped": t.spool_dropped,
        "shadow": shadow_summary(t),
    }


def shadow_summary(t: Telemetry) -> Optional[Dict[str, Any]]:
    """The candidate-vs-active figures of a shadow / A-B telemetry message (None outside those modes)."""
    sh = t.shadow
    if sh is None:
        return None
    w = sh.window
    return {
        "mode": sh.mode,
        "candidate": sh.candidate.model_dump(),
        "mirrored": sh.mirrored,
        "dropped": sh.dropped,
        "agreement": sh.agreement,
        "candidate_errors": sh.candidate_errors,
        "candidate_p99_ms": sh.candidate_latency_ms.p99,
        "active_p99_ms": sh.active_latency_ms.p99,
        "split": sh.split,
        "candidate_share": sh.candidate_share,
        "arms": {k: {"requests": v.requests, "errors": v.errors, "p99_ms": v.latency_ms.p99}
                 for k, v in sh.arms.items()},
        "window": w.model_dump() if w is not None else None,
    }


#: Largest telemetry sequence number accepted (it is stored in a 64-bit column).
MAX_TELEMETRY_SEQ = (1 << 62) - 1


def parse_telemetry(payload: bytes, *, max_bytes: int) -> Any:
    """Validate a telemetry payload in one pass (pydantic-core's JSON parser), bounded first.

    Refused (MessageError): over `max_bytes`; a NaN/Infinity token (strict JSON has none; checked on
    the bytes, so a string holding them is refused too, which no telemetry field needs); invalid JSON;
    nesting deeper than pydantic-core's limit or an integer over its 4,300 digits (parsed in linear
    time there); a `seq` over `MAX_TELEMETRY_SEQ` (the registry keeps it in a 64-bit column); anything
    the `Telemetry` model refuses. Other large integers stay inside the JSON summary.

    The msgspec mirror (`fleet.telemetry_fast`) tries first; what it does not accept, the pydantic
    model decides. The result is a `FastTelemetry` or a `Telemetry`: the same attributes and values."""
    if len(payload) > max_bytes:
        raise MessageError("Telemetry payload is %d bytes, over the %d allowed" % (len(payload), max_bytes))
    if b"NaN" in payload or b"Infinity" in payload:
        raise MessageError("Telemetry payload holds a NaN or Infinity number")
    t: Any = fast_telemetry(payload)
    if t is None:
        t = _pydantic_telemetry(payload)
    if t.seq > MAX_TELEMETRY_SEQ:
        raise MessageError("Telemetry: seq %.20s… is over the %d allowed" % (t.seq, MAX_TELEMETRY_SEQ))
    return t


def _pydantic_telemetry(payload: bytes) -> Telemetry:
    """The `Telemetry` model's own verdict (and its one-line reason)."""
    try:
        return Telemetry.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise MessageError("Telemetry: %s: %s" % (loc, first["msg"]))


def health_of(t: Telemetry, policy: HealthPolicy) -> str:
    """``ok``, ``degraded`` (throttling) or ``unhealthy`` (error rate or p99 over the policy)."""
    rate = t.error_rate
    if rate is None and t.requests:
        rate = t.errors / float(t.requests)
    if rate is not None and rate > policy.max_error_rate:
        return "unhealthy"
    if policy.max_p99_ms is not None and t.latency_ms.p99 is not None and t.latency_ms.p99 > policy.max_p99_ms:
        return "unhealthy"
    if t.throttled:
        return "degraded"
    return "ok"
