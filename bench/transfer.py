"""Bundle pull over MQTT: the agent's throughput against raw MQTT, a chunk-size sweep, and the bytes
re-sent after a `kill -9` at 50%.

Everything runs on loopback against a real mosquitto started for the run:

* **agent pull**: a real `edge-agent run` process receives a signed deploy command from the controller
  (`fleet.controller.Controller`, the code `fleet serve` runs, in this process) and pulls a bundle whose
  payload is one large random file. The figure is the agent's own measurement in its `fetch-done` event:
  payload bytes / time from the first chunk request to the last file verified and stored (sha256,
  fsync, rename included).
* **baseline**: the same bytes, read from the same file, published by a plain paho client in this process
  to a plain paho subscriber in a child process, at the same chunk size and QoS 1, no protocol (no
  requests, no checks, the subscriber only counts bytes). Measured in the same run, per chunk size.
* **chunk-size sweep**: 64 KiB to 1 MiB on the smaller bundle, agent and baseline each.
* agent and baseline run in interleaved rounds (3; `--quick`: 2); figures are medians over the rounds.
* **CPU per GB** on the receiving side: the agent process's CPU time during its pull (all threads:
  receive, checks, sha256, disk writes; from its fetch-done event) against the baseline subscriber's
  CPU time from its first message to its last. Wall-clock rates swing with whatever else the machine
  runs; CPU per byte barely does, so it shows the cost of the pull itself.
* **kill -9 at 50%**: the agent is SIGKILLed when its progress passes 50% and started again; the figure
  is the bytes the controller had to send more than once (served bytes − file size), against the file
  size as the baseline (what a restart from zero would re-send).

`--quick` uses 32 and 64 MiB instead of 64 and 256 MiB.

Reading the numbers: broker, controller and agent (or publisher and subscriber) share the machine's
cores. The agent does per byte what the baseline subscriber does not (sha256, a write to disk, a
request per chunk), so where the cores are the limit the ratio shows that work; the raw ceiling also
moves a lot with whatever else runs on the machine, hence the interleaved rounds and medians.
"""

from __future__ import annotations

import os
import statistics
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

KIB = 1024
MIB = 1024 * 1024
DEFAULT_CHUNK = 256 * KIB
TARGET_RATIO = 0.70

_SUBSCRIBER = r"""
import sys, time
import paho.mqtt.client as mqtt
host, port, topic, expected = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
state = {"n": 0, "first": None, "last": None, "cpu0": 0.0, "cpu": 0.0}
def on_connect(c, u, f, rc, p):
    c.subscribe(topic, qos=1)
def on_subscribe(c, u, mid, rcs, p):
    print("ready", flush=True)
def on_message(c, u, m):
    now = time.time()
    if state["first"] is None:
        state["first"] = now
        state["cpu0"] = time.process_time()
    state["n"] += len(m.payload)
    if state["n"] >= expected:
        state["last"] = now
        state["cpu"] = time.process_time() - state["cpu0"]
        c.disconnect()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=mqtt.MQTTv5)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, port)
c.loop_forever()
print("done %r %r %d %r" % (state["first"], state["last"], state["n"], state["cpu"]), flush=True)
"""


def make_blob(path: Path, size: int) -> None:
    """A file of `size` random bytes (random: nothing on the way can compress it)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def baseline(broker, blob: Path, chunk: int) -> Tuple[float, float]:
    """Raw MQTT: publish the file's bytes in `chunk`-sized QoS 1 messages to a plain subscriber.
    Returns MB/s from the first publish to the last byte received, and the subscriber's CPU seconds
    from its first message to its last."""
    import paho.mqtt.client as mqtt

    size = blob.stat().st_size
    topic = "bench/raw/%d" % chunk
    sub = subprocess.Popen([sys.executable, "-c", _SUBSCRIBER, broker.host, str(broker.port), topic, str(size)],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "ready":
        raise RuntimeError("baseline subscriber did not start")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(64)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    time.sleep(0.2)
    start = time.time()
    info = None
    with open(blob, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            info = pub.publish(topic, data, qos=1)
    out = sub.communicate(timeout=600)[0].strip().split()
    if info is not None:
        info.wait_for_publish(30)
    pub.loop_stop()
    pub.disconnect()
    last = float(out[2])
    return size / (last - start) / 1e6, float(out[4])


class AgentRun:
    """A controller in this process and `edge-agent run` processes pulling from it."""

    def __init__(self, broker, tmp: Path) -> None:
        from agent_helpers import Watcher, agent_toml, write_key

        from edge_agent.config import MqttConfig
        from fleet.config import FleetConfig
        from fleet.controller import Controller

        self.broker = broker
        self.tmp = tmp
        self.release = write_key(tmp / "bundle-keys", "release")
        self.ckey = write_key(tmp / "controller-keys", "controller")
        mq = MqttConfig(host=broker.host, port=broker.port)
        fc = FleetConfig.model_validate({"mqtt": mq.model_dump(), "controller": {"state_dir": str(tmp / "ctl")}})
        self.ctl = Controller(fc, key=self.ckey)
        self.ctl.start()
        assert self.ctl.wait_connected(10)
        self.watcher = Watcher(broker.host, broker.port)
        self._agent_toml = agent_toml
        self._n = 0

    def add_bundle(self, name: str, blob: Path):
        """Build a signed sample bundle carrying `blob` and store it in the controller."""
        from agent_helpers import build_sample_bundle

        out = build_sample_bundle(self.tmp / ("b-" + name), self.release, name=name, version=1,
                                  extra_files={"payload/blob.bin": blob})
        body, _, _ = self.ctl.add_bundle(out)
        out.unlink()  # the controller has its own copy
        return body

    def _agent(self, device: str, chunk: int, window: int = 8) -> subprocess.Popen:
        from agent_helpers import start_agent

        cfg = self._agent_toml(
            self.tmp / ("%s.toml" % device), device_id=device, state_dir=self.tmp / ("state-" + device),
            port=self.broker.port, bundle_keys=self.tmp / "bundle-keys",
            command_key=self.tmp / "controller-keys" / "controller.pub",
            extra="[transfer]\nchunk_bytes = %d\nwindow = %d\nprogress_interval_s = 0.2" % (chunk, window),
        )
        started = time.time()
        p = start_agent(cfg, self.tmp / ("%s.log" % device))
        w = self.watcher
        w.wait_for(lambda: w.status.get(device, {}).get("online") and w.status[device]["ts"] >= started - 1, 60,
                   "%s online" % device)
        return p

    def pull(self, body, chunk: int, *, kill_at: Optional[float] = None, window: int = 8) -> Dict[str, Any]:
        """Deploy `body` to a fresh agent; return the agent's fetch-done data (and served bytes)."""
        from agent_helpers import stop_process

        self._n += 1
        device = "bench-%d" % self._n
        w = self.watcher
        served0 = self.ctl.chunks.stats["served_bytes"]
        p = self._agent(device, chunk, window)
        self.ctl.send_command(device, self.ctl.deploy_args(body.name, body.version)).wait(10)
        result: Dict[str, Any] = {}
        try:
            if kill_at is not None:
                w.wait_for(lambda: any(e["data"].get("percent", 0) >= kill_at
                                       for e in w.find(device, "fetch-progress")), 600, "progress")
                p.kill()
                p.wait(10)
                result["percent_at_kill"] = max(e["data"]["percent"] for e in w.find(device, "fetch-progress"))
                time.sleep(0.5)
                p = self._agent(device, chunk, window)
            w.wait_for(lambda: bool(w.find(device, "fetch-done") or w.find(device, "fetch-failed")), 900,
                       "fetch-done")
            if w.find(device, "fetch-failed"):
                raise RuntimeError(w.find(device, "fetch-failed")[0]["message"])
            result.update(w.find(device, "fetch-done")[-1]["data"])
            # Let answers to requests still in flight at the end settle before reading the counter.
            time.sleep(0.3)
            result["served_bytes"] = self.ctl.chunks.stats["served_bytes"] - served0
        finally:
            stop_process(p)
        return result

    def close(self) -> None:
        """Stop the controller and the watcher."""
        self.ctl.stop()
        self.watcher.close()


def _rate(res: Dict[str, Any]) -> float:
    """MB/s of one pull, from the agent's own fetch-done figures."""
    return res["bytes_received"] / res["elapsed_s"] / 1e6


def _rounds(run: AgentRun, broker, body, blob: Path, chunk: int, *, rounds: int):
    """Interleaved agent/raw rounds: (median agent MB/s, median raw MB/s, median ratio, per-round results)."""
    results = []
    for _ in range(rounds):
        raw, raw_cpu = baseline(broker, blob, chunk)
        res = run.pull(body, chunk)
        res["raw"] = raw
        res["raw_cpu_s"] = raw_cpu
        results.append(res)
    agent = statistics.median(_rate(r) for r in results)
    base = statistics.median(r["raw"] for r in results)
    ratio = statistics.median(_rate(r) / r["raw"] for r in results)
    return agent, base, ratio, results


def _cpu_per_gb(cpu_s: float, nbytes: int) -> float:
    """CPU seconds per GB (1e9 bytes)."""
    return cpu_s / max(1, nbytes) * 1e9


def _list(values) -> str:
    return "/".join("%.0f" % v for v in values)


def main() -> int:
    """Run the benchmark."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    from mqtt_broker import Broker

    sizes = [32 * MIB, 64 * MIB] if args.quick else [64 * MIB, 256 * MIB]
    sweep = [64 * KIB, 256 * KIB, 1 * MIB] if args.quick else [64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB]
    # Loopback numbers on a small shared machine are noisy: agent and baseline run in interleaved rounds
    # and each figure is the median over rounds (the ratio: the median of the per-round ratios).
    rounds = 2 if args.quick else 3
    figures: List[Dict[str, Any]] = []
    rows: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as td:
        tmp = Path(td)
        broker = Broker(tmp / "mosquitto")
        run = AgentRun(broker, tmp)
        try:
            blobs = {}
            bodies = {}
            for size in sizes:
                blob = tmp / ("blob-%d" % size)
                make_blob(blob, size)
                blobs[size] = blob
                bodies[size] = run.add_bundle("bench-%dm" % (size // MIB), blob)
            # Main figures: each size at the default chunk size.
            for size in sizes:
                agent, base, ratio, results = _rounds(run, broker, bodies[size], blobs[size], DEFAULT_CHUNK,
                                                      rounds=rounds)
                label = "%d MiB @ 256 KiB" % (size // MIB)
                figures.append(figure("agent pull %s" % label, round(agent, 1), "MB/s", baseline=round(base, 1)))
                figures.append(figure("agent/raw ratio %s" % label, round(ratio, 3), "ratio", baseline=1.0,
                                      target=TARGET_RATIO))
                rows.append("%s: agent %s MB/s, raw %s MB/s per round; %d retries, %d bad chunks in all"
                            % (label, _list(_rate(r) for r in results), _list(r["raw"] for r in results),
                               sum(r["retries"] for r in results), sum(r["bad_chunks"] for r in results)))
                # CPU per byte on the receiving side: far less sensitive to what else runs on the machine.
                agent_cpu = statistics.median(_cpu_per_gb(r["cpu_s"], r["bytes_received"]) for r in results)
                raw_cpu = statistics.median(_cpu_per_gb(r["raw_cpu_s"], size) for r in results)
                figures.append(figure("agent CPU per GB pulled %s" % label, round(agent_cpu, 2), "CPU-s/GB",
                                      baseline=round(raw_cpu, 2), higher_is_better=False))
                rows.append("%s: agent process %s CPU-s/GB, raw subscriber %s CPU-s/GB per round"
                            % (label, "/".join("%.2f" % _cpu_per_gb(r["cpu_s"], r["bytes_received"]) for r in results),
                               "/".join("%.2f" % _cpu_per_gb(r["raw_cpu_s"], size) for r in results)))
            # Chunk-size sweep on the smaller bundle.
            small = sizes[0]
            for chunk in sweep:
                agent, base, ratio, _ = _rounds(run, broker, bodies[small], blobs[small], chunk, rounds=rounds)
                label = "%d MiB @ %d KiB" % (small // MIB, chunk // KIB)
                figures.append(figure("sweep agent pull %s" % label, round(agent, 1), "MB/s", baseline=round(base, 1)))
                rows.append("sweep %s: agent %.1f MB/s, raw %.1f MB/s, ratio %.2f (medians)"
                            % (label, agent, base, ratio))
            # kill -9 at 50%, restart, completion. On loopback the whole pull takes well under the
            # agent's checkpoint interval (1 s), so the controller is capped to make the pull last about
            # 8 s, as over a real device link; what is re-sent is then what a real link would re-send.
            payload = bodies[small].total_size()
            cap = payload // 8
            run.ctl.chunks.set_rate(cap)
            try:
                res = run.pull(bodies[small], DEFAULT_CHUNK, kill_at=50.0)
            finally:
                run.ctl.chunks.set_rate(None)
            resent = max(0, res["served_bytes"] - payload)
            figures.append(figure("bytes re-sent after kill -9 at %.0f%% (%d MiB)" % (res["percent_at_kill"],
                                                                                     small // MIB),
                                  resent, "bytes", baseline=payload, higher_is_better=False))
            figures.append(figure("bytes resumed from the chunk map after kill -9", res["bytes_resumed"], "bytes",
                                  baseline=payload))
            rows.append("kill -9 (controller capped at %.1f MB/s)" % (cap / 1e6))
            rows.append("kill -9 at %.0f%%: second run fetched %d bytes, resumed %d, controller served %d in total "
                        "for a %d byte bundle (%d re-sent)" % (res["percent_at_kill"], res["bytes_received"],
                                                               res["bytes_resumed"], res["served_bytes"], payload,
                                                               resent))
        finally:
            run.close()
            broker.close()
    print_table(figures, "bundle pull over MQTT (loopback mosquitto)")
    for r in rows:
        print("  " + r)
    env = environment(broker="mosquitto (tests/mosquitto-test.conf)", default_chunk_bytes=DEFAULT_CHUNK,
                      window=8, quick=bool(args.quick))
    write_json(args.json, figures, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
