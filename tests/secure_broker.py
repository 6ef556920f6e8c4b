"""mosquitto started with the SHIPPED security config (configs/mosquitto/), for tests and benchmarks.

`SecureBroker(kind, pki_dir)` copies ``configs/mosquitto/edge-agent-<kind>.conf`` into a temp dir, writes
the dynamic-security file with `fleet.dynsec` (what `fleet broker dynsec` writes) for the identities of the
PKI (or the password users), changes only the install paths, the listener port (a free loopback port) and,
where this machine keeps it elsewhere, the plugin's path, and starts mosquitto. Every other line is used
as shipped, so the tests prove the config operators install.

`MqttProbe` is a small blocking wrapper around a paho-mqtt 2.x MQTT 5 client: connect, subscribe and
publish wait for the broker's acknowledgement (with a timeout) and return its reason code; received
messages are collected in order.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import paho.mqtt.client as mqtt
from mqtt_broker import MosquittoMissing, find_mosquitto, free_port
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "configs" / "mosquitto"
INSTALL_DIR = "/etc/mosquitto/edge-agent/"
SHIPPED_PORT = 8883
CONTROLLER = "fleet-controller"
OPERATOR = "fleet-operator"
ADMIN = "dynsec-admin"
SHIPPED_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def find_dynsec_plugin() -> str:
    """The dynamic-security plugin of the installed mosquitto (Debian/Ubuntu: the mosquitto package)."""
    if os.path.exists(SHIPPED_PLUGIN):
        return SHIPPED_PLUGIN
    for d in ("/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib", "/usr/lib64"):
        cand = os.path.join(d, "mosquitto_dynamic_security.so")
        if os.path.exists(cand):
            return cand
    raise MosquittoMissing("mosquitto_dynamic_security.so not found (Debian/Ubuntu: apt install mosquitto)")


def identities_of(names) -> Dict[str, List[str]]:
    """Split identity names as the tests use them: the controller, operators (`fleet-operator*`), rule
    admins (`dynsec-admin*`), devices."""
    names = sorted(set(names))
    return {
        "controllers": [n for n in names if n == CONTROLLER],
        "operators": [n for n in names if n.startswith(OPERATOR)],
        "admins": [n for n in names if n.startswith(ADMIN)],
        "devices": [n for n in names if n != CONTROLLER and not n.startswith((OPERATOR, ADMIN))],
    }


def pki_identities(pki_dir: Path) -> List[str]:
    """Client certificate names in a make_test_pki.py folder."""
    return [p.stem for p in Path(pki_dir).glob("*.crt") if p.stem not in ("ca", "server")]


def mosquitto_password_hash(password: str, *, iterations: int = 101) -> str:
    """A mosquitto 2.0 password-file hash (`$7$`: PBKDF2-HMAC-SHA512, 12-byte salt), as mosquitto_passwd writes."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return "$7$%d$%s$%s" % (iterations, base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def render_config(kind: str, install_dir: Path, port: int) -> str:
    """The shipped drop-in with install paths and the listener moved; fails if the shipped file changed shape."""
    text = (CONF_DIR / ("edge-agent-%s.conf" % kind)).read_text(encoding="utf-8")
    if INSTALL_DIR not in text:
        raise AssertionError("shipped config no longer uses %s" % INSTALL_DIR)
    text = text.replace(INSTALL_DIR, str(install_dir) + "/")
    text, n = re.subn(r"(?m)^listener %d$" % SHIPPED_PORT, "listener %d 127.0.0.1" % port, text)
    if n != 1:
        raise AssertionError("shipped config must have exactly one 'listener %d' line" % SHIPPED_PORT)
    if "\nplugin %s\n" % SHIPPED_PLUGIN not in text:
        raise AssertionError("shipped config no longer loads %s" % SHIPPED_PLUGIN)
    return text.replace(SHIPPED_PLUGIN, find_dynsec_plugin())


class SecureBroker:
    """mosquitto with configs/mosquitto/edge-agent-{tls,password}.conf on a free loopback port."""

    def __init__(self, kind: str, pki_dir: Path, *, passwords: Optional[Dict[str, str]] = None,
                 identities: Optional[List[str]] = None) -> None:
        from fleet.dynsec import build_document, render

        self.binary = find_mosquitto()
        self.kind = kind
        self.workdir = Path(tempfile.mkdtemp(prefix="mosq-sec-"))
        self.install_dir = self.workdir / "etc"
        self.install_dir.mkdir()
        for name in ("ca.crt", "ca.crl", "server.crt", "server.key"):
            shutil.copy(str(Path(pki_dir) / name), str(self.install_dir / name))
        names = identities if identities is not None else (
            list(passwords) if passwords is not None else pki_identities(pki_dir))
        doc = build_document(**identities_of(names))
        (self.install_dir / "dynamic-security.json").write_text(render(doc), encoding="utf-8")
        if passwords is not None:
            lines = ["%s:%s\n" % (u, mosquitto_password_hash(p)) for u, p in sorted(passwords.items())]
            (self.install_dir / "passwd").write_text("".join(lines), encoding="utf-8")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        # What Debian's /etc/mosquitto/mosquitto.conf contributes (persistence, logging), then the drop-in.
        main = "persistence false\nlog_dest file %s\nlog_type all\nconnection_messages true\n" % self.log_path
        main += self._run_as() + "\n"
        self.conf_path.write_text(main + render_config(kind, self.install_dir, self.port), encoding="utf-8")
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def _run_as(self) -> str:
        """Started as root, mosquitto drops to the `mosquitto` user before it reads the ACL and key files:
        give that user the files, as an installation does. Without that user, stay root."""
        if os.geteuid() != 0:
            return ""
        try:
            pw = pwd.getpwnam("mosquitto")
        except KeyError:
            return "user root\n"
        for path in [self.workdir, *list(self.workdir.rglob("*"))]:
            os.chown(str(path), pw.pw_uid, pw.pw_gid)
        return ""

    def start(self, timeout_s: float = 10.0) -> None:
        """Start mosquitto and wait until the listener accepts TCP connections."""
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError("mosquitto exited at start-up: %s\n%s" % (err, self.log()))
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        self.close()
        raise RuntimeError("mosquitto did not listen on port %d\n%s" % (self.port, self.log()))

    def log(self) -> str:
        """The broker log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop mosquitto and remove the working directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(str(self.workdir), ignore_errors=True)


def start_secure_broker(kind: str, pki_dir: Path, *, passwords: Optional[Dict[str, str]] = None,
                        identities: Optional[List[str]] = None) -> SecureBroker:
    """A `SecureBroker` for a pytest fixture: fails when mosquitto is missing, skips with EDGE_AGENT_SKIP_MQTT=1."""
    try:
        return SecureBroker(kind, pki_dir, passwords=passwords, identities=identities)
    except MosquittoMissing as e:
        if os.environ.get("EDGE_AGENT_SKIP_MQTT") == "1":
            import pytest

            pytest.skip(str(e))
        raise


class ProbeError(AssertionError):
    """The broker did not answer as a probe expected (timeout, refused connection)."""


class MqttProbe:
    """A blocking MQTT 5 test client: every call waits for the broker's answer and returns its reason code."""

    def __init__(self, client_id: str, *, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.messages: List[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._connack: Optional[int] = None
        self._disconnected: Optional[int] = None
        self._acks: Dict[int, List[int]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # -- callbacks (paho's network thread) ----------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._connack = reason_code.value
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._disconnected = reason_code.value
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._acks[mid] = [reason_code.value]
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._acks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    # -- blocking API ---------------------------------------------------------------------------------
    def tls(self, ca: Path, cert: Optional[Path] = None, key: Optional[Path] = None) -> MqttProbe:
        """Use TLS: verify the broker against `ca`; present `cert`/`key` when given."""
        self.client.tls_set(
            ca_certs=str(ca),
            certfile=str(cert) if cert else None,
            keyfile=str(key) if key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        return self

    def login(self, username: str, password: Optional[str]) -> MqttProbe:
        """Send a username (and password) in CONNECT."""
        self.client.username_pw_set(username, password)
        return self

    def _wait(self, pred, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProbeError("timed out waiting for %s" % what)
                self._cond.wait(left)

    def try_connect(self, host: str, port: int) -> Tuple[bool, str]:
        """(True, "") when the broker accepted us; (False, why) when it refused (CONNACK code or TLS error)."""
        try:
            self.client.connect(host, port, keepalive=30)
        except (ssl.SSLError, OSError) as e:
            return False, "%s: %s" % (type(e).__name__, e)
        self.client.loop_start()
        try:
            self._wait(lambda: self._connack is not None or self._disconnected is not None, "CONNACK")
        except ProbeError as e:
            return False, str(e)
        if self._connack == 0:
            return True, ""
        return False, "CONNACK %s / disconnect %s" % (self._connack, self._disconnected)

    def connect(self, host: str, port: int) -> MqttProbe:
        """Connect and require success."""
        ok, why = self.try_connect(host, port)
        if not ok:
            raise ProbeError("connection refused: %s" % why)
        return self

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and return the SUBACK reason code."""
        rc, mid = self.client.subscribe(topic_filter, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        self._wait(lambda: mid in self._acks, "SUBACK")
        return self._acks[mid][0]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, **props) -> int:
        """Publish and, for QoS 1, return the PUBACK reason code (0 = accepted, 135 = not authorized)."""
        properties = None
        if props:
            properties = Properties(PacketTypes.PUBLISH)
            for k, v in props.items():
                setattr(properties, k, v)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0:
            info.wait_for_publish(self.timeout_s)
            return 0
        self._wait(lambda: info.mid in self._acks, "PUBACK for %s" % topic)
        return self._acks[info.mid][0]

    def wait_for(self, topic: str, payload: Optional[bytes] = None) -> mqtt.MQTTMessage:
        """Wait until a message on `topic` (with `payload`, when given) has arrived; return it."""

        def found() -> Optional[mqtt.MQTTMessage]:
            for m in self.messages:
                if m.topic == topic and (payload is None or m.payload == payload):
                    return m
            return None

        self._wait(lambda: found() is not None, "a message on %s" % topic)
        msg = found()
        assert msg is not None
        return msg

    def topics_seen(self) -> List[str]:
        """Topics of every message received so far, in order."""
        with self._cond:
            return [m.topic for m in self.messages]

    @property
    def connected(self) -> bool:
        """True while paho considers the connection up."""
        return self.client.is_connected()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
