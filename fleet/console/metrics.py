"""Fleet-wide Prometheus metrics (``/metrics`` on the controller): a series per device from its latest
telemetry, labelled by device id, and the controller's own ingest, queue, drop and rollout figures.

Text exposition format 0.0.4; names follow Prometheus conventions (base units, ``_total`` counters) so
``promtool check metrics`` is clean.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

#: (metric, help, telemetry key, scale to base unit)
DEVICE_GAUGES: Tuple[Tuple[str, str, str, float], ...] = (
    ("fleet_device_latency_p50_seconds", "Median request latency in the last telemetry interval.", "p50_ms", 1e-3),
    ("fleet_device_latency_p99_seconds", "99th percentile request latency in the last telemetry interval.",
     "p99_ms", 1e-3),
    ("fleet_device_requests_per_second", "Requests per second in the last telemetry interval.", "qps", 1.0),
    ("fleet_device_error_ratio", "Fraction of requests that failed in the last telemetry interval.",
     "error_rate", 1.0),
    ("fleet_device_large_model_ratio", "Fraction of requests the large model answered.", "large_fraction", 1.0),
    ("fleet_device_router_tau", "The router's confidence threshold tau.", "tau", 1.0),
    ("fleet_device_gpu_utilization_ratio", "GPU utilisation (0-1).", "gpu_util", 0.01),
    ("fleet_device_temperature_celsius", "Hottest thermal zone.", "temp_max_c", 1.0),
    ("fleet_device_power_watts", "Board power.", "power_mw", 1e-3),
    ("fleet_device_memory_used_bytes", "Memory in use.", "mem_used_mb", 1024.0 * 1024.0),
    ("fleet_device_queue_depth", "Requests waiting on the device.", "queue_depth", 1.0),
)



def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class _Out:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s %s" % (name, kind))

    def sample(self, name: str, value: float, labels: Optional[Dict[str, str]] = None) -> None:
        lab = ""
        if labels:
            lab = "{" + ",".join('%s="%s"' % (k, _esc(str(v))) for k, v in sorted(labels.items())) + "}"
        self.lines.append("%s%s %s" % (name, lab, repr(float(value))))


def render(devices: List[Dict[str, Any]], status: Dict[str, Any], rollouts: List[Dict[str, Any]]) -> str:
    """The exposition text for every device row, the controller status and recent rollouts."""
    out = _Out()
    _device_series(out, devices)
    _controller_series(out, status)
    _rollout_series(out, rollouts)
    return "\n".join(out.lines) + "\n"


def _device_series(out: _Out, devices: List[Dict[str, Any]]) -> None:
    # The device label is escaped once per device, not once per sample (10,000 devices × 16 series).
    labels = [(d, '{device="%s"}' % _esc(str(d["device_id"]))) for d in devices]
    lines = out.lines
    out.family("fleet_device_online", "gauge", "1 when the device's retained status says online.")
    lines.extend("fleet_device_online%s %s" % (lab, "1.0" if d.get("online") else "0.0") for d, lab in labels)
    out.family("fleet_device_health", "gauge", "1 for the device's current health word.")
    for d in devices:
        out.sample("fleet_device_health", 1.0, {"device": d["device_id"], "health": d.get("health") or "unknown"})
    out.family("fleet_device_last_seen_timestamp_seconds", "gauge", "When the controller last heard the device.")
    for d, lab in labels:
        v = _num(d.get("last_seen"))
        if v is not None:
            lines.append("fleet_device_last_seen_timestamp_seconds%s %r" % (lab, v))
    for name, help_text, key, scale in DEVICE_GAUGES:
        out.family(name, "gauge", help_text)
        for d, lab in labels:
            v = _num((d.get("telemetry") or {}).get(key))
            if v is not None:
                lines.append("%s%s %r" % (name, lab, v * scale))
    out.family("fleet_device_bundle_info", "gauge", "The bundle a device serves (value 1).")
    for d in devices:
        a = d.get("active")
        if a:
            out.sample("fleet_device_bundle_info", 1.0, {"device": d["device_id"], "bundle": a["name"],
                                                         "version": str(a["version"])})


def _controller_series(out: _Out, st: Dict[str, Any]) -> None:
    ing = st.get("ingest") or {}
    out.family("fleet_controller_devices", "gauge", "Devices in the registry.")
    out.sample("fleet_controller_devices", st.get("devices") or 0)
    out.family("fleet_controller_uptime_seconds", "gauge", "Seconds since this controller started.")
    out.sample("fleet_controller_uptime_seconds", st.get("uptime_s") or 0)
    out.family("fleet_controller_ingest_received_total", "counter", "Device reports received, by channel.")
    for ch, n in sorted((ing.get("received") or {}).items()):
        out.sample("fleet_controller_ingest_received_total", n, {"channel": ch})
    out.family("fleet_controller_ingest_malformed_total", "counter", "Device reports that did not parse.")
    for ch, n in sorted((ing.get("malformed") or {}).items()):
        out.sample("fleet_controller_ingest_malformed_total", n, {"channel": ch})
    out.family("fleet_controller_ingest_dropped_total", "counter", "Device reports dropped, by reason.")
    for why, n in sorted((ing.get("dropped") or {}).items()):
        out.sample("fleet_controller_ingest_dropped_total", n, {"reason": why})
    out.family("fleet_controller_ingest_oversize_total", "counter", "Reports dropped unparsed for their size.")
    out.sample("fleet_controller_ingest_oversize_total", ing.get("oversize") or 0)
    out.family("fleet_controller_ingest_rate_limited_total", "counter", "Reports over a device's rate.")
    out.sample("fleet_controller_ingest_rate_limited_total", ing.get("rate_limited") or 0)
    out.family("fleet_controller_ingest_queue_messages", "gauge", "Reports waiting to be parsed.")
    out.sample("fleet_controller_ingest_queue_messages", ing.get("queued") or 0)
    out.family("fleet_controller_ingest_queue_bytes", "gauge", "Bytes of reports waiting to be parsed.")
    out.sample("fleet_controller_ingest_queue_bytes", ing.get("queued_bytes") or 0)
    out.family("fleet_controller_telemetry_pending", "gauge", "Telemetry summaries waiting for the registry.")
    out.sample("fleet_controller_telemetry_pending", ing.get("pending_telemetry") or 0)
    rpc = st.get("rpc") or {}
    out.family("fleet_controller_rpc_requests_total", "counter", "Operator requests run (CLI and console).")
    out.sample("fleet_controller_rpc_requests_total", rpc.get("requests") or 0)
    out.family("fleet_controller_rpc_refused_total", "counter", "Operator requests refused, by reason.")
    for why in ("malformed", "refused_busy", "rate_limited", "expired", "errors"):
        out.sample("fleet_controller_rpc_refused_total", rpc.get(why) or 0, {"reason": why})
    out.family("fleet_controller_command_send_failures_total", "counter", "Commands the broker did not take.")
    out.sample("fleet_controller_command_send_failures_total", st.get("command_send_failures") or 0)


def _rollout_series(out: _Out, rollouts: List[Dict[str, Any]]) -> None:
    out.family("fleet_rollouts_active", "gauge", "Rollouts running or paused in the fleet.")
    out.sample("fleet_rollouts_active", sum(1 for r in rollouts if r.get("state") in ("running", "paused")))
    out.family("fleet_rollout_info", "gauge", "Recent rollouts with their state (value 1).")
    for r in rollouts:
        b = r.get("bundle") or {}
        out.sample("fleet_rollout_info", 1.0, {"rollout": str(r.get("rollout_id")), "state": str(r.get("state")),
                                               "bundle": str(b.get("name", "")), "version": str(b.get("version", ""))})
