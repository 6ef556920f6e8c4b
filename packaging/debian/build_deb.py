#!/usr/bin/env python3
"""Build edge-agent_<version>_<arch>.deb: the agent in a virtual environment under /opt/edge-agent.

The virtual environment is assembled for the *target* (architecture, Python minor version, glibc),
not for the machine that builds it, so an arm64/Python 3.8 package for JetPack 5 builds on an amd64
box. pip installs binary wheels for the target platform into the venv's site-packages (`pip install
--target --platform ...`); the venv itself is just its layout: `pyvenv.cfg` with
`include-system-site-packages = true` (JetPack's TensorRT, pycuda and OpenCV come from the system)
and `bin/python3.X` pointing at the target's `/usr/bin/python3.X`. Every absolute path in it is the
installed path, so nothing needs relocating.

Wheels are cached under build/wheels/ and a rebuild resolves from that cache first, so repeated
builds work offline. Needs: a Python with pip >= 22.2 to run this script, and dpkg-deb.

    python3 packaging/debian/build_deb.py --arch arm64 --python 3.8 --glibc 2.31
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PREFIX = "/opt/edge-agent"
PACKAGE = "edge-agent"

#: Debian architecture -> the machine name in manylinux platform tags.
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}

#: Dependencies of our dependencies that the agent never imports at run time: onnxruntime lists
#: sympy/coloredlogs (with mpmath/humanfriendly) for its model tools only. Leaving them out saves
#: ~80 MB on the device; the installed-package test runs the ONNX Runtime self-test without them.
EXCLUDED = {"sympy", "mpmath", "coloredlogs", "humanfriendly"}

#: The source files the project wheel is built from (copied to a clean folder first, so stale
#: build artefacts in the work tree never end up in the package).
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "edge_agent", "fleet"]


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def log(msg: str) -> None:
    """Progress line on stderr."""
    print("build-deb: %s" % msg, file=sys.stderr, flush=True)


def run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure becomes a BuildError carrying its output."""
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if proc.returncode != 0:
        raise BuildError("%s failed (exit %d):\n%s" % (" ".join(cmd[:6]), proc.returncode, proc.stdout[-4000:]))
    return proc


def project_version() -> str:
    """`__version__` from edge_agent/__init__.py."""
    text = (REPO / "edge_agent" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise BuildError("no __version__ in edge_agent/__init__.py")
    return m.group(1)


def platform_tags(arch: str, glibc: str) -> List[str]:
    """manylinux tags a target with this glibc accepts, newest first (pip does not expand them itself)."""
    machine = MACHINES[arch]
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise BuildError("--glibc must be 2.17 or newer, got %s" % glibc)
    tags = ["manylinux_2_%d_%s" % (m, machine) for m in range(minor, 16, -1)]
    tags.append("manylinux2014_%s" % machine)
    if machine == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def pip_target_args(arch: str, python: str, glibc: str) -> List[str]:
    """pip options that select wheels for the target instead of the running interpreter."""
    nodot = python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", "cp" + nodot]
    for tag in platform_tags(arch, glibc):
        args += ["--platform", tag]
    return args


def read_requirements(path: Path) -> List[str]:
    """Requirement lines of a requirements file, without comments."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def build_project_wheel(work: Path, cache: Path) -> Path:
    """Build the project's pure-Python wheel from a clean copy of its sources."""
    src = work / "src"
    dist = work / "dist"
    for d in (src, dist):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        p = REPO / name
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
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links", str(tools),
         "-w", str(dist), str(src)])
    wheels = list(dist.glob("edge_agent-*.whl"))
    if len(wheels) != 1:
        raise BuildError("expected one project wheel in %s, found %s" % (dist, wheels))
    return wheels[0]


def target_marker_env(arch: str, python: str) -> Dict[str, str]:
    """PEP 508 marker values of the target interpreter (pip evaluates markers for the one running it)."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python + ".0",
        "os_name": "posix",
        "platform_machine": MACHINES[arch],
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python + ".0",
        "python_version": python,
        "sys_platform": "linux",
        "extra": "",
    }


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(
    roots: List[str], requires: Dict[str, List[str]], env: Dict[str, str]
) -> Tuple[List[str], List[str]]:
    """Walk Requires-Dist from `roots` with markers evaluated for the target.

    `requires` maps canonical names of resolved distributions to their Requires-Dist lines. Returns
    (needed: canonical names reachable on the target, missing: requirements the target needs that the
    resolution lacks, because pip evaluated their markers for the build interpreter).
    """
    Requirement = _packaging().requirements.Requirement
    needed: List[str] = []
    missing: List[str] = []
    todo = [_canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.append(name)
        for line in requires.get(name, []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = _canonical(req.name)
            if dep in requires:
                todo.append(dep)
            elif dep not in [_canonical(Requirement(m).name) for m in missing]:
                missing.append("%s%s" % (req.name, req.specifier))
    return sorted(needed), missing


def _packaging():
    """The `packaging` library: installed, or the copy pip vendors (pip is required anyway)."""
    try:
        import packaging.markers
        import packaging.requirements

        return packaging
    except ImportError:
        from pip._vendor import packaging as vendored
        from pip._vendor.packaging import markers, requirements  # noqa: F401

        return vendored


def resolve(
    requirements: List[str], target_args: List[str], cache: Path, work: Path, env: Dict[str, str]
) -> Dict[str, str]:
    """Resolve name -> version for the target, from the wheel cache when possible, else from the index.

    pip's resolver evaluates environment markers (`tomli; python_version < "3.11"`) for the interpreter
    running it, not for --python-version; the closure is therefore re-walked with the target's markers,
    requirements it lacks are added and resolved again, and packages only the build interpreter needs
    are dropped.
    """
    report = work / "resolve.json"
    Requirement = _packaging().requirements.Requirement
    roots = [Requirement(r).name if not r.endswith(".whl") else "edge-agent" for r in requirements]

    def _resolve(reqs: List[str], offline: bool) -> Dict[str, dict]:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--report", str(report), "--target", str(work / "dry-target"), *target_args]
        if offline:
            cmd += ["--no-index", "--find-links", str(cache)]
        run(cmd + reqs)
        data = json.loads(report.read_text(encoding="utf-8"))
        return {_canonical(item["metadata"]["name"]): item["metadata"] for item in data["install"]}

    def _resolve_cached_first(reqs: List[str]) -> Dict[str, dict]:
        try:
            return _resolve(reqs, offline=True)
        except BuildError:
            log("downloading wheels for the target into %s" % cache)
            run([sys.executable, "-m", "pip", "download", "-q", "-d", str(cache), *target_args, *reqs])
            return _resolve(reqs, offline=True)

    reqs = list(requirements)
    for _ in range(10):
        resolved = _resolve_cached_first(reqs)
        requires = {name: meta.get("requires_dist") or [] for name, meta in resolved.items()}
        needed, missing = dependency_closure(roots, requires, env)
        if not missing:
            log("resolved %d packages for the target" % len(needed))
            return {name: resolved[name]["version"] for name in needed}
        log("adding what the target's markers require: %s" % ", ".join(missing))
        reqs += missing
    raise BuildError("dependency resolution for the target did not settle after 10 rounds")


def install_venv(
    stage: Path, project_wheel: Path, *, pins: Dict[str, str], target_args: List[str], cache: Path, python: str
) -> None:
    """Lay out the venv at stage/opt/edge-agent and install the wheels into its site-packages."""
    venv = stage / PREFIX.lstrip("/")
    site = venv / "lib" / ("python" + python) / "site-packages"
    site.mkdir(parents=True)
    specs = [str(project_wheel)] + ["%s==%s" % (n, v) for n, v in sorted(pins.items())
                                    if n != "edge-agent" and n not in EXCLUDED]
    log("installing %d wheels into the venv" % len(specs))
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", str(cache),
         "--no-compile", "--no-warn-script-location", "--target", str(site), *target_args, *specs])
    # pip writes console scripts for the *build* interpreter; ours is written below.
    shutil.rmtree(site / "bin", ignore_errors=True)
    for direct_url in site.glob("*.dist-info/direct_url.json"):
        direct_url.unlink()  # holds the build machine's path to the project wheel
    # Some wheels carry bytecode of the interpreter that built them; postinst compiles for the target.
    for cache_dir in sorted(site.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache_dir)
    (venv / "pyvenv.cfg").write_text(
        "home = /usr/bin\ninclude-system-site-packages = true\nversion = %s\n" % python, encoding="utf-8"
    )
    bindir = venv / "bin"
    bindir.mkdir()
    os.symlink("/usr/bin/python" + python, str(bindir / ("python" + python)))
    os.symlink("python" + python, str(bindir / "python3"))
    os.symlink("python" + python, str(bindir / "python"))
    launcher = bindir / "edge-agent"
    launcher.write_text(
        "#!%s/bin/python%s -s\n"
        '"""edge-agent command (Debian package launcher)."""\n'
        "import sys\n\n"
        "from edge_agent.cli import main\n\n"
        "if __name__ == \"__main__\":\n"
        "    sys.exit(main())\n" % (PREFIX, python),
        encoding="utf-8",
    )


def install_files(stage: Path, version: str, python: str) -> None:
    """Config, unit, launcher link, docs and lintian overrides."""
    etc = stage / "etc" / PACKAGE
    (etc / "keys").mkdir(parents=True)
    # Controller command keys live apart from the bundle keys (the agent refuses an overlap).
    (etc / "command-keys").mkdir()
    # The documented configs/agent.toml already uses the installed paths; the package adds a header.
    conffile = (HERE / "agent.toml.head").read_text(encoding="utf-8")
    conffile += (REPO / "configs" / "agent.toml").read_text(encoding="utf-8")
    (etc / "agent.toml").write_text(conffile, encoding="utf-8")
    unit_dir = stage / "lib" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copy2(HERE / "edge-agent.service", unit_dir / "edge-agent.service")
    usr_bin = stage / "usr" / "bin"
    usr_bin.mkdir(parents=True)
    os.symlink(PREFIX + "/bin/edge-agent", str(usr_bin / "edge-agent"))
    doc = stage / "usr" / "share" / "doc" / PACKAGE
    doc.mkdir(parents=True)
    shutil.copy2(HERE / "copyright", doc / "copyright")
    install_doc = REPO / "docs" / "install-jetson.md"
    if install_doc.exists():
        shutil.copy2(install_doc, doc / "install-jetson.md")
    changelog = (
        "%s (%s) unstable; urgency=medium\n\n"
        "  * Release %s (built for Python %s).\n\n"
        " -- %s  %s\n" % (PACKAGE, version, version, python, maintainer(), debian_date())
    )
    write_gzip(doc / "changelog.gz", changelog.encode("utf-8"))
    overrides = stage / "usr" / "share" / "lintian" / "overrides"
    overrides.mkdir(parents=True)
    shutil.copy2(HERE / "lintian-overrides", overrides / PACKAGE)


def maintainer() -> str:
    """The Maintainer field."""
    return "Edge Agent Maintainers <maintainers@edge-agent.invalid>"


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))


def debian_date() -> str:
    """RFC 2822 date for the changelog trailer."""
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(source_date_epoch()))


def write_gzip(path: Path, data: bytes) -> None:
    """gzip -9n: no name or timestamp in the header, as lintian expects."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        gz.write(data)


def normalize_permissions(stage: Path) -> None:
    """0755 dirs and executables (scripts with a shebang, ELF executables), 0644 everything else."""
    for dirpath, _dirnames, filenames in os.walk(str(stage)):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with open(p, "rb") as f:
                head = f.read(4)
            executable = head[:2] == b"#!" or (head == b"\x7fELF" and not _is_shared_object(p))
            os.chmod(str(p), 0o755 if executable else 0o644)


def _is_shared_object(p: Path) -> bool:
    with open(p, "rb") as f:
        header = f.read(18)
    return len(header) == 18 and header[16:18] in (b"\x03\x00", b"\x00\x03")  # ET_DYN, either endianness


def installed_size_kib(stage: Path) -> int:
    """Installed-Size: the staged tree in KiB, as dpkg-gencontrol counts it."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(str(stage)):
        if os.path.relpath(dirpath, str(stage)).split(os.sep)[0] == "DEBIAN":
            continue
        total += len(dirnames) + len(filenames)  # one KiB per inode, plus content
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += (os.path.getsize(p) + 1023) // 1024
    return total


def python_depends(python: str) -> str:
    """The interpreter the venv links to, and the default python3 of that release."""
    return "python%s, python3 (>= %s~)" % (python, python)


def write_control(stage: Path, version: str, arch: str, python: str, glibc: str) -> None:
    """DEBIAN/: control, conffiles, maintainer scripts, md5sums."""
    debian = stage / "DEBIAN"
    debian.mkdir()
    template = (HERE / "control.in").read_text(encoding="utf-8")
    control = template.format(
        package=PACKAGE,
        version=version,
        arch=arch,
        maintainer=maintainer(),
        installed_size=installed_size_kib(stage),
        python_depends=python_depends(python),
        glibc=glibc,
    )
    (debian / "control").write_text(control, encoding="utf-8")
    shutil.copy2(HERE / "conffiles", debian / "conffiles")
    for script in ("postinst", "prerm", "postrm"):
        text = (HERE / script).read_text(encoding="utf-8").replace("@PYTHON@", "python" + python)
        (debian / script).write_text(text, encoding="utf-8")
        os.chmod(str(debian / script), 0o755)
    lines = []
    for dirpath, dirnames, filenames in os.walk(str(stage)):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, str(stage))
        if rel_dir.split(os.sep)[0] == "DEBIAN":
            continue
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(p) or rel.startswith("etc/"):
                continue  # conffiles are tracked by dpkg itself
            with open(p, "rb") as f:
                lines.append("%s  %s\n" % (hashlib.md5(f.read()).hexdigest(), rel))
    (debian / "md5sums").write_text("".join(lines), encoding="utf-8")
    os.chmod(str(debian / "md5sums"), 0o644)
    os.chmod(str(debian / "control"), 0o644)
    os.chmod(str(debian / "conffiles"), 0o644)


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
) -> Path:
    """Build the package; returns the .deb path."""
    if arch not in MACHINES:
        raise BuildError("unsupported --arch %r (choose %s)" % (arch, ", ".join(sorted(MACHINES))))
    if not re.match(r"^3\.\d+$", python):
        raise BuildError("--python must be a minor version like 3.8, got %r" % python)
    if shutil.which("dpkg-deb") is None:
        raise BuildError("dpkg-deb not found: apt-get install dpkg")
    version = version or project_version()
    tag = "%s-cp%s-glibc%s" % (arch, python.replace(".", ""), glibc)
    work = (work_root or REPO / "build" / "deb") / tag
    cache = cache_root / tag
    cache.mkdir(parents=True, exist_ok=True)
    stage = work / "root"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    target_args = pip_target_args(arch, python, glibc)

    wheel = build_project_wheel(work, cache_root)
    requirements = [str(wheel), *read_requirements(HERE / "requirements.txt")]
    pins = resolve(requirements, target_args, cache, work, target_marker_env(arch, python))
    # The project wheel itself is installed from its path; the cache only holds third-party wheels.
    for stale in cache.glob("edge_agent-*.whl"):
        stale.unlink()
    install_venv(stage, wheel, pins=pins, target_args=target_args, cache=cache, python=python)
    install_files(stage, version, python)
    normalize_permissions(stage)
    write_control(stage, version, arch, python, glibc)

    out.mkdir(parents=True, exist_ok=True)
    deb = out / ("%s_%s_%s.deb" % (PACKAGE, version, arch))
    log("packing %s" % deb)
    run(["dpkg-deb", "--root-owner-group", "-Z" + compress, "--build", str(stage), str(deb)])
    (work / "resolved.json").write_text(json.dumps(pins, indent=1, sort_keys=True), encoding="utf-8")
    return deb


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=_default_arch(), help="Debian architecture: amd64 or arm64")
    p.add_argument("--python", default=_default_python(),
                   help="the target's Python minor version (3.8 JetPack 5, 3.10 JetPack 6)")
    p.add_argument("--glibc", default="2.31", help="oldest target glibc (2.31 Ubuntu 20.04, 2.35 Ubuntu 22.04)")
    p.add_argument("--version", help="package version (default: edge_agent.__version__)")
    p.add_argument("--out", type=Path, default=REPO / "dist", help="where the .deb goes")
    p.add_argument("--cache", type=Path, default=REPO / "build" / "wheels", help="wheel cache")
    p.add_argument("--work", type=Path, default=REPO / "build" / "deb", help="scratch folder (staging tree)")
    p.add_argument("--compress", default="xz", choices=["xz", "gzip", "none"], help="dpkg-deb compression")
    a = p.parse_args(argv)
    try:
        deb = build(arch=a.arch, python=a.python, glibc=a.glibc, version=a.version, out=a.out.resolve(),
                    cache_root=a.cache.resolve(), compress=a.compress, work_root=a.work.resolve())
    except BuildError as e:
        print("build-deb: error: %s" % e, file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    raise SystemExit(main())
