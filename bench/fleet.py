"""Fleet controller benchmark: telemetry ingest from a simulated fleet, and the time to roll out.

Everything runs on loopback against a real mosquitto (tests/mqtt_broker.py):

1. **Ingest.** Publisher processes play N devices, each sending one real `Telemetry` message per second
   on its own topic (QoS 0, as agents do), for `--seconds`: pre-built PUBLISH packets over a few raw
   sockets, each 50 ms slice of a second in one write per socket, each device's seq rising 1, 2, …
   (bench/_mqtt_load.py; its own CPU per 1,000 messages and lag behind schedule are figures too). The same
   traffic is received twice, one after the other in the same run:
   * *baseline*: a raw-socket subscriber process that only counts PUBLISH packets (the broker's raw
     delivery of this traffic on this machine);
   * the real controller, `fleet serve` in its own process (shared subscription, parse, validate,
     batched registry writes), whose counters are read over the RPC afterwards.
   Around the controller's measured window every device sends one more message at QoS 1 (seq 0 before,
   seq S+1 after), so every message the broker dropped is a gap the controllers can see; their own count
   of telemetry that reached none of them is set against the bench's exact count.
   Figures: messages/s received, messages lost (sent − received − shed: neither handled nor shed
   and counted by the controller — bounded backlog, per-device rate limit, size; target 0), shed messages
   (counted), CPU (percent of one core and per 1,000 messages, from /proc), peak resident memory, the worst
   RPC round trip while the traffic runs, and the load average (other work on the machine).
   At fleet scale (20,000 devices; --quick: 2,000) the same traffic is taken in by one and then by two
   `fleet serve` processes in one shared-subscription group on a PostgreSQL registry (a throw-away
   cluster, tests/pg_server.py), against the raw subscriber's rate in the same run; the busiest
   controller's CPU and share of the messages show the second one taking half the work.
   *Loss accounting*: one message in 50 never leaves its device (the load generator counts it as sent and
   does not write it); the controller's own count of telemetry that reached no controller must equal
   the bench's exact count.
2. **Rollout.** `fleet serve` + simulated devices (tests/sim_devices.py: one MQTT session playing every
   device; each verifies the signed command and reports the events and statuses of a healthy deploy,
   without fetching bytes) — the time from `rollout.start` (waves 10/30/100) until every device passed
   probation. Baseline: the same devices, the same signed deploy commands sent directly to all of them at
   once (no waves, no gates), until every device passed.
3. **Failover.** Two `fleet serve` on one PostgreSQL registry, a rollout to simulated devices; the
   rollout's owner is killed with -9 while wave 1 is in flight: the time until the other controller
   holds the rollout's lease (bound: lease 5 s + one 0.2 s tick) and until the rollout succeeded, and
   how many commands devices refused (a replayed or out-of-order sequence number; target 0).

    python bench/fleet.py                 # 1,000, 10,000 and 20,000 devices, rollout to 10,000
    python bench/fleet.py --quick         # 2,000 devices, rollout to 200, no failover (< 1 minute)
    python bench/fleet.py --phases scale  # only the 20,000-device phase (ingest, scale, failover, rollout)
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402

PREFIX = "bench/v1"
SHARED_TELEMETRY = "$share/fleet/%s/devices/+/telemetry" % PREFIX
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- processes


def _cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(CLK_TCK)


def _mem_kib(pid: int) -> Dict[str, int]:
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _telemetry_template(device_id: str) -> bytes:
    from edge_agent.protocol.messages import BundleRef, Telemetry

    t = Telemetry(
        device_id=device_id,
        ts=1.0,
        seq=0,
        period_s=1.0,
        uptime_s=100.0,
        qps=42.0,
        requests=42,
        errors=0,
        error_rate=0.0,
        latency_ms={"p50": 3.1, "p95": 5.2, "p99": 7.9},
        queue_depth=1,
        mean_batch=3.5,
        large_fraction=0.2,
        tau=0.8,
        cpu_percent=35.0,
        mem_used_mb=2100.0,
        mem_available_mb=5900.0,
        temperatures_c={"cpu": 48.5, "gpu": 47.0},
        throttled=False,
        bundle=BundleRef(name="digits", version=1),
        engine={"backend": "onnxruntime", "precision": "fp32"},
    )
    # ts, seq and uptime change per message (one run of the agent: ts - uptime stays put); everything
    # else is the realistic ~600-byte body.
    return (t.to_json().replace(b'"ts":1.0', b'"ts":%(ts)s').replace(b'"seq":0', b'"seq":%(seq)d')
            .replace(b'"uptime_s":100.0', b'"uptime_s":%(up)s'))


def device_templates(n: int) -> List[Tuple[bytes, bytes]]:
    """(topic, body template) of `n` simulated devices (ids sim-00000 …)."""
    from edge_agent.protocol import topics

    base = _telemetry_template("sim-XXXXX")
    out = []
    for i in range(n):
        d = "sim-%05d" % i
        out.append((topics.telemetry(PREFIX, d).encode(), base.replace(b"sim-XXXXX", d.encode())))
    return out


def run_publishers(host: str, port: int, devices: List[Tuple[bytes, bytes]], seconds: float, processes: int, *,
                   boot: float, drop_every: int = 0) -> Dict[str, float]:
    """Start publisher processes (bench/_mqtt_load.py), wait for them: messages sent, monotonic time of the
    first publish, worst lag behind schedule (s), and their CPU seconds."""
    from bench._mqtt_load import publisher_main

    q: Any = mp.Queue()
    delay = 1.0 + len(devices) / 20000.0  # time to start the processes
    start_at = time.time() + delay
    mono_start = time.monotonic() + delay
    procs = [
        mp.Process(target=publisher_main, args=({"host": host, "port": port, "devices": devices[k::processes],
                                                 "seconds": seconds, "start_at": start_at, "boot": boot,
                                                 "sockets": 2, "drop_every": drop_every}, q))
        for k in range(processes)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    return {"sent": sum(r["sent"] for r in results), "link_lost": sum(r["link_lost"] for r in results),
            "mono_start": mono_start,
            "behind_s": max(r["behind_s"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results)}


# ------------------------------------------------------------------------------------------ controller


def _pg_exec(url: str, sql: str, params: Tuple = ()) -> List[Tuple]:
    """One statement on the bench's PostgreSQL (waits for the schema a starting controller creates)."""
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                cur = conn.execute(sql, params)
                return list(cur.fetchall()) if cur.description else []
        except psycopg.errors.UndefinedTable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _fresh_pg_db(pg) -> str:
    """A new database in the bench's cluster, migrated (a registry opened once)."""
    from fleet.registry import Registry

    url = pg.create_db()
    Registry(url).close()
    return url


class ServeProcess:
    """`fleet serve` in its own process, with a fresh state dir and key."""

    def __init__(self, broker, workdir: Path, *, tick_s: float = 1.0, pg_url: Optional[str] = None,
                 client_id: str = "fleet-controller", key=None, lease_s: float = 10.0,
                 flush_s: float = 5.0) -> None:
        from edge_agent.signing import PrivateKey

        self.workdir = workdir
        self.host, self.port = broker.host, broker.port
        self.pg_url, self.client_id = pg_url, client_id
        workdir.mkdir(parents=True, exist_ok=True)
        self.key = key or PrivateKey.generate("controller")
        key_file = workdir / "controller.key"
        key_file.write_text(self.key.to_text())
        key_file.chmod(0o600)
        self.state = workdir / "state"
        rec = self.state / "store" / "bundles" / "digits"
        rec.mkdir(parents=True, exist_ok=True)
        # The rollout phase needs only the store's record of the bundle (simulated devices fetch no bytes).
        (rec / "2.json").write_text(
            json.dumps({"name": "digits", "version": 2, "manifest_sha256": "2" * 64, "manifest_size": 2000})
        )
        self.config = workdir / "fleet.toml"
        self.config.write_text(
            '[mqtt]\nhost = "%s"\nport = %d\nprefix = "%s"\nmax_queued_messages = 100000\n'
            '[controller]\nkey_file = "%s"\nstate_dir = "%s"\nclient_id = "%s"\n[rollouts]\ntick_interval_s = %g\n'
            'telemetry_flush_s = %g\n'
            % (broker.host, broker.port, PREFIX, key_file, self.state, client_id, tick_s, flush_s)
            + ('[registry]\nurl = "%s"\nlease_s = %g\n' % (pg_url, lease_s) if pg_url else "")
        )
        if pg_url:
            _pg_exec(pg_url, "INSERT INTO bundle_records (name, version, manifest_sha256, manifest_size, created) "
                     "VALUES ('digits', 2, %s, 2000, 0) ON CONFLICT DO NOTHING", ("2" * 64,))
        self.log = open(workdir / "serve.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "serve", "--config", str(self.config)],
            cwd=str(ROOT),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.rpc = None

    def connect(self):
        """An RPC client to this controller (waits until it answers)."""
        from edge_agent.config import MqttConfig
        from fleet.rpc import RpcClient, RpcTimeout

        cfg = MqttConfig(host=self.host, port=self.port, prefix=PREFIX)
        self.rpc = RpcClient.connect(cfg)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rpc.call("controller.status", timeout_s=2)
                return self.rpc
            except RpcTimeout:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("fleet serve did not answer; see %s" % (self.workdir / "serve.log"))

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until this controller's heartbeat is in the shared registry (it subscribed before that)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("fleet serve exited; see %s" % (self.workdir / "serve.log"))
            rows = _pg_exec(self.pg_url, "SELECT COUNT(*) FROM controllers WHERE client_id = %s AND heartbeat >= %s",
                            (self.client_id, time.time() - 5))
            if rows[0][0]:
                return
            time.sleep(0.2)
        raise RuntimeError("fleet serve %s did not start; see %s" % (self.client_id, self.workdir / "serve.log"))

    def status(self) -> Dict[str, Any]:
        """The controller's own counters."""
        return self.rpc.call("controller.status", timeout_s=30)

    def stop(self) -> None:
        """Stop it (SIGTERM) and close the client."""
        if self.rpc is not None:
            self.rpc.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# ----------------------------------------------------------------------------------------------- phases


def _load() -> List[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def ingest_baseline(broker, n: int, seconds: float, procs: int) -> Dict[str, float]:
    """The raw subscriber's view of the traffic (bench/_mqtt_load.py: counts PUBLISH packets, nothing else)."""
    from bench._mqtt_load import raw_subscriber_main

    ready, stop = mp.Event(), mp.Event()
    q: Any = mp.Queue()
    sub = mp.Process(target=raw_subscriber_main, args=(broker.host, broker.port, SHARED_TELEMETRY, ready, q, stop))
    sub.start()
    ready.wait(10)
    time.sleep(0.3)  # the SUBACK
    load0 = _load()
    cpu0 = _cpu_seconds(sub.pid)
    pub = run_publishers(broker.host, broker.port, device_templates(n), seconds, procs, boot=time.time() - 100.0)
    time.sleep(2.0)  # let the subscriber drain
    cpu = _cpu_seconds(sub.pid) - cpu0
    stop.set()
    r = q.get(timeout=30)
    sub.join(10)
    # CLOCK_MONOTONIC is system-wide on Linux, so the subscriber's timestamps compare with ours.
    elapsed = max(1e-9, (r["last"] or pub["mono_start"]) - pub["mono_start"])
    return {
        "sent": pub["sent"],
        "received": r["received"],
        "rate": r["received"] / elapsed,
        "elapsed_s": elapsed,
        "cpu_pct": 100.0 * cpu / elapsed,
        "behind_s": pub["behind_s"],
        "publisher_cpu_ms_per_1000": 1e6 * pub["cpu_s"] / max(1, pub["sent"]),
        "load_avg": [load0, _load()],
    }


def _wait_received(counters, target: int, timeout_s: float) -> Dict[str, Any]:
    """Poll the controllers' counters until `received` reaches `target` or stops moving for 5 s."""
    deadline = time.monotonic() + timeout_s
    last, last_change = None, time.monotonic()
    while True:
        st = counters()
        got = st["received"] + st["dropped"]
        if got >= target or time.monotonic() > deadline or time.monotonic() - last_change > 5.0:
            return st
        if got != last:
            last, last_change = got, time.monotonic()
        time.sleep(0.25)


def _wait_flushed(counters, timeout_s: float = 30.0) -> Dict[str, Any]:
    """Poll until every controller has nothing queued and nothing waiting for the registry (a flush ran)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = counters()
        if (st["queued"] == 0 and st["pending"] == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.25)


def ingest_controller(broker, workdir: Path, n: int, seconds: float, procs: int, *, controllers: int = 1,
                      pg_url: Optional[str] = None, flush_s: float = 5.0, drop_every: int = 0) -> Dict[str, float]:
    """The real controller(s)' view of the same traffic, and how fast the CLI is answered meanwhile.
    With `pg_url`, the controllers share a PostgreSQL registry and report their counters there.

    Around the measured window every device sends one more message (QoS 1, paced: all of them reach the
    broker): seq 0 before, seq S+1 after. Messages the broker dropped at the start or the end of the window
    are then sequence gaps like the ones in the middle, so the controllers' own count of messages that
    reached none of them covers the whole window, and is set against the bench's exact count."""
    import threading

    from bench._mqtt_load import send_round
    from fleet.rpc import RpcTimeout

    serves = [ServeProcess(broker, workdir / ("c%d" % k), pg_url=pg_url, client_id="bench-ctl-%d" % k,
                           flush_s=flush_s) for k in range(controllers)]
    devices = device_templates(n)
    boot = time.time() - 100.0  # every simulated agent started 100 s before the run
    try:
        rpc = serves[0].connect()
        for sv in serves[1:]:
            sv.wait_ready()

        def counters() -> Dict[str, Any]:
            return _ingest_counters(serves, rpc, pg_url)

        zero = counters()
        send_round(broker.host, broker.port, devices, 0, boot)
        _wait_received(counters, zero["received"] + zero["dropped"] + n, 60)
        before = _wait_flushed(counters)
        load0 = _load()
        cpu0 = [_cpu_seconds(sv.proc.pid) for sv in serves]
        rpc_ms: List[float] = []
        publishing = threading.Event()
        publishing.set()

        def probe() -> None:
            # `devices.list`-sized work is what an operator does during load; controller.status is cheaper.
            while publishing.is_set():
                t = time.monotonic()
                try:
                    rpc.call("controller.status", timeout_s=60)
                    rpc_ms.append((time.monotonic() - t) * 1000.0)
                except RpcTimeout:
                    rpc_ms.append(60000.0)
                time.sleep(0.5)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        pub = run_publishers(broker.host, broker.port, devices, seconds, procs, boot=boot, drop_every=drop_every)
        sent, mono_start = pub["sent"], pub["mono_start"]
        publishing.clear()
        prober.join(70)
        wall_start = time.time() - (time.monotonic() - mono_start)
        # Wait until the controllers have taken in everything they are going to get.
        st = _wait_received(counters, before["received"] + before["dropped"] + sent, seconds + 180)
        cpu_each = [_cpu_seconds(sv.proc.pid) - c for sv, c in zip(serves, cpu0)]
        cpu = sum(cpu_each)
        load1 = _load()
        received = st["received"] - before["received"]
        # The controllers stamp the wall-clock time of the last message they handled.
        done_at = mono_start + (st["last_message_at"] - wall_start)
        elapsed = max(1e-9, done_at - mono_start)
        send_round(broker.host, broker.port, devices, int(seconds) + 1, boot)
        end = _wait_received(counters, st["received"] + st["dropped"] + n, 60)
        end = _wait_flushed(counters)
        shed = st["dropped"] - before["dropped"]
        return {
            "controllers": controllers,
            "registry": "postgresql" if pg_url else "sqlite",
            "sent": sent,
            "received": received,
            "rate": received / elapsed,
            "elapsed_s": elapsed,
            "cpu_pct": 100.0 * cpu / elapsed,
            "cpu_ms_per_1000": 1000.0 * cpu / max(1, received) * 1000.0,
            # The busiest controller: its CPU and its share of the messages (with two, each takes about half).
            "busiest_cpu_pct": 100.0 * max(cpu_each) / elapsed,
            "busiest_share": max(a - b for a, b in zip(st["received_each"], before["received_each"]))
            / max(1, received) if len(st["received_each"]) == len(before["received_each"]) else None,
            "rss_mib": max(_mem_kib(sv.proc.pid).get("VmHWM", 0) for sv in serves) / 1024.0,
            "malformed": st["malformed"] - before["malformed"],
            # Neither handled nor shed-and-counted by a controller: lost between the devices and them.
            "lost": sent - received - shed,
            # What the controllers themselves count as sent by the devices but never received (sequence
            # gaps, their own shedding excluded), to set against `lost`.
            "counted_upstream_lost": (end["upstream_lost"] or 0) - (before["upstream_lost"] or 0),
            "dropped_overload": shed,
            "link_lost_simulated": pub["link_lost"],
            "closing_round_received": end["received"] + end["dropped"] - st["received"] - st["dropped"],
            "devices": st["devices"],
            "drain_s": max(0.0, done_at - (mono_start + seconds)),
            "behind_s": pub["behind_s"],
            "publisher_cpu_ms_per_1000": 1e6 * pub["cpu_s"] / max(1, sent),
            "rpc_ms_max": max(rpc_ms) if rpc_ms else None,
            "rpc_ms_median": sorted(rpc_ms)[len(rpc_ms) // 2] if rpc_ms else None,
            "load_avg": [load0, load1],
        }
    finally:
        for sv in serves:
            sv.stop()


def _ingest_counters(serves: List[ServeProcess], rpc, pg_url: Optional[str]) -> Dict[str, Any]:
    """Telemetry received / malformed / shed, summed over the controllers (from the shared registry's
    heartbeats with PostgreSQL, else from the only controller's RPC), and the latest message time."""
    if pg_url is None:
        st = rpc.call("controller.status", timeout_s=60)
        ing = [st["ingest"]]
        devices = st["devices"]
        upstream = st.get("telemetry_upstream", {}).get("lost")
    else:
        since = time.time() - 30
        rows = _pg_exec(pg_url, "SELECT client_id, stats FROM controllers WHERE heartbeat >= %s", (since,))
        ing = [json.loads(r[1])["ingest"] for r in sorted(rows)]
        devices = int(_pg_exec(pg_url, "SELECT COUNT(*) FROM devices")[0][0])
        upstream = int(_pg_exec(pg_url, "SELECT COALESCE(SUM(tel_lost_prior + GREATEST(0, tel_seq_max - "
                                "tel_seq_min + 1 - tel_received)), 0) FROM devices WHERE tel_boot IS NOT NULL")[0][0])
    return {
        "upstream_lost": upstream,
        "received": sum(i["received"]["telemetry"] for i in ing),
        "received_each": [i["received"]["telemetry"] for i in ing],
        "malformed": sum(sum(i["malformed"].values()) for i in ing),
        # Shed and counted: the bounded backlog, the per-device rate limit, oversize reports.
        "dropped": sum(i["dropped"]["telemetry"] + i.get("rate_limited", 0) + i.get("oversize", 0) for i in ing),
        "queued": sum(i.get("queued", 0) for i in ing),
        "pending": sum(i.get("pending_telemetry", 0) for i in ing),
        "last_message_at": max((i["last_message_at"] or 0.0) for i in ing) if ing else 0.0,
        "devices": devices,
    }


def rollout_phase(broker, workdir: Path, n: int) -> Dict[str, float]:
    """Time to roll out to `n` simulated devices in waves, and the same deploys sent directly."""
    from sim_devices import SimFleet

    from edge_agent.config import MqttConfig
    from edge_agent.protocol.messages import BundleRef

    cfg = MqttConfig(host=broker.host, port=broker.port, prefix=PREFIX, max_queued_messages=100000)
    serve = ServeProcess(broker, workdir, tick_s=0.2)
    ids = ["sim-%05d" % i for i in range(n)]
    fleet = SimFleet(
        cfg,
        ids,
        trusted={serve.key.keyid: serve.key.public},
        initial=BundleRef(name="digits", version=1),
        step_s=0.01,
        client_id="bench-sims",
    )
    try:
        fleet.start()
        rpc = serve.connect()
        deadline = time.monotonic() + 60
        while serve.status()["devices"] < n:
            if time.monotonic() > deadline:
                raise RuntimeError("controller registered only %d of %d devices" % (serve.status()["devices"], n))
            time.sleep(0.2)
        cpu0 = _cpu_seconds(serve.proc.pid)
        t0 = time.monotonic()
        r = rpc.call(
            "rollout.start", {"bundle": {"name": "digits", "version": 2}, "waves": [10, 30, 100]}, timeout_s=120
        )
        waves = []
        while True:
            s = rpc.call("rollout.status", {"rollout_id": r["rollout_id"], "history": 0, "devices": False},
                         timeout_s=60)
            waves = [w["devices"] for w in s["wave_progress"]]
            if s["state"] in ("succeeded", "halted", "aborted", "stalled"):
                break
            if time.monotonic() - t0 > 600:
                raise RuntimeError("rollout did not finish in 600 s: %s" % s["state"])
            time.sleep(0.1)
        rollout_s = time.monotonic() - t0
        cpu = _cpu_seconds(serve.proc.pid) - cpu0
        ok = sum(w["succeeded"] for w in s["wave_progress"])
        # Baseline: the same signed deploy (version 3) to every device at once, timed until all passed.
        from edge_agent.protocol.commands import sign_command
        from edge_agent.protocol.messages import DeployArgs

        passed = {"n": 0}
        seen = set()

        def count(msg) -> None:
            if b'"probation-passed"' in msg.payload and b'"version":3' in msg.payload and msg.topic not in seen:
                seen.add(msg.topic)
                passed["n"] += 1

        from edge_agent.mqtt.session import MqttSession, require_connected
        from edge_agent.protocol import topics

        watcher = MqttSession(cfg, client_id="bench-watch", name="bench-watch")
        watcher.subscribe(topics.all_devices(PREFIX, "events"), count, qos=1)
        pusher = MqttSession(cfg, client_id="bench-push", outgoing_queue=n + 10, name="bench-push")
        watcher.start()
        pusher.start()
        require_connected(watcher, 10)
        require_connected(pusher, 10)
        time.sleep(0.3)
        args = DeployArgs(bundle=BundleRef(name="digits", version=3), manifest_sha256="3" * 64, manifest_size=3000)
        t1 = time.monotonic()
        seq0 = int(time.time() * 1000) + 10**7  # above the controller's counter
        for d in ids:
            pusher.publish(
                topics.commands(PREFIX, d),
                sign_command(args, device_id=d, seq=seq0, keys=[serve.key], now=int(time.time())),
                qos=1,
            )
        while passed["n"] < n and time.monotonic() - t1 < 300:
            time.sleep(0.02)
        direct_s = time.monotonic() - t1
        watcher.stop()
        pusher.stop()
        return {
            "rollout_s": rollout_s,
            "state": s["state"],
            "succeeded": ok,
            "waves": waves,
            "direct_s": direct_s,
            "direct_passed": passed["n"],
            "cpu_s": cpu,
        }
    finally:
        fleet.stop()
        serve.stop()


def failover_phase(broker, workdir: Path, pg_url: str, n: int, lease_s: float) -> Dict[str, float]:
    """Two controllers on one PostgreSQL registry; a rollout to `n` simulated devices; its owner is
    killed with -9 while wave 1 is in flight. Measured: the time from the kill until the other
    controller holds the rollout's lease (failover), and until the rollout succeeded."""
    import signal

    from sim_devices import SimFleet

    from edge_agent.config import MqttConfig
    from edge_agent.protocol.messages import BundleRef

    cfg = MqttConfig(host=broker.host, port=broker.port, prefix=PREFIX, max_queued_messages=100000)
    a = ServeProcess(broker, workdir / "a", tick_s=0.2, pg_url=pg_url, client_id="bench-a", lease_s=lease_s)
    b = ServeProcess(broker, workdir / "b", tick_s=0.2, pg_url=pg_url, client_id="bench-b", key=a.key,
                     lease_s=lease_s)
    ids = ["sim-%05d" % i for i in range(n)]
    fleet = SimFleet(cfg, ids, trusted={a.key.keyid: a.key.public}, initial=BundleRef(name="digits", version=1),
                     step_s=0.3, client_id="bench-sims-failover")
    serves = {"bench-a": a, "bench-b": b}
    try:
        fleet.start()
        rpc = a.connect()
        b.wait_ready()
        deadline = time.monotonic() + 60
        while int(_pg_exec(pg_url, "SELECT COUNT(*) FROM devices")[0][0]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the registry did not learn every device")
            time.sleep(0.2)
        r = rpc.call("rollout.start", {"bundle": {"name": "digits", "version": 2}, "waves": [10, 30, 100]},
                     timeout_s=120)
        rid = r["rollout_id"]
        while not _pg_exec(pg_url, "SELECT 1 FROM rollout_devices WHERE rollout_id = %s AND state IN "
                           "('sent', 'in-progress') LIMIT 1", (rid,)):
            time.sleep(0.05)
        owner = _pg_exec(pg_url, "SELECT owner FROM rollout_leases WHERE rollout_id = %s", (rid,))[0][0]
        victim = serves[owner.split("@")[0]]
        os.kill(victim.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        victim.proc.wait(10)
        failover_s = None
        state = None
        while time.monotonic() - t_kill < 300:
            now_owner = _pg_exec(pg_url, "SELECT owner FROM rollout_leases WHERE rollout_id = %s", (rid,))[0][0]
            if failover_s is None and now_owner != owner:
                failover_s = time.monotonic() - t_kill
            state = _pg_exec(pg_url, "SELECT state FROM rollouts WHERE rollout_id = %s", (rid,))[0][0]
            if state in ("succeeded", "halted", "aborted", "stalled"):
                break
            time.sleep(0.05)
        finished_s = time.monotonic() - t_kill
        refused = sum(len(d.refused) for d in fleet.devices.values())
        wrong = sum(1 for d in fleet.devices.values() if any(c != "deploy" for c in d.commands))
        return {"failover_s": failover_s, "finished_after_kill_s": finished_s, "state": state, "lease_s": lease_s,
                "tick_s": 0.2, "devices": n, "refused_commands": refused, "devices_with_other_commands": wrong,
                "succeeded": sum(1 for d in fleet.devices.values() if d.active and d.active.version == 2)}
    finally:
        fleet.stop()
        for sv in (a, b):
            if sv.proc.poll() is None:
                sv.stop()
            else:
                sv.log.close()


def _progress(name: str, detail: Dict[str, Any]) -> None:
    """Each phase's raw numbers as soon as it ends (a later phase failing does not lose them)."""
    print("%s: %s" % (name, json.dumps(detail, sort_keys=True)), file=sys.stderr, flush=True)


def _ingest_figures(n: int, label: str, base: Dict[str, float], ctl: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The ingest figures of one measurement (`label` empty for the original single-controller ones, so
    their names stay as they were)."""
    out = [
        figure("ingest rate, %d devices x 1 msg/s%s" % (n, label), round(ctl["rate"], 1), "msg/s",
               baseline=round(base["rate"], 1), target=0.95 * n),
        figure("messages lost, %d devices%s" % (n, label), ctl["lost"], "messages",
               baseline=base["sent"] - base["received"], target=0, higher_is_better=False),
        figure("controller CPU, %d devices%s" % (n, label), round(ctl["cpu_pct"], 1), "% of one core",
               baseline=round(base["cpu_pct"], 1), higher_is_better=False),
        figure("controller CPU per 1,000 messages, %d devices%s" % (n, label), round(ctl["cpu_ms_per_1000"], 1),
               "ms", higher_is_better=False),
        figure("controller peak RSS, %d devices%s" % (n, label), round(ctl["rss_mib"], 1), "MiB",
               higher_is_better=False),
        figure("dropped by the bounded ingest backlog, %d devices%s" % (n, label), ctl["dropped_overload"],
               "messages", target=0, higher_is_better=False),
        figure("lost upstream as counted by the controllers (sequence gaps), %d devices%s" % (n, label),
               ctl["counted_upstream_lost"], "messages", baseline=ctl["lost"], higher_is_better=False),
        figure("RPC round trip under load (max), %d devices%s" % (n, label), ctl["rpc_ms_max"], "ms", target=1000,
               higher_is_better=False),
        figure("messages the controllers received (counted or shed), %d devices%s" % (n, label),
               ctl["received"] + ctl["dropped_overload"], "messages", baseline=base["received"], target=ctl["sent"]),
        figure("load generator behind schedule, %d devices%s" % (n, label), round(ctl["behind_s"], 2), "s",
               baseline=round(base["behind_s"], 2), target=0.5, higher_is_better=False),
        figure("load generator CPU per 1,000 messages, %d devices%s" % (n, label),
               round(ctl["publisher_cpu_ms_per_1000"], 1), "ms", baseline=round(base["publisher_cpu_ms_per_1000"], 1),
               higher_is_better=False),
        figure("busiest controller CPU, %d devices%s" % (n, label), round(ctl["busiest_cpu_pct"], 1), "% of one core",
               higher_is_better=False),
        figure("busiest controller's share of the messages, %d devices%s" % (n, label),
               None if ctl["busiest_share"] is None else round(ctl["busiest_share"], 3), "fraction",
               higher_is_better=False),
        figure("load average (1 min) after the measurement, %d devices%s" % (n, label), ctl["load_avg"][1][0],
               "runnable tasks (2 cores)", baseline=base["load_avg"][1][0], higher_is_better=False),
    ]
    return out


def _scale_phase(broker, pg, work: Path, n: int, seconds: float, *, details: Dict[str, Any],
                 flush_s: float) -> List[Dict[str, Any]]:
    """`n` devices taken in by one and by two controllers on one PostgreSQL registry, vs raw delivery."""
    procs = 1 if n <= 10000 else 2
    base = ingest_baseline(broker, n, seconds, procs)
    details["scale_%d" % n] = {"baseline": base}
    out = []
    for k in (1, 2):
        ctl = ingest_controller(broker, work / ("scale-%d-%d" % (n, k)), n, seconds, procs, controllers=k,
                                pg_url=_fresh_pg_db(pg), flush_s=flush_s)
        details["scale_%d" % n]["controllers_%d" % k] = ctl
        _progress("scale_%d_controllers_%d" % (n, k), {"baseline": base, "controller": ctl})
        label = ", %d controller%s, PostgreSQL" % (k, "s" if k > 1 else "")
        out += _ingest_figures(n, label, base, ctl)
    return out


def _loss_figures(broker, work: Path, n: int, seconds: float, *, details: Dict[str, Any],
                  flush_s: float) -> List[Dict[str, Any]]:
    """One message in 50 never leaves its device (a lossy link, simulated by the load generator): the
    controller's own count of telemetry that reached no controller, against the bench's exact count."""
    ctl = ingest_controller(broker, work / "loss", n, seconds, 1, flush_s=flush_s, drop_every=50)
    details["loss_%d" % n] = ctl
    _progress("loss_%d" % n, ctl)
    return [
        figure("lost upstream as counted by the controller, %d devices, 1 in 50 messages never published" % n,
               ctl["counted_upstream_lost"], "messages", baseline=ctl["lost"], target=ctl["lost"]),
        figure("messages lost beyond the simulated link loss, %d devices" % n,
               ctl["lost"] - ctl["link_lost_simulated"], "messages", target=0, higher_is_better=False),
    ]


def _failover_figures(broker, pg, work: Path, n: int, details: Dict[str, Any]) -> List[Dict[str, Any]]:
    fo = failover_phase(broker, work / "failover", _fresh_pg_db(pg), n, lease_s=5.0)
    details["failover"] = fo
    _progress("failover", fo)
    return [
        figure("failover after kill -9 of the rollout owner (%d devices, lease 5 s, tick 0.2 s)" % n,
               None if fo["failover_s"] is None else round(fo["failover_s"], 2), "s", target=5.2,
               higher_is_better=False),
        figure("rollout finished after the owner's kill -9", round(fo["finished_after_kill_s"], 2), "s",
               higher_is_better=False),
        figure("devices refusing a command during failover", fo["refused_commands"], "commands", target=0,
               higher_is_better=False),
    ]


def _rollout_figures(broker, work: Path, n: int, details: Dict[str, Any]) -> List[Dict[str, Any]]:
    ro = rollout_phase(broker, work / "rollout", n)
    details["rollout"] = ro
    _progress("rollout", ro)
    return [
        figure("rollout to %d devices (waves %s), until all passed probation"
               % (n, "/".join(str(w) for w in ro["waves"])), round(ro["rollout_s"], 2), "s",
               baseline=round(ro["direct_s"], 2), higher_is_better=False),
        figure("rollout devices succeeded", ro["succeeded"], "devices", target=n),
    ]


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=None, help="telemetry duration per measurement")
    p.add_argument("--phases", default=None,
                   help="comma-separated subset of: ingest, scale, loss, failover, rollout (default: all; "
                        "--quick: scale, loss, rollout — failover waits out a 15 s resend grace)")
    p.add_argument("--scale-devices", type=int, default=None, help="devices of the scale phase")
    args = p.parse_args()
    phases = set((args.phases or ("scale,loss,rollout" if args.quick else
                                  "ingest,scale,loss,failover,rollout")).split(","))
    from mqtt_broker import Broker

    sizes = (2000,) if args.quick else (1000, 10000)
    sizes = sizes if "ingest" in phases else ()
    scale_n = args.scale_devices or (2000 if args.quick else 20000)  # 1 and 2 controllers, PostgreSQL registry
    rollout_n = 200 if args.quick else 10000
    failover_n = 50 if args.quick else 500
    loss_n = 2000 if args.quick else 5000
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    # --quick: summaries written every second instead of every 5 s, so the waits for a flush are short.
    flush_s = 1.0 if args.quick else 5.0
    load_start = _load()
    figures = []
    details: Dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    from pg_server import PgServer

    pg = PgServer()
    try:
        with Broker(work / "broker", extra_conf="max_queued_messages 100000\n") as broker:
            for n in sizes:
                procs = 1 if n <= 10000 else 2
                base = ingest_baseline(broker, n, seconds, procs)
                ctl = ingest_controller(broker, work / ("ingest-%d" % n), n, seconds, procs, flush_s=flush_s)
                details["ingest_%d" % n] = {"baseline": base, "controller": ctl}
                _progress("ingest_%d" % n, details["ingest_%d" % n])
                figures += _ingest_figures(n, "", base, ctl)
            if "scale" in phases:
                figures += _scale_phase(broker, pg, work, scale_n, seconds, details=details, flush_s=flush_s)
            if "loss" in phases:
                figures += _loss_figures(broker, work, loss_n, seconds, details=details, flush_s=flush_s)
            if "failover" in phases:
                figures += _failover_figures(broker, pg, work, failover_n, details)
            if "rollout" in phases:
                figures += _rollout_figures(broker, work, rollout_n, details)
    finally:
        pg.close()
    print_table(figures, "fleet controller (%s)" % ("quick" if args.quick else "full"))
    for k, v in details.items():
        print("%s: %s" % (k, json.dumps(v, sort_keys=True)))
    write_json(args.json, figures, environment(seconds_per_measurement=seconds, details=details,
                                               load_avg_start=load_start, load_avg_end=_load()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
