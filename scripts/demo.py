"""The whole loop on loopback, with real parts: a mosquitto broker, `fleet serve`, several `edge-agent run`
processes on the ONNX Runtime CPU backend (each with its own state dir and local HTTP API), the sample
digit models built into a signed bundle and rolled out in waves, inference through the DynamicRouter,
telemetry, and then a bundle that breaks its health gate: its rollout halts in the first wave, the
device that took it rolls itself back, and later waves never receive it.

Run it through `scripts/demo.sh` (which installs what it needs). Everything lives in a temporary folder
that is removed at the end (`--keep` keeps it, with every process's log, and keeps everything running
with the web console up, traffic flowing, until Ctrl-C). The console's URL and an operator token are
printed when the controller starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "digits96"
#: Held-out items the traffic clients cycle through (rendered at start-up, about 0.5 ms each).
DEMO_ITEMS = 600
PY = sys.executable


def say(title: str) -> None:
    """A section heading."""
    print("\n\033[1m== %s\033[0m" % title, flush=True)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str:
    """The mosquitto binary (Debian puts it in /usr/sbin, which may not be on PATH)."""
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("mosquitto is not installed: run scripts/demo.sh, or apt-get install mosquitto")


class Demo:
    """Starts and stops every process of the demo; owns the temporary folder."""

    def __init__(self, tmp: Path, devices: int) -> None:
        self.tmp = tmp
        self.device_ids = ["edge-%02d" % (i + 1) for i in range(devices)]
        self.procs: List[subprocess.Popen] = []
        self.api_ports: Dict[str, int] = {}
        self.port = free_port()
        self.fleet_toml = tmp / "fleet.toml"
        self.console_port = free_port()
        self.console_token = ""

    # ------------------------------------------------------------------------------------------ processes

    def spawn(self, name: str, argv: List[str]) -> subprocess.Popen:
        """Start a long-running process with its output in `<name>.log`."""
        log = open(self.tmp / ("%s.log" % name), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO))
        self.procs.append(p)
        return p

    def cli(self, *args: str, check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
        """Run `fleet ...` the way an operator would, and show what it prints."""
        argv = [PY, "-m", "fleet.cli", *args]
        if show:
            print("$ fleet %s" % " ".join(a if " " not in a else repr(a) for a in args), flush=True)
        r = subprocess.run(argv, check=False, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        if show:
            print(r.stdout.rstrip(), flush=True)
        if check and r.returncode != 0:
            raise SystemExit("fleet %s failed with exit code %d" % (args[0], r.returncode))
        return r

    def start_broker(self) -> None:
        """mosquitto on a free loopback port (MQTT 5 is always on)."""
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(
            "listener %d 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
            "max_packet_size 2000000\nlog_dest stdout\n" % self.port
        )
        self.spawn("mosquitto", [find_mosquitto(), "-c", str(conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                print("mosquitto listening on 127.0.0.1:%d" % self.port)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("mosquitto did not start; see %s" % (self.tmp / "mosquitto.log"))

    def make_keys(self) -> None:
        """A release key signs bundles; the controller key signs commands. Devices trust each for its job."""
        self.cli("keygen", "--out", str(self.tmp / "keys"), "--name", "release")
        self.cli("keygen", "--out", str(self.tmp / "keys"), "--name", "controller", show=False)
        for name, folder in (("release", "bundle-keys"), ("controller", "command-keys")):
            (self.tmp / folder).mkdir()
            shutil.copy(self.tmp / "keys" / ("%s.pub" % name), self.tmp / folder / ("%s.pub" % name))

    def start_controller(self) -> None:
        """`fleet serve` with the registry, chunk server and rollouts under the temp folder."""
        self.fleet_toml.write_text(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = %d\n"
            "[controller]\nkey_file = \"%s\"\nstate_dir = \"%s\"\n"
            "[rollouts]\ntelemetry_flush_s = 1.0\ndevice_timeout_s = 120.0\n"
            "[registry]\nhistory_interval_s = 2.0\n"
            "[console]\nenabled = true\nport = %d\n"
            % (self.port, self.tmp / "keys" / "controller.key", self.tmp / "controller", self.console_port)
        )
        self.console_token = self.cli("token", "add", "--role", "operator", "--name", "demo", "--config",
                                      str(self.fleet_toml), show=False).stdout.splitlines()[0]
        self.spawn("fleet-serve", [PY, "-m", "fleet.cli", "serve", "--config", str(self.fleet_toml)])
        print("web console: http://127.0.0.1:%d/  (operator token: %s)" % (self.console_port, self.console_token),
              flush=True)

    def start_agents(self) -> None:
        """One `edge-agent run` per device, CPU backend, a short probation window for the demo."""
        for dev in self.device_ids:
            api_port = free_port()
            self.api_ports[dev] = api_port
            cfg = self.tmp / ("%s.toml" % dev)
            cfg.write_text(
                "\n".join([
                    'device_id = "%s"' % dev,
                    'state_dir = "%s"' % (self.tmp / ("state-" + dev)),
                    "[mqtt]", 'host = "127.0.0.1"', "port = %d" % self.port,
                    "[trust]", 'bundle_keys_dir = "%s"' % (self.tmp / "bundle-keys"),
                    'command_keys = ["%s"]' % (self.tmp / "command-keys" / "controller.pub"),
                    "[engine]", 'backend = "onnxruntime"', "tune_iterations = 5", "max_batch_limit = 16",
                    "ort_intra_op_threads = 1",
                    "[api]", "enabled = true", "port = %d" % api_port,
                    "[telemetry]", "period_s = 1.0", "use_jtop = false",
                    "[probation]", "window_s = 6", "max_window_s = 6", "p99_min_requests = 5",
                ]) + "\n"
            )
            self.spawn(dev, [PY, "-m", "edge_agent.cli", "run", "--config", str(cfg)])

    def wait_devices_online(self, timeout_s: float = 60) -> None:
        """Poll the controller until every device is registered and online."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.cli("devices", "--json", "--config", str(self.fleet_toml), check=False, show=False)
            if r.returncode == 0:
                try:
                    rows = json.loads(r.stdout)
                except ValueError:
                    rows = []
                online = {d.get("device_id") for d in rows if d.get("online")}
                if online >= set(self.device_ids):
                    return
            time.sleep(0.5)
        raise SystemExit("devices did not come online; logs are in %s" % self.tmp)

    def stop(self) -> None:
        """SIGTERM every process (agents first), SIGKILL what does not exit."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    # -------------------------------------------------------------------------------------------- bundles

    def build_bundle(self, version: int, health_extra: str = "") -> Path:
        """Build and sign the sample bundle at `version` (the SPEC's paths made absolute)."""
        spec = (SAMPLES / "bundle.toml").read_text()
        spec = re.sub(r"(?m)^version = \d+", "version = %d" % version, spec)
        spec = re.sub(r'= "([\w.-]+\.(onnx|npz))"', lambda m: '= "%s"' % (SAMPLES / m.group(1)).as_posix(), spec)
        spec += "\n" + health_extra + "\n"
        spec_path = self.tmp / ("spec-v%d.toml" % version)
        spec_path.write_text(spec)
        out = self.tmp / "bundles" / ("digits96-%d.bundle" % version)
        out.parent.mkdir(exist_ok=True)
        self.cli("bundle", "build", str(spec_path), "--key", str(self.tmp / "keys" / "release.key"),
                 "--out", str(out))
        return out


class Traffic:
    """Clients that POST held-out digit images (PNG) to the devices' local APIs and tally the answers."""

    def __init__(self, ports: Dict[str, int], rate_per_device: float) -> None:
        import cv2
        import numpy as np

        sys.path.insert(0, str(SAMPLES.parent))
        import harness  # samples/harness.py: the held-out split, rendered from the bundled glyphs

        xs, ys = harness.rendered_split("heldout", DEMO_ITEMS)
        self.labels = [int(y) for y in ys]
        self.images = []
        for x in xs:
            ok, png = cv2.imencode(".png", np.asarray(x[0], np.uint8))  # 96x96 gray camera crops
            assert ok
            self.images.append(png.tobytes())
        self.ports = ports
        self.period = 1.0 / rate_per_device
        self.stats: Counter = Counter()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: List[threading.Thread] = []

    def post(self, port: int, i: int) -> Optional[dict]:
        """One request; the JSON answer or None."""
        req = urllib.request.Request(
            "http://127.0.0.1:%d/v1/infer" % port, data=self.images[i], headers={"Content-Type": "image/png"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _run(self, dev: str, port: int) -> None:
        i = hash(dev) % len(self.images)
        nxt = time.monotonic()
        while not self.stop_event.is_set():
            ans = self.post(port, i)
            with self.lock:
                if ans is None:
                    self.stats["%s:failed" % dev] += 1
                else:
                    self.stats["%s:ok" % dev] += 1
            i = (i + 1) % len(self.images)
            nxt += self.period
            self.stop_event.wait(max(0.0, nxt - time.monotonic()))

    def start(self) -> None:
        """Background load on every device."""
        for dev, port in self.ports.items():
            t = threading.Thread(target=self._run, args=(dev, port), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        """Stop the background load."""
        self.stop_event.set()
        for t in self.threads:
            t.join(10)

    def evaluate(self, port: int, n: int) -> None:
        """Send `n` held-out images to one device and print routes, accuracy and latency."""
        routes: Counter = Counter()
        correct = 0
        lat: List[float] = []
        for i in range(n):
            ans = self.post(port, i)
            if ans is None:
                routes["failed"] += 1
                continue
            routes[ans.get("route", "?")] += 1
            top = ans["output"]["top"][0]["index"]
            correct += int(top == self.labels[i])
            lat.append(float(ans.get("latency_ms", 0.0)))
        lat.sort()
        answered = max(1, n - routes["failed"])
        print("  requests        %d (failed %d)" % (n, routes["failed"]))
        print("  routed small    %d  (%.1f%%)" % (routes["small"], 100.0 * routes["small"] / answered))
        print("  routed large    %d  (%.1f%%)" % (routes["large"], 100.0 * routes["large"] / answered))
        print("  top-1 accuracy  %.2f%% on held-out 96x96 digits the models never saw" % (100.0 * correct / answered))
        if lat:
            print("  latency (ms)    p50 %.2f  p99 %.2f (server-side, arrival to answer)"
                  % (lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]))


def main() -> int:
    """Run the demo."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=5, help="number of agents (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    demo = Demo(tmp, args.devices)
    traffic: Optional[Traffic] = None
    ok = False
    try:
        say("1. broker, keys, controller and %d agents" % args.devices)
        demo.start_broker()
        demo.make_keys()
        demo.start_controller()
        demo.start_agents()
        demo.wait_devices_online()
        demo.cli("devices", "--config", str(demo.fleet_toml))

        say("2. build and sign the sample bundle (96x96 digits: small 4-conv CNN + large ResNet-like CNN, "
            "golden outputs recorded)")
        v1 = demo.build_bundle(1)
        demo.cli("bundle", "inspect", str(v1))

        say("3. staged rollout of digits96 v1: waves 20%, 60%, 100%; each device self-tests and passes probation")
        demo.cli("rollout", "start", str(v1), "--waves", "20,60,100", "--watch", "--interval", "1",
                 "--watch-timeout", "180", "--config", str(demo.fleet_toml))
        demo.cli("devices", "--config", str(demo.fleet_toml))

        say("4. inference through the DynamicRouter on %s's local API" % demo.device_ids[0])
        traffic = Traffic(demo.api_ports, rate_per_device=25.0)
        traffic.evaluate(demo.api_ports[demo.device_ids[0]], len(traffic.images))
        print("\n  /metrics (excerpt):")
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % demo.api_ports[demo.device_ids[0]]) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(("edge_agent_requests_total", "edge_agent_route", "edge_agent_tau",
                                    "edge_agent_large_fraction", "edge_agent_latency")):
                    print("   ", line)

        say("5. live telemetry while every device serves traffic")
        traffic.start()
        time.sleep(3)
        demo.cli("telemetry", "--follow", "--duration", "4", "--interval", "2", "--config", str(demo.fleet_toml))

        say("6. digits96 v2 declares a p99 latency SLO of 0.05 ms that these devices cannot meet")
        v2 = demo.build_bundle(2, health_extra="p99_latency_slo_ms = 0.05")
        r = demo.cli("rollout", "start", str(v2), "--waves", "20,60,100", "--watch", "--interval", "1",
                     "--watch-timeout", "180", "--config", str(demo.fleet_toml), check=False)
        if r.returncode == 0:
            raise SystemExit("the broken bundle's rollout did not halt")
        print("\n(the rollout halted: the first wave's device failed probation and rolled itself back;")
        print(" devices in later waves never received v2)")
        demo.cli("devices", "--config", str(demo.fleet_toml))
        traffic.stop()
        failed = sum(v for k, v in traffic.stats.items() if k.endswith(":failed"))
        served = sum(v for k, v in traffic.stats.items() if k.endswith(":ok"))
        print("\nbackground traffic during the failed rollout: %d answered, %d failed" % (served, failed))
        ok = True
        if args.keep:
            say("7. everything keeps running: web console http://127.0.0.1:%d/ (operator token: %s); Ctrl-C stops"
                % (demo.console_port, demo.console_token))
            traffic = Traffic(demo.api_ports, rate_per_device=25.0)
            traffic.start()
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        if traffic is not None:
            traffic.stop()
        demo.stop()
        if args.keep or not ok:
            print("\nlogs and state kept in %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    say("demo %s" % ("finished" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
