"""The signed apt repository, used the way a device uses it: apt-get in a clean Debian 12 root.

The packages of the three targets (Debian 12 amd64, JetPack 5, JetPack 6) are built with the pinned
wheels, put into one repository by packaging/apt/make_repo.py (as `make apt-repo` does) and served
over HTTP on loopback. In a root made by debootstrap (cached, tests/debroot.py) with only that
repository in its sources: apt-get installs edge-agent and edge-agent-fleet; `edge-agent selftest` and
the agent's ExecStart run as the service user against a real mosquitto; the controller's
ExecStart runs as its user; an upgrade to a build whose defaults changed runs with stdin closed and
must not prompt, keeping the edited conffile and drop-in; remove and purge leave what Debian policy
says. The JetPack suites are checked with apt for arm64 (candidates, no collision).

Runs once per test run, on the system Python's version (the package's interpreter); needs root,
debootstrap, apt-utils, gnupg and network access to deb.debian.org the first time.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from debroot import Root, cached_root_tarball, run
from mqtt_broker import Broker

REPO = Path(__file__).resolve().parent.parent
BUILDER = REPO / "packaging" / "debian" / "build_deb.py"
MAKE_REPO = REPO / "packaging" / "apt" / "make_repo.py"
SYSTEM_PYTHON = "3.11"  # Debian 12's, the bookworm target's
UPSTREAM = "0.1.0"
#: Every build of this module uses the same timestamp, so a commit landing mid-run cannot change the bytes.
SOURCE_DATE_EPOCH = "1767225600"

pytestmark = [
    pytest.mark.deb,
    pytest.mark.timeout(2400),
    pytest.mark.skipif("%d.%d" % sys.version_info[:2] != SYSTEM_PYTHON,
                       reason="runs once per test run, on Python %s (the packages do not use the test's Python)"
                       % SYSTEM_PYTHON),
]


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("debootstrap, chroot and apt-get in a root need root")
    for tool, package in (("debootstrap", "debootstrap"), ("apt-ftparchive", "apt-utils"), ("gpg", "gnupg"),
                          ("unshare", "util-linux"), ("setpriv", "util-linux")):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.fail("%s is missing: apt-get install %s" % (tool, package))


def _build(target: str, out: Path, work: Path, *, source: Path = REPO, version: str = "") -> List[Path]:
    cmd = [sys.executable, str(BUILDER), "--target", target, "--compress", "none", "--out", str(out),
           "--work", str(work), "--source", str(source)]
    if version:
        cmd += ["--version", version]
    proc = run(cmd, check=False, timeout=1200, env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    assert proc.returncode == 0, "build of %s failed:\n%s" % (target, proc.stderr[-4000:])
    return [Path(p) for p in proc.stdout.split()]


def _changed_defaults_source(dest: Path) -> Path:
    """A copy of the source tree whose telemetry period default is 15 s instead of 10 s."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "edge_agent", "fleet", "configs", "docs"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(str(src), str(dest / name), ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(str(src), str(dest / name))
    config = dest / "edge_agent" / "config.py"
    text = config.read_text()
    assert text.count("period_s: float = Field(10.0, gt=0)") == 1
    config.write_text(text.replace("period_s: float = Field(10.0, gt=0)", "period_s: float = Field(15.0, gt=0)"))
    example = dest / "configs" / "agent.toml"
    example.write_text(example.read_text().replace("period_s = 10.0", "period_s = 15.0"))
    return dest


class Server:
    """The repository folder over HTTP on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Dict[str, object]:
    """Packages of every target, v1, and a bookworm v2 whose defaults changed."""
    _require()
    base = tmp_path_factory.mktemp("apt")
    t0 = time.monotonic()
    suites = {}
    for target in ("bookworm", "jetpack5", "jetpack6"):
        suites[target] = base / "dist" / target
        _build(target, suites[target], base / "work")
    v2_src = _changed_defaults_source(base / "src-v2")
    v2 = _build("bookworm", base / "dist-v2", base / "work-v2", source=v2_src, version=UPSTREAM + ".1")
    shutil.rmtree(str(base / "work"))
    shutil.rmtree(str(base / "work-v2"))
    print("\napt repo test: 4 package builds took %.0f s" % (time.monotonic() - t0))
    return {"base": base, "suites": suites, "v2": v2}


def _make_repo(base: Path, suites: Dict[str, Path], name: str) -> Path:
    out = base / name
    proc = run([sys.executable, str(MAKE_REPO), "--out", str(out), "--gnupg-home", str(base / "gnupg"),
                *["%s=%s" % kv for kv in sorted(suites.items())]], check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def repo(built) -> Path:
    return _make_repo(built["base"], built["suites"], "repo")


@pytest.fixture(scope="module")
def root_tarball() -> Path:
    _require()
    info = cached_root_tarball()
    print("\ndebootstrap root: %s in %.0f s (%s)" % (info["path"], info["seconds"],
                                                     "built now" if info["built"] else "from the cache"))
    return info["path"]


@pytest.fixture
def root(root_tarball):
    r = Root(root_tarball)
    yield r
    r.cleanup()


def _add_repo(root: Root, repo: Path, url: str, suite: str, extra: str = "") -> None:
    keyrings = root.path / "etc" / "apt" / "keyrings"
    keyrings.mkdir(parents=True, exist_ok=True)
    shutil.copy2(str(repo / "edge-agent-archive-keyring.gpg"), str(keyrings / "edge-agent.gpg"))
    os.chmod(str(keyrings / "edge-agent.gpg"), 0o644)
    # Only this repository: the install must not need Debian's archive (an offline device's situation).
    debian = root.path / "etc" / "apt" / "sources.list"
    if debian.exists():
        os.replace(str(debian), str(debian) + ".off")
    (root.path / "etc" / "apt" / "sources.list.d" / "edge-agent.list").write_text(
        "deb [%ssigned-by=/etc/apt/keyrings/edge-agent.gpg] %s %s main\n" % (extra, url, suite))


# ------------------------------------------------------------------------------------------ repository


def test_a_rebuild_at_the_same_commit_gives_the_same_bytes(built, tmp_path):
    """Pinned, hash-checked wheels and fixed timestamps: the Debian 12 packages rebuild bit for bit."""
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in built["suites"]["bookworm"].glob("*.deb")}
    again = _build("bookworm", tmp_path / "out", tmp_path / "work")
    second = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in again}
    assert len(first) == 3 and second == first


def test_repository_is_signed_and_holds_every_target_side_by_side(repo, tmp_path):
    keyring = repo / "edge-agent-archive-keyring.gpg"
    for suite, arch, tag in (("bookworm", "amd64", "deb12"), ("jetpack5", "arm64", "jp5"),
                             ("jetpack6", "arm64", "jp6")):
        dist = repo / "dists" / suite
        for sig, data in (("InRelease", None), ("Release.gpg", "Release")):
            cmd = ["gpgv", "--keyring", str(keyring), str(dist / sig)] + ([str(dist / data)] if data else [])
            assert run(cmd, check=False).returncode == 0, (suite, sig)
        release = (dist / "Release").read_text()
        assert "Suite: %s" % suite in release and "Architectures: %s" % arch in release
        packages = (dist / "main" / ("binary-" + arch) / "Packages").read_text()
        versions = dict(re.findall(r"(?m)^Package: (\S+)\n(?:.*\n)*?Version: (\S+)", packages))
        assert versions == {p: "%s+%s" % (UPSTREAM, tag) for p in ("edge-agent", "edge-agent-fleet",
                                                                   "edge-agent-broker")}, versions
    pool = sorted(p.name for p in (repo / "pool").rglob("edge-agent_*.deb"))
    assert pool == ["edge-agent_%s+deb12_amd64.deb" % UPSTREAM, "edge-agent_%s+jp5_arm64.deb" % UPSTREAM,
                    "edge-agent_%s+jp6_arm64.deb" % UPSTREAM]
    # A tampered index no longer verifies: the signature covers what apt reads.
    bad = tmp_path / "Release"
    bad.write_text((repo / "dists" / "bookworm" / "Release").read_text().replace("main", "evil", 1))
    cmd = ["gpgv", "--keyring", str(keyring), str(repo / "dists" / "bookworm" / "Release.gpg"), str(bad)]
    assert run(cmd, check=False).returncode != 0


def test_jetpack_suites_give_arm64_devices_their_own_build(repo, root):
    server = Server(repo)
    try:
        root.run(["dpkg", "--add-architecture", "arm64"])
        for suite, tag in (("jetpack5", "jp5"), ("jetpack6", "jp6")):
            _add_repo(root, repo, server.url, suite, extra="arch=arm64 ")
            root.apt("update")
            policy = root.run(["apt-cache", "policy", "edge-agent:arm64"]).stdout
            assert "Candidate: %s+%s" % (UPSTREAM, tag) in policy, policy
            depends = root.run(["apt-cache", "show", "edge-agent:arm64"]).stdout
            assert ("python3.8" if tag == "jp5" else "python3.10") in depends
    finally:
        server.close()


def test_apt_refuses_the_repository_signed_by_another_key(repo, root, tmp_path):
    server = Server(repo)
    try:
        _add_repo(root, repo, server.url, "bookworm")
        home = tmp_path / "other-gnupg"
        home.mkdir(mode=0o700)
        run(["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--quick-gen-key", "other <o@x.invalid>",
             "ed25519", "sign", "1d"])
        other = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export"], check=True,
                               stdout=subprocess.PIPE).stdout
        (root.path / "etc" / "apt" / "keyrings" / "edge-agent.gpg").write_bytes(other)
        proc = root.run(["apt-get", "-q", "update"], check=False)
        assert "NO_PUBKEY" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        install = root.run(["apt-get", "-q", "-y", "install", "edge-agent"], check=False, stdin=subprocess.DEVNULL)
        assert install.returncode != 0 and not (root.path / "opt" / "edge-agent").exists()
    finally:
        server.close()


# ------------------------------------------------------------------------------------------ lifecycle


def _exec_start(root: Root, unit: str) -> List[str]:
    """The installed unit's ExecStart= command line."""
    text = (root.path / "lib" / "systemd" / "system" / unit).read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    return line.split("=", 1)[1].split()


def _notify_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    os.chmod(str(path), 0o666)  # the agent runs as the edge-agent uid
    sock.settimeout(0.2)
    return sock


def _collect_until(sock: socket.socket, pred, timeout_s: float, seen: List[str]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(pred(m) for m in seen):
            return True
        try:
            seen.extend(sock.recv(4096).decode().split("\n"))
        except socket.timeout:
            continue
    return any(pred(m) for m in seen)


def _run_agent_as_service(root: Root, broker: Broker) -> None:
    """The unit's ExecStart as edge-agent, as systemd runs it: READY after the broker, status online, clean stop."""
    import paho.mqtt.client as mqtt

    from edge_agent.protocol import topics

    notify_path = root.path / "run" / "notify.sock"
    notify_path.parent.mkdir(exist_ok=True)
    sock = _notify_listener(notify_path)
    got: List[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="apt-test-observer")
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload)) if m.payload else None
    sub.connect(broker.host, broker.port)
    sub.subscribe(topics.status("edge/v1", "apt-test-1"), qos=1)
    sub.loop_start()
    env = {"NOTIFY_SOCKET": "/run/notify.sock", "WATCHDOG_USEC": "4000000", "PYTHONUNBUFFERED": "1"}
    cmd = root.command(_exec_start(root, "edge-agent.service"), user="edge-agent", cwd="/var/lib/edge-agent",
                       umask="0027", env=env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: List[str] = []
    try:
        assert _collect_until(sock, lambda m: m == "READY=1", 60, seen), (seen, proc.poll())
        assert _collect_until(sock, lambda m: m.startswith("STATUS=connected"), 5, seen), seen
        assert _collect_until(sock, lambda m: m == "WATCHDOG=1", 10, seen), seen
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(s.get("online") for s in got):
            time.sleep(0.1)
        assert any(s.get("online") and s.get("device_id") == "apt-test-1" for s in got), got
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert _collect_until(sock, lambda m: m == "STOPPING=1", 5, seen), seen
        uid = int(root.passwd("edge-agent")[2])
        state = list((root.path / "var" / "lib" / "edge-agent").rglob("*"))
        assert state and all(p.lstat().st_uid == uid for p in state)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sub.loop_stop()
        sub.disconnect()
        sock.close()
        notify_path.unlink()


def _run_controller_as_service(root: Root, broker: Broker) -> None:
    """fleet.service's ExecStart as edge-fleet with a key made as README.Debian says: it connects and serves."""
    conf = root.path / "etc" / "fleet" / "fleet.toml"
    text = conf.read_text()
    assert 'host = "127.0.0.1"\nport = 1883' in text
    conf.write_text(text.replace("port = 1883", "port = %d" % broker.port))
    root.run(["fleet", "keygen", "--out", "/etc/fleet/keys", "--name", "controller"])
    root.run(["chgrp", "edge-fleet", "/etc/fleet/keys/controller.key"])
    root.run(["chmod", "0640", "/etc/fleet/keys/controller.key"])
    cmd = root.command([*_exec_start(root, "fleet.service"), "--connect-timeout", "20"], user="edge-fleet",
                       cwd="/var/lib/fleet", umask="0027", env={"PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("fleet controller serving on"):
            proc.kill()
            raise AssertionError("fleet serve: %r\n%s" % (line, proc.communicate()[1][-3000:]))
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_install_run_upgrade_remove_purge_from_the_repository(built, repo, root, tmp_path):
    broker = Broker(tmp_path / "mosquitto")
    server = Server(repo)
    try:
        _add_repo(root, repo, server.url, "bookworm")
        root.apt("update")
        before_opt = (root.path / "opt").is_dir()
        root.apt("install", "edge-agent", "edge-agent-fleet")
        # The broker host's package needs mosquitto, which comes from Debian's archive. No service may
        # start in the chroot (mosquitto's init script would): policy-rc.d says so, as in any chroot.
        policy = root.path / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        sources = root.path / "etc" / "apt" / "sources.list"
        os.replace(str(sources) + ".off", str(sources))
        root.apt("update")
        root.apt("install", "edge-agent-broker")
        os.replace(str(sources), str(sources) + ".off")
        status = root.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n", "edge-agent*"]).stdout
        for pkg in ("edge-agent", "edge-agent-fleet", "edge-agent-broker"):
            assert "%s %s+deb12 install ok installed" % (pkg, UPSTREAM) in status, status
        # The package owns /opt/edge-agent, not /opt; the service is enabled, the controller is not yet.
        assert before_opt and root.run(["dpkg", "-S", "/opt"], check=False).returncode != 0
        wants = root.path / "etc" / "systemd" / "system" / "multi-user.target.wants"
        assert (wants / "edge-agent.service").is_symlink() and not (wants / "fleet.service").exists()
        user = root.passwd("edge-agent")
        assert user is not None and int(user[2]) < 1000 and user[6] == "/usr/sbin/nologin"
        assert "edge-agent" in (root.path / "etc" / "group").read_text().split("video:", 1)[1].split("\n", 1)[0]
        shipped = set(p.name for p in (root.path / "usr" / "share" / "edge-agent-broker" / "mosquitto").iterdir())
        assert shipped == set(p.name for p in (REPO / "configs" / "mosquitto").iterdir())

        selftest = root.run(["edge-agent", "selftest", "--json", "--backend", "onnxruntime"], user="edge-agent",
                            check=False, timeout=300)
        assert selftest.returncode == 0 and json.loads(selftest.stdout)["passed"] is True, selftest.stderr[-2000:]

        # What a site does: set its device id and broker in the conffile, tune one thing in a drop-in.
        conf = root.path / "etc" / "edge-agent" / "agent.toml"
        edited = conf.read_text().replace('# device_id = "jetson-01"', 'device_id = "apt-test-1"')
        edited = edited.replace('host = "127.0.0.1"\nport = 1883', 'host = "%s"\nport = %d' % (broker.host,
                                                                                              broker.port))
        assert edited.count("apt-test-1") == 1 and str(broker.port) in edited
        conf.write_text(edited)
        (conf.parent / "agent.toml.d" / "50-site.toml").write_text("[api]\nport = 0\n")
        _run_agent_as_service(root, broker)
        _run_controller_as_service(root, broker)
        effective = json.loads(root.run(["edge-agent", "config", "--json"]).stdout)["config"]
        assert effective["telemetry"]["period_s"] == 10.0 and effective["api"]["port"] == 0

        # Upgrade to a build whose defaults changed, non-interactively with stdin closed: no prompt.
        uid = root.passwd("edge-agent")[2]
        v2 = dict(built["suites"])
        v2["bookworm"] = built["base"] / "dist-both"
        v2["bookworm"].mkdir(exist_ok=True)
        for deb in list(built["suites"]["bookworm"].glob("*.deb")) + list(built["v2"]):
            shutil.copy2(str(deb), str(v2["bookworm"]))
        upgraded_repo = _make_repo(built["base"], v2, "repo-v2")
        server.close()
        server = Server(upgraded_repo)
        _add_repo(root, upgraded_repo, server.url, "bookworm")
        root.apt("update")
        upgrade = root.apt("upgrade")
        assert "Configuration file" not in upgrade.stdout + upgrade.stderr
        status = root.run(["dpkg-query", "-W", "-f", "${Version} ${Status}", "edge-agent"]).stdout
        assert status == "%s.1+deb12 install ok installed" % UPSTREAM, status
        assert conf.read_text() == edited and not list(conf.parent.glob("agent.toml.dpkg-*"))
        assert (conf.parent / "agent.toml.d" / "50-site.toml").exists()
        effective = json.loads(root.run(["edge-agent", "config", "--json"]).stdout)["config"]
        assert effective["telemetry"]["period_s"] == 15.0  # the new default reached the device
        assert effective["device_id"] == "apt-test-1" and effective["api"]["port"] == 0
        assert root.passwd("edge-agent")[2] == uid

        # remove: program gone; configuration, state and the user stay.
        (root.path / "var" / "lib" / "edge-agent" / "marker").write_text("kept")
        root.apt("remove", "edge-agent-fleet", "edge-agent")
        assert not (root.path / "opt" / "edge-agent").exists() and (root.path / "opt").is_dir()
        assert conf.read_text() == edited
        assert (root.path / "var" / "lib" / "edge-agent" / "marker").exists()
        # purge: configuration and state gone; the system users stay (Debian policy).
        (conf.parent / "agent.toml.d" / "50-site.toml").unlink()
        root.apt("purge", "edge-agent-fleet", "edge-agent", "edge-agent-broker")
        left = root.run(["dpkg-query", "-W", "-f", "${Package}\n", "edge-agent*"], check=False).stdout.split()
        assert left == []
        for gone in ("etc/edge-agent", "var/lib/edge-agent", "etc/fleet/fleet.toml", "var/lib/fleet",
                     "usr/bin/edge-agent", "etc/systemd/system/multi-user.target.wants/edge-agent.service"):
            assert not (root.path / gone).exists() and not (root.path / gone).is_symlink(), gone
        # The controller key the administrator made is theirs: purge leaves it (and so its folder).
        assert (root.path / "etc" / "fleet" / "keys" / "controller.key").exists()
        assert root.passwd("edge-agent") is not None and root.passwd("edge-fleet") is not None
        assert (root.path / "opt").is_dir()
    finally:
        server.close()
        broker.close()
