"""Telemetry path benchmark: the offline spool, draining a backlog over a real mosquitto, and the per-period cost.

1. Spool append (fsync on, as in production) against the floor measured in the same directory: a raw
   `write + fsync` of the same record bytes to one file, in alternating rounds (median of each).
   Figure: spool appends/s vs raw appends/s (target >= 0.5).
2. Backlog drain after an outage: N telemetry messages spooled, then flushed by `TelemetryPublisher`
   through a real mosquitto (QoS 1, waiting for each PUBACK, as `session_publish` does), against
   publishing the same payloads straight through the same client with the same QoS, in alternating
   rounds (medians). Figures: drain rate vs direct publish rate (target >= 0.5: the spool costs at most
   half the link's rate) and messages lost (target 0).
3. Per-period cost: `collect_system()` + building the `Telemetry` + its JSON + the Prometheus text,
   against reading /proc/meminfo and /proc/stat alone. Figure: ms per period (target <= 50 ms, i.e.
   <= 0.5 % of a 10 s period).

Usage: python bench/telemetry.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402
from edge_agent.protocol import topics  # noqa: E402
from edge_agent.telemetry.builder import TelemetryBuilder  # noqa: E402
from edge_agent.telemetry.prometheus import render_prometheus  # noqa: E402
from edge_agent.telemetry.publisher import TelemetryPublisher  # noqa: E402
from edge_agent.telemetry.spool import Spool  # noqa: E402
from edge_agent.telemetry.spool_format import encode_record  # noqa: E402
from edge_agent.telemetry.system_collector import SystemCollector  # noqa: E402

TOPIC = topics.telemetry("edge/v1", "bench-1")
STATS = {"requests": 1234, "errors": 3, "refused": 0, "latency_ms": {"p50": 2.1, "p95": 6.4, "p99": 9.8},
         "queue_depth": 4, "mean_batch": 3.2, "large_fraction": 0.21, "tau": 0.63,
         "routes": {r: {"requests": 600, "errors": 1, "latency_ms": {"p50": 2.0, "p95": 6.0, "p99": 9.0},
                        "queue_depth": 2, "mean_batch": 3.0} for r in ("small", "large")}}


def _sample_payload(builder: TelemetryBuilder) -> bytes:
    return builder.build(STATS).to_json()


def bench_append(n: int, workdir: Path, payload: bytes) -> List[Dict]:
    # fsync time on a shared disk swings a lot from second to second: alternate short rounds of both
    # and compare the medians, so neither side gets the quiet moments alone.
    rounds = 10
    per = max(1, n // rounds)
    spool = Spool(workdir / "spool", n + 10)
    record = encode_record(0, TOPIC, payload, 0)
    spool_rates, raw_rates = [], []
    with open(workdir / "raw.log", "ab") as f:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(per):
                spool.append(TOPIC, payload, 0)
            spool_rates.append(per / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(per):
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            raw_rates.append(per / (time.perf_counter() - t0))
    spool.close()
    spool_rate, raw_rate = statistics.median(spool_rates), statistics.median(raw_rates)
    return [figure("spool append rate (fsync each)", round(spool_rate, 1), "msg/s", baseline=round(raw_rate, 1),
                   target=round(raw_rate * 0.5, 1)),
            figure("spool append / raw write+fsync", round(spool_rate / raw_rate, 3), "ratio", target=0.5)]


class _Link:
    """paho MQTT 5 client; publish returns True once the PUBACK is in (QoS 1)."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.mqtt = mqtt
        self.up = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda *a: self.up.set()
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        if not self.up.wait(10):
            raise RuntimeError("could not connect to the benchmark broker")

    def __call__(self, topic: str, payload: bytes, qos: int) -> bool:
        info = self.c.publish(topic, payload, qos=qos)
        if info.rc != self.mqtt.MQTT_ERR_SUCCESS:
            return False
        info.wait_for_publish(timeout=10)
        return info.is_published()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class _Counter:
    """A subscriber that counts what arrives."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.n = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, *a: c.subscribe(TOPIC, qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError("subscriber did not subscribe")

    def _on_message(self, *a) -> None:
        with self.lock:
            self.n += 1

    def wait(self, n: int, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.n >= n:
                    return self.n
            time.sleep(0.005)
        with self.lock:
            return self.n

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def bench_drain(n: int, workdir: Path, builder: TelemetryBuilder) -> List[Dict]:
    from mqtt_broker import Broker

    payload = _sample_payload(builder)
    rounds = 6
    per = max(1, n // rounds)
    direct_rates, drain_rates = [], []
    with Broker(workdir / "mosq") as broker:
        sub = _Counter(broker.host, broker.port)
        link = _Link(broker.host, broker.port, "bench-1")
        spool = Spool(workdir / "drain-spool", per + 10)
        offline = TelemetryPublisher(builder=builder, get_stats=lambda: STATS, publish=lambda *a: False,
                                     spool=spool, telemetry_topic=TOPIC, period_s=60.0, qos=1)
        pub = TelemetryPublisher(builder=builder, get_stats=lambda: STATS, publish=link, spool=spool,
                                 telemetry_topic=TOPIC, period_s=60.0, qos=1)
        sent = 0
        try:
            # Alternate rounds (direct, then an outage's backlog drained) so machine noise hits both alike.
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(per):
                    if not link(TOPIC, payload, 1):
                        raise RuntimeError("direct publish failed")
                direct_rates.append(per / (time.perf_counter() - t0))
                sent += per
                for _ in range(per):
                    offline.tick()
                assert len(spool) == per
                t0 = time.perf_counter()
                pub.notify_connected()
                pub.pump()
                drain_rates.append(per / (time.perf_counter() - t0))
                sent += per
                assert len(spool) == 0
            total = sub.wait(sent)
            lost = sent - total
        finally:
            link.close()
            sub.close()
    direct_rate, drain_rate = statistics.median(direct_rates), statistics.median(drain_rates)
    return [figure("backlog drain rate (QoS 1)", round(drain_rate, 1), "msg/s", baseline=round(direct_rate, 1),
                   target=round(direct_rate * 0.5, 1)),
            figure("drain / direct publish", round(drain_rate / direct_rate, 3), "ratio", target=0.5),
            figure("messages lost (direct + drained)", lost, "msg", baseline=0, target=0, higher_is_better=False)]


def bench_period(n: int, builder: TelemetryBuilder) -> List[Dict]:
    collector = SystemCollector(use_jtop=True)
    collector.collect()  # first reading primes the CPU sample
    b = TelemetryBuilder("bench-1", system=collector.collect)
    t0 = time.perf_counter()
    for _ in range(n):
        t = b.build(STATS)
        t.to_json()
        render_prometheus(t, totals=b.totals())
    per = (time.perf_counter() - t0) / n * 1000.0
    t0 = time.perf_counter()
    for _ in range(n):
        for name in ("/proc/meminfo", "/proc/stat"):
            try:
                with open(name, "rb") as f:
                    f.read()
            except OSError:
                pass
    base = (time.perf_counter() - t0) / n * 1000.0
    collector.close()
    return [figure("per-period cost (collect+build+json+prometheus)", round(per, 3), "ms", baseline=round(base, 4),
                   target=50.0, higher_is_better=False)]


def main(argv=None) -> int:
    """Run the three measurements, print the table, write JSON."""
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    n_append = 300 if args.quick else 2000
    n_drain = 300 if args.quick else 3000
    n_period = 50 if args.quick else 300
    builder = TelemetryBuilder("bench-1", system=lambda: {})
    figures: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        work = Path(tmp)
        figures += bench_append(n_append, work, _sample_payload(builder))
        figures += bench_drain(n_drain, work, builder)
    figures += bench_period(n_period, builder)
    print_table(figures, "telemetry (%s)" % ("quick" if args.quick else "full"))
    write_json(args.json, figures, environment(n_append=n_append, n_drain=n_drain, n_period=n_period))
    return 0


if __name__ == "__main__":
    sys.exit(main())
