"""Prometheus text exposition: parses, one HELP/TYPE per family, labels escaped, counters named _total."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.protocol.messages import BundleRef, LatencyMs, RouteStats, Telemetry
from edge_agent.telemetry.prometheus import escape_label_value, render_prometheus

# One sample line of the 0.0.4 text format, strictly: name{label="value",...} value
_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*")*)\}'
    r' (?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|NaN|Inf))$'
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\\\|\\"|\\n)*)"')


def _unescape(v: str) -> str:
    return re.sub(r'\\(\\|"|n)', lambda m: {"\\": "\\", '"': '"', "n": "\n"}[m.group(1)], v)


def strict_parse(text: str):
    """A small parser of our own: every line is HELP, TYPE or a sample; HELP+TYPE precede a family's samples."""
    assert text.endswith("\n")
    families, current = {}, None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, "family %s declared twice" % name
            families[name] = {"help": line.split(" ", 3)[3], "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, mtype = line.split(" ")
            assert name == current and mtype in ("counter", "gauge", "histogram")
            families[name]["type"] = mtype
        else:
            m = _SAMPLE.match(line)
            assert m, "not a valid sample line: %r" % line
            suffixes = ("_bucket", "_sum", "_count") if families[current]["type"] == "histogram" else ("",)
            assert m.group("name") in [current + x for x in suffixes], "sample %s outside its family" % m.group("name")
            labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group("labels"))}
            if len(suffixes) > 1:
                labels["__suffix__"] = m.group("name")[len(current):]
            families[current]["samples"].append((labels, float(m.group("value"))))
    return families


def _telemetry(**kw) -> Telemetry:
    base = dict(
        device_id="jetson-01", ts=1.7e9, seq=4, period_s=10.0, uptime_s=3600.5, qps=20.0, requests=200, errors=2,
        refused=1, error_rate=0.01, latency_ms=LatencyMs(p50=2.0, p95=7.5, p99=11.0), queue_depth=3, mean_batch=2.5,
        large_fraction=0.25, tau=0.6,
        routes={"small": RouteStats(requests=150, latency_ms=LatencyMs(p50=1.0, p95=2.0, p99=3.0)),
                "large": RouteStats(requests=48, errors=2, latency_ms=LatencyMs(p99=12.0), queue_depth=1)},
        gpu_util=37.0, cpu_percent=9.0, mem_used_mb=3000.0, mem_available_mb=4000.0,
        temperatures_c={"CPU": 37.5, 'we"ird\\sen\nsor': 40.0}, power_mw=4567.0, throttled=False,
        bundle=BundleRef(name="digits", version=3), engine={"backend": "tensorrt", "precision": "fp16", "bad key": 1},
        spool_dropped=7, malformed_messages=2, handler_errors=3, worker_errors=1, source="jtop+proc",
    )
    base.update(kw)
    return Telemetry(**base)


def _hist(counts, sum_ms):
    from edge_agent.runtime.stats import HISTOGRAM_BOUNDS_MS

    full = list(counts) + [0] * (len(HISTOGRAM_BOUNDS_MS) + 1 - len(counts))
    return {"counts": full, "sum_ms": sum_ms, "count": sum(full)}


TOTALS = {"requests": 12345, "errors": 67, "refused": 8,
          "routes": {"small": {"requests": 10000, "errors": 60}, "large": {"requests": 2270, "errors": 7}},
          "latency_histogram": {
              "bounds_ms": (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0),
              "total": _hist([100, 200, 300], 400.0),
              "routes": {"small": _hist([100, 200, 0], 150.0), "large": _hist([0, 0, 300], 250.0)}}}


def test_output_parses_strictly_and_with_prometheus_client():
    text = render_prometheus(_telemetry(), totals=TOTALS)
    fams = strict_parse(text)
    for name, f in fams.items():
        assert f["type"] is not None and f["help"], name
        assert f["samples"], name
        assert all(s[0]["device_id"] == "jetson-01" for s in f["samples"])
        assert name.endswith("_total") == (f["type"] == "counter"), name
        assert not any("quantile" in s[0] for s in f["samples"]), name  # a summary's label; no summaries here
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client strips _total from counter family names
    assert parsed["edge_agent_requests"].type == "counter"
    assert parsed["edge_agent_requests"].samples[0].value == 12345
    assert parsed["edge_agent_latency_seconds"].type == "histogram"
    assert parsed["edge_agent_route_latency_seconds"].type == "histogram"
    assert parsed["edge_agent_period_latency_seconds"].type == "gauge"
    _promtool_check(text)


def test_values_are_in_base_units():
    fams = strict_parse(render_prometheus(_telemetry(), totals=TOTALS))
    lat = {s[0]["percentile"]: s[1] for s in fams["edge_agent_period_latency_seconds"]["samples"]}
    assert lat == {"0.5": 0.002, "0.95": 0.0075, "0.99": 0.011}
    buckets = {s[0]["le"]: s[1] for s in fams["edge_agent_latency_seconds"]["samples"]
               if s[0]["__suffix__"] == "_bucket"}
    assert (buckets["0.00025"], buckets["0.0005"], buckets["0.001"], buckets["+Inf"]) == (100, 300, 600, 600)
    rest = {s[0]["__suffix__"]: s[1] for s in fams["edge_agent_latency_seconds"]["samples"] if "le" not in s[0]}
    assert rest == {"_sum": 0.4, "_count": 600}
    assert fams["edge_agent_power_watts"]["samples"][0][1] == pytest.approx(4.567)
    assert fams["edge_agent_memory_available_bytes"]["samples"][0][1] == 4000.0 * 1024 * 1024
    assert fams["edge_agent_gpu_utilization_ratio"]["samples"][0][1] == pytest.approx(0.37)
    assert fams["edge_agent_throttled"]["samples"][0][1] == 0
    routes = {(s[0]["route"], s[0]["percentile"]): s[1]
              for s in fams["edge_agent_period_route_latency_seconds"]["samples"]}
    assert routes[("large", "0.99")] == 0.012 and ("large", "0.5") not in routes  # null percentile left out
    counts = {s[0]["route"]: s[1] for s in fams["edge_agent_route_latency_seconds"]["samples"]
              if s[0]["__suffix__"] == "_count"}
    assert counts == {"small": 300, "large": 300}
    assert {s[0]["route"]: s[1] for s in fams["edge_agent_route_requests_total"]["samples"]} == {
        "small": 10000, "large": 2270}
    assert fams["edge_agent_spool_dropped_total"]["samples"][0][1] == 7
    assert fams["edge_agent_handler_errors_total"]["samples"][0][1] == 3
    assert fams["edge_agent_worker_errors_total"]["samples"][0][1] == 1


def test_label_values_are_escaped_and_round_trip():
    text = render_prometheus(_telemetry())
    assert r'sensor="we\"ird\\sen\nsor"' in text
    fams = strict_parse(text)
    sensors = {s[0]["sensor"] for s in fams["edge_agent_temperature_celsius"]["samples"]}
    assert sensors == {"CPU", 'we"ird\\sen\nsor'}
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["sensor"] for s in parsed["edge_agent_temperature_celsius"].samples} == sensors
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_info_carries_bundle_and_engine_and_skips_bad_label_names():
    fams = strict_parse(render_prometheus(_telemetry()))
    labels, value = fams["edge_agent_info"]["samples"][0]
    assert value == 1
    assert labels["bundle"] == "digits" and labels["bundle_version"] == "3"
    assert labels["engine_backend"] == "tensorrt" and labels["engine_precision"] == "fp16"
    assert not any(" " in k for k in labels)


def test_unknown_values_are_absent_not_zero_and_counters_need_totals():
    t = Telemetry(device_id="box", ts=1.0, seq=0, period_s=10.0, uptime_s=1.0)
    fams = strict_parse(render_prometheus(t))
    assert "edge_agent_gpu_utilization_ratio" not in fams and "edge_agent_power_watts" not in fams
    assert "edge_agent_period_latency_seconds" not in fams and "edge_agent_temperature_celsius" not in fams
    assert "edge_agent_latency_seconds" not in fams  # histograms come from the running totals only
    assert "edge_agent_requests_total" not in fams  # no totals given: no fake counters from period counts
    assert fams["edge_agent_period_requests"]["samples"][0][1] == 0
    assert fams["edge_agent_uptime_seconds"]["samples"][0][1] == 1.0


def test_metrics_endpoint_serves_the_publishers_latest_telemetry(tmp_path):
    import urllib.request

    import numpy as np
    from _runtime_helpers import DIGITS, digits_manifest, digits_models, load_split

    from edge_agent.config import ApiConfig, RuntimeConfig
    from edge_agent.runtime.http_api import ApiServer
    from edge_agent.runtime.service import InferenceService
    from edge_agent.telemetry.builder import TelemetryBuilder
    from edge_agent.telemetry.publisher import TelemetryPublisher
    from edge_agent.telemetry.spool import Spool
    from edge_agent.telemetry.system_parsers import empty_system

    models = digits_models(max_batch=8)
    svc = InferenceService(models, digits_manifest(DIGITS), DIGITS, RuntimeConfig())
    sent = []
    pub = TelemetryPublisher(
        builder=TelemetryBuilder("cpu-box", system=empty_system, bundle=lambda: svc.bundle),
        get_stats=lambda: svc.stats_snapshot(reset=True), publish=lambda *a: sent.append(a) or True,
        spool=Spool(tmp_path / "spool", 10), telemetry_topic="edge/v1/devices/cpu-box/telemetry", period_s=60)
    api = ApiServer(ApiConfig(port=0), get_service=lambda: svc, is_ready=lambda: True,
                    metrics_text=pub.metrics_text)
    api.start()
    try:
        x, _ = load_split("heldout")
        for rnd in (25, 15):
            for i in range(rnd):
                svc.infer_tensor(np.asarray(x[i], dtype=np.float32), timeout_s=10)
            pub.tick()
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % api.port, timeout=5) as r:
            ctype = r.headers["Content-Type"]
            text = r.read().decode("utf-8")
    finally:
        api.stop()
        pub.stop()
        svc.close()
        models.close()
    assert ctype.startswith("text/plain; version=0.0.4")
    fams = strict_parse(text)
    assert fams["edge_agent_requests_total"]["samples"][0][1] == 40  # running total over both periods
    assert fams["edge_agent_period_requests"]["samples"][0][1] == 15  # the latest period only
    assert sum(s[1] for s in fams["edge_agent_route_requests_total"]["samples"]) == 40
    assert fams["edge_agent_info"]["samples"][0][0]["bundle"] == "digits"
    assert len(sent) == 2
    count = [s[1] for s in fams["edge_agent_latency_seconds"]["samples"] if s[0]["__suffix__"] == "_count"]
    assert count == [40]  # every answered request, over both periods
    _promtool_check(text)


def _promtool() -> str:
    """promtool's path. scripts/test.sh installs Debian's `prometheus` package, which provides it; only an
    ad-hoc run outside that script (EDGE_AGENT_TEST_SCRIPT unset) may skip for want of it."""
    import os
    import shutil

    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("EDGE_AGENT_TEST_SCRIPT") == "1" or os.environ.get("CI"):
            pytest.fail("promtool is missing although scripts/test.sh installs it (Debian package prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/test.sh does it)")
    return path


def _promtool_check(text: str) -> None:
    import subprocess

    out = subprocess.run([_promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr  # no lint warning


def test_promtool_accepts_the_full_exposition_with_shadow_and_histograms():
    from edge_agent.protocol.messages import ShadowStats

    sh = ShadowStats.model_validate({
        "mode": "shadow", "candidate": {"name": "digits", "version": 4}, "mirrored": 10, "dropped": 1,
        "candidate_errors": 0, "agreement": 0.9, "candidate_latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "active_latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0}})
    _promtool_check(render_prometheus(_telemetry(shadow=sh), totals=TOTALS))


def test_every_family_is_documented_in_docs_telemetry():
    from pathlib import Path

    from edge_agent.protocol.messages import ShadowStats

    sh = ShadowStats.model_validate({
        "mode": "ab", "candidate": {"name": "digits", "version": 4}, "mirrored": 10, "dropped": 1,
        "candidate_errors": 0, "agreement": 0.9, "candidate_latency_ms": {"p50": 1.0},
        "active_latency_ms": {"p50": 1.0}, "arms": {"active": {"requests": 3}, "candidate": {"requests": 2}}})
    fams = strict_parse(render_prometheus(_telemetry(shadow=sh), totals=TOTALS))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "telemetry.md").read_text()
    missing = sorted(name for name in fams if "`%s" % name not in doc)
    assert not missing, "families not in docs/telemetry.md: %s" % ", ".join(missing)
