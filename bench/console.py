"""Console server time at fleet scale: the devices API and the devices page at 1,000 and 10,000 devices.

A registry (SQLite, as one controller keeps it) is filled with N devices — status, bundle, health and a
full telemetry summary each — and the real console (`fleet.console.server.ConsoleServer` over a real
`Controller`'s RPC dispatcher, not connected to a broker: no broker work is in these paths) answers over
loopback HTTP with keep-alive. Figures (median of the repeats, milliseconds, lower is better):

* ``devices_api_ms_N``: ``GET /api/v1/devices`` — one page of 50, sorted by last_seen descending
  (target < 200 ms at 10,000).
* ``devices_api_filtered_ms_N``: the same with a device-id substring filter and a health filter, sorted by
  health.
* ``devices_page_ms_N``: everything the devices page fetches from the server: the HTML, its script,
  chart code and style sheet, and the first page of devices (target < 200 ms at 10,000).
* baseline of each: the registry query for the same page called directly in the same run
  (``fleet.device_query.page_devices``), so the figure shows what HTTP, auth and JSON add; and, for
  scale, ``registry_list_all_ms_N``: every device row decoded (what ``fleet devices`` asks for).
* ``metrics_scrape_ms_N``: ``GET /metrics`` (a series per device), against that full-list baseline.

    python bench/console.py [--quick] [--json out.json]      # --quick: 1,000 and 10,000, fewer repeats
"""

from __future__ import annotations

import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402

TARGET_MS = 200.0
PAGE = "/api/v1/devices?limit=50&sort=last_seen&order=desc"
FILTERED = "/api/v1/devices?limit=50&sort=health&q=7&health=ok"
STATIC = ("/", "/static/app.js", "/static/charts.js", "/static/app.css")


def fill(registry: Any, n: int) -> None:
    """N devices with a status, an active bundle and a telemetry summary each."""
    now = time.time()
    for i in range(n):
        registry.record_status({"device_id": "dev-%05d" % i, "ts": now, "online": i % 13 != 0,
                                "agent_version": "0.1.0", "platform": {"backend": "tensorrt"},
                                "active": {"name": "digits", "version": 1 + i % 3}, "previous": None,
                                "deploy": {"state": "active"}, "ready": True}, now=now)
    summary = {"ts": now, "seq": 1, "qps": 40.0, "p50_ms": 3.0, "p99_ms": 8.0, "error_rate": 0.001,
               "large_fraction": 0.2, "tau": 0.8, "gpu_util": 55.0, "temp_max_c": 51.0, "power_mw": 9000,
               "mem_used_mb": 2100.0, "bundle": {"name": "digits", "version": 1}, "shadow": None}
    batch = [("dev-%05d" % i, now, summary, "ok" if i % 17 else "unhealthy") for i in range(n)]
    for k in range(0, n, 2000):
        registry.record_telemetry(batch[k:k + 2000], now=now)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` in milliseconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def get(conn: http.client.HTTPConnection, path: str, token: str) -> bytes:
    """One GET on a kept-alive connection; the body (fails on a non-200)."""
    conn.request("GET", path, headers={"Authorization": "Bearer " + token})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError("%s answered %d: %s" % (path, r.status, body[:200]))
    return body


def measure(n: int, repeats: int, tmp: Path) -> List[Dict[str, Any]]:
    """The figures at n devices."""
    from fleet.config import ConsoleSection, ControllerSection, FleetConfig
    from fleet.console.server import ConsoleServer
    from fleet.console.tokens import add_token
    from fleet.controller import Controller
    from fleet.device_query import page_devices

    d = tmp / ("n%d" % n)
    cfg = FleetConfig(controller=ControllerSection(state_dir=d, key_file=d / "none.key"),
                      console=ConsoleSection(enabled=True, port=0, requests_per_s=1e6, request_burst=1000000))
    ctl = Controller(cfg)  # not started: the RPC dispatcher and registry are all the console uses here
    fill(ctl.registry, n)
    token = add_token(d / "tokens", role="viewer", name="bench")
    console = ConsoleServer(cfg.console, ctl, tokens_file=d / "tokens")
    console.start()
    conn = http.client.HTTPConnection("127.0.0.1", console.httpd.server_address[1], timeout=30)
    try:
        direct = median_ms(lambda: page_devices(ctl.registry, {"limit": 50, "sort": "last_seen", "order": "desc"}),
                           repeats)
        direct_f = median_ms(lambda: page_devices(ctl.registry, {"limit": 50, "sort": "health", "q": "7",
                                                                 "health": "ok"}), repeats)
        api = median_ms(lambda: get(conn, PAGE, token), repeats)
        api_f = median_ms(lambda: get(conn, FILTERED, token), repeats)
        page = median_ms(lambda: [get(conn, p, token) for p in (*STATIC, PAGE)], repeats)
        list_all = median_ms(ctl.registry.list_devices, max(3, repeats // 4))
        metrics = median_ms(lambda: get(conn, "/metrics", token), max(3, repeats // 4))
    finally:
        conn.close()
        console.stop()
        ctl.registry.close()
    return [
        figure("devices_api_ms_%d" % n, api, "ms", baseline=direct, target=TARGET_MS if n >= 10000 else None,
               higher_is_better=False),
        figure("devices_api_filtered_ms_%d" % n, api_f, "ms", baseline=direct_f,
               target=TARGET_MS if n >= 10000 else None, higher_is_better=False),
        figure("devices_page_ms_%d" % n, page, "ms", baseline=direct, target=TARGET_MS if n >= 10000 else None,
               higher_is_better=False),
        figure("registry_list_all_ms_%d" % n, list_all, "ms", higher_is_better=False),
        figure("metrics_scrape_ms_%d" % n, metrics, "ms", baseline=list_all, higher_is_better=False),
    ]


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    repeats = 15 if args.quick else 50
    figures: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        for n in (1000, 10000):
            rows = measure(n, repeats, Path(tmp))
            print_table(rows, "%d devices (median of %d)" % (n, repeats))
            figures.extend(rows)
    print_table(figures, "console server time")
    write_json(args.json, figures, environment(registry="sqlite", repeats=repeats, page_size=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
