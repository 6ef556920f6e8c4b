"""Soak: a real `edge-agent run` under steady inference load through its HTTP API, with telemetry on,
while the broker is restarted every few minutes. Not part of any test suite.

What runs: mosquitto (tests/mqtt_broker.py, persistence on so a subscriber's session survives the
restarts), `fleet serve`, and the agent as a child process serving the sample digits bundle. Client
threads post single-item .npy requests to ``/v1/infer`` at a fixed total rate. A telemetry subscriber
with a persistent session (QoS 1 subscription, `queue_qos0_messages` on the broker) records every
telemetry message's `seq` and `spool_dropped`. Every ``--broker-restart-s`` the broker is stopped for
``--broker-down-s`` and started again.

Reported (table, and ``--json``):
- agent RSS and open file descriptors over time, and their growth after the warm-up (the baseline is
  the agent's own value at the end of the warm-up, measured in the same run; target ~0);
- inference requests sent / failed (target 0 failed: the broker going away must not touch serving);
- telemetry messages lost beyond the spool policy: seq numbers never received, minus the messages the
  agent itself reports as dropped by its bounded spool (`spool_dropped`). Target 0.

    python bench/soak.py                       # 10 minutes, broker restarted every 2 minutes
    python bench/soak.py --quick               # about a minute
    python bench/soak.py --duration 180 --broker-restart-s 45 --json soak.json
"""

from __future__ import annotations

import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402

MIB = 1 << 20


# ------------------------------------------------------------------------------------------ measuring


def proc_rss_mb(pid: int) -> Optional[float]:
    """Resident set size of a process in MiB (None when it is gone)."""
    try:
        with open("/proc/%d/status" % pid, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def proc_fds(pid: int) -> Optional[int]:
    """Open file descriptors of a process (None when it is gone)."""
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


def slope_per_hour(points: List[Tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of (t seconds, value) in value per hour."""
    if len(points) < 3:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return 3600.0 * sum((t - mt) * (v - mv) for t, v in points) / den


class Load:
    """Client threads posting .npy requests at a fixed total rate over keep-alive connections."""

    def __init__(self, port: int, body: bytes, *, rps: float, clients: int) -> None:
        self.port = port
        self.body = body
        self.interval = clients / float(rps)
        self.clients = clients
        self.sent = 0
        self.ok = 0
        self.failed: Dict[str, int] = {}
        self.latencies: List[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def _fail(self, why: str) -> None:
        with self._lock:
            self.failed[why] = self.failed.get(why, 0) + 1

    def _run(self, k: int) -> None:
        conn: Optional[http.client.HTTPConnection] = None
        nxt = time.monotonic() + k * self.interval / self.clients
        while not self._stop.is_set():
            delay = nxt - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            nxt += self.interval
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            t0 = time.perf_counter()
            with self._lock:
                self.sent += 1
            try:
                conn.request("POST", "/v1/infer", body=self.body, headers={"Content-Type": "application/x-npy"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    with self._lock:
                        self.ok += 1
                        self.latencies.append(time.perf_counter() - t0)
                else:
                    self._fail("http %d" % r.status)
            except (OSError, http.client.HTTPException) as e:
                self._fail(type(e).__name__)
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def start(self) -> None:
        for k in range(self.clients):
            t = threading.Thread(target=self._run, args=(k,), name="load-%d" % k, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


class TelemetryLog:
    """A persistent-session subscriber to one device's telemetry (survives broker restarts)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.seqs: Dict[int, float] = {}
        self.spool_dropped: List[Tuple[int, int]] = []  # (seq, spool_dropped)
        self.duplicates = 0
        self.connects = 0
        self.session_present: List[bool] = []
        self.built_at: Dict[int, float] = {}  # seq -> the message's own ts (when the agent built it)
        self._lock = threading.Lock()
        self.topic = topic
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="soak-telemetry-%d" % os.getpid(), protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connects += 1
        self.session_present.append(bool(getattr(flags, "session_present", False)))
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            data = json.loads(msg.payload)
            seq = int(data["seq"])
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            if seq in self.seqs:
                self.duplicates += 1
            self.seqs[seq] = time.time()
            self.built_at[seq] = float(data.get("ts") or 0.0)
            self.spool_dropped.append((seq, int(data.get("spool_dropped") or 0)))

    def lost(self) -> Dict[str, int]:
        """Received, missing seqs between the first and last received, drops the agent reported."""
        with self._lock:
            seqs = sorted(self.seqs)
            drops = sorted(self.spool_dropped)
        if not seqs:
            return {"received": 0, "missing": 0, "spool_dropped": 0, "lost_beyond_policy": 0}
        have = set(seqs)
        gaps = [s for s in range(seqs[0], seqs[-1] + 1) if s not in have]
        missing = len(gaps)
        dropped = max(0, drops[-1][1] - drops[0][1])
        return {"received": len(seqs), "missing": missing, "spool_dropped": dropped,
                "lost_beyond_policy": max(0, missing - dropped), "first_seq": seqs[0], "last_seq": seqs[-1],
                "missing_seqs": gaps[:50], "duplicates": self.duplicates, "subscriber_connects": self.connects,
                "subscriber_session_present": self.session_present,
                "gap_built_after": [round(self.built_at.get(s - 1, 0.0), 1) for s in gaps[:50] if s - 1 in have]}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ------------------------------------------------------------------------------------------ the rig


def _npy_body() -> bytes:
    import numpy as np

    with np.load(str(ROOT / "samples" / "digits" / "heldout.npz")) as z:
        x = z["x"][0].astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def run(args) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    from agent_helpers import FleetRig, build_sample_bundle
    from mqtt_broker import Broker, free_port

    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    persist = tmp / "mosquitto-db"
    persist.mkdir()
    # Started as root, mosquitto drops to its own user: it must be able to write its database here.
    os.chmod(str(tmp), 0o755)
    os.chmod(str(persist), 0o777)
    broker = Broker(tmp / "mosquitto", extra_conf="persistence true\npersistence_location %s/\n"
                                                  "queue_qos0_messages true\n" % persist)
    rig = FleetRig(broker, tmp)
    samples: List[Tuple[float, float, int]] = []
    restarts: List[float] = []
    restart_wall: List[float] = []
    load = tlog = None
    try:
        api_port = free_port()
        cfg = rig.agent_config("soak1")
        text = cfg.read_text().replace("[api]\nenabled = false",
                                       '[api]\nenabled = true\nhost = "127.0.0.1"\nport = %d' % api_port)
        text = text.replace("period_s = 1.0", "period_s = %s" % args.telemetry_period_s)
        cfg.write_text(text)
        tlog = TelemetryLog(broker.host, broker.port, "edge/v1/devices/soak1/telemetry")
        agent = rig.start_agent("soak1")
        bundle = build_sample_bundle(tmp / "bundles", rig.release_key, version=1)
        pusher = rig.pusher()
        pusher.add_bundle(bundle)
        assert pusher.send_command("soak1", pusher.deploy_args("digits", 1)).wait(10)
        w = rig.watcher
        w.wait_for(lambda: (w.status.get("soak1") or {}).get("ready") is True, 120, "agent ready")
        load = Load(api_port, _npy_body(), rps=args.rps, clients=args.clients)
        start = time.monotonic()
        load.start()
        next_restart = start + args.broker_restart_s
        next_sample = start
        while True:
            now = time.monotonic()
            if now - start >= args.duration:
                break
            if agent.poll() is not None:
                raise RuntimeError("the agent exited with %s:\n%s" % (agent.returncode, rig.logs("soak1")))
            if now >= next_sample:
                rss, fds = proc_rss_mb(agent.pid), proc_fds(agent.pid)
                if rss is not None and fds is not None:
                    samples.append((now - start, rss, fds))
                next_sample += args.sample_s
            if now >= next_restart and now - start + args.broker_down_s < args.duration - 5:
                broker.stop()
                restarts.append(now - start)
                restart_wall.append(round(time.time(), 1))
                time.sleep(args.broker_down_s)
                broker.start()
                next_restart = time.monotonic() + args.broker_restart_s
                continue
            time.sleep(0.1)
        load.stop()
        # Let the last telemetry (and anything spooled during the last outage) arrive.
        time.sleep(max(3.0, 3 * args.telemetry_period_s))
        tel = tlog.lost()
        tel["broker_stopped_at"] = restart_wall
        agent_alive = agent.poll() is None
    finally:
        if load is not None:
            load.stop()
        if tlog is not None:
            tlog.close()
        rig.close()
        broker.close()
    return summarize(args, samples=samples, restarts=restarts, load=load, tel=tel, agent_alive=agent_alive)


def summarize(args, *, samples, restarts, load, tel, agent_alive) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    warm = [s for s in samples if s[0] >= args.warmup_s]
    head, tail = warm[:3], warm[-3:]
    rss0 = statistics.median(s[1] for s in head) if head else None
    rss1 = statistics.median(s[1] for s in tail) if tail else None
    fd0 = statistics.median(s[2] for s in head) if head else None
    fd1 = statistics.median(s[2] for s in tail) if tail else None
    lat = sorted(load.latencies)
    p99 = lat[int(0.99 * (len(lat) - 1))] * 1000 if lat else None
    failed = sum(load.failed.values())
    figures = [
        figure("agent RSS growth after warm-up", None if rss0 is None else round(rss1 - rss0, 2), "MiB",
               baseline=None if rss0 is None else round(rss0, 1), target=8.0, higher_is_better=False),
        figure("agent RSS slope after warm-up", slope_per_hour([(t, r) for t, r, _ in warm]), "MiB/h",
               baseline=None, target=None, higher_is_better=False),
        figure("agent RSS slope, last half of the run", slope_per_hour(
            [(t, r) for t, r, _ in samples if t >= samples[-1][0] / 2] if samples else []), "MiB/h",
            baseline=None, target=None, higher_is_better=False),
        figure("agent open fds growth after warm-up", None if fd0 is None else fd1 - fd0, "fds", baseline=fd0,
               target=2, higher_is_better=False),
        figure("inference requests sent", load.sent, "requests", baseline=None, target=None),
        figure("inference requests failed", failed, "requests", baseline=0, target=0, higher_is_better=False),
        figure("inference p99 latency (client side)", p99, "ms", baseline=None, target=None, higher_is_better=False),
        figure("broker restarts survived", len(restarts), "restarts", baseline=None, target=None),
        figure("telemetry messages received", tel["received"], "messages", baseline=None, target=None),
        figure("telemetry dropped by the spool policy (agent-reported)", tel["spool_dropped"], "messages",
               baseline=None, target=None, higher_is_better=False),
        figure("telemetry lost beyond the spool policy", tel["lost_beyond_policy"], "messages",
               baseline=tel["spool_dropped"], target=0, higher_is_better=False),
    ]
    env = environment(duration_s=args.duration, warmup_s=args.warmup_s, rps=args.rps, clients=args.clients,
                      broker_restart_s=args.broker_restart_s, broker_down_s=args.broker_down_s,
                      telemetry_period_s=args.telemetry_period_s, broker_restarts_at_s=[round(r, 1) for r in restarts],
                      failures_by_kind=load.failed, telemetry=tel, agent_alive_at_end=agent_alive,
                      series=[[round(t, 1), round(r, 2), f] for t, r, f in samples])
    return figures, env


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--broker-restart-s", type=float, default=120.0, help="restart the broker this often")
    p.add_argument("--broker-down-s", type=float, default=2.0, help="how long the broker stays down")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="excluded from the growth figures (default: a third of the run, at most 120 s)")
    p.add_argument("--rps", type=float, default=100.0, help="total inference requests per second")
    p.add_argument("--clients", type=int, default=4, help="client threads (keep-alive connections)")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS / fd sampling interval")
    p.add_argument("--telemetry-period-s", type=float, default=1.0, help="the agent's telemetry period")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)  # the rig's own reconnect warnings during the outages
    if args.quick:
        args.duration = min(args.duration, 50.0)
        args.broker_restart_s = min(args.broker_restart_s, 15.0)
        args.sample_s = min(args.sample_s, 2.0)
    if args.warmup_s is None:
        # The agent's RSS settles within about two minutes here (allocator, caches, first batches).
        args.warmup_s = min(120.0, args.duration / 3)
    figures, env = run(args)
    print_table(figures, "soak: %.0f s, broker restarted every %.0f s (down %.1f s), %.0f req/s"
                % (args.duration, args.broker_restart_s, args.broker_down_s, args.rps))
    series = env["series"]
    step = max(1, len(series) // 12)
    print("\n  t (s)   RSS (MiB)   fds")
    for t, r, f in series[::step] + ([series[-1]] if series and (len(series) - 1) % step else []):
        print("  %6.1f  %9.2f  %5d" % (t, r, f))
    print("  telemetry: %s" % env["telemetry"])
    if env["failures_by_kind"]:
        print("  failures: %s" % env["failures_by_kind"])
    write_json(args.json, figures, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
