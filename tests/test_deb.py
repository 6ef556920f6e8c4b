"""The Debian package: build, lintian, contents, systemd unit, and install/upgrade/purge in a test root.

The package is built once per session for this machine (architecture and /usr/bin/python3's version),
then installed with the real dpkg into a fresh root per scenario (`dpkg --root`, maintainer scripts run
chrootless with DPKG_ROOT, as mmdebstrap does). The installed agent runs from that root inside a private
mount namespace in which the root's /opt/edge-agent is mounted at /opt/edge-agent, so the launcher
symlink, its shebang and the venv resolve exactly as on a device.

Skipped only when dpkg-deb is missing. Needs root (dpkg writes files owned by root and by the
service user), lintian, systemd (systemd-analyze), and the package's dependencies installed on
this machine (they stand in for the test root's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from edge_agent import __version__

REPO = Path(__file__).resolve().parent.parent
BUILDER = REPO / "packaging" / "debian" / "build_deb.py"
UNIT = "edge-agent.service"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.deb,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed (apt-get install dpkg)"),
    pytest.mark.timeout(900),
]

#: Directories a real system already has (owned by base packages there), so purge must leave them.
BASE_DIRS = [
    "/etc", "/etc/systemd", "/etc/systemd/system", "/etc/systemd/system/multi-user.target.wants", "/opt",
    "/usr", "/usr/bin", "/usr/sbin", "/usr/share", "/usr/share/doc", "/lib", "/lib/systemd",
    "/lib/systemd/system", "/var", "/var/lib", "/var/log",
]


SHADOW_BACKUPS = ("passwd-", "group-", "shadow-", "gshadow-")


def _run(cmd: List[str], *, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=SBIN_PATH + ":" + os.environ.get("PATH", ""))
    env.update(kw.pop("env", {}))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(cmd), proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:]))
    return proc


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("installing into a test root with dpkg needs root (files owned by root and edge-agent)")


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.fail("%s is missing: apt-get install %s" % (name, package))
    return path


def _target_python() -> str:
    proc = _run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=False)
    if proc.returncode != 0:
        pytest.fail("/usr/bin/python3 is missing: apt-get install python3 (the package targets it)")
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    """The package for this machine, built like `make deb` (gzip instead of xz to save CI time)."""
    out = tmp_path_factory.mktemp("deb")
    # A private scratch folder, so a concurrent build in the same checkout cannot pull the tree away.
    proc = _run([sys.executable, str(BUILDER), "--python", _target_python(), "--compress", "gzip",
                 "--out", str(out), "--work", str(out / "work")], check=False, timeout=900)
    assert proc.returncode == 0, "package build failed:\n%s" % proc.stderr[-4000:]
    shutil.rmtree(str(out / "work"))
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out
    return path


def _field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


def _dep_names(depends: str) -> List[str]:
    return [re.split(r"[\s(:]", alt.strip())[0] for dep in depends.split(",") for alt in dep.split("|")[:1]]


class DebRoot:
    """A fresh root for `dpkg --root`: a user database, and the package's dependencies marked installed
    with this machine's versions (so dpkg checks the Depends line against real Debian versions)."""

    def __init__(self, deb: Path, *, groups: Tuple[str, ...] = ("video",)) -> None:
        # World-traversable (unlike pytest's tmp dirs), so the agent can run as the edge-agent uid.
        self.path = Path(tempfile.mkdtemp(prefix="edge-agent-debroot-"))
        os.chmod(str(self.path), 0o755)
        p = self.path
        admin = p / "var" / "lib" / "dpkg"
        for sub in ("updates", "info", "triggers"):
            (admin / sub).mkdir(parents=True, exist_ok=True)
        for d in BASE_DIRS:
            (p / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        gids = {"root": 0, "video": 44, "jtop": 998}
        (p / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (p / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
        (p / "etc" / "group").write_text("".join("%s:x:%d:\n" % (g, gids[g]) for g in ("root", *groups)))
        (p / "etc" / "gshadow").write_text("".join("%s:*::\n" % g for g in ("root", *groups)))
        os.chmod(str(p / "etc" / "shadow"), 0o640)
        os.chmod(str(p / "etc" / "gshadow"), 0o640)
        stanzas = [self._stanza("base-files", "99", "all")]
        (admin / "info" / "base-files.list").write_text("/.\n" + "\n".join(BASE_DIRS) + "\n")
        for name in _dep_names(_field(deb, "Depends")):
            q = _run(["dpkg-query", "-W", "-f", "${Version}\t${Architecture}", name], check=False)
            if q.returncode != 0:
                pytest.fail("the package depends on %s, which is not installed here: apt-get install %s" % (name, name))
            version, arch = q.stdout.split("\t")
            stanzas.append(self._stanza(name, version, arch))
            (admin / "info" / ("%s.list" % name)).write_text("")
        (admin / "status").write_text("".join(stanzas))
        self.admindir = admin

    @staticmethod
    def _stanza(name: str, version: str, arch: str) -> str:
        return ("Package: %s\nStatus: install ok installed\nPriority: optional\nMaintainer: test <t@t.invalid>\n"
                "Architecture: %s\nVersion: %s\nDescription: stand-in for the host's package\n\n"
                % (name, arch, version))

    def dpkg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Real dpkg on this root; maintainer scripts run with DPKG_ROOT set."""
        base = ["dpkg", "--root", str(self.path), "--force-script-chrootless", "--log", "/dev/null"]
        return _run([*base, *args], check=check)

    def status(self) -> str:
        """`<status> <version>` of edge-agent, or '' when dpkg does not know it."""
        q = _run(["dpkg-query", "--admindir", str(self.admindir), "-W", "-f", "${Status} ${Version}", "edge-agent"],
                 check=False)
        return q.stdout.strip() if q.returncode == 0 else ""

    def user(self, name: str = "edge-agent") -> Optional[List[str]]:
        for line in (self.path / "etc" / "passwd").read_text().splitlines():
            if line.split(":")[0] == name:
                return line.split(":")
        return None

    def group_members(self, group: str) -> Optional[List[str]]:
        for line in (self.path / "etc" / "group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == group:
                return [m for m in fields[3].split(",") if m]
        return None

    def snapshot(self) -> Dict[str, Tuple]:
        """Every path under the root (but dpkg's own database) with its type, mode, owner and content."""
        snap = {}
        for dirpath, dirnames, filenames in os.walk(str(self.path)):
            rel_dir = os.path.relpath(dirpath, str(self.path))
            if rel_dir.split(os.sep)[:3] == ["var", "lib", "dpkg"]:
                continue
            for name in dirnames + filenames:
                if rel_dir == "etc" and name in SHADOW_BACKUPS:
                    continue  # shadow's tools keep the previous database there; a real system has them too
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                content = None
                if os.path.isfile(full) and not os.path.islink(full) and st.st_size < 1 << 20:
                    with open(full, "rb") as f:
                        content = f.read()
                snap[os.path.join(rel_dir, name)] = (st.st_mode, st.st_uid, st.st_gid, content)
        return snap

    def ns_command(self, argv: List[str], *, as_user: bool = False) -> List[str]:
        """`argv` in a private mount namespace where this root's /opt/edge-agent is /opt/edge-agent."""
        prefix = []
        if as_user:
            uid, gid = self.user()[2:4]
            prefix = ["setpriv", "--reuid", uid, "--regid", gid, "--clear-groups"]
        script = ('mount -t tmpfs tmpfs /opt && mkdir /opt/edge-agent && '
                  'mount --bind "$0/opt/edge-agent" /opt/edge-agent && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.path), *prefix, *argv]

    def edge_agent(self, *args: str, as_user: bool = False, check: bool = True, timeout: float = 120):
        """Run the installed /usr/bin/edge-agent (the symlink in this root)."""
        return _run(self.ns_command([str(self.path / "usr" / "bin" / "edge-agent"), *list(args)], as_user=as_user),
                    check=check, timeout=timeout, cwd="/")

    def cleanup(self) -> None:
        shutil.rmtree(str(self.path), ignore_errors=True)


def _namespaces_work() -> bool:
    probe = _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /opt"],
                 check=False)
    return probe.returncode == 0


@pytest.fixture
def new_root(deb):
    _require_root()
    _require_tool("useradd", "passwd")
    roots = []

    def make(**kw) -> DebRoot:
        r = DebRoot(deb, **kw)
        roots.append(r)
        return r

    yield make
    for r in roots:
        r.cleanup()


@pytest.fixture(scope="module")
def installed(deb):
    """One root with the package installed, shared by the read-only checks of this module."""
    _require_root()
    _require_tool("useradd", "passwd")
    r = DebRoot(deb, groups=("video", "jtop"))
    r.dpkg("-i", str(deb))
    yield r
    r.cleanup()


@pytest.fixture(scope="module")
def namespaces():
    if not _namespaces_work():
        pytest.fail("cannot create a mount namespace (unshare --mount): the installed agent cannot be run here")


# ------------------------------------------------------------------------------------------ package


def test_control_fields_and_dependencies(deb):
    assert _field(deb, "Package") == "edge-agent"
    assert _field(deb, "Version") == __version__
    host_arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    assert _field(deb, "Architecture") == host_arch
    assert deb.name == "edge-agent_%s_%s.deb" % (__version__, host_arch)
    depends = _dep_names(_field(deb, "Depends"))
    py = _target_python()
    for name in ("python" + py, "python3", "python3-venv", "python3-numpy"):
        assert name in depends
    recommends = _dep_names(_field(deb, "Recommends"))
    assert "python3-libnvinfer" in recommends and "python3-opencv" in recommends


def test_info_lists_conffile_and_maintainer_scripts(deb, tmp_path):
    info = _run(["dpkg-deb", "-I", str(deb)]).stdout
    for member in ("control", "conffiles", "postinst", "prerm", "postrm", "md5sums"):
        assert re.search(r"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s+%s\b" % member, info, re.M), member
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(r"^\s+\d+ bytes,\s+\d+ lines\s+\*\s+%s\s+#!/bin/sh" % script, info, re.M), script
    ctrl = tmp_path / "ctrl"
    _run(["dpkg-deb", "-e", str(deb), str(ctrl)])
    assert (ctrl / "conffiles").read_text().split() == ["/etc/edge-agent/agent.toml"]


def _contents(deb: Path) -> Dict[str, Tuple[str, str, str]]:
    """path -> (mode string, owner/group, link target)."""
    out = {}
    for line in _run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        parts = line.split(None, 5)
        name, _, target = parts[5].partition(" -> ")
        out[name.rstrip("/").lstrip(".") or "/"] = (parts[0], parts[1], target)
    return out


def test_contents_have_venv_launcher_conffile_unit_and_no_bytecode(deb):
    files = _contents(deb)
    py = _target_python()
    site = "/opt/edge-agent/lib/python%s/site-packages" % py
    expected = [
        "/opt/edge-agent/pyvenv.cfg", "/opt/edge-agent/bin/edge-agent", "/etc/edge-agent/agent.toml",
        "/etc/edge-agent/keys", "/etc/edge-agent/command-keys", "/lib/systemd/system/edge-agent.service",
        "/usr/share/doc/edge-agent/copyright",
        "/usr/share/doc/edge-agent/changelog.gz", "/usr/share/lintian/overrides/edge-agent",
        site + "/edge_agent/__init__.py", site + "/edge_agent/selftest/tiny.onnx", site + "/pydantic/__init__.py",
        site + "/pydantic_core/__init__.py", site + "/paho/mqtt/client.py", site + "/cryptography/__init__.py",
        site + "/onnxruntime/__init__.py", site + "/numpy/__init__.py",
    ]
    for path in expected:
        assert path in files, path
    assert files["/usr/bin/edge-agent"][2] == "/opt/edge-agent/bin/edge-agent"
    assert files["/opt/edge-agent/bin/python" + py][2] == "/usr/bin/python" + py
    assert files["/opt/edge-agent/bin/edge-agent"][0] == "-rwxr-xr-x"
    assert files["/etc/edge-agent/agent.toml"][0] == "-rw-r--r--"
    assert all(owner == "root/root" for _, owner, _ in files.values())
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in files if p.startswith(site + "/sympy")]  # excluded: not imported at run time
    assert not [p for p in files if p.endswith("direct_url.json")]


def test_package_holds_no_build_machine_paths(deb, tmp_path):
    root = tmp_path / "x"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    needle = str(REPO).encode()
    py = _target_python()
    site = root / "opt" / "edge-agent" / "lib" / ("python" + py) / "site-packages"
    suspects = [root / "opt" / "edge-agent" / "pyvenv.cfg", root / "opt" / "edge-agent" / "bin" / "edge-agent"]
    suspects += list(site.glob("*.dist-info/*")) + list((site / "edge_agent").rglob("*.py"))
    assert [p for p in suspects if p.is_file() and needle in p.read_bytes()] == []
    cfg = (root / "opt" / "edge-agent" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and "home = /usr/bin" in cfg
    shebang = (root / "opt" / "edge-agent" / "bin" / "edge-agent").read_text().splitlines()[0]
    assert shebang == "#!/opt/edge-agent/bin/python%s -s" % py


@pytest.fixture(scope="session")
def site_for_this_python(deb, tmp_path_factory) -> Path:
    """The package's site-packages built for the Python running the tests (3.8 = JetPack 5's on .venv38)."""
    here = "%d.%d" % sys.version_info[:2]
    out = tmp_path_factory.mktemp("site")
    pkg = deb
    if here != _target_python():
        proc = _run([sys.executable, str(BUILDER), "--python", here, "--compress", "none", "--out", str(out),
                     "--work", str(out / "work")], check=False, timeout=900)
        assert proc.returncode == 0, "package build for Python %s failed:\n%s" % (here, proc.stderr[-4000:])
        shutil.rmtree(str(out / "work"))
        pkg = Path(proc.stdout.strip().splitlines()[-1])
    _run(["dpkg-deb", "-x", str(pkg), str(out / "root")])
    return out / "root" / "opt" / "edge-agent" / "lib" / ("python" + here) / "site-packages"


def test_shipped_wheels_are_complete_for_this_python(site_for_this_python):
    """Only the package's site-packages and the standard library (-S): every agent module imports and the
    self-test passes, so no dependency is missing for this Python (markers such as tomli's included)."""
    code = (
        "import importlib, pkgutil, sys, edge_agent\n"
        "names = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "from edge_agent.cli import main\n"
        "sys.exit(main(['selftest', '--backend', 'onnxruntime', '--json']))\n"
    )
    proc = _run([sys.executable, "-S", "-s", "-c", code], check=False, cwd="/", timeout=300,
                env={"PYTHONPATH": str(site_for_this_python)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["passed"] is True


def test_lintian_reports_no_errors(deb):
    lintian = _require_tool("lintian", "lintian")
    # --display-info: unused overrides are reported at info level.
    proc = _run([lintian, "--display-info", "--no-tag-display-limit", str(deb)], check=False, timeout=600)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("E:")]
    assert errors == [], "\n".join(errors)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Overrides must still match something, or they hide nothing and only rot.
    assert not [ln for ln in lines if "unused-override" in ln]


# ------------------------------------------------------------------------------------------ systemd


def _verify(unit: Path) -> subprocess.CompletedProcess:
    analyze = _require_tool("systemd-analyze", "systemd")
    return _run([analyze, "verify", str(unit)], check=False, timeout=120)


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path):
    """The check below relies on systemd-analyze printing problems; prove that it does here."""
    text = (REPO / "packaging" / "debian" / UNIT).read_text()
    bad = tmp_path / UNIT
    bad.write_text(text.replace("ExecStart=/usr/bin/edge-agent", "ExecStart=/bin/true")
                   .replace("Restart=on-failure", "Restart=on-falure"))
    proc = _verify(bad)
    assert "on-falure" in proc.stdout + proc.stderr


def test_installed_unit_passes_systemd_analyze_verify(installed, namespaces, tmp_path):
    unit_text = (installed.path / "lib" / "systemd" / "system" / UNIT).read_text()
    assert unit_text == (REPO / "packaging" / "debian" / UNIT).read_text()
    # The only change: ExecStart points at the test root's /usr/bin/edge-agent symlink, which resolves
    # inside the namespace to the installed launcher, so verify checks the real executable.
    unit = tmp_path / UNIT
    unit.write_text(unit_text.replace("ExecStart=/usr/bin/edge-agent",
                                      "ExecStart=%s/usr/bin/edge-agent" % installed.path))
    ns = installed.ns_command([_require_tool("systemd-analyze", "systemd"), "verify", str(unit)])
    proc = _run(ns, check=False, timeout=120)
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == "", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ install


def test_install_creates_user_state_dir_and_enables_the_service(installed):
    r = installed
    assert r.status() == "install ok installed %s" % __version__
    user = r.user()
    assert user is not None, "postinst did not create the edge-agent user"
    assert user[5] == "/var/lib/edge-agent" and user[6] == "/usr/sbin/nologin"
    assert int(user[2]) < 1000  # a system user
    assert r.group_members("video") == ["edge-agent"]
    assert r.group_members("jtop") == ["edge-agent"]
    assert r.group_members("edge-agent") == []
    state = r.path / "var" / "lib" / "edge-agent"
    st = state.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (int(user[2]), int(user[3]), 0o750)
    wants = r.path / "etc" / "systemd" / "system" / "multi-user.target.wants" / UNIT
    assert os.readlink(str(wants)) == "/lib/systemd/system/" + UNIT
    for d in ("keys", "command-keys"):
        keys = r.path / "etc" / "edge-agent" / d
        assert keys.is_dir() and (keys.stat().st_uid, keys.stat().st_gid) == (0, 0)


def test_installed_agent_prints_its_version(installed, namespaces):
    proc = installed.edge_agent("--version", as_user=True)
    assert proc.stdout.strip() == "edge-agent %s" % __version__


def test_installed_venv_sees_system_site_packages_and_uses_its_own_deps(installed, namespaces):
    code = ("import sys, json, numpy, pydantic, edge_agent; print(json.dumps([sys.prefix, sys.path, "
            "numpy.__file__, pydantic.__file__, edge_agent.__file__]))")
    py = "/opt/edge-agent/bin/python3"
    # From / as a service starts: `python -c` puts the working directory first on sys.path.
    out = _run(installed.ns_command([py, "-c", code], as_user=True), cwd="/").stdout
    prefix, path, numpy_file, pydantic_file, agent_file = json.loads(out)
    assert prefix == "/opt/edge-agent"
    assert "/usr/lib/python3/dist-packages" in path  # JetPack's tensorrt, pycuda and cv2 live there
    for f in (numpy_file, pydantic_file, agent_file):
        assert f.startswith("/opt/edge-agent/lib/"), f


def test_installed_selftest_passes_on_onnxruntime(installed, namespaces):
    proc = installed.edge_agent("selftest", "--json", "--backend", "onnxruntime", as_user=True, check=False,
                                timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    assert not [c for c in report["checks"] if c["status"] == "FAIL"]


def _listen_notify(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    os.chmod(str(path), 0o666)  # the agent runs as the edge-agent uid
    sock.settimeout(0.5)
    return sock


def _collect(sock: socket.socket, want: str, deadline: float, seen: List[str]) -> bool:
    while time.monotonic() < deadline:
        try:
            seen.extend(sock.recv(4096).decode().split("\n"))
        except socket.timeout:
            continue
        if any(m == want for m in seen):
            return True
    return False


@pytest.mark.mqtt
def test_installed_agent_runs_against_a_broker_as_the_service_user(installed, namespaces, broker, tmp_path):
    import paho.mqtt.client as mqtt

    from edge_agent.protocol import topics

    r = installed
    # What an administrator does: edit the conffile (broker, device id), leave the rest.
    conf = r.path / "etc" / "edge-agent" / "agent.toml"
    original = conf.read_text()
    text = original.replace('state_dir = "/var/lib/edge-agent"', 'state_dir = "%s/var/lib/edge-agent"' % r.path)
    text = text.replace('host = "127.0.0.1"\nport = 1883', 'host = "%s"\nport = %d' % (broker.host, broker.port), 1)
    keys = 'bundle_keys_dir = "%s"'
    text = text.replace(keys % "/etc/edge-agent/keys", keys % (r.path / "etc" / "edge-agent" / "keys"))
    text = re.sub(r"(?m)^port = 8080$", "port = 0", text)
    text = '# device_id\ndevice_id = "deb-test-1"\n' + text
    assert text.count(str(r.path)) == 2 and "port = %d" % broker.port in text
    conf.write_text(text)

    status_topic = topics.status("edge/v1", "deb-test-1")
    got: List[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="deb-test-observer")
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe(status_topic, qos=1)
    sub.loop_start()

    notify = _listen_notify(r.path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(r.path / "notify.sock"), WATCHDOG_USEC="2000000")
    env.pop("WATCHDOG_PID", None)
    cmd = r.ns_command([str(r.path / "usr" / "bin" / "edge-agent"), "run", "--config", str(conf)], as_user=True)
    proc = subprocess.Popen(cmd, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    messages: List[str] = []
    try:
        assert _collect(notify, "READY=1", time.monotonic() + 60, messages), (messages, proc.poll())
        assert _collect(notify, "WATCHDOG=1", time.monotonic() + 10, messages), messages
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(s.get("online") for s in got):
            time.sleep(0.1)
        assert any(s.get("online") and s.get("device_id") == "deb-test-1" for s in got), got
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert _collect(notify, "STOPPING=1", time.monotonic() + 5, messages), messages
        # The agent wrote its state as the service user, under the state directory only.
        uid = int(r.user()[2])
        state_files = list((r.path / "var" / "lib" / "edge-agent").rglob("*"))
        assert state_files and all(p.lstat().st_uid == uid for p in state_files)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sub.loop_stop()
        sub.disconnect()
        notify.close()
        (r.path / "notify.sock").unlink()
        conf.write_text(original)


# ------------------------------------------------------------------------------------------ lifecycle


def _repack(deb: Path, out_dir: Path, version: str, conffile_extra: str = "") -> Path:
    """The same package under another version, optionally with a changed packaged conffile."""
    tree = out_dir / ("tree-" + version)
    _run(["dpkg-deb", "-R", str(deb), str(tree)])
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", "Version: " + version, control.read_text()))
    if conffile_extra:
        conf = tree / "etc" / "edge-agent" / "agent.toml"
        conf.write_text(conf.read_text() + conffile_extra)
    out = out_dir / ("edge-agent_%s.deb" % version)
    _run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(out)])
    shutil.rmtree(str(tree))
    return out


def test_upgrade_keeps_a_changed_conffile_user_and_state(deb, new_root, tmp_path):
    r = new_root()
    r.dpkg("-i", str(deb))
    conf = r.path / "etc" / "edge-agent" / "agent.toml"
    edited = conf.read_text().replace('log_level = "INFO"', 'log_level = "DEBUG"')
    conf.write_text(edited)
    state_file = r.path / "var" / "lib" / "edge-agent" / "marker"
    state_file.write_text("kept")
    uid = r.user()[2]
    wants = r.path / "etc" / "systemd" / "system" / "multi-user.target.wants" / UNIT
    wants.unlink()  # the administrator disabled the service; an upgrade must not re-enable it

    # Same packaged conffile: dpkg keeps the edited one silently.
    v2 = _repack(deb, tmp_path, __version__ + "+upgrade1")
    r.dpkg("-i", str(v2))
    assert r.status() == "install ok installed %s+upgrade1" % __version__
    assert conf.read_text() == edited
    # Changed packaged conffile: the administrator's version wins (--force-confold, as unattended
    # upgrades run), the packaged one is left beside it.
    v3 = _repack(deb, tmp_path, __version__ + "+upgrade2", conffile_extra="\n# a new comment\n")
    r.dpkg("--force-confold", "-i", str(v3))
    assert r.status() == "install ok installed %s+upgrade2" % __version__
    assert conf.read_text() == edited
    assert (r.path / "etc" / "edge-agent" / "agent.toml.dpkg-dist").read_text().endswith("# a new comment\n")
    assert state_file.read_text() == "kept"
    assert r.user()[2] == uid
    assert not wants.exists() and not wants.is_symlink()


def test_remove_keeps_config_state_and_user_and_purge_removes_everything(deb, new_root):
    r = new_root()
    before = r.snapshot()
    r.dpkg("-i", str(deb))
    assert r.user() is not None and r.group_members("jtop") is None  # no jtop group here: none created
    (r.path / "var" / "lib" / "edge-agent" / "state.json").write_text("{}")
    # Bytecode as postinst would create on a device (it skips compiling in a test root); prerm removes it.
    pycache = r.path / "opt" / "edge-agent" / "lib" / "__pycache__"
    pycache.mkdir()
    (pycache / "x.cpython.pyc").write_bytes(b"\0")

    r.dpkg("--remove", "edge-agent")
    assert r.status().startswith("deinstall ok config-files")
    assert not (r.path / "opt" / "edge-agent").exists()
    assert not (r.path / "usr" / "bin" / "edge-agent").is_symlink()
    assert (r.path / "etc" / "edge-agent" / "agent.toml").exists()
    assert (r.path / "var" / "lib" / "edge-agent" / "state.json").exists()
    assert r.user() is not None

    r.dpkg("--purge", "edge-agent")
    assert r.status() == ""
    after = r.snapshot()
    assert sorted(set(after) - set(before)) == []
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    assert changed == []
    assert sorted(set(before) - set(after)) == []
