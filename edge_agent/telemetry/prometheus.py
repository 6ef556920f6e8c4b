"""Prometheus text exposition (format 0.0.4) of a `Telemetry` message, for the local `/metrics` endpoint.

Values are converted to base units (seconds, bytes, watts, °C) as Prometheus naming asks. Per-period
values are gauges; monotonic counters (`*_total`) come from the builder's running totals when given,
plus the message's own cumulative counters (spool drops, malformed messages). Unknown (null) values
are left out rather than exported as zero.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from edge_agent.protocol.messages import Telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "edge_agent_"
#: Per-period percentiles are gauges labelled `percentile` (the `quantile` label belongs to summaries).
_QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Sample = Tuple[Dict[str, str], Any]


def escape_label_value(v: str) -> str:
    """Backslash, double quote and line feed escaped as the format requires."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(v: str) -> str:
    """Backslash and line feed escaped (HELP text)."""
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: Any) -> str:
    """A sample value: integers as integers, floats in Python repr, NaN/±Inf spelled as Prometheus does."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


class _Writer:
    def __init__(self, device_id: str) -> None:
        self.lines: List[str] = []
        self.device_id = device_id

    def family(self, name: str, mtype: str, help_text: str, samples: List[Sample]) -> None:
        samples = [(lbl, v) for lbl, v in samples if v is not None]
        if not samples:
            return
        full = PREFIX + name
        self.lines.append("# HELP %s %s" % (full, escape_help(help_text)))
        self.lines.append("# TYPE %s %s" % (full, mtype))
        for labels, value in samples:
            self._sample(full, labels, value)

    def gauge(self, name: str, help_text: str, value: Any, **labels: str) -> None:
        self.family(name, "gauge", help_text, [(labels, value)])

    def histogram(self, name: str, help_text: str, bounds_s: List[float],
                  series: List[Tuple[Dict[str, str], Any]]) -> None:
        """A histogram family: per series ``_bucket{le}`` (cumulative, ending with +Inf), ``_sum``, ``_count``.
        Each series value is ``{"counts": per bucket then +Inf, "sum_ms"}``."""
        series = [(lbl, h) for lbl, h in series if h and len(h.get("counts") or ()) == len(bounds_s) + 1]
        if not series:
            return
        full = PREFIX + name
        self.lines.append("# HELP %s %s" % (full, escape_help(help_text)))
        self.lines.append("# TYPE %s histogram" % full)
        for labels, h in series:
            running = 0
            for le, c in zip([*(format_value(b) for b in bounds_s), "+Inf"], h["counts"]):
                running += int(c)
                self._sample(full + "_bucket", dict(labels, le=le), running)
            self._sample(full + "_sum", labels, float(h["sum_ms"]) / 1000.0)
            self._sample(full + "_count", labels, running)

    def _sample(self, name: str, labels: Dict[str, str], value: Any) -> None:
        all_labels = dict({"device_id": self.device_id}, **labels)
        lbl = ",".join('%s="%s"' % (k, escape_label_value(str(val))) for k, val in all_labels.items())
        self.lines.append("%s{%s} %s" % (name, lbl, format_value(value)))


def _ms_to_s(v: Optional[float]) -> Optional[float]:
    return None if v is None else v / 1000.0


def _mb_to_bytes(v: Optional[float]) -> Optional[float]:
    return None if v is None else v * 1024.0 * 1024.0


def _shadow(w: _Writer, t: Telemetry) -> None:
    """Candidate-vs-active gauges while a shadow or A/B candidate runs."""
    sh = t.shadow
    if sh is None:
        return
    lbl = {"mode": sh.mode, "candidate": sh.candidate.name, "candidate_version": str(sh.candidate.version)}
    w.gauge("shadow_agreement_ratio", "Agreement of the candidate with the active model over the last period (0-1).",
            sh.agreement, **lbl)
    w.gauge("shadow_mirrored", "Inputs the shadow candidate ran in the last period.", sh.mirrored, **lbl)
    w.gauge("shadow_dropped", "Sampled inputs shed instead of mirrored in the last period.", sh.dropped, **lbl)
    w.gauge("shadow_candidate_errors", "Candidate failures in the last period.", sh.candidate_errors, **lbl)
    w.family("shadow_latency_seconds", "gauge", "Latency percentiles of the candidate and the active model (same "
             "inputs in shadow mode, own arm in A/B mode) over the last period.",
             [(dict(lbl, side=side, percentile=q), _ms_to_s(getattr(lat, k)))
              for side, lat in (("candidate", sh.candidate_latency_ms), ("active", sh.active_latency_ms))
              for k, q in _QUANTILES])
    w.family("shadow_arm_requests", "gauge", "A/B: requests answered per arm in the last period.",
             [(dict(lbl, arm=a), rs.requests) for a, rs in sorted(sh.arms.items())])


def render_prometheus(t: Telemetry, *, totals: Optional[Mapping[str, Any]] = None) -> str:
    """The metrics of one telemetry message (and the builder's running totals, when given) as text."""
    w = _Writer(t.device_id)
    if totals is not None:
        w.family("requests_total", "counter", "Inference requests received since the agent started.",
                 [({}, int(totals.get("requests", 0)))])
        w.family("errors_total", "counter", "Inference requests that failed since the agent started.",
                 [({}, int(totals.get("errors", 0)))])
        w.family("refused_total", "counter", "Inference requests refused under overload since the agent started.",
                 [({}, int(totals.get("refused", 0)))])
        routes = totals.get("routes") or {}
        w.family("route_requests_total", "counter", "Requests answered per route since the agent started.",
                 [({"route": r}, int(c.get("requests", 0))) for r, c in sorted(routes.items())])
        w.family("route_errors_total", "counter", "Requests failed per route since the agent started.",
                 [({"route": r}, int(c.get("errors", 0))) for r, c in sorted(routes.items())])
        hist = totals.get("latency_histogram") or {}
        bounds_s = [b / 1000.0 for b in hist.get("bounds_ms") or ()]
        w.histogram("latency_seconds", "End-to-end inference latency since the agent started (arrival to answer).",
                    bounds_s, [({}, hist.get("total"))])
        w.histogram("route_latency_seconds", "Inference latency per route since the agent started.",
                    bounds_s, [({"route": r}, h) for r, h in sorted((hist.get("routes") or {}).items())])
    w.family("spool_dropped_total", "counter", "Telemetry/event messages dropped because the offline spool was full.",
             [({}, t.spool_dropped)])
    w.family("malformed_messages_total", "counter", "Received MQTT payloads that were malformed and ignored.",
             [({}, t.malformed_messages)])
    w.family("handler_errors_total", "counter", "Received MQTT messages whose handler failed (logged, session kept).",
             [({}, t.handler_errors)])
    w.family("worker_errors_total", "counter", "Agent work items (commands) that failed on an unexpected error.",
             [({}, t.worker_errors)])

    w.gauge("period_requests", "Requests received in the last telemetry period.", t.requests)
    w.gauge("period_errors", "Requests failed in the last telemetry period.", t.errors)
    w.gauge("period_refused", "Requests refused in the last telemetry period.", t.refused)
    w.gauge("requests_per_second", "Requests per second over the last telemetry period.", t.qps)
    w.gauge("error_ratio", "Failed share of the requests of the last period (0-1).", t.error_rate)
    w.family("period_latency_seconds", "gauge", "End-to-end inference latency percentiles over the last period.",
             [({"percentile": q}, _ms_to_s(getattr(t.latency_ms, k))) for k, q in _QUANTILES])
    w.gauge("queue_depth", "Requests waiting in the batch queues.", t.queue_depth)
    w.gauge("mean_batch_size", "Mean batch size over the last period.", t.mean_batch)
    w.gauge("large_route_ratio", "Share of answered requests routed to the large model (0-1).", t.large_fraction)
    w.gauge("router_tau", "Current threshold of the small/large router.", t.tau)
    routes = sorted(t.routes.items())
    w.family("period_route_latency_seconds", "gauge", "Inference latency percentiles per route over the last period.",
             [({"route": r, "percentile": q}, _ms_to_s(getattr(rs.latency_ms, k))) for r, rs in routes
              for k, q in _QUANTILES])
    w.family("route_queue_depth", "gauge", "Requests waiting per route.",
             [({"route": r}, rs.queue_depth) for r, rs in routes])
    w.family("route_mean_batch_size", "gauge", "Mean batch size per route over the last period.",
             [({"route": r}, rs.mean_batch) for r, rs in routes])

    w.gauge("gpu_utilization_ratio", "GPU load (0-1).", None if t.gpu_util is None else t.gpu_util / 100.0)
    w.gauge("gpu_memory_used_bytes", "Memory used on a discrete GPU.", _mb_to_bytes(t.gpu_mem_used_mb))
    w.gauge("gpu_memory_total_bytes", "Memory of a discrete GPU.", _mb_to_bytes(t.gpu_mem_total_mb))
    w.gauge("cpu_utilization_ratio", "CPU load (0-1).", None if t.cpu_percent is None else t.cpu_percent / 100.0)
    w.gauge("memory_used_bytes", "System memory in use.", _mb_to_bytes(t.mem_used_mb))
    w.gauge("memory_available_bytes", "System memory available (MemAvailable).", _mb_to_bytes(t.mem_available_mb))
    w.family("temperature_celsius", "gauge", "Temperature per sensor.",
             [({"sensor": s}, v) for s, v in sorted(t.temperatures_c.items())])
    w.gauge("power_watts", "Board (or GPU) power draw.", None if t.power_mw is None else t.power_mw / 1000.0)
    w.gauge("throttled", "1 when a thermal or power limit is throttling the device.", t.throttled)
    w.gauge("uptime_seconds", "Seconds since the agent started.", t.uptime_s)

    _shadow(w, t)

    info: Dict[str, str] = {}
    if t.bundle is not None:
        info.update(bundle=t.bundle.name, bundle_version=str(t.bundle.version))
    for k, v in sorted((t.engine or {}).items()):
        if v is not None and _LABEL_NAME.match(k):
            info["engine_" + k] = str(v)
    if t.source:
        info["system_source"] = t.source
    w.family("info", "gauge", "Active bundle, engine and statistics source (value is always 1).", [(info, 1)])
    return "\n".join(w.lines) + "\n"
