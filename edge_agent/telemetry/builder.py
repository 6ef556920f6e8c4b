"""Builds the periodic `Telemetry` message from the runtime's period stats and the system reading.

The runtime's `InferenceService.stats_snapshot(reset=True)` gives counters *of the period*; the builder
turns them into rates (qps, error_rate) over the time that really passed since the previous message,
and keeps running totals since start for Prometheus counters (`totals()`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Union

from pydantic import ValidationError

from edge_agent.protocol.messages import BundleRef, LatencyMs, RouteStats, ShadowStats, Telemetry
from edge_agent.runtime.stats import HISTOGRAM_BOUNDS_MS
from edge_agent.telemetry.metrics import Counters, CumulativeHistogram
from edge_agent.telemetry.system_collector import collect_system

logger = logging.getLogger(__name__)

#: Keys of the runtime's stats dict that are copied as they are.
_RUNTIME_SCALARS = ("queue_depth", "mean_batch", "large_fraction", "tau")
_SYSTEM_FIELDS = ("gpu_util", "gpu_mem_used_mb", "gpu_mem_total_mb", "cpu_percent", "mem_used_mb",
                  "mem_available_mb", "power_mw", "throttled")
#: Cumulative counters kept for Prometheus (`<name>_total`).
TOTALS = ("requests", "errors", "refused")


def _count(v: Any) -> int:
    try:
        n = int(v or 0)
    except (TypeError, ValueError):
        return 0
    return max(0, n)


class TelemetryBuilder:
    """Makes one `Telemetry` per call to `build()`, numbering them with `seq` from 0."""

    def __init__(
        self,
        device_id: str,
        *,
        system: Callable[[], Dict[str, Any]] = collect_system,
        bundle: Callable[[], Union[BundleRef, Dict[str, Any], None]] = lambda: None,
        engine: Callable[[], Optional[Dict[str, Any]]] = lambda: None,
        spool_dropped: Callable[[], int] = lambda: 0,
        malformed: Callable[[], int] = lambda: 0,
        handler_errors: Callable[[], int] = lambda: 0,
        worker_errors: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        started_at: Optional[float] = None,
    ) -> None:
        self.device_id = device_id
        self._system = system
        self._bundle = bundle
        self._engine = engine
        self._spool_dropped = spool_dropped
        self._malformed = malformed
        self._handler_errors = handler_errors
        self._worker_errors = worker_errors
        self._clock = clock
        self._wall = wall_clock
        self._started = clock() if started_at is None else started_at
        self._last = self._started
        self._seq = 0
        self._totals = Counters(TOTALS)
        self._route_totals: Dict[str, Counters] = {}
        self._latency_hist = CumulativeHistogram(len(HISTOGRAM_BOUNDS_MS) + 1)
        self._route_hists: Dict[str, CumulativeHistogram] = {}

    @property
    def next_seq(self) -> int:
        """The `seq` the next message will carry."""
        return self._seq

    def totals(self) -> Dict[str, Any]:
        """Counters since start: {"requests", "errors", "refused", "routes": {route: {"requests", "errors"}},
        "latency_histogram": {"bounds_ms", "total", "routes": {route: ...}}} (see CumulativeHistogram)."""
        out: Dict[str, Any] = self._totals.snapshot()
        out["routes"] = {r: c.snapshot() for r, c in sorted(self._route_totals.items())}
        out["latency_histogram"] = {
            "bounds_ms": HISTOGRAM_BOUNDS_MS,
            "total": self._latency_hist.snapshot(),
            "routes": {r: h.snapshot() for r, h in sorted(self._route_hists.items())},
        }
        return out

    def _add_histograms(self, hist: Any) -> None:
        """Accumulate the period's latency histograms (a malformed one is skipped with a warning)."""
        if not isinstance(hist, dict):
            return
        n = len(HISTOGRAM_BOUNDS_MS) + 1
        ok = self._latency_hist.add(hist.get("total")) if hist.get("total") is not None else True
        for name, h in (hist.get("routes") or {}).items():
            ok = self._route_hists.setdefault(str(name), CumulativeHistogram(n)).add(h) and ok
        if not ok:
            logger.warning("runtime latency histogram does not match %d buckets; left out", n)

    def build(self, stats: Optional[Dict[str, Any]] = None) -> Telemetry:
        """One message from the period's runtime stats (None when no model is serving)."""
        now = self._clock()
        period = max(now - self._last, 1e-6)
        self._last = now
        fields: Dict[str, Any] = {
            "device_id": self.device_id,
            "ts": self._wall(),
            "seq": self._seq,
            "period_s": round(period, 3),
            "uptime_s": round(max(0.0, now - self._started), 3),
        }
        fields.update(self._runtime_fields(stats or {}, period))
        fields.update(self._system_fields())
        fields.update(self._agent_fields())
        try:
            t = Telemetry(**fields)
        except ValidationError as e:
            # A value from a collector that does not fit the contract must not stop telemetry.
            logger.warning("telemetry fields rejected (%s); sending the message without them", e.errors()[0]["loc"])
            bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
            keep = ("device_id", "ts", "seq", "period_s", "uptime_s")
            try:
                t = Telemetry(**{k: v for k, v in fields.items() if k in keep or k not in bad})
            except ValidationError:
                t = Telemetry(**{k: fields[k] for k in keep})
        self._seq += 1
        return t

    # ------------------------------------------------------------------------------------------ parts

    def _runtime_fields(self, stats: Dict[str, Any], period: float) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        requests, errors, refused = (_count(stats.get(k)) for k in TOTALS)
        self._totals.inc("requests", requests)
        self._totals.inc("errors", errors)
        self._totals.inc("refused", refused)
        out.update(requests=requests, errors=errors, refused=refused)
        self._add_histograms(stats.get("latency_histogram"))
        if stats:
            out["qps"] = round(requests / period, 4)
            out["error_rate"] = round(errors / requests, 6) if requests else None
        for k in _RUNTIME_SCALARS:
            if stats.get(k) is not None:
                out[k] = stats[k]
        try:
            if stats.get("latency_ms") is not None:
                out["latency_ms"] = LatencyMs.model_validate(stats["latency_ms"])
            routes = {}
            for name, r in (stats.get("routes") or {}).items():
                rs = RouteStats.model_validate(r)
                routes[str(name)] = rs
                c = self._route_totals.setdefault(str(name), Counters(("requests", "errors")))
                c.inc("requests", rs.requests)
                c.inc("errors", rs.errors)
            out["routes"] = routes
            if stats.get("shadow") is not None:
                out["shadow"] = ShadowStats.model_validate(stats["shadow"])
        except ValidationError as e:
            logger.warning("runtime stats do not match the telemetry contract (%s); per-route stats left out", e)
            out.pop("latency_ms", None)
            out.pop("routes", None)
            out.pop("shadow", None)
        return out

    def _system_fields(self) -> Dict[str, Any]:
        try:
            sysd = self._system() or {}
        except Exception as e:  # collect_system never raises; an injected collector might
            logger.warning("system statistics failed: %s", e)
            return {}
        out = {k: sysd.get(k) for k in _SYSTEM_FIELDS if sysd.get(k) is not None}
        temps: Dict[str, float] = {}
        for k, v in (sysd.get("temperatures_c") or {}).items():
            try:
                temps[str(k)] = float(v)
            except (TypeError, ValueError):
                logger.debug("temperature %r=%r is not a number; left out", k, v)
        out["temperatures_c"] = temps
        if sysd.get("source"):
            out["source"] = sysd["source"]
        return out

    def _agent_fields(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        counters = (("spool_dropped", self._spool_dropped), ("malformed_messages", self._malformed),
                    ("handler_errors", self._handler_errors), ("worker_errors", self._worker_errors))
        for key, fn in counters:
            try:
                out[key] = _count(fn())
            except Exception as e:
                logger.debug("%s unavailable: %s", key, e)
        try:
            b = self._bundle()
            if b is not None:
                out["bundle"] = b if isinstance(b, BundleRef) else BundleRef.model_validate(b)
        except Exception as e:
            logger.debug("active bundle unavailable: %s", e)
        try:
            eng = self._engine()
            if eng:
                out["engine"] = {str(k): (v if v is None or isinstance(v, (str, int, float)) else str(v))
                                 for k, v in eng.items()}
        except Exception as e:
            logger.debug("engine description unavailable: %s", e)
        return out
