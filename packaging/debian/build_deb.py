#!/usr/bin/env python3
"""Build edge-agent_<version>_<arch>.deb: the agent in a virtual environment under /opt/edge-agent.

The virtual environment is assembled for the *target* (architecture, Python minor version, glibc),
not for the machine that builds it, so an arm64/Python 3.8 package for JetPack 5 builds on an amd64
box. pip installs binary wheels for the target platform into the venv's site-packages (`pip install
--target --platform ...`); the venv itself is just its layout: `pyvenv.cfg` with
`include-system-site-packages = true` (JetPack's TensorRT, pycuda and OpenCV come from the system)
and `bin/python3.X` pointing at the target's `/usr/bin/python3.X`. Every absolute path in it is the
installed path, so nothing needs relocating.

A named target (`--target bookworm|jetpack5|jetpack6`, see TARGETS) installs the wheels pinned with
hashes in packaging/debian/locks/<target>.txt and gets a version suffix (`0.1.0+jp5`), so the JetPack 5
and JetPack 6 packages can sit side by side in one apt repository and a rebuild at the same commit
gives the same bytes. It also builds the companion packages edge-agent-fleet (the controller's
service) and edge-agent-broker (mosquitto drop-ins). Without a target (`--arch/--python/--glibc`), the
wheels are resolved afresh: a development build.

Wheels are cached under build/wheels/, so repeated builds work offline. Needs: a Python with
pip >= 22.2 to run this script.

    python3 packaging/debian/build_deb.py --target jetpack5
    python3 packaging/debian/build_deb.py --arch arm64 --python 3.8 --glibc 2.31
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import companions  # noqa: E402
import debpack  # noqa: E402
import wheellock  # noqa: E402
from buildutil import MACHINES, BuildError, log, pip_target_args, platform_tags, run  # noqa: E402, F401
from resolve import dependency_closure, read_requirements, resolve, target_marker_env  # noqa: E402, F401
from stagefiles import (  # noqa: E402
    PACKAGE,
    PREFIX,
    installed_size_kib,
    maintainer,
    normalize_permissions,
    source_date_epoch,
    stage_agent_files,
    write_control,
)

REPO = HERE.parent.parent

#: Dependencies of our dependencies that the agent never imports at run time: onnxruntime lists
#: sympy/coloredlogs (with mpmath/humanfriendly) for its model tools only. Leaving them out saves
#: ~80 MB on the device; the installed-package test runs the ONNX Runtime self-test without them.
EXCLUDED = {"sympy", "mpmath", "coloredlogs", "humanfriendly"}

#: The source files the project wheel is built from (copied to a clean folder first, so stale
#: build artefacts in the work tree never end up in the package).
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "edge_agent", "fleet"]


class Target(NamedTuple):
    """A platform the project publishes packages for."""

    arch: str
    python: str
    glibc: str
    suite: str  # the apt repository suite (dists/<suite>) holding its packages
    tag: str  # version suffix: <upstream>+<tag>


#: JetPack 5.1 = L4T R35 on Ubuntu 20.04; JetPack 6 = L4T R36 on Ubuntu 22.04; bookworm = Debian 12 amd64.
TARGETS = {
    "bookworm": Target("amd64", "3.11", "2.36", "bookworm", "deb12"),
    "jetpack5": Target("arm64", "3.8", "2.31", "jetpack5", "jp5"),
    "jetpack6": Target("arm64", "3.10", "2.35", "jetpack6", "jp6"),
}


def project_version(src: Path) -> str:
    """`__version__` from edge_agent/__init__.py."""
    text = (src / "edge_agent" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise BuildError("no __version__ in edge_agent/__init__.py")
    return m.group(1)


def build_project_wheel(work: Path, cache: Path, source: Path) -> Path:
    """Build the project's pure-Python wheel from a clean copy of its sources."""
    src = work / "src"
    dist = work / "dist"
    for d in (src, dist):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        p = source / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        elif p.exists():
            shutil.copy2(p, src / name)
    if not (src / "README.md").exists():
        # pyproject names a readme; the wheel's long description is not used on the device.
        (src / "README.md").write_text("edge-agent\n", encoding="utf-8")
    # The build backend runs on this interpreter, so its wheels are cached per builder Python.
    tools = cache / ("build-tools-py%d%d" % sys.version_info[:2])
    if not list(tools.glob("setuptools-*.whl")) or not list(tools.glob("wheel-*.whl")):
        log("downloading build tools (setuptools, wheel) into %s" % tools)
        run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(tools),
             "setuptools>=61", "wheel"])
    log("building the project wheel")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links", str(tools),
         "-w", str(dist), str(src)], env=env)
    wheels = list(dist.glob("edge_agent-*.whl"))
    if len(wheels) != 1:
        raise BuildError("expected one project wheel in %s, found %s" % (dist, wheels))
    return wheels[0]


def lay_out_venv(venv: Path, python: str) -> Path:
    """pyvenv.cfg, bin/ with the interpreter links and the launchers; returns site-packages."""
    site = venv / "lib" / ("python" + python) / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(
        "home = /usr/bin\ninclude-system-site-packages = true\nversion = %s\n" % python, encoding="utf-8"
    )
    bindir = venv / "bin"
    bindir.mkdir()
    os.symlink("/usr/bin/python" + python, str(bindir / ("python" + python)))
    os.symlink("python" + python, str(bindir / "python3"))
    os.symlink("python" + python, str(bindir / "python"))
    for command, module in (("edge-agent", "edge_agent.cli"), ("fleet", "fleet.cli")):
        (bindir / command).write_text(
            "#!%s/bin/python%s -s\n"
            '"""%s command (Debian package launcher)."""\n'
            "import sys\n\n"
            "from %s import main\n\n"
            "if __name__ == \"__main__\":\n"
            "    sys.exit(main())\n" % (PREFIX, python, command, module),
            encoding="utf-8",
        )
    return site


def clean_site(site: Path) -> None:
    """Drop what pip wrote for the build machine: console scripts, direct_url.json, foreign bytecode."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    for direct_url in site.glob("*.dist-info/direct_url.json"):
        direct_url.unlink()  # holds the build machine's path to the project wheel
        record = direct_url.parent / "RECORD"
        if record.exists():  # and RECORD held the hash of that path: drop the line with the file
            lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
            record.write_text("".join(ln for ln in lines if not ln.startswith(direct_url.parent.name
                                                                              + "/direct_url.json,")),
                              encoding="utf-8")
    # Some wheels carry bytecode of the interpreter that built them; postinst compiles for the target.
    for cache_dir in sorted(site.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache_dir)


def install_project(site: Path, wheel: Path, target_args: List[str]) -> None:
    """The project wheel (built here, not hash-pinned) into site-packages."""
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
         "--no-warn-script-location", "--target", str(site), *target_args, str(wheel)])


def update_lock(name: str, target: Target, wheel: Path, cache: Path, work: Path) -> Path:
    """Resolve the target's requirements afresh and rewrite its lock file."""
    target_args = pip_target_args(target.arch, target.python, target.glibc)
    requirements = [str(wheel), *read_requirements(HERE / "requirements.txt")]
    pins = resolve(requirements, target_args, cache, work, target_marker_env(target.arch, target.python))
    pins = {n: v for n, v in pins.items() if n != "edge-agent" and n not in EXCLUDED}
    hashes = wheellock.wheel_hashes(work / "resolve.json", pins)
    lock = HERE / "locks" / ("%s.txt" % name)
    header = wheellock.LOCK_HEADER.format(target=name, **target._asdict())
    wheellock.write_lock(lock, pins, hashes, header)
    log("wrote %s (%d wheels)" % (lock, len(pins)))
    return lock


def build(
    *,
    arch: str,
    python: str,
    glibc: str,
    version: Optional[str],
    out: Path,
    cache_root: Path,
    compress: str,
    work_root: Optional[Path] = None,
    target: Optional[str] = None,
    source: Path = REPO,
    refresh_lock: bool = False,
) -> List[Path]:
    """Build the packages; returns the .deb paths (edge-agent first)."""
    if target is not None:
        if target not in TARGETS:
            raise BuildError("unknown --target %r (choose %s)" % (target, ", ".join(sorted(TARGETS))))
        arch, python, glibc = TARGETS[target].arch, TARGETS[target].python, TARGETS[target].glibc
    if arch not in MACHINES:
        raise BuildError("unsupported --arch %r (choose %s)" % (arch, ", ".join(sorted(MACHINES))))
    if not re.match(r"^3\.\d+$", python):
        raise BuildError("--python must be a minor version like 3.8, got %r" % python)
    version = version or project_version(source)
    if target is not None:
        version += "+" + TARGETS[target].tag
    tag = target or "%s-cp%s-glibc%s" % (arch, python.replace(".", ""), glibc)
    work = (work_root or REPO / "build" / "deb") / tag
    cache = cache_root / ("%s-cp%s-glibc%s" % (arch, python.replace(".", ""), glibc))
    cache.mkdir(parents=True, exist_ok=True)
    target_args = pip_target_args(arch, python, glibc)

    wheel = build_project_wheel(work, cache_root, source)
    stage = work / "root"
    shutil.rmtree(stage, ignore_errors=True)
    site = lay_out_venv(stage / PREFIX.lstrip("/"), python)
    if target is not None:
        lock = HERE / "locks" / ("%s.txt" % target)
        if refresh_lock or not lock.exists():
            update_lock(target, TARGETS[target], wheel, cache, work)
        log("installing the %d wheels pinned in %s" % (len(wheellock.read_lock(lock)), lock.name))
        wheellock.install_locked(lock, site, cache=cache, target_args=target_args, python=sys.executable,
                                 run=run, log=log)
        pins = wheellock.read_lock(lock)
    else:
        pins = resolve([str(wheel), *read_requirements(HERE / "requirements.txt")], target_args, cache, work,
                       target_marker_env(arch, python))
        specs = ["%s==%s" % (n, v) for n, v in sorted(pins.items()) if n != "edge-agent" and n not in EXCLUDED]
        log("installing %d wheels into the venv" % len(specs))
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", str(cache),
             "--no-compile", "--no-warn-script-location", "--target", str(site), *target_args, *specs])
    install_project(site, wheel, target_args)
    clean_site(site)
    stage_agent_files(stage, version, python, source)
    normalize_permissions(stage)
    write_control(stage, version, arch, python, glibc)

    out.mkdir(parents=True, exist_ok=True)
    debs = [pack(stage, out / ("%s_%s_%s.deb" % (PACKAGE, version, arch)), compress)]
    for name, stager in companions.STAGERS.items():
        cstage = work / ("root-" + name)
        shutil.rmtree(cstage, ignore_errors=True)
        pkg_arch = stager(cstage, version=version, arch=arch, source=source)
        normalize_permissions(cstage)
        debs.append(pack(cstage, out / ("%s_%s_%s.deb" % (name, version, pkg_arch)), compress))
    (work / "resolved.json").write_text(json.dumps(pins, indent=1, sort_keys=True), encoding="utf-8")
    return debs


def pack(stage: Path, deb: Path, compress: str) -> Path:
    """Write one .deb; /opt stays unowned (see debpack)."""
    log("packing %s" % deb)
    return debpack.pack(stage, deb, compress=compress, mtime=source_date_epoch(), unowned=["opt"])


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), help="a published platform (pinned wheels, suffix)")
    p.add_argument("--arch", default=_default_arch(), help="Debian architecture: amd64 or arm64")
    p.add_argument("--python", default=_default_python(),
                   help="the target's Python minor version (3.8 JetPack 5, 3.10 JetPack 6)")
    p.add_argument("--glibc", default="2.31", help="oldest target glibc (2.31 Ubuntu 20.04, 2.35 Ubuntu 22.04)")
    p.add_argument("--version", help="upstream version (default: edge_agent.__version__)")
    p.add_argument("--update-lock", action="store_true", help="re-resolve the target's wheels, rewrite its lock")
    p.add_argument("--source", type=Path, default=REPO, help="the source tree to package (default: this one)")
    p.add_argument("--out", type=Path, default=REPO / "dist", help="where the .deb files go")
    p.add_argument("--cache", type=Path, default=REPO / "build" / "wheels", help="wheel cache")
    p.add_argument("--work", type=Path, default=REPO / "build" / "deb", help="scratch folder (staging tree)")
    p.add_argument("--compress", default="xz", choices=sorted(debpack.COMPRESSORS), help="data.tar compression")
    a = p.parse_args(argv)
    try:
        debs = build(arch=a.arch, python=a.python, glibc=a.glibc, version=a.version, out=a.out.resolve(),
                     cache_root=a.cache.resolve(), compress=a.compress, work_root=a.work.resolve(),
                     target=a.target, source=a.source.resolve(), refresh_lock=a.update_lock)
    except BuildError as e:
        print("build-deb: error: %s" % e, file=sys.stderr)
        return 1
    for deb in debs:
        print(deb)
    return 0


def _default_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], stdout=subprocess.PIPE, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "amd64"


def _default_python() -> str:
    """The minor version of this machine's /usr/bin/python3, else of the running interpreter."""
    try:
        out = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return "%d.%d" % sys.version_info[:2]


__all__ = ["installed_size_kib", "maintainer"]

if __name__ == "__main__":
    raise SystemExit(main())
