"""The Grafana dashboard and provisioning files under configs/grafana/ fit what the controller's /metrics
serves: every metric a panel queries is one the console exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fleet.console.metrics import render

GRAFANA = Path(__file__).resolve().parent.parent / "configs" / "grafana"


def _exported() -> set:
    dev = {"device_id": "d1", "online": True, "health": "ok", "last_seen": 1.0,
           "active": {"name": "digits", "version": 1},
           "telemetry": {"p50_ms": 1, "p99_ms": 2, "qps": 3, "error_rate": 0, "large_fraction": 0.1, "tau": 0.8,
                         "gpu_util": 50, "temp_max_c": 40, "power_mw": 5000, "mem_used_mb": 100, "queue_depth": 0}}
    status = {"devices": 1, "uptime_s": 1, "ingest": {"received": {"telemetry": 1}, "dropped": {"telemetry": 0},
                                                       "malformed": {"status": 0}}, "rpc": {"requests": 1}}
    text = render([dev], status, [{"rollout_id": "r1", "state": "running", "bundle": {"name": "d", "version": 2}}])
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads((GRAFANA / "dashboards" / "fleet.json").read_text())
    exported = _exported()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            used |= set(re.findall(r"\bfleet_[a-z0-9_]+", t["expr"]))
    assert used and used <= exported, sorted(used - exported)
    # The per-device charts of the console's device page all have a panel.
    for m in ("fleet_device_latency_p99_seconds", "fleet_device_requests_per_second", "fleet_device_error_ratio",
              "fleet_device_large_model_ratio", "fleet_device_router_tau", "fleet_device_gpu_utilization_ratio",
              "fleet_device_temperature_celsius", "fleet_device_power_watts", "fleet_device_memory_used_bytes"):
        assert m in used


def test_provisioning_files_point_at_the_dashboard_and_datasource():
    import yaml

    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "fleet-prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fleet.yaml").read_text())
    assert prov["providers"][0]["type"] == "file"
    scrape = yaml.safe_load((GRAFANA / "prometheus-scrape.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["127.0.0.1:8780"]
