"""The console's REST API against a real controller (mosquitto, `Controller` with its registry and RPC,
simulated devices): authentication and roles, bounded inputs, server-side paging, the same RPC methods
the CLI runs, bundle upload of a real signed bundle, live rollout streams, Prometheus /metrics under
promtool, and the OpenAPI copy in docs/."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from console_helpers import Client, send_telemetry, start_console
from fleet_helpers import FleetRig

from fleet.console.openapi import document
from fleet.console.tokens import load_tokens

pytestmark = pytest.mark.mqtt
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def rig(broker, tmp_path):
    # dev-00 never answers a deploy of v2, so a v2 rollout with dev-00 in its first wave stays running.
    r = FleetRig(broker, tmp_path, devices=12,
                 behaviour=lambda d, b: "silent" if d == "dev-00" and b.version == 2 else "pass").start()
    console, tokens = start_console(r.controller, tmp_path, max_body_bytes=4096, max_upload_bytes=8 * 1024 * 1024)
    r.console, r.tokens = console, tokens
    r.op = Client(console.url, tokens["operator"])
    r.viewer = Client(console.url, tokens["viewer"])
    r.anon = Client(console.url)
    yield r
    console.stop()
    r.stop()


def test_tokens_are_stored_hashed(rig, tmp_path):
    text = (tmp_path / "console-tokens").read_text()
    for tok in rig.tokens.values():
        assert tok not in text
    assert sorted((p.name, p.role) for p in load_tokens(tmp_path / "console-tokens").values()) == [
        ("alice", "viewer"), ("olga", "operator")]
    assert oct((tmp_path / "console-tokens").stat().st_mode & 0o777) == "0o600"


def test_unauthenticated_and_viewer_cannot_act(rig):
    assert rig.anon.get("/api/v1/devices")[0] == 401
    assert Client(rig.console.url, "not-a-token").get("/api/v1/devices")[0] == 401
    assert rig.anon.get("/metrics")[0] == 401
    assert rig.viewer.get("/api/v1/devices")[0] == 200
    start = {"bundle": {"name": "digits", "version": 2}, "waves": [100]}
    s, doc, _ = rig.viewer.post("/api/v1/rollouts", start)
    assert s == 403 and "viewer" in doc["error"]
    assert rig.anon.post("/api/v1/rollouts", start)[0] == 401
    assert rig.viewer.post("/api/v1/rollback", {"devices": ["dev-01"]})[0] == 403
    assert rig.viewer.request("POST", "/api/v1/bundles", raw=b"x", ctype="application/octet-stream")[0] == 403
    assert rig.controller.registry.list_rollouts() == []  # nothing started
    # The static UI and the API description need no token (they hold no fleet data).
    assert rig.anon.get("/")[0] == 200 and rig.anon.get("/api/v1/openapi.json")[0] == 200


def test_devices_paged_sorted_filtered_on_the_server(rig):
    s, page, _ = rig.viewer.get("/api/v1/devices?limit=5&offset=5&sort=device_id&order=desc")
    assert s == 200 and page["total"] == 12
    assert [d["device_id"] for d in page["devices"]] == ["dev-%02d" % i for i in range(6, 1, -1)]
    s, page, _ = rig.viewer.get("/api/v1/devices?q=DEV-1&limit=50")
    assert s == 200 and sorted(d["device_id"] for d in page["devices"]) == ["dev-10", "dev-11"]
    s, page, _ = rig.viewer.get("/api/v1/devices?online=false")
    assert s == 200 and page["total"] == 0
    s, page, _ = rig.viewer.get("/api/v1/devices?bundle=digits&version=1&limit=1")
    assert s == 200 and page["total"] == 12 and len(page["devices"]) == 1
    s, page, _ = rig.viewer.get("/api/v1/devices?q=%25")  # a literal %, not a wildcard
    assert s == 200 and page["total"] == 0


@pytest.mark.parametrize("query", [
    "limit=0", "limit=100000", "offset=-1", "sort=password", "order=up", "online=maybe", "limit=1&limit=2",
    "q=" + "x" * 65, "&".join("f%d=1" % i for i in range(30)), "version=abc", "limit=" + "9" * 40,
])
def test_bad_device_queries_are_400(rig, query):
    s, doc, _ = rig.viewer.get("/api/v1/devices?" + query)
    assert s == 400, (query, doc)
    assert doc["error"]


def test_bad_bodies_are_4xx(rig):
    assert rig.op.request("POST", "/api/v1/rollouts", raw=b"{" * 5000)[0] == 413  # over max_body_bytes
    assert rig.op.request("POST", "/api/v1/rollouts", raw=b"[" * 200 + b"]" * 200)[0] == 400  # too deep
    assert rig.op.request("POST", "/api/v1/rollouts", raw=b"not json")[0] == 400
    assert rig.op.request("POST", "/api/v1/rollouts", raw=b"{}", ctype="text/plain")[0] == 415
    assert rig.op.post("/api/v1/rollouts", {"bundle": {"name": "digits", "version": 2}, "rm": 1})[0] == 400
    assert rig.op.post("/api/v1/rollouts", {"bundle": {"name": "nope", "version": 9}})[0] == 404
    assert rig.op.post("/api/v1/rollback", {"devices": "dev-01"})[0] == 400
    assert rig.op.post("/api/v1/rollouts/r-nope/pause")[0] == 404
    assert rig.op.post("/api/v1/rollouts/r-nope/abort", {"rollback": "yes"})[0] == 400
    assert rig.op.request("DELETE", "/api/v1/devices")[0] == 405
    assert rig.op.get("/api/v1/devices/../../etc/passwd")[0] == 404
    assert rig.op.get("/static/../server.py")[0] == 404
    assert rig.op.get("/api/v1/devices/dev-99")[0] == 404
    # The server is still fine after all that.
    assert rig.op.get("/api/v1/devices/dev-01")[0] == 200


def test_same_semantics_as_the_cli(rig, capsys):
    """The API runs the RPC methods the CLI runs: what one starts, the other sees and controls."""
    rpc = rig.controller.control.rpc
    s, dev, _ = rig.viewer.get("/api/v1/devices/dev-03")
    direct = rpc.dispatch("devices.show", {"device_id": "dev-03"}).result
    assert s == 200 and dev["device_id"] == direct["device_id"] and dev["active"] == direct["active"]
    s, r, _ = rig.op.post("/api/v1/rollouts", {"bundle": {"name": "digits", "version": 2},
                                               "wave_devices": [["dev-00"], ["dev-01", "dev-02"]]})
    assert s == 201, r
    rid = r["rollout_id"]
    rc, out, err = rig.cli(capsys, "rollout", "status", rid, "--json")
    assert rc == 0, out + err
    assert json.loads(out)["rollout_id"] == rid
    rc, out, err = rig.cli(capsys, "rollout", "pause", rid)
    assert rc == 0, out + err
    s, st, _ = rig.viewer.get("/api/v1/rollouts/%s?devices=false" % rid)
    assert s == 200 and st["state"] == "paused" and "devices" not in st
    s, st, _ = rig.op.post("/api/v1/rollouts/%s/resume" % rid)
    assert s == 200, st
    rc, out, err = rig.cli(capsys, "rollout", "status", rid, "--json")
    assert rc == 0 and json.loads(out)["state"] == "running", out + err
    s, st, _ = rig.op.post("/api/v1/rollouts/%s/abort" % rid, {"rollback": True})
    assert s == 200, st
    rc, out, err = rig.cli(capsys, "rollout", "status", rid, "--json")
    assert rc == 0 and json.loads(out)["state"] == "aborted", out + err
    # The same refusal through both: resuming an aborted rollout.
    s, st, _ = rig.op.post("/api/v1/rollouts/%s/resume" % rid)
    rc, out, err = rig.cli(capsys, "rollout", "resume", rid)
    assert s == 409 and rc != 0 and st["error"] in err, (st, err)
    s, lst, _ = rig.viewer.get("/api/v1/rollouts")
    assert s == 200 and lst[0]["rollout_id"] == rid and lst[0]["state"] == "aborted"
    s, ev, _ = rig.viewer.get("/api/v1/devices/dev-00/events")
    assert s == 200 and any(h["rollout_id"] == rid for h in ev["history"]), ev


def test_rollout_stream_sends_changes_until_the_end(rig):
    s, r, _ = rig.op.post("/api/v1/rollouts", {"bundle": {"name": "digits", "version": 3}, "waves": [50, 100]})
    assert s == 201
    sock = socket.create_connection(("127.0.0.1", rig.console.httpd.server_address[1]), timeout=30)
    sock.sendall(("GET /api/v1/rollouts/%s/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
                  % (r["rollout_id"], rig.tokens["viewer"])).encode())
    data = b""
    deadline = time.monotonic() + 30
    while b"event: end" not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"200" in head.split(b"\r\n")[0] and b"text/event-stream" in head
    states = [json.loads(line[6:])["state"] for line in body.split(b"\n") if line.startswith(b"data: {\"")]
    assert states[0] == "running" and states[-1] == "succeeded", states
    assert b"event: end" in body


def test_bundle_upload_inspect_and_refusal(rig, tmp_path, capsys):
    from agent_helpers import build_sample_bundle, write_key

    key = write_key(tmp_path / "keys", "release")
    bundle = build_sample_bundle(tmp_path / "b", key, version=7)
    s, rec, _ = rig.op.request("POST", "/api/v1/bundles", raw=bundle.read_bytes(), ctype="application/octet-stream")
    assert s == 201, rec
    assert (rec["name"], rec["version"]) == ("digits", 7)
    s, b, _ = rig.viewer.get("/api/v1/bundles/digits/7")
    assert s == 200 and set(b["models"]) == {"small", "large"}
    assert [sig["keyid"] for sig in b["signatures"]] == [key.keyid]
    assert b["record"]["manifest_sha256"] == rec["manifest_sha256"]
    # `fleet bundles` runs the same RPC methods over MQTT.
    rc, out, err = rig.cli(capsys, "bundles", "digits@7", "--json")
    assert rc == 0 and json.loads(out) == b, err
    rc, out, err = rig.cli(capsys, "bundles", "--json")
    assert rc == 0 and json.loads(out) == rig.viewer.get("/api/v1/bundles")[1], err
    s, doc, _ = rig.op.request("POST", "/api/v1/bundles", raw=b"\0" * 2048, ctype="application/octet-stream")
    assert s == 422 and "refused" in doc["error"]
    # Over max_upload_bytes: refused from the headers alone, before a byte of the body is read.
    sock = socket.create_connection(("127.0.0.1", rig.console.httpd.server_address[1]), timeout=10)
    sock.sendall(("POST /api/v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                  "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                  % (rig.tokens["operator"], 9 * 1024 * 1024)).encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    sock.close()
    assert list((rig.state_dir / "uploads").iterdir()) == []  # temporary files removed


def test_metrics_clean_under_promtool(rig):
    send_telemetry(rig)
    rig.wait(lambda: all((d.get("telemetry") or {}).get("p99_ms") is not None
                         for d in rig.controller.registry.list_devices()), 20, "telemetry in the registry")
    s, text, hdrs = rig.viewer.get("/metrics")
    assert s == 200 and hdrs["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'fleet_device_latency_p99_seconds{device="dev-07"}' in text
    assert 'fleet_controller_ingest_received_total{channel="telemetry"}' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (scripts/test.sh installs Debian's prometheus package)")
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


def test_openapi_copy_in_docs_matches_the_server(rig):
    s, served, _ = rig.anon.get("/api/v1/openapi.json")
    assert s == 200 and served == document()
    assert json.loads((REPO / "docs" / "console-openapi.json").read_text()) == served, (
        "docs/console-openapi.json is stale: python -m fleet.console.openapi > docs/console-openapi.json")
    from openapi_spec_validator import validate

    validate(served)  # a valid OpenAPI 3.0 document
    ops = {(m.upper(), p) for p, item in served["paths"].items() for m in item}
    assert ("POST", "/api/v1/rollouts/{rollout_id}/promote") in ops and ("GET", "/api/v1/devices") in ops


def test_token_cli_adds_and_lists(tmp_path, capsys):
    from fleet.cli import main

    toml = tmp_path / "fleet.toml"
    toml.write_text('[controller]\nstate_dir = "%s"\n' % (tmp_path / "state"))
    assert main(["token", "add", "--role", "operator", "--name", "ops1", "--config", str(toml)]) == 0
    token = capsys.readouterr()[0].splitlines()[0]
    assert len(token) >= 40 and token not in (tmp_path / "state" / "console-tokens").read_text()
    assert main(["token", "add", "--role", "operator", "--name", "ops1", "--config", str(toml)]) == 2
    capsys.readouterr()
    assert main(["token", "list", "--config", str(toml)]) == 0
    assert "operator  ops1" in capsys.readouterr()[0]


def _self_signed(tmp: Path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-console-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return tmp / "c.pem", tmp / "k.pem"


def test_tls_listener(rig, tmp_path):
    import ssl
    import urllib.request

    from fleet.config import ConsoleSection
    from fleet.console.server import ConsoleServer

    cert, key = _self_signed(tmp_path)
    tls = ConsoleServer(ConsoleSection(enabled=True, port=0, tls_cert_file=cert, tls_key_file=key),
                        rig.controller, tokens_file=tmp_path / "console-tokens")
    tls.start()
    try:
        assert tls.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(tls.url + "api/v1/whoami", headers={"Authorization": "Bearer "
                                                                         + rig.tokens["operator"]})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert json.loads(r.read()) == {"name": "olga", "role": "operator"}
        # Plain HTTP to the TLS port gets no answer from the API.
        plain = socket.create_connection(("127.0.0.1", tls.httpd.server_address[1]), timeout=10)
        plain.sendall(b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not plain.recv(4096).startswith(b"HTTP/1.1 200")
        plain.close()
    finally:
        tls.stop()


def test_hostile_queries_and_bodies_never_500(rig):
    """Random query strings and JSON bodies on every route: 4xx or 2xx, never a 5xx, and the server lives."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fleet.config import ConsoleSection
    from fleet.console.routes import ROUTES
    from fleet.console.server import ConsoleServer

    # A console without the per-token rate, so every example reaches the routes (not a 429).
    fast = ConsoleServer(ConsoleSection(enabled=True, port=0, requests_per_s=1e6, request_burst=10 ** 6),
                         rig.controller, tokens_file=rig.tmp / "console-tokens")
    fast.start()
    op = Client(fast.url, rig.tokens["operator"])
    seen = set()
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
                               st.text(max_size=20), lambda c: st.lists(c, max_size=4) |
                               st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)
    paths = [r.path.replace("{device_id}", "dev-01").replace("{rollout_id}", "r-x").replace("{name}", "digits")
             .replace("{version}", "2") for r in ROUTES if not r.path.endswith("/stream")
             and r.path != "/api/v1/bundles"]
    key = st.sampled_from(["sort", "order", "offset", "limit", "q", "health", "online", "version", "window_s",
                           "history", "devices", "x"])
    val = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12)

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(path=st.sampled_from(paths), query=st.dictionaries(key, val, max_size=4), body=json_values)
    def probe(path, query, body):
        from urllib.parse import urlencode

        s, doc, _ = op.get(path + "?" + urlencode(query))
        seen.add(s)
        assert s < 500, (path, query, doc)
        if path.startswith("/api/v1/rollouts/") or path == "/api/v1/rollback":
            s, doc, _ = op.post(path, body)
            seen.add(s)
            assert s < 500, (path, body, doc)

    try:
        probe()
        assert 429 not in seen and {200, 400} <= seen, seen
        assert op.get("/api/v1/devices/dev-01")[0] == 200
    finally:
        fast.stop()


def test_rate_per_token(rig, tmp_path):
    from fleet.config import ConsoleSection
    from fleet.console.server import ConsoleServer

    slow = ConsoleServer(ConsoleSection(enabled=True, port=0, requests_per_s=0.1, request_burst=3),
                         rig.controller, tokens_file=tmp_path / "console-tokens")
    slow.start()
    try:
        op, viewer = Client(slow.url, rig.tokens["operator"]), Client(slow.url, rig.tokens["viewer"])
        assert [op.get("/api/v1/whoami")[0] for _ in range(4)] == [200, 200, 200, 429]
        assert viewer.get("/api/v1/whoami")[0] == 200  # another token has its own rate
    finally:
        slow.stop()
