"""The Debian package as built: control fields, contents, lintian, the systemd unit, and the packaged agent.

The package is built once per session for this machine (architecture and /usr/bin/python3's version),
unpacked with dpkg-deb and run from a private mount namespace in which its /opt/edge-agent is mounted
at /opt/edge-agent, so the launcher symlink, its shebang and the venv resolve exactly as on a device.
Installing, running as the service user, upgrading and purging with apt-get in a real Debian root is
tests/test_apt_repo.py.

Skipped only when dpkg-deb is missing. Needs lintian and systemd (systemd-analyze); running the
packaged agent needs root (mount namespaces).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

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
    path = Path(proc.stdout.split()[0])
    assert path.is_file() and path.parent == out and path.name.startswith("edge-agent_")
    return path


def _field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


def _dep_names(depends: str) -> List[str]:
    return [re.split(r"[\s(:]", alt.strip())[0] for dep in depends.split(",") for alt in dep.split("|")[:1]]


class Extracted:
    """The package's files unpacked into a folder; the installed agent runs from it inside a private
    mount namespace in which the folder's /opt/edge-agent is mounted at /opt/edge-agent. (Installing with
    apt-get into a Debian root, with the maintainer scripts, is tests/test_apt_repo.py.)"""

    def __init__(self, deb: Path) -> None:
        # World-traversable (unlike pytest's tmp dirs), so the agent can run as another uid.
        self.path = Path(tempfile.mkdtemp(prefix="edge-agent-extracted-"))
        os.chmod(str(self.path), 0o755)
        _run(["dpkg-deb", "-x", str(deb), str(self.path)])

    def ns_command(self, argv: List[str], *, as_nobody: bool = False) -> List[str]:
        """`argv` in a private mount namespace where this folder's /opt/edge-agent is /opt/edge-agent."""
        prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if as_nobody else []
        script = ('mount -t tmpfs tmpfs /opt && mkdir /opt/edge-agent && '
                  'mount --bind "$0/opt/edge-agent" /opt/edge-agent && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.path), *prefix, *argv]

    def edge_agent(self, *args: str, as_nobody: bool = False, check: bool = True, timeout: float = 120):
        """Run the packaged /usr/bin/edge-agent (the symlink in this folder)."""
        return _run(self.ns_command([str(self.path / "usr" / "bin" / "edge-agent"), *list(args)],
                                    as_nobody=as_nobody), check=check, timeout=timeout, cwd="/")

    def cleanup(self) -> None:
        shutil.rmtree(str(self.path), ignore_errors=True)


def _namespaces_work() -> bool:
    probe = _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /opt"],
                 check=False)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def extracted(deb):
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root")
    if not _namespaces_work():
        pytest.fail("cannot create a mount namespace (unshare --mount): the packaged agent cannot be run here")
    e = Extracted(deb)
    yield e
    e.cleanup()


# ------------------------------------------------------------------------------------------ package


def test_control_fields_and_dependencies(deb):
    assert _field(deb, "Package") == "edge-agent"
    assert _field(deb, "Version") == __version__
    host_arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    assert _field(deb, "Architecture") == host_arch
    assert deb.name == "edge-agent_%s_%s.deb" % (__version__, host_arch)
    depends = _dep_names(_field(deb, "Depends"))
    py = _target_python()
    for name in ("python" + py, "python3", "adduser"):
        assert name in depends
    # The venv carries numpy and creates nothing at install time: an offline install needs neither of these.
    assert "python3-venv" not in depends and "python3-numpy" not in depends
    # Nothing recommended (apt installs recommends by default; OpenCV alone pulled 423 packages on 20.04).
    assert _field(deb, "Recommends") == ""
    suggests = _dep_names(_field(deb, "Suggests"))
    assert "python3-libnvinfer" in suggests and "python3-opencv" in suggests


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
        "/opt/edge-agent/pyvenv.cfg", "/opt/edge-agent/bin/edge-agent", "/opt/edge-agent/bin/fleet",
        "/etc/edge-agent/agent.toml", "/etc/edge-agent/agent.toml.d", "/usr/share/doc/edge-agent/agent.toml.example",
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
    # /opt/edge-agent is the package's; /opt itself is the system's (created by base-files, owned by none).
    assert "/opt" not in files
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
        pkg = Path(proc.stdout.split()[0])
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


def test_installed_unit_passes_systemd_analyze_verify(extracted, tmp_path):
    unit_text = (extracted.path / "lib" / "systemd" / "system" / UNIT).read_text()
    assert unit_text == (REPO / "packaging" / "debian" / UNIT).read_text()
    # The only change: ExecStart points at the extracted /usr/bin/edge-agent symlink, which resolves
    # inside the namespace to the packaged launcher, so verify checks the real executable.
    unit = tmp_path / UNIT
    unit.write_text(unit_text.replace("ExecStart=/usr/bin/edge-agent",
                                      "ExecStart=%s/usr/bin/edge-agent" % extracted.path))
    ns = extracted.ns_command([_require_tool("systemd-analyze", "systemd"), "verify", str(unit)])
    proc = _run(ns, check=False, timeout=120)
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == "", proc.stdout + proc.stderr


def _exposure(unit: Path) -> float:
    proc = _run([_require_tool("systemd-analyze", "systemd"), "security", "--offline=true", str(unit)],
                check=False, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


def test_unit_exposure_is_well_below_the_old_4_1(tmp_path):
    """`systemd-analyze security` rates the unit (lower is better); the unhardened baseline is measured in
    the same run, so the check cannot pass on a systemd that rates everything low."""
    text = (REPO / "packaging" / "debian" / UNIT).read_text()
    ours = _exposure(REPO / "packaging" / "debian" / UNIT)
    bare = tmp_path / UNIT
    bare.write_text(text.split("# Hardening", 1)[0] + "\n[Install]\nWantedBy=multi-user.target\n")
    baseline = _exposure(bare)
    assert ours < 4.1 and ours < baseline - 3, (ours, baseline)


# ------------------------------------------------------------------------------------------ packaged agent


def test_packaged_agent_prints_its_version(extracted):
    proc = extracted.edge_agent("--version", as_nobody=True)
    assert proc.stdout.strip() == "edge-agent %s" % __version__


def test_packaged_venv_sees_system_site_packages_and_uses_its_own_deps(extracted):
    code = ("import sys, json, numpy, pydantic, edge_agent; print(json.dumps([sys.prefix, sys.path, "
            "numpy.__file__, pydantic.__file__, edge_agent.__file__]))")
    py = "/opt/edge-agent/bin/python3"
    # From / as a service starts: `python -c` puts the working directory first on sys.path.
    out = _run(extracted.ns_command([py, "-c", code], as_nobody=True), cwd="/").stdout
    prefix, path, numpy_file, pydantic_file, agent_file = json.loads(out)
    assert prefix == "/opt/edge-agent"
    assert "/usr/lib/python3/dist-packages" in path  # JetPack's tensorrt, pycuda and cv2 live there
    for f in (numpy_file, pydantic_file, agent_file):
        assert f.startswith("/opt/edge-agent/lib/"), f
