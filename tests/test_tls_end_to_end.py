"""The device's MQTT path and the controller work end to end through the shipped TLS broker config.

Product code on both sides — the agent's `MqttSession`, `BundleStore`, `Fetcher`, `verify_command` and
`verify_manifest`; the controller's `Controller` (chunk server, signed commands) — each with its own
client certificate from scripts/make_test_pki.py, against mosquitto running configs/mosquitto/
edge-agent-tls.conf and its ACL. A second device watches every topic and must see none of it.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from agent_helpers import agent_toml, build_sample_bundle, start_agent, stop_process, write_key
from secure_broker import REPO, MqttProbe, SecureBroker, start_secure_broker

from edge_agent.bundle.store import BundleStore
from edge_agent.bundle.verify import verify_manifest
from edge_agent.config import MqttConfig, TlsConfig, TransferConfig
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.commands import verify_command
from edge_agent.signing import PrivateKey
from edge_agent.transfer.fetcher import Fetcher
from fleet.config import ControllerSection, FleetConfig
from fleet.controller import Controller
from fleet.rpc import RpcClient, RpcServer

pytestmark = pytest.mark.mqtt

P = topics.DEFAULT_PREFIX
DEVICE = "cam-01"
WATCHER = "cam-02"
CONTROLLER = "fleet-controller"
OPERATOR = "fleet-operator"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Test CA, broker certificate, two devices and the controller."""
    out = tmp_path_factory.mktemp("pki")
    cmd = [sys.executable, str(REPO / "scripts" / "make_test_pki.py"), str(out),
           "--device", DEVICE, "--device", WATCHER, "--controller", CONTROLLER, "--operator", OPERATOR]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return out


@pytest.fixture(scope="module")
def broker(pki):
    """mosquitto with the shipped TLS drop-in and ACL."""
    b = start_secure_broker("tls", pki)
    yield b
    b.close()


def _mqtt(broker: SecureBroker, pki: Path, identity: str, username: Optional[str] = None) -> MqttConfig:
    tls = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / ("%s.crt" % identity), key_file=pki / ("%s.key" % identity))
    return MqttConfig(host=broker.host, port=broker.port, prefix=P, tls=tls, username=username)


def test_deploy_command_and_bundle_transfer_over_tls(broker, pki, tmp_path):
    bundle_key = PrivateKey.generate("release")
    controller_key = PrivateKey.generate("controller")
    bundle = build_sample_bundle(tmp_path / "build", bundle_key, version=3)

    watcher = MqttProbe("watcher").tls(pki / "ca.crt", pki / ("%s.crt" % WATCHER), pki / ("%s.key" % WATCHER))
    watcher.connect(broker.host, broker.port)
    watcher.subscribe("#")

    cfg = FleetConfig(
        mqtt=_mqtt(broker, pki, CONTROLLER),
        controller=ControllerSection(client_id="ctl-e2e", state_dir=tmp_path / "controller"),
    )
    ctl = Controller(cfg, key=controller_key)
    body, manifest_sha, manifest_size = ctl.add_bundle(bundle)

    dev = MqttSession(_mqtt(broker, pki, DEVICE), client_id=DEVICE, name="device")
    store = BundleStore(tmp_path / "device").open()
    fetcher = Fetcher(dev, store, TransferConfig(), prefix=P, device_id=DEVICE)
    commands: queue.Queue = queue.Queue()
    dev.subscribe(topics.commands(P, DEVICE), lambda msg: commands.put(msg.payload), qos=1)
    dev.subscribe(topics.chunks(P, DEVICE), fetcher.on_chunk, qos=1)
    try:
        ctl.start()
        dev.start()
        assert ctl.wait_connected(10), ctl.session.last_error
        assert dev.wait_connected(10), dev.last_error
        time.sleep(0.2)  # subscriptions are made in the network thread right after CONNACK

        # Controller -> device: a signed deploy command through the broker.
        ctl.send_command(DEVICE, ctl.deploy_args(body.name, body.version))
        raw = commands.get(timeout=10)
        cmd = verify_command(
            raw,
            device_id=DEVICE,
            trusted={controller_key.public.keyid: controller_key.public},
            last_seq=0,
            now=int(time.time()),
            max_age_s=600,
        )
        assert cmd.args.manifest_sha256 == manifest_sha

        # Device -> controller -> device: the manifest and every file, chunk by chunk.
        raw_manifest = fetcher.fetch_manifest(cmd.args.bundle, manifest_sha, manifest_size, max_bytes=1 << 20)
        manifest = verify_manifest(
            raw_manifest,
            trusted={bundle_key.public.keyid: bundle_key.public},
            threshold=1,
            now=int(time.time()),
            highest_versions={},
            max_manifest_bytes=1 << 20,
        )
        files = {f.sha256: (path, f.size) for path, f in manifest.files.items()}
        stats = fetcher.fetch_files(cmd.args.bundle, files)
        assert stats.bytes_total == sum(size for _, size in files.values())
        assert all(store.has_object(sha) for sha in files)
        assert store.check_objects() == []

        # Reports go out; a report under another device's id is refused and the session says so.
        ok = dev.publish(topics.status(P, DEVICE), b'{"online": true}', qos=1)
        assert ok.wait(5), ok.error
        forged = dev.publish(topics.status(P, WATCHER), b'{"online": false}', qos=1)
        assert not forged.wait(5)
        assert "not authorized" in (forged.error or "").lower(), forged.error
    finally:
        dev.stop()
        ctl.stop()

    # The other device, subscribed to everything, received nothing of this exchange.
    time.sleep(0.3)
    assert watcher.topics_seen() == []
    watcher.close()


def test_operator_cli_rpc_over_tls(broker, pki):
    """The CLI's RpcClient reaches the controller's RpcServer with client certificates; with no
    `mqtt.username` configured, the CLI names its reply topic with its certificate's CN (the username the
    broker gives it), which the ACL lets only that identity read."""
    ctl = MqttSession(_mqtt(broker, pki, CONTROLLER), client_id="ctl-rpc", name="controller")
    server = RpcServer(ctl, prefix=P)
    server.register("echo", lambda params: {"echo": params.get("x")})
    watcher = MqttProbe("watcher-rpc").tls(pki / "ca.crt", pki / ("%s.crt" % WATCHER), pki / ("%s.key" % WATCHER))
    watcher.connect(broker.host, broker.port)
    watcher.subscribe("#")
    try:
        ctl.start()
        server.start()
        assert ctl.wait_connected(10), ctl.last_error
        time.sleep(0.2)
        with RpcClient.connect(_mqtt(broker, pki, OPERATOR)) as cli:
            assert "/fleet/rpc-reply/%s/" % OPERATOR in cli.reply_topic
            assert cli.call("echo", {"x": 42}, timeout_s=10) == {"echo": 42}
    finally:
        server.stop()
        ctl.stop()
    time.sleep(0.3)
    assert watcher.topics_seen() == []
    watcher.close()


def test_operator_follows_telemetry_with_the_fleet_cli_over_tls(broker, pki, tmp_path):
    """`fleet telemetry --follow` as the operator (certificate only, no username) receives a device's
    telemetry through the shipped ACL."""
    from edge_agent.protocol.messages import Telemetry

    conf = tmp_path / "fleet.toml"
    conf.write_text("\n".join([
        "[mqtt]", 'host = "%s"' % broker.host, "port = %d" % broker.port, 'prefix = "%s"' % P,
        "[mqtt.tls]", 'ca_file = "%s"' % (pki / "ca.crt"), 'cert_file = "%s"' % (pki / ("%s.crt" % OPERATOR)),
        'key_file = "%s"' % (pki / ("%s.key" % OPERATOR)),
    ]) + "\n")
    cli = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "telemetry", "--follow", "--json", "--count", "1", "--duration", "30",
         "--config", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
    )
    dev = MqttProbe("cam-01-telemetry").tls(pki / "ca.crt", pki / ("%s.crt" % DEVICE), pki / ("%s.key" % DEVICE))
    dev.connect(broker.host, broker.port)
    try:
        deadline = time.monotonic() + 20
        while cli.poll() is None and time.monotonic() < deadline:
            t = Telemetry(device_id=DEVICE, ts=time.time(), seq=1, period_s=1.0, uptime_s=5.0, requests=7)
            # 16 = "no matching subscribers": the CLI has not subscribed yet.
            assert dev.publish(topics.telemetry(P, DEVICE), t.to_json(), qos=1) in (0, 16)
            time.sleep(0.1)  # a retry pace while the CLI starts and subscribes, not a wait for it
        out, err = cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        dev.close()
    assert cli.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["device_id"] == DEVICE and rows[0]["requests"] == 7


def _active_bundle(probe: MqttProbe, device_id: str):
    """(name, version) of the newest retained/live status of `device_id` that names an active bundle."""
    for msg in reversed(probe.messages):
        if msg.topic == topics.status(P, device_id) and msg.payload:
            data = json.loads(msg.payload)
            if data.get("active"):
                return data["active"]["name"], data["active"]["version"], data.get("last_command_seq")
    return None


def test_agent_process_deploys_a_bundle_over_tls(broker, pki, tmp_path):
    """`edge-agent run` (a real child process) with its device certificate and the real `Controller`:
    the controller signs a deploy command, the agent fetches, verifies, prepares, self-tests and activates
    the bundle, and reports it in its retained status — all through the shipped TLS config and ACL."""
    release = write_key(tmp_path / "bundle-keys", "release")
    controller_key = write_key(tmp_path / "command-keys", "controller")
    bundle = build_sample_bundle(tmp_path / "build", release, version=1)
    tls = "\n".join([
        "[mqtt.tls]",
        'ca_file = "%s"' % (pki / "ca.crt"),
        'cert_file = "%s"' % (pki / ("%s.crt" % DEVICE)),
        'key_file = "%s"' % (pki / ("%s.key" % DEVICE)),
    ])  # fmt: skip
    conf = agent_toml(
        tmp_path / "agent.toml", device_id=DEVICE, state_dir=tmp_path / "agent-state", port=broker.port,
        bundle_keys=tmp_path / "bundle-keys", command_key=tmp_path / "command-keys" / "controller.pub", extra=tls,
    )  # fmt: skip
    observer = MqttProbe("observer").tls(pki / "ca.crt", pki / ("%s.crt" % CONTROLLER), pki / ("%s.key" % CONTROLLER))
    observer.connect(broker.host, broker.port)
    observer.subscribe(topics.status(P, DEVICE))
    ctl = Controller(
        FleetConfig(
            mqtt=_mqtt(broker, pki, CONTROLLER),
            controller=ControllerSection(client_id="ctl-agent-e2e", state_dir=tmp_path / "controller"),
        ),
        key=controller_key,
    )
    body, _, _ = ctl.add_bundle(bundle)
    log_path = tmp_path / "agent.log"
    agent = start_agent(conf, log_path)
    try:
        ctl.start()
        assert ctl.wait_connected(10), ctl.session.last_error
        # The agent is online (its retained status arrived) before the command is sent.
        deadline = time.monotonic() + 60
        while not any(m.topic == topics.status(P, DEVICE) for m in observer.messages):
            assert agent.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, (
                "agent never published its status over TLS\n%s" % (log_path.read_text(errors="replace")[-3000:])
            )
            time.sleep(0.1)
        ctl.send_command(DEVICE, ctl.deploy_args(body.name, body.version))
        deadline = time.monotonic() + 120
        while _active_bundle(observer, DEVICE) is None:
            assert agent.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, (
                "bundle not activated over TLS\n%s" % (log_path.read_text(errors="replace")[-4000:])
            )
            time.sleep(0.2)
        name, version, seq = _active_bundle(observer, DEVICE)
        assert (name, version) == (body.name, body.version)
        assert seq >= 1
    finally:
        stop_process(agent)
        ctl.stop()
        observer.close()
