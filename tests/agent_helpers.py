"""Helpers for the agent-core tests and the transfer benchmark: sample bundles (real models, real
signatures), keys and configs on disk, an MQTT event watcher, and agent processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from edge_agent.bundle.archive import pack_bundle, read_bundle
from edge_agent.bundle.verify import read_unverified
from edge_agent.signing import PrivateKey, canonical_json, sign_document

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SPEC = REPO / "samples" / "digits" / "bundle.toml"
MIB = 1 << 20


def build_sample_bundle(
    out_dir: Path, key: PrivateKey, *, version: int = 1, name: str = "digits",
    extra: Optional[Dict[str, bytes]] = None, extra_files: Optional[Dict[str, Path]] = None,
    now: Optional[int] = None, expires_in_days: Optional[float] = None,
) -> Path:
    """The sample digits bundle (real ONNX models and golden outputs) at `version`, with optional extra
    payload files added to the manifest and re-signed."""
    from fleet.bundle_builder import build_bundle

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_text = SAMPLE_SPEC.read_text(encoding="utf-8")
    spec_text = re.sub(r"(?m)^version = \d+", "version = %d" % version, spec_text)
    spec_text = re.sub(r'(?m)^name = "[^"]*"', 'name = "%s"' % name, spec_text)
    if expires_in_days is not None:
        spec_text = re.sub(r"(?m)^expires_in_days = .*$", "expires_in_days = %s" % expires_in_days, spec_text)
    base = SAMPLE_SPEC.parent
    for fname in ("small.onnx", "large.onnx", "golden.npz"):
        spec_text = spec_text.replace('"%s"' % fname, '"%s"' % (base / fname))
    spec = out_dir / ("spec-%s-%d.toml" % (name, version))
    spec.write_text(spec_text, encoding="utf-8")
    plain = out_dir / ("%s-%d.plain.bundle" % (name, version))
    build_bundle(spec, key, plain, now=now)
    if not extra and not extra_files:
        return plain
    extra_paths: Dict[str, Path] = dict(extra_files or {})
    for rel, data in (extra or {}).items():
        p = out_dir / ("extra-%d-%s" % (version, rel.replace("/", "__")))
        p.write_bytes(data)
        extra_paths[rel] = p
    return add_files(plain, extra_paths, key, out_dir / ("%s-%d.bundle" % (name, version)))


def add_files(bundle: Path, extra: Dict[str, Path], key: PrivateKey, out: Path) -> Path:
    """Re-pack `bundle` with `extra` files pinned in its manifest (re-signed with `key`)."""
    import hashlib

    raw, reader = read_bundle(bundle, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 40)
    tmp = out.parent / (out.name + ".members")
    tmp.mkdir(exist_ok=True)
    files: Dict[str, Path] = {}
    with reader:
        body = read_unverified(raw, max_manifest_bytes=1 << 20).to_signed_dict()
        for m in reader.files():
            p = tmp / m.name.replace("/", "__")
            with open(p, "wb") as f:
                for block in reader.iter_chunks(m.name):
                    f.write(block)
            files[m.name] = p
    for rel, p in extra.items():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        body["files"][rel] = {"sha256": h.hexdigest(), "size": p.stat().st_size}
        files[rel] = p
    manifest = canonical_json(sign_document(body, [key]))
    pack_bundle(manifest, files, out)
    shutil.rmtree(tmp)
    return out


def write_key(dir_: Path, name: str) -> PrivateKey:
    """A fresh key pair written as NAME.key / NAME.pub under `dir_`."""
    dir_.mkdir(parents=True, exist_ok=True)
    k = PrivateKey.generate(name)
    (dir_ / (name + ".key")).write_text(k.to_text())
    (dir_ / (name + ".pub")).write_text(k.public.to_text())
    return k


def inprocess_agent(tmp_path: Path, device_id: str, *, broker=None, notifier=None, **sections):
    """An `Agent` built in this process: a fresh release key, ONNX Runtime, no HTTP API, no command keys;
    connected to `broker` (MQTT, telemetry) when given, else built without MQTT. `sections` override
    config sections (`telemetry={"period_s": 0.2}`)."""
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig

    write_key(tmp_path / "bundle-keys", "release")
    raw = {
        "device_id": device_id, "state_dir": str(tmp_path / "state"),
        "trust": {"bundle_keys_dir": str(tmp_path / "bundle-keys"), "command_keys": []},
        "engine": {"backend": "onnxruntime"}, "api": {"enabled": False},
    }
    if broker is not None:
        raw["mqtt"] = {"host": broker.host, "port": broker.port}
    raw.update(sections)
    return Agent(AgentConfig.model_validate(raw), notifier=notifier).build(with_mqtt=broker is not None)


def agent_toml(path: Path, *, device_id: str, state_dir: Path, port: int, bundle_keys: Path, command_key: Path,
               extra: str = "", probation_s: float = 0) -> Path:
    """Write an agent.toml for a test agent (CPU backend, no HTTP API, fast tuning)."""
    path.write_text(
        "\n".join([
            'device_id = "%s"' % device_id,
            'state_dir = "%s"' % state_dir,
            'log_level = "DEBUG"',
            "[mqtt]", 'host = "127.0.0.1"', "port = %d" % port, "reconnect_min_s = 0.2", "reconnect_max_s = 1.0",
            "[trust]", 'bundle_keys_dir = "%s"' % bundle_keys, 'command_keys = ["%s"]' % command_key,
            "[engine]", 'backend = "onnxruntime"', "tune_iterations = 3", "max_batch_limit = 8",
            "[api]", "enabled = false",
            "[telemetry]", "period_s = 1.0", "use_jtop = false",
            "[probation]", "window_s = %s" % probation_s, "max_window_s = %s" % probation_s,
            extra,
        ]) + "\n",
        encoding="utf-8",
    )
    return path


def fleet_toml(path: Path, *, state_dir: Path, port: int, key_file: Path, extra_chunks: str = "",
               extra_toml: str = "") -> Path:
    """Write a fleet.toml for a test controller (`extra_toml`: more sections, e.g. [console])."""
    path.write_text(
        "\n".join([
            "[mqtt]", 'host = "127.0.0.1"', "port = %d" % port, "reconnect_min_s = 0.2", "reconnect_max_s = 1.0",
            "[controller]", 'key_file = "%s"' % key_file, 'state_dir = "%s"' % state_dir,
            "[chunks]", extra_chunks, extra_toml,
        ]) + "\n",
        encoding="utf-8",
    )
    return path


class Watcher:
    """Subscribes to every device topic and records events and statuses (a real MQTT client)."""

    def __init__(self, host: str, port: int, prefix: str = "edge/v1") -> None:
        from edge_agent.config import MqttConfig
        from edge_agent.mqtt.session import MqttSession

        self.events: List[dict] = []
        self.status: Dict[str, dict] = {}
        self._cond = threading.Condition()
        self.session = MqttSession(MqttConfig(host=host, port=port, prefix=prefix, reconnect_min_s=0.1,
                                              reconnect_max_s=0.5), client_id="watcher-%d" % os.getpid())
        self.session.subscribe("%s/devices/+/events" % prefix, self._on_event)
        self.session.subscribe("%s/devices/+/status" % prefix, self._on_status)
        self.session.start()
        assert self.session.wait_connected(10) and self.session.wait_subscribed(10), self.session.last_error

    def _on_event(self, msg) -> None:
        with self._cond:
            self.events.append(json.loads(msg.payload))
            self._cond.notify_all()

    def _on_status(self, msg) -> None:
        if not msg.payload:
            return
        data = json.loads(msg.payload)
        with self._cond:
            self.status[data["device_id"]] = data
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
        """Wait until `pred()` holds (called under the lock)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for %s; events: %s" % (
                        what, [(e["device_id"], e["kind"], e["message"]) for e in self.events[-15:]]))
                self._cond.wait(min(left, 0.2))

    def kinds(self, device_id: str) -> List[str]:
        """Event kinds from one device, in order."""
        with self._cond:
            return [e["kind"] for e in self.events if e["device_id"] == device_id]

    def find(self, device_id: str, kind: str) -> List[dict]:
        """Events of one kind from one device."""
        with self._cond:
            return [e for e in self.events if e["device_id"] == device_id and e["kind"] == kind]

    def close(self) -> None:
        """Disconnect."""
        self.session.stop()


def start_agent(config: Path, log_path: Path) -> subprocess.Popen:
    """`edge-agent run --config CONFIG` as a real child process."""
    logf = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "-v", "run", "--config", str(config)],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
    )


def stop_process(p: subprocess.Popen, timeout_s: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit; returns the exit code."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout_s)
    return p.returncode


class FleetRig:
    """A broker, `fleet serve` as a real process, keys, a watcher, and agents as real processes."""

    def __init__(self, broker, tmp: Path, *, max_bytes_per_s: Optional[int] = None, probation_s: float = 0,
                 extra_toml: str = "") -> None:
        self.broker = broker
        self.probation_s = probation_s
        self.tmp = Path(tmp)
        self.release_key = write_key(self.tmp / "bundle-keys", "release")
        self.controller_key = write_key(self.tmp / "controller-keys", "controller")
        self.fleet_toml = fleet_toml(
            self.tmp / "fleet.toml", state_dir=self.tmp / "controller", port=broker.port,
            key_file=self.tmp / "controller-keys" / "controller.key",
            extra_chunks=("max_bytes_per_s = %d" % max_bytes_per_s) if max_bytes_per_s else "", extra_toml=extra_toml,
        )
        self.watcher = Watcher(broker.host, broker.port)
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "serve", "--config", str(self.fleet_toml)],
            stdout=open(self.tmp / "serve.log", "ab"), stderr=subprocess.STDOUT, cwd=str(REPO),
        )
        self.agents: Dict[str, subprocess.Popen] = {}
        self._pusher = None

    def agent_config(self, device_id: str, extra: str = "") -> Path:
        """The agent.toml of `device_id` (written once)."""
        return agent_toml(
            self.tmp / ("%s.toml" % device_id), device_id=device_id, state_dir=self.tmp / ("state-" + device_id),
            port=self.broker.port, bundle_keys=self.tmp / "bundle-keys",
            command_key=self.tmp / "controller-keys" / "controller.pub", extra=extra, probation_s=self.probation_s,
        )

    def start_agent(self, device_id: str, extra: str = "", wait_online: bool = True) -> subprocess.Popen:
        """Start `edge-agent run` for `device_id` and wait until its status says online."""
        cfg = self.tmp / ("%s.toml" % device_id)
        if not cfg.exists() or extra:
            self.agent_config(device_id, extra)
        started = time.time()
        p = start_agent(cfg, self.tmp / ("%s.log" % device_id))
        self.agents[device_id] = p
        if wait_online:
            self.watcher.wait_for(
                lambda: self.watcher.status.get(device_id, {}).get("online") and
                self.watcher.status[device_id]["ts"] >= started - 1, 30, "%s online" % device_id)
        return p

    def state(self, device_id: str) -> dict:
        """The device's state.json."""
        return json.loads((self.tmp / ("state-" + device_id) / "state.json").read_bytes())

    def push(self, bundle: Path, devices: List[str], wait: float = 60) -> subprocess.CompletedProcess:
        """`fleet push` as a real process."""
        return subprocess.run(
            [sys.executable, "-m", "fleet.cli", "push", str(bundle), "--devices", ",".join(devices),
             "--config", str(self.fleet_toml), "--wait", str(wait)],
            check=False, capture_output=True, text=True, cwd=str(REPO), timeout=wait + 60,
        )

    def pusher(self):
        """An in-process controller session (no chunk serving) for hand-made commands."""
        if self._pusher is None:
            from fleet.config import load_fleet_config
            from fleet.controller import Controller

            cfg = load_fleet_config(self.fleet_toml)
            self._pusher = Controller(cfg, key=self.controller_key, client_id="test-pusher", serve_chunks=False)
            self._pusher.session.start()
            assert self._pusher.session.wait_connected(10)
        return self._pusher

    def publish_raw_command(self, device_id: str, payload: bytes) -> None:
        """Publish bytes on a device's commands topic (as an attacker with broker access could)."""
        from edge_agent.protocol import topics

        assert self.pusher().session.publish(topics.commands("edge/v1", device_id), payload, qos=1).wait(5)

    def logs(self, device_id: str) -> str:
        """The tail of an agent's log."""
        try:
            return (self.tmp / ("%s.log" % device_id)).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop everything this rig started."""
        for p in self.agents.values():
            stop_process(p)
        if self._pusher is not None:
            self._pusher.session.stop()
        stop_process(self.serve)
        self.watcher.close()
