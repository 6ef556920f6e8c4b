"""TelemetryBuilder: runtime period stats + system reading -> a Telemetry that validates against its schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge_agent.protocol.messages import BundleRef, Telemetry
from edge_agent.telemetry.builder import TelemetryBuilder
from edge_agent.telemetry.system_parsers import empty_system

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "schemas" / "telemetry.json").read_text())


def _validate(t: Telemetry) -> dict:
    doc = json.loads(t.to_json())
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    return doc


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _stats(requests=200, errors=2, refused=1):
    route = {"requests": 150, "errors": 1, "latency_ms": {"p50": 1.5, "p95": 3.0, "p99": 4.25},
             "queue_depth": 2, "mean_batch": 3.5}
    large = {"requests": 47, "errors": 1, "latency_ms": {"p50": 6.0, "p95": 9.0, "p99": 12.0},
             "queue_depth": 0, "mean_batch": 1.2}
    return {"requests": requests, "errors": errors, "refused": refused,
            "latency_ms": {"p50": 2.0, "p95": 7.5, "p99": 11.0}, "queue_depth": 2, "mean_batch": 2.9,
            "large_fraction": 0.2387, "tau": 0.61, "routes": {"small": route, "large": large}}


def _system():
    s = empty_system()
    s.update(gpu_util=37.0, cpu_percent=9.0, mem_used_mb=3004.1, mem_available_mb=3906.2, power_mw=4567.0,
             temperatures_c={"CPU": 37.5, "GPU": 36.0}, throttled=False, source="jtop+proc")
    return s


def test_builder_turns_period_counts_into_rates_and_carries_every_field():
    clock = Clock()
    b = TelemetryBuilder("jetson-01", system=_system, clock=clock, wall_clock=lambda: 1.7e9,
                         bundle=lambda: BundleRef(name="digits", version=3),
                         engine=lambda: {"backend": "tensorrt", "precision": "fp16", "batch_small": 16, "x": [1]},
                         spool_dropped=lambda: 7, malformed=lambda: 2, handler_errors=lambda: 4,
                         worker_errors=lambda: 1, started_at=90.0)
    clock.t = 110.0  # 20 s since start
    t = b.build(_stats())
    assert t.seq == 0 and t.period_s == 20.0 and t.uptime_s == 20.0 and t.ts == 1.7e9
    assert t.qps == pytest.approx(10.0)
    assert t.error_rate == pytest.approx(0.01)
    assert (t.requests, t.errors, t.refused) == (200, 2, 1)
    assert t.latency_ms.p99 == 11.0 and t.routes["large"].latency_ms.p99 == 12.0
    assert t.tau == 0.61 and t.large_fraction == 0.2387 and t.mean_batch == 2.9 and t.queue_depth == 2
    assert t.gpu_util == 37.0 and t.power_mw == 4567.0 and t.temperatures_c == {"CPU": 37.5, "GPU": 36.0}
    assert t.throttled is False and t.source == "jtop+proc"
    assert t.bundle == BundleRef(name="digits", version=3)
    assert t.engine == {"backend": "tensorrt", "precision": "fp16", "batch_small": 16, "x": "[1]"}
    assert t.spool_dropped == 7 and t.malformed_messages == 2
    assert t.handler_errors == 4 and t.worker_errors == 1
    doc = _validate(t)
    assert doc["schema"] == "edge-agent/telemetry/1"

    clock.t = 115.0
    t2 = b.build(_stats(requests=50, errors=0, refused=0))
    assert t2.seq == 1 and t2.period_s == 5.0 and t2.qps == pytest.approx(10.0) and t2.error_rate == 0.0
    tot = b.totals()
    assert (tot["requests"], tot["errors"], tot["refused"]) == (250, 2, 1)
    assert tot["routes"]["small"] == {"requests": 300, "errors": 2}


def test_no_model_and_no_sensors_gives_nulls_not_zeros():
    b = TelemetryBuilder("box", system=empty_system, clock=Clock())
    t = b.build(None)
    doc = _validate(t)
    for k in ("qps", "error_rate", "tau", "gpu_util", "cpu_percent", "mem_used_mb", "power_mw", "throttled",
              "bundle", "engine", "queue_depth"):
        assert doc[k] is None, k
    assert doc["temperatures_c"] == {} and doc["routes"] == {}


def test_zero_requests_has_zero_qps_and_unknown_error_rate():
    b = TelemetryBuilder("box", system=empty_system, clock=Clock())
    t = b.build({"requests": 0, "errors": 0, "refused": 0, "latency_ms": {"p50": None, "p95": None, "p99": None}})
    assert t.qps == 0.0 and t.error_rate is None


def test_malformed_runtime_stats_and_failing_collectors_do_not_stop_telemetry(caplog):
    def broken_system():
        raise RuntimeError("sensor bus hung")

    bad = _stats()
    bad["routes"]["small"]["latency_ms"] = {"p50": "fast"}
    b = TelemetryBuilder("box", system=broken_system, clock=Clock(), bundle=lambda: {"name": "BAD NAME", "version": 0},
                         spool_dropped=lambda: 1 // 0)
    t = b.build(bad)
    _validate(t)
    assert t.requests == 200 and t.routes == {} and t.bundle is None and t.spool_dropped == 0
    assert "sensor bus hung" in caplog.text and "per-route stats left out" in caplog.text


def test_value_outside_the_contract_is_dropped_field_by_field():
    s = _system()
    s["cpu_percent"] = "not a number"
    s["temperatures_c"] = {"CPU": 37.5, "bogus": "hot"}
    b = TelemetryBuilder("box", system=lambda: s, clock=Clock())
    stats = _stats()
    stats["queue_depth"] = "deep"
    t = b.build(stats)
    assert t.cpu_percent is None and t.queue_depth is None
    assert t.gpu_util == 37.0 and t.requests == 200 and t.temperatures_c == {"CPU": 37.5}
    _validate(t)


def test_telemetry_from_a_real_inference_service_validates():
    from _runtime_helpers import DIGITS, digits_manifest, digits_models, load_split

    from edge_agent.config import RuntimeConfig
    from edge_agent.runtime.service import InferenceService

    models = digits_models(max_batch=8)
    svc = InferenceService(models, digits_manifest(DIGITS), DIGITS, RuntimeConfig())
    try:
        x, _ = load_split("heldout")
        for i in range(40):
            svc.infer_tensor(np.asarray(x[i], dtype=np.float32), timeout_s=10)
        clock = Clock()
        b = TelemetryBuilder("cpu-box", clock=clock, bundle=lambda: svc.bundle)
        clock.t += 10
        t = b.build(svc.stats_snapshot(reset=True))
    finally:
        svc.close()
        models.close()
    doc = _validate(t)
    assert doc["requests"] == 40 and doc["errors"] == 0 and doc["qps"] == pytest.approx(4.0)
    assert doc["latency_ms"]["p99"] > 0
    assert sum(r["requests"] for r in doc["routes"].values()) == 40
    assert doc["bundle"] == {"name": "digits", "version": 1}
    assert doc["mem_available_mb"] is not None  # collected from this machine
