"""The shipped broker security (configs/mosquitto/) holds against devices, anonymous and foreign clients.

A real mosquitto runs the shipped drop-ins (only paths and the port changed, see secure_broker.py) with a
PKI made by scripts/make_test_pki.py. Every refusal is checked together with a positive control that
shows the observer would have seen the message, so a test cannot pass because nothing was delivered at all.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from secure_broker import REPO, MqttProbe, ProbeError, start_secure_broker

pytestmark = pytest.mark.mqtt

P = "edge/v1"
NOT_AUTHORIZED = 135
# PUBACK 0, or 16 "no matching subscribers" (MQTT 5): accepted either way.
ACCEPTED = (0, 16)
BAD_USER_OR_PASSWORD = 134
CONTROLLER = "fleet-controller"
OPERATOR = "fleet-operator"
# A valid certificate whose name the dynamic-security file does not list.
UNLISTED = "dev-unlisted"
# A device added at run time with mosquitto_ctrl, by an identity with the rules' admin role.
LATE = "dev-late"
ADMIN = "dynsec-admin"
PASSWORDS = {"dev-a": "pw-a", "dev-b": "pw-b", CONTROLLER: "pw-ctl", OPERATOR: "pw-op"}
# After the observer has received a positive control, how long a forbidden message gets to show up.
GRACE_S = 0.3


def _make_pki(out: Path, *args: str) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "make_test_pki.py"), str(out), *list(args)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Test CA + broker cert + clients; dev-stolen's certificate is on the CRL."""
    out = tmp_path_factory.mktemp("pki")
    _make_pki(
        out,
        "--device", "dev-a", "--device", "dev-b", "--device", "dev-stolen", "--device", UNLISTED,
        "--device", LATE, "--device", ADMIN,
        "--controller", CONTROLLER, "--operator", OPERATOR, "--revoke", "dev-stolen",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory) -> Path:
    """Another CA that issued a certificate with the same CN as a real device."""
    out = tmp_path_factory.mktemp("rogue")
    _make_pki(out, "--device", "dev-a", "--ca-name", "rogue CA")
    return out


@pytest.fixture(scope="module")
def tls_broker(pki):
    """mosquitto with configs/mosquitto/edge-agent-tls.conf."""
    b = start_secure_broker("tls", pki, identities=["dev-a", "dev-b", "dev-stolen", CONTROLLER, OPERATOR])
    yield b
    b.close()


@pytest.fixture(scope="module")
def pw_broker(pki):
    """mosquitto with configs/mosquitto/edge-agent-password.conf."""
    b = start_secure_broker("password", pki, passwords=PASSWORDS)
    yield b
    b.close()


@pytest.fixture
def clients(tls_broker, pki):
    """Factory for connected certificate-authenticated probes; all are closed after the test."""
    made = []

    def make(identity: str, client_id: str = "", pki_dir: Path = pki, connect: bool = True) -> MqttProbe:
        probe = MqttProbe(client_id or "%s-%d" % (identity, len(made)))
        probe.tls(pki / "ca.crt", pki_dir / ("%s.crt" % identity), pki_dir / ("%s.key" % identity))
        made.append(probe)
        if connect:
            probe.connect(tls_broker.host, tls_broker.port)
        return probe

    yield make
    for p in made:
        p.close()


def _dev(device: str, channel: str) -> str:
    return "%s/devices/%s/%s" % (P, device, channel)


def _nothing_more(probe: MqttProbe, allowed_topics) -> None:
    time.sleep(GRACE_S)
    unexpected = [t for t in probe.topics_seen() if t not in allowed_topics]
    assert unexpected == [], "received forbidden messages: %r" % unexpected


# --- device isolation (TLS client certificates) ---------------------------------------------------------


def test_device_cannot_publish_reports_as_another_device(clients):
    ctl = clients(CONTROLLER)
    for channel in ("status", "telemetry", "events", "results"):
        assert ctl.subscribe(P + "/devices/+/" + channel) == 1
    a = clients("dev-a")
    for channel in ("status", "telemetry", "events", "results"):
        assert a.publish(_dev("dev-b", channel), b"forged", retain=(channel == "status")) == NOT_AUTHORIZED
    # Positive control from the same client: the broker handles one client's packets in order.
    assert a.publish(_dev("dev-a", "status"), b"genuine") in ACCEPTED
    ctl.wait_for(_dev("dev-a", "status"), b"genuine")
    assert ctl.topics_seen() == [_dev("dev-a", "status")]
    # The refused retained publish left no retained status behind for dev-b.
    late = clients(CONTROLLER)
    late.subscribe(_dev("dev-b", "status"))
    _nothing_more(late, [])


def test_device_cannot_read_another_devices_commands_or_chunks(clients):
    b = clients("dev-b")
    b.subscribe(_dev("dev-b", "commands"))
    b.subscribe(_dev("dev-b", "chunks"))
    a = clients("dev-a")
    for flt in (_dev("dev-b", "commands"), _dev("dev-b", "chunks"), "#", P + "/devices/+/commands",
                "$share/spy/%s/devices/+/chunks" % P, "$share/spy/#"):  # fmt: skip
        # The dynamic-security plugin refuses the SUBSCRIBE itself (and would filter at delivery too).
        assert a.subscribe(flt) == NOT_AUTHORIZED, flt
    assert a.subscribe(_dev("dev-a", "commands")) == 1
    ctl = clients(CONTROLLER)
    assert ctl.publish(_dev("dev-b", "commands"), b"cmd-b") in ACCEPTED
    assert ctl.publish(_dev("dev-b", "chunks"), b"chunk-b") in ACCEPTED
    assert ctl.publish(_dev("dev-a", "commands"), b"cmd-a") in ACCEPTED
    b.wait_for(_dev("dev-b", "commands"), b"cmd-b")
    b.wait_for(_dev("dev-b", "chunks"), b"chunk-b")
    a.wait_for(_dev("dev-a", "commands"), b"cmd-a")
    _nothing_more(a, [_dev("dev-a", "commands")])


def test_device_cannot_publish_commands_chunks_or_rpc(clients):
    b = clients("dev-b")
    b.subscribe(_dev("dev-b", "commands"))
    b.subscribe(_dev("dev-b", "chunks"))
    ctl = clients(CONTROLLER)
    ctl.subscribe(P + "/fleet/rpc")
    ctl.subscribe(P + "/devices/+/fetch")
    op = clients(OPERATOR)
    op.subscribe(P + "/fleet/rpc-reply/%s/#" % OPERATOR)
    a = clients("dev-a")
    forbidden = [
        _dev("dev-b", "commands"),
        _dev("dev-a", "commands"),  # not even to itself: commands come from the controller only
        _dev("dev-b", "chunks"),
        _dev("dev-a", "chunks"),
        _dev("dev-b", "fetch"),  # fetch requests in another device's name (its rate share, its entitlements)
        P + "/fleet/rpc",
        P + "/fleet/rpc-reply/%s/x" % OPERATOR,
        P + "/bundles/fetch",  # the shared fetch topic of earlier versions: gone
    ]
    for topic in forbidden:
        assert a.publish(topic, b"forged") == NOT_AUTHORIZED, topic
    assert a.publish(_dev("dev-a", "fetch"), b"fetch-a") in ACCEPTED
    ctl.wait_for(_dev("dev-a", "fetch"), b"fetch-a")
    assert ctl.topics_seen() == [_dev("dev-a", "fetch")]
    _nothing_more(b, [])
    _nothing_more(op, [])


def test_device_cannot_read_other_devices_reports_or_fetch_requests(clients):
    a = clients("dev-a")
    for flt in (P + "/devices/+/status", P + "/devices/+/telemetry", P + "/devices/+/fetch", P + "/fleet/rpc",
                _dev("dev-a", "telemetry"), _dev("dev-b", "fetch"), _dev("dev-a", "fetch")):
        assert a.subscribe(flt) == NOT_AUTHORIZED, flt
    ctl = clients(CONTROLLER)
    ctl.subscribe(P + "/devices/+/telemetry")
    ctl.subscribe(P + "/devices/+/fetch")
    b = clients("dev-b")
    assert b.publish(_dev("dev-b", "telemetry"), b"tel-b") in ACCEPTED
    assert b.publish(_dev("dev-b", "fetch"), b"fetch-b") in ACCEPTED
    ctl.wait_for(_dev("dev-b", "fetch"), b"fetch-b")
    ctl.wait_for(_dev("dev-b", "telemetry"), b"tel-b")
    # Nor its own reports: nothing a device publishes is readable by devices.
    assert a.publish(_dev("dev-a", "telemetry"), b"tel-a") in ACCEPTED
    ctl.wait_for(_dev("dev-a", "telemetry"), b"tel-a")
    _nothing_more(a, [])


def _drop_connection(probe: MqttProbe) -> None:
    """End the TCP connection without DISCONNECT, as a device losing power does: the broker sends the will."""
    sock = probe.client.socket()
    probe.client.loop_stop()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_device_cannot_plant_a_last_will_on_another_devices_status(clients, tls_broker):
    ctl = clients(CONTROLLER)
    ctl.subscribe(P + "/devices/+/status")
    own = clients("dev-a", connect=False)
    own.client.will_set(_dev("dev-a", "status"), b"will-a", qos=1, retain=False)
    forged = clients("dev-a", connect=False)
    forged.client.will_set(_dev("dev-b", "status"), b"will-b", qos=1, retain=True)
    for probe in (forged, own):
        ok, _why = probe.try_connect(tls_broker.host, tls_broker.port)
        if ok:
            _drop_connection(probe)
    # Positive control: the legitimate will is delivered, so dropping the connection did fire wills.
    ctl.wait_for(_dev("dev-a", "status"), b"will-a")
    _nothing_more(ctl, [_dev("dev-a", "status")])
    late = clients(CONTROLLER)
    late.subscribe(_dev("dev-b", "status"))
    _nothing_more(late, [])


def test_another_devices_client_id_grants_none_of_its_rights(clients):
    b_watch = clients(CONTROLLER)
    b_watch.subscribe(_dev("dev-b", "status"))
    # dev-a's certificate, but dev-b's client id: the identity is the certificate CN, not the client id.
    a = clients("dev-a", client_id="dev-b")
    a.subscribe(_dev("dev-b", "commands"))
    a.subscribe(_dev("dev-a", "commands"))
    assert a.publish(_dev("dev-b", "status"), b"forged") == NOT_AUTHORIZED
    ctl = clients(CONTROLLER)
    assert ctl.publish(_dev("dev-b", "commands"), b"cmd-b") in ACCEPTED
    assert ctl.publish(_dev("dev-a", "commands"), b"cmd-a") in ACCEPTED
    a.wait_for(_dev("dev-a", "commands"), b"cmd-a")
    _nothing_more(a, [_dev("dev-a", "commands")])
    _nothing_more(b_watch, [])


def test_username_in_connect_is_ignored_with_certificates(clients, tls_broker):
    # dev-a's certificate, but CONNECT claims to be the controller: the certificate CN wins.
    a = clients("dev-a", connect=False)
    a.login(CONTROLLER, "anything")
    a.connect(tls_broker.host, tls_broker.port)
    b = clients("dev-b")
    b.subscribe(_dev("dev-b", "commands"))
    assert a.publish(_dev("dev-b", "commands"), b"forged") == NOT_AUTHORIZED
    a.subscribe(P + "/devices/+/telemetry")
    assert b.publish(_dev("dev-b", "telemetry"), b"tel-b") in ACCEPTED
    # Positive control: with the same claimed username, dev-a still has its own device rights.
    a.subscribe(_dev("dev-a", "commands"))
    ctl = clients(CONTROLLER)
    assert ctl.publish(_dev("dev-a", "commands"), b"cmd-a") in ACCEPTED
    a.wait_for(_dev("dev-a", "commands"), b"cmd-a")
    _nothing_more(a, [_dev("dev-a", "commands")])
    _nothing_more(b, [])


# --- shared subscriptions and identities (dynamic security) ---------------------------------------------

CONTROLLER_GROUPS = [
    "$share/fleet/%s/devices/+/fetch" % P,
    "$share/fleet/%s/devices/+/events" % P,
    "$share/fleet/%s/devices/+/telemetry" % P,
    "$share/fleet-rpc/%s/fleet/rpc" % P,
]


def test_device_cannot_steal_the_controllers_shared_subscription_turns(clients):
    """The attack: devices join the controller's `$share` groups to take round-robin turns, which mosquitto
    2.0 then drops at the ACL. Every join is refused in the SUBACK, and the controller gets every message."""
    ctl = clients(CONTROLLER)
    for flt in CONTROLLER_GROUPS:
        assert ctl.subscribe(flt) == 1, flt
    thieves = [clients("dev-a", client_id="thief-%d" % i) for i in range(10)]
    for t in thieves:
        for flt in [*CONTROLLER_GROUPS, "$share/fleet/%s/devices/+/status" % P, "$share/fleet/#",
                    "$share/fleet/" + _dev("dev-a", "fetch"), "$share/x/" + _dev("dev-b", "fetch")]:
            assert t.subscribe(flt) == NOT_AUTHORIZED, flt
    b = clients("dev-b")
    op = clients(OPERATOR)
    n = 20
    for i in range(n):
        assert b.publish(_dev("dev-b", "fetch"), b"f%d" % i) in ACCEPTED
        assert b.publish(_dev("dev-b", "events"), b"e%d" % i) in ACCEPTED
        assert b.publish(_dev("dev-b", "telemetry"), b"t%d" % i) in ACCEPTED
        assert op.publish(P + "/fleet/rpc", b"r%d" % i) in ACCEPTED
    expected = {(_dev("dev-b", "fetch"), b"f%d" % i) for i in range(n)}
    expected |= {(_dev("dev-b", "events"), b"e%d" % i) for i in range(n)}
    expected |= {(_dev("dev-b", "telemetry"), b"t%d" % i) for i in range(n)}
    expected |= {(P + "/fleet/rpc", b"r%d" % i) for i in range(n)}
    deadline = time.monotonic() + 10
    while len(ctl.messages) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {(m.topic, m.payload) for m in ctl.messages} == expected
    assert len(ctl.messages) == len(expected)
    for t in thieves:
        _nothing_more(t, [])


def test_refused_subscription_is_reported_by_the_session(tls_broker, pki):
    """A filter the broker's rules refuse (SUBACK 135) is not silent in the product's session: waiting for
    it says no, the refusal is counted and `last_error` names the filter; its own filter is granted."""
    from edge_agent.config import MqttConfig, TlsConfig
    from edge_agent.mqtt.session import MqttSession

    tls = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "dev-a.crt", key_file=pki / "dev-a.key")
    dev = MqttSession(MqttConfig(host=tls_broker.host, port=tls_broker.port, tls=tls), client_id="dev-a")
    dev.subscribe(_dev("dev-a", "commands"), lambda m: None)
    dev.subscribe(_dev("dev-b", "commands"), lambda m: None)
    dev.start()
    try:
        assert dev.wait_connected(5)
        assert dev.wait_subscribed(5, _dev("dev-a", "commands")), dev.last_error
        assert not dev.wait_subscribed(5, _dev("dev-b", "commands"))
        assert not dev.wait_subscribed(0.0)
        assert dev.stats["subscribe_refused"] == 1
        assert _dev("dev-b", "commands") in (dev.last_error or "") and "authori" in dev.last_error.lower()
    finally:
        dev.stop(timeout_s=1)


def test_operator_cannot_join_the_controllers_shared_subscriptions(clients):
    op = clients(OPERATOR)
    for flt in CONTROLLER_GROUPS:
        assert op.subscribe(flt) == NOT_AUTHORIZED, flt
    assert op.subscribe(P + "/devices/+/telemetry") == 1  # positive control: its own right, unshared


def test_operator_and_controller_names_get_no_device_rights(clients):
    """The old ACL's `pattern` lines applied to every user: the operator could pose as a device called
    `fleet-operator` (and appear in `fleet devices`), read `devices/fleet-operator/commands` and publish
    fetch requests. With one role per identity it has none of that."""
    op, ctl = clients(OPERATOR), clients(CONTROLLER)
    watch = clients(CONTROLLER)
    assert watch.subscribe(P + "/devices/+/status") == 1
    assert watch.subscribe(P + "/devices/+/fetch") == 1
    for who, name in ((op, OPERATOR), (ctl, CONTROLLER)):
        for channel in ("status", "telemetry", "events", "results", "fetch"):
            assert who.publish(_dev(name, channel), b"fake-device", retain=(channel == "status")) == NOT_AUTHORIZED
        assert who.subscribe(_dev(name, "chunks")) == NOT_AUTHORIZED
    assert op.subscribe(_dev(OPERATOR, "commands")) == NOT_AUTHORIZED
    assert op.publish(_dev("dev-a", "fetch"), b"op-fetch") == NOT_AUTHORIZED
    assert ctl.publish(_dev(OPERATOR, "commands"), b"cmd") in ACCEPTED
    a = clients("dev-a")
    assert a.publish(_dev("dev-a", "status"), b"genuine") in ACCEPTED  # positive control
    watch.wait_for(_dev("dev-a", "status"), b"genuine")
    _nothing_more(watch, [_dev("dev-a", "status")])
    _nothing_more(op, [])


def test_certificate_not_named_in_the_rules_gets_no_rights(clients):
    """A valid certificate (right CA, not revoked) whose name was never added to the rules: the broker
    lets it connect, but it may publish, subscribe to and receive nothing."""
    ghost = clients(UNLISTED)
    ctl = clients(CONTROLLER)
    assert ctl.subscribe(P + "/devices/+/fetch") == 1
    assert ghost.subscribe(_dev(UNLISTED, "commands")) == NOT_AUTHORIZED
    assert ghost.publish(_dev(UNLISTED, "status"), b"hello") == NOT_AUTHORIZED
    assert ghost.publish(_dev(UNLISTED, "fetch"), b"ghost-fetch") == NOT_AUTHORIZED
    assert ghost.publish(_dev("dev-a", "fetch"), b"ghost-fetch") == NOT_AUTHORIZED
    assert clients("dev-a").publish(_dev("dev-a", "fetch"), b"real-fetch") in ACCEPTED
    ctl.wait_for(_dev("dev-a", "fetch"), b"real-fetch")
    _nothing_more(ctl, [_dev("dev-a", "fetch")])


def test_dynsec_generator_refuses_a_name_with_two_roles_or_not_an_id(tmp_path):
    out = tmp_path / "ds.json"
    for extra in (["--device", OPERATOR], ["--device", "a/#"]):
        r = subprocess.run([sys.executable, "-m", "fleet.cli", "broker", "dynsec", "--out", str(out), *extra],
                           check=False, capture_output=True, timeout=60, cwd=str(REPO))
        assert r.returncode != 0, extra
        assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "fleet.cli", "broker", "dynsec", "--out", str(out), "--device", "cam-1"],
                       check=False, capture_output=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert "device-cam-1" in out.read_text()


def test_device_added_at_run_time_with_mosquitto_ctrl_gets_only_its_own_rights(pki):
    """The provisioning path the docs give: `fleet broker add-device` prints mosquitto_ctrl commands; run as
    the admin identity against a running broker, they give the new device exactly its role."""
    import shutil

    ctrl = shutil.which("mosquitto_ctrl")
    assert ctrl, "mosquitto_ctrl is missing (Debian: package mosquitto)"
    b = start_secure_broker("tls", pki, identities=[CONTROLLER, ADMIN, "dev-a"])
    probes = []

    def probe(identity: str) -> MqttProbe:
        p = MqttProbe("%s-%d" % (identity, len(probes)))
        p.tls(pki / "ca.crt", pki / ("%s.crt" % identity), pki / ("%s.key" % identity))
        probes.append(p)
        return p.connect(b.host, b.port)

    try:
        assert probe(LATE).subscribe(_dev(LATE, "commands")) == NOT_AUTHORIZED  # not provisioned yet
        conn = ["-h", b.host, "-p", str(b.port), "--cafile", str(pki / "ca.crt"), "--cert",
                str(pki / ("%s.crt" % ADMIN)), "--key", str(pki / ("%s.key" % ADMIN))]
        out = subprocess.run([sys.executable, "-m", "fleet.cli", "broker", "add-device", LATE], check=True,
                             capture_output=True, text=True, timeout=60, cwd=str(REPO)).stdout
        import shlex

        for line in out.splitlines():
            argv = shlex.split(line)
            assert argv[0] == "mosquitto_ctrl"
            r = subprocess.run([ctrl, *conn, *argv[1:]], check=False, capture_output=True, text=True, timeout=30,
                               input="\n\n")  # createClient asks for a password: none (certificates)
            assert r.returncode == 0 and "rror" not in r.stdout + r.stderr, (line, r.stdout, r.stderr)
        late, ctl = probe(LATE), probe(CONTROLLER)
        assert late.subscribe(_dev(LATE, "commands")) == 1
        for flt in ("$share/fleet/%s/devices/+/fetch" % P, _dev("dev-a", "commands"), "#"):
            assert late.subscribe(flt) == NOT_AUTHORIZED, flt
        assert late.publish(_dev("dev-a", "status"), b"forged") == NOT_AUTHORIZED
        assert late.publish(_dev("dev-a", "fetch"), b"forged") == NOT_AUTHORIZED
        assert ctl.subscribe(_dev(LATE, "fetch")) == 1
        assert late.publish(_dev(LATE, "fetch"), b"fetch-late") in ACCEPTED
        ctl.wait_for(_dev(LATE, "fetch"), b"fetch-late")
        assert ctl.publish(_dev(LATE, "commands"), b"cmd-late") in ACCEPTED
        late.wait_for(_dev(LATE, "commands"), b"cmd-late")
        # Without the admin role the same command is refused.
        r = subprocess.run([ctrl, "-h", b.host, "-p", str(b.port), "--cafile", str(pki / "ca.crt"), "--cert",
                            str(pki / "dev-a.crt"), "--key", str(pki / "dev-a.key"), "dynsec", "createClient", "x"],
                           check=False, capture_output=True, text=True, timeout=30)
        assert "Not authorized" in r.stdout + r.stderr, (r.stdout, r.stderr)
    finally:
        for p in probes:
            p.close()
        b.close()


# --- who may connect ------------------------------------------------------------------------------------


def test_client_without_certificate_is_refused(tls_broker, pki, clients):
    anon = MqttProbe("anonymous", timeout_s=3).tls(pki / "ca.crt")
    try:
        ok, _why = anon.try_connect(tls_broker.host, tls_broker.port)
    finally:
        anon.close()
    assert not ok, "a client without a certificate was accepted"
    assert "as anonymous " not in tls_broker.log()
    assert clients("dev-a").connected  # the same broker accepts a real device


def test_plain_mqtt_on_the_tls_port_is_refused(tls_broker):
    plain = MqttProbe("plain", timeout_s=3)
    try:
        ok, _why = plain.try_connect(tls_broker.host, tls_broker.port)
    finally:
        plain.close()
    assert not ok


def test_certificate_from_another_ca_is_refused(tls_broker, rogue_pki, pki, clients):
    rogue = MqttProbe("dev-a-rogue", timeout_s=3).tls(pki / "ca.crt", rogue_pki / "dev-a.crt", rogue_pki / "dev-a.key")
    try:
        ok, _why = rogue.try_connect(tls_broker.host, tls_broker.port)
    finally:
        rogue.close()
    assert not ok, "a certificate from a foreign CA was accepted"
    assert "as dev-a-rogue " not in tls_broker.log()
    assert clients("dev-a").connected


def test_revoked_device_certificate_is_refused(tls_broker, pki, clients):
    crl = x509.load_pem_x509_crl((pki / "ca.crl").read_bytes())
    stolen = x509.load_pem_x509_certificate((pki / "dev-stolen.crt").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(stolen.serial_number) is not None
    probe = clients("dev-stolen", connect=False)
    ok, _why = probe.try_connect(tls_broker.host, tls_broker.port)
    assert not ok, "a revoked certificate was accepted"
    assert "u'dev-stolen'" not in tls_broker.log()
    assert clients("dev-b").connected  # not revoked, same CA


def test_broker_certificate_is_verified_by_clients(tls_broker, rogue_pki, pki):
    # A client that trusts only the rogue CA must refuse the real broker (and vice versa a rogue broker).
    probe = MqttProbe("dev-a-wrong-ca", timeout_s=3).tls(rogue_pki / "ca.crt", pki / "dev-a.crt", pki / "dev-a.key")
    try:
        ok, why = probe.try_connect(tls_broker.host, tls_broker.port)
    finally:
        probe.close()
    assert not ok
    assert "certificate verify failed" in why


# --- controller and operator rights ---------------------------------------------------------------------


def test_controllers_share_device_reports_and_send_commands_and_chunks(clients):
    group = "$share/fleet-controllers/%s/devices/+/telemetry" % P
    ctl1, ctl2 = clients(CONTROLLER, client_id="ctl-1"), clients(CONTROLLER, client_id="ctl-2")
    assert ctl1.subscribe(group) == 1 and ctl2.subscribe(group) == 1
    a = clients("dev-a")
    a.subscribe(_dev("dev-a", "commands"))
    a.subscribe(_dev("dev-a", "chunks"))
    n = 20
    for i in range(n):
        assert a.publish(_dev("dev-a", "telemetry"), b"t%d" % i) in ACCEPTED
    deadline = time.monotonic() + 5
    while len(ctl1.messages) + len(ctl2.messages) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(GRACE_S)
    got = sorted(m.payload for m in ctl1.messages + ctl2.messages)
    assert got == sorted(b"t%d" % i for i in range(n)), "each report must reach exactly one controller"
    assert ctl1.messages and ctl2.messages, "the shared subscription did not spread the load"
    assert ctl1.publish(_dev("dev-a", "commands"), b"cmd") in ACCEPTED
    assert ctl2.publish(_dev("dev-a", "chunks"), b"\x00\x01chunk", UserProperty=[("offset", "0")]) in ACCEPTED
    a.wait_for(_dev("dev-a", "commands"), b"cmd")
    assert a.wait_for(_dev("dev-a", "chunks")).payload == b"\x00\x01chunk"


def test_operator_rpc_round_trip_and_replies_are_private(clients):
    reply_topic = "%s/fleet/rpc-reply/%s/cli-1" % (P, OPERATOR)
    ctl = clients(CONTROLLER)
    ctl.subscribe(P + "/fleet/rpc")
    spy = clients("dev-a")
    spy.subscribe(P + "/fleet/#")
    op = clients(OPERATOR)
    op.subscribe(P + "/fleet/rpc-reply/%s/#" % OPERATOR)
    assert op.publish(P + "/fleet/rpc", b"list", ResponseTopic=reply_topic, CorrelationData=b"c1") in ACCEPTED
    req = ctl.wait_for(P + "/fleet/rpc", b"list")
    assert req.properties.ResponseTopic == reply_topic
    assert ctl.publish(reply_topic, b"answer", CorrelationData=req.properties.CorrelationData) in ACCEPTED
    assert op.wait_for(reply_topic, b"answer").properties.CorrelationData == b"c1"
    _nothing_more(spy, [])
    # The operator acts only through the controller: no direct commands, chunks or device reports.
    assert op.publish(_dev("dev-a", "commands"), b"forged") == NOT_AUTHORIZED
    assert op.publish(_dev("dev-a", "chunks"), b"forged") == NOT_AUTHORIZED
    assert op.publish(_dev("dev-a", "status"), b"forged") == NOT_AUTHORIZED
    # The controller cannot pose as a device either.
    assert ctl.publish(_dev("dev-a", "status"), b"forged") == NOT_AUTHORIZED


def test_operator_reads_telemetry_and_status_but_not_commands_chunks_or_events(clients):
    op = clients(OPERATOR)
    for flt in ("#", P + "/devices/+/commands", P + "/devices/+/chunks", P + "/devices/+/events",
                P + "/devices/+/fetch"):
        assert op.subscribe(flt) == NOT_AUTHORIZED, flt
    assert op.subscribe(P + "/devices/+/telemetry") == 1
    assert op.subscribe(P + "/devices/+/status") == 1
    a, ctl = clients("dev-a"), clients(CONTROLLER)
    assert ctl.publish(_dev("dev-a", "commands"), b"cmd") in ACCEPTED
    assert ctl.publish(_dev("dev-a", "chunks"), b"chunk") in ACCEPTED
    assert a.publish(_dev("dev-a", "events"), b"event") in ACCEPTED
    assert a.publish(_dev("dev-a", "results"), b"result") in ACCEPTED
    assert a.publish(_dev("dev-a", "status"), b"status") in ACCEPTED
    assert a.publish(_dev("dev-a", "telemetry"), b"telemetry") in ACCEPTED  # positive controls last
    op.wait_for(_dev("dev-a", "status"), b"status")
    op.wait_for(_dev("dev-a", "telemetry"), b"telemetry")
    _nothing_more(op, [_dev("dev-a", "status"), _dev("dev-a", "telemetry")])
    # Reading is all: an operator still cannot publish device reports.
    assert op.publish(_dev("dev-a", "telemetry"), b"forged") == NOT_AUTHORIZED


def test_small_request_reply_is_not_delayed_by_nagle(tls_broker, pki):
    """A CLI-sized request and reply through the shipped listener (the product's MQTT sessions on both
    sides). Without `set_tcp_nodelay true` the broker's small writes wait ~40 ms for a delayed ACK."""
    import statistics
    import threading

    from edge_agent.config import MqttConfig, TlsConfig
    from edge_agent.mqtt.session import MqttSession

    def session(identity: str) -> MqttSession:
        tls = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / ("%s.crt" % identity),
                        key_file=pki / ("%s.key" % identity))
        return MqttSession(MqttConfig(host=tls_broker.host, port=tls_broker.port, tls=tls), client_id=identity)

    reply = "%s/fleet/rpc-reply/%s/cli" % (P, OPERATOR)
    ctl, op = session(CONTROLLER), session(OPERATOR)
    got = threading.Event()
    ctl.subscribe(P + "/fleet/rpc", lambda m: ctl.publish(reply, b"r" * 200, qos=1), qos=1)
    op.subscribe(reply, lambda m: got.set(), qos=1)
    ctl.start()
    op.start()
    try:
        assert ctl.wait_connected(5) and op.wait_connected(5)
        assert ctl.wait_subscribed(5) and op.wait_subscribed(5), (ctl.last_error, op.last_error)
        rtt = []
        for _ in range(30):
            got.clear()
            t0 = time.perf_counter()
            op.publish(P + "/fleet/rpc", b"q" * 200, qos=1)
            assert got.wait(5), "no reply"
            rtt.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01)
    finally:
        ctl.stop(timeout_s=1)
        op.stop(timeout_s=1)
    # Measured: median 42 ms without set_tcp_nodelay, about 1 ms with it.
    assert statistics.median(rtt) < 15, sorted(rtt)


# --- password listener ----------------------------------------------------------------------------------


def _pw_probe(pw_broker, pki, user, password, client_id):
    probe = MqttProbe(client_id, timeout_s=3).tls(pki / "ca.crt")
    if user is not None:
        probe.login(user, password)
    return probe


@pytest.mark.parametrize(
    "user,password",
    [
        (None, None),  # anonymous
        ("dev-a", "wrong"),
        ("dev-a", None),
        ("nobody", "pw-a"),
    ],
    ids=["anonymous", "wrong-password", "no-password", "unknown-user"],
)
def test_password_listener_refuses_bad_credentials(pw_broker, pki, user, password):
    probe = _pw_probe(pw_broker, pki, user, password, "bad-login")
    try:
        ok, why = probe.try_connect(pw_broker.host, pw_broker.port)
    finally:
        probe.close()
    assert not ok
    # mosquitto 2.0 answers 135 "not authorized" for all of these; 134 "bad user name or password" is fine too.
    assert why.startswith(("CONNACK %d " % NOT_AUTHORIZED, "CONNACK %d " % BAD_USER_OR_PASSWORD)), why


def test_password_identity_gets_the_same_acl(pw_broker, pki):
    ctl = _pw_probe(pw_broker, pki, CONTROLLER, PASSWORDS[CONTROLLER], "ctl").connect(pw_broker.host, pw_broker.port)
    a = _pw_probe(pw_broker, pki, "dev-a", PASSWORDS["dev-a"], "dev-a").connect(pw_broker.host, pw_broker.port)
    try:
        ctl.subscribe("$share/g/%s/devices/+/status" % P)
        assert a.publish(_dev("dev-b", "status"), b"forged") == NOT_AUTHORIZED
        assert a.publish(_dev("dev-a", "commands"), b"forged") == NOT_AUTHORIZED
        assert a.publish(_dev("dev-a", "status"), b"genuine") in ACCEPTED
        ctl.wait_for(_dev("dev-a", "status"), b"genuine")
        assert ctl.topics_seen() == [_dev("dev-a", "status")]
    finally:
        a.close()
        ctl.close()


def test_password_listener_requires_tls(pw_broker):
    plain = MqttProbe("plain", timeout_s=3).login("dev-a", PASSWORDS["dev-a"])
    try:
        ok, _why = plain.try_connect(pw_broker.host, pw_broker.port)
    finally:
        plain.close()
    assert not ok


# --- the PKI script -------------------------------------------------------------------------------------


def test_pki_script_refuses_a_name_that_is_not_a_device_id(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "make_test_pki.py"), str(tmp_path), "--device", "a/#"]
    r = subprocess.run(cmd, check=False, capture_output=True, timeout=60)
    assert r.returncode != 0
    assert b"invalid device id" in r.stderr
    assert not list(tmp_path.glob("a*"))


def test_pki_script_extends_an_existing_ca(tmp_path):
    _make_pki(tmp_path, "--device", "dev-1")
    ca_before = (tmp_path / "ca.crt").read_bytes()
    cert_before = (tmp_path / "dev-1.crt").read_bytes()
    _make_pki(tmp_path, "--device", "dev-2", "--revoke", "dev-1")
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "dev-1.crt").read_bytes() == cert_before
    ca = x509.load_pem_x509_certificate(ca_before)
    dev2 = x509.load_pem_x509_certificate((tmp_path / "dev-2.crt").read_bytes())
    assert dev2.issuer == ca.subject
    assert dev2.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "dev-2"
    crl = x509.load_pem_x509_crl((tmp_path / "ca.crl").read_bytes())
    dev1 = x509.load_pem_x509_certificate(cert_before)
    assert crl.get_revoked_certificate_by_serial_number(dev1.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(dev2.serial_number) is None


def test_probe_timeout_is_reported(tls_broker, pki):
    """The helper itself: waiting for a message that never comes fails instead of passing silently."""
    probe = MqttProbe("dev-a-timeout", timeout_s=0.3).tls(pki / "ca.crt", pki / "dev-a.crt", pki / "dev-a.key")
    probe.connect(tls_broker.host, tls_broker.port)
    try:
        with pytest.raises(ProbeError):
            probe.wait_for(_dev("dev-a", "commands"))
    finally:
        probe.close()
