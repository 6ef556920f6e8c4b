"""A hostile-device rig for the controller: mosquitto with the SHIPPED TLS drop-in and dynamic-security
rules (`secure_broker.py`), `fleet serve` as a real process with the controller's certificate, and MQTT
clients holding real device and operator certificates: attackers that flood the controller's topics, and
a bystander device that pulls a bundle deployed to it, chunk by chunk, as the agent's fetcher does.

Used by tests/test_controller_floods.py (claims) and bench/security.py (figures). The controller's memory
is read from /proc/<pid>/status: VmRSS now, VmHWM the peak since it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from agent_helpers import build_sample_bundle, write_key
from secure_broker import REPO, MqttProbe, SecureBroker, start_secure_broker

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store import BundleStore
from edge_agent.config import MqttConfig, TlsConfig, TransferConfig
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import BundleRef, ChunkRequest, Event, RpcRequest, Status, Telemetry
from edge_agent.transfer.fetcher import Fetcher

P = topics.DEFAULT_PREFIX
CONTROLLER = "fleet-controller"
OPERATOR = "fleet-operator"
#: A second operator: floods the RPC while the first one's requests must still be answered.
OPERATOR_2 = "fleet-operator-2"
ATTACKER = "dev-attacker"
BYSTANDER = "dev-bystander"


def proc_status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS: resident now; VmHWM: the peak resident set)."""
    with open("/proc/%d/status" % pid, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def status_doc(device: str) -> Dict:
    return Status(device_id=device, online=True, ts=time.time(), agent_version="0.1.0", ready=True,
                  active={"name": "digits", "version": 1}, deploy={"state": "active"}).to_dict()


def telemetry_doc(device: str, seq: int = 1) -> Dict:
    return Telemetry(device_id=device, ts=time.time(), seq=seq, period_s=10.0, uptime_s=100.0, requests=10,
                     errors=0, latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0}, temperatures_c={"cpu": 40.0},
                     bundle={"name": "digits", "version": 1}).to_dict()


def event_doc(device: str, message: str = "ok", seq: int = 1) -> Dict:
    return Event(device_id=device, ts=time.time(), seq=seq, kind="activated", level="info", message=message,
                 bundle={"name": "digits", "version": 1}).to_dict()


def enc(doc) -> bytes:
    return json.dumps(doc).encode()


class Flood:
    """Publishes `make(i)` -> (topic, payload, props) from one client as fast as the broker acknowledges
    (QoS 1, at most `window` unacknowledged), in a thread, until stopped. Counts what it sent."""

    def __init__(self, probe: MqttProbe, make: Callable[[int], Tuple[str, bytes, Dict]], *, window: int = 32,
                 retain: bool = False) -> None:
        self.probe = probe
        self.make = make
        self.window = window
        self.retain = retain
        self.sent = 0
        self.sent_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _run(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        pending: List = []
        i = 0
        while not self._stop.is_set():
            topic, payload, props = self.make(i)
            properties = None
            if props:
                properties = Properties(PacketTypes.PUBLISH)
                for k, v in props.items():
                    setattr(properties, k, v)
            pending.append(self.probe.client.publish(topic, payload, qos=1, retain=self.retain, properties=properties))
            self.sent += 1
            self.sent_bytes += len(payload)
            i += 1
            while len(pending) >= self.window and not self._stop.is_set():
                pending[0].wait_for_publish(1.0)
                if pending[0].is_published() or not self.probe.connected:
                    pending.pop(0)
            if not self.probe.connected:
                time.sleep(0.05)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class FloodRig:
    """Shipped broker + `fleet serve` process + certificate holders; see the module docstring."""

    def __init__(self, tmp: Path, *, attackers: int = 1, serve_toml_extra: str = "") -> None:
        self.tmp = Path(tmp)
        self.attackers = [ATTACKER] + ["dev-attacker-%d" % i for i in range(1, attackers)]
        self.pki = self.tmp / "pki"
        names = []
        for d in [*self.attackers, BYSTANDER]:
            names += ["--device", d]
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_test_pki.py"), str(self.pki), *names,
                        "--controller", CONTROLLER, "--operator", OPERATOR, "--operator", OPERATOR_2],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        self.broker: SecureBroker = start_secure_broker("tls", self.pki)
        self.release_key = write_key(self.tmp / "bundle-keys", "release")
        write_key(self.tmp / "controller-keys", "controller")
        self.state_dir = self.tmp / "controller"
        self.fleet_toml = self.tmp / "fleet.toml"
        self.fleet_toml.write_text("\n".join([
            "[mqtt]", 'host = "%s"' % self.broker.host, "port = %d" % self.broker.port,
            "reconnect_min_s = 0.2", "reconnect_max_s = 1.0",
            "[mqtt.tls]", 'ca_file = "%s"' % (self.pki / "ca.crt"),
            'cert_file = "%s"' % (self.pki / "fleet-controller.crt"),
            'key_file = "%s"' % (self.pki / "fleet-controller.key"),
            "[controller]", 'key_file = "%s"' % (self.tmp / "controller-keys" / "controller.key"),
            'state_dir = "%s"' % self.state_dir,
            "[rollouts]", "tick_interval_s = 0.2", "telemetry_flush_s = 0.5",
            serve_toml_extra,
        ]) + "\n", encoding="utf-8")
        self.serve: Optional[subprocess.Popen] = None
        self._probes: List[MqttProbe] = []
        self._pusher = None
        self.start_serve()

    # ----------------------------------------------------------------------------- processes

    def start_serve(self, timeout_s: float = 30.0) -> subprocess.Popen:
        """Start `fleet serve` and wait until it answers an operator RPC."""
        log = open(self.tmp / "serve.log", "ab")
        self.serve = subprocess.Popen([sys.executable, "-m", "fleet.cli", "serve", "--config", str(self.fleet_toml)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        log.close()
        deadline = time.monotonic() + timeout_s
        with self.rpc_client() as rpc:
            while True:
                try:
                    rpc.call("controller.status", timeout_s=2.0)
                    return self.serve
                except Exception:
                    if time.monotonic() > deadline or self.serve.poll() is not None:
                        raise AssertionError("fleet serve did not answer:\n" + self.serve_log())

    def stop_serve(self) -> None:
        """SIGTERM `fleet serve` and wait for it."""
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            try:
                self.serve.wait(15)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait(10)

    def serve_log(self) -> str:
        try:
            return (self.tmp / "serve.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def rss_mb(self) -> float:
        """`fleet serve`'s resident memory now (MB)."""
        return proc_status_kb(self.serve.pid, "VmRSS") / 1024.0

    def peak_rss_mb(self) -> float:
        """`fleet serve`'s peak resident memory since it started (VmHWM, MB)."""
        return proc_status_kb(self.serve.pid, "VmHWM") / 1024.0

    # ----------------------------------------------------------------------------- clients

    def mqtt_cfg(self, identity: str) -> MqttConfig:
        tls = TlsConfig(ca_file=self.pki / "ca.crt", cert_file=self.pki / ("%s.crt" % identity),
                        key_file=self.pki / ("%s.key" % identity))
        return MqttConfig(host=self.broker.host, port=self.broker.port, tls=tls, reconnect_min_s=0.1,
                          reconnect_max_s=0.5)

    def probe(self, identity: str, client_id: str = "") -> MqttProbe:
        p = MqttProbe(client_id or "%s-%d" % (identity, len(self._probes)), timeout_s=10)
        p.tls(self.pki / "ca.crt", self.pki / ("%s.crt" % identity), self.pki / ("%s.key" % identity))
        p.client.max_inflight_messages_set(64)
        self._probes.append(p)
        return p.connect(self.broker.host, self.broker.port)

    def rpc_client(self):
        from fleet.rpc import RpcClient

        return RpcClient.connect(self.mqtt_cfg(OPERATOR))

    def pusher(self):
        """An in-process controller session (no chunk serving, no fleet management) on the same state dir:
        stores bundles and sends deploy commands, as `fleet push` does."""
        if self._pusher is None:
            from fleet.config import load_fleet_config
            from fleet.controller import Controller

            cfg = load_fleet_config(self.fleet_toml)
            self._pusher = Controller(cfg, key=Controller.load_key(cfg), client_id="test-pusher", serve_chunks=False)
            self._pusher.session.start()
            assert self._pusher.session.wait_connected(10)
        return self._pusher

    def deploy_bundle(self, device: str, *, version: int, payload_bytes: int) -> Tuple[ManifestBody, str, int]:
        """Build a signed bundle with `payload_bytes` of extra data, store it, send `device` its deploy."""
        bundle = build_sample_bundle(self.tmp / ("b-%s-%d" % (device, version)), self.release_key, version=version,
                                     extra={"blob.bin": os.urandom(payload_bytes)})
        ctl = self.pusher()
        body, msha, size = ctl.add_bundle(bundle)
        assert ctl.send_command(device, ctl.deploy_args(body.name, body.version)).wait(10)
        return body, msha, size

    def pull(self, device: str, body: ManifestBody, msha: str, size: int, *, chunk_bytes: int = 256 * 1024,
             timeout_s: float = 10.0) -> float:
        """Pull a bundle as `device` with the agent's fetcher (manifest, then files); seconds taken."""
        store = BundleStore(self.tmp / ("store-%s-%d" % (device, time.monotonic_ns()))).open()
        session = MqttSession(self.mqtt_cfg(device), client_id="%s-pull-%d" % (device, time.monotonic_ns()))
        transfer = TransferConfig(chunk_bytes=chunk_bytes, chunk_timeout_s=timeout_s, progress_interval_s=1.0)
        fetcher = Fetcher(session, store, transfer, prefix=P, device_id=device, emit=lambda k, m, d: None)
        session.subscribe(topics.chunks(P, device), fetcher.on_chunk)
        session.start()
        try:
            assert session.wait_connected(10)
            time.sleep(0.2)  # the chunks subscription is made right after CONNACK
            ref = BundleRef(name=body.name, version=body.version)
            t0 = time.monotonic()
            fetcher.fetch_manifest(ref, msha, size, max_bytes=1 << 20)
            fetcher.fetch_files(ref, store.missing_files(body))
            took = time.monotonic() - t0
            assert not store.missing_files(body)
            return took
        finally:
            session.stop(timeout_s=2)

    # ----------------------------------------------------------------------------- attacks

    def fetch_flood(self, body: ManifestBody, *, who: str = ATTACKER, length: int = 1 << 20) -> Flood:
        """Fetch requests from `who` (naming itself, answered on its own chunks topic) for `body`'s
        biggest file, 1 MiB at a time (each request ~215 bytes)."""
        sha, entry = max(((e.sha256, e) for e in body.files.values()), key=lambda t: t[1].size)
        ref = {"name": body.name, "version": body.version}

        def make(i: int):
            off = (i * length) % max(1, entry.size - length)
            req = ChunkRequest(device_id=who, bundle=ref, sha256=sha, offset=off, length=min(length, entry.size))
            return topics.fetch(P, who), req.to_json(), {"ResponseTopic": topics.chunks(P, who),
                                                        "CorrelationData": b"%08d" % i}

        return Flood(self.probe(who), make)

    def report_flood(self, channel: str, *, who: str = ATTACKER, payload_bytes: int = 0) -> Flood:
        """Reports on `who`'s own `channel` topic: valid small documents, or `payload_bytes` of JSON."""

        def make(i: int):
            if payload_bytes:
                doc = event_doc(who, message="x" * payload_bytes) if channel == "events" else dict(
                    telemetry_doc(who, i + 1), padding="x" * payload_bytes)
            else:
                doc = event_doc(who, seq=i + 1) if channel == "events" else telemetry_doc(who, i + 1)
            return topics.device_topic(P, who, channel), enc(doc), {}

        return Flood(self.probe(who), make)

    def rpc_flood(self, who: str = OPERATOR_2) -> Flood:
        """Valid CLI requests (`devices.list`) from an operator's certificate, fresh and non-retained."""
        reply = "%s/fleet/rpc-reply/%s/flood" % (P, who)

        def make(i: int):
            req = RpcRequest(method="devices.list", params={}, issued_at=int(time.time()))
            return topics.fleet_rpc(P), req.to_json(), {"ResponseTopic": reply, "CorrelationData": b"%08d" % i}

        return Flood(self.probe(who), make)

    def close(self) -> None:
        for p in self._probes:
            try:
                p.close()
            except Exception:
                pass
        if self._pusher is not None:
            self._pusher.stop()
        self.stop_serve()
        self.broker.close()
