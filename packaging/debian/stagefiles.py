"""The edge-agent package's files beside the venv (conffile, drop-in folder, unit, docs) and its DEBIAN/."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PREFIX = "/opt/edge-agent"
PACKAGE = "edge-agent"


def maintainer() -> str:
    """The Maintainer field."""
    return "Edge Agent Maintainers <maintainers@edge-agent.invalid>"


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set, else the commit time of this checkout, else now.

    Every timestamp in the package comes from here, so a rebuild at the same commit gives the same bytes.
    """
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, check=True).stdout.strip()
        return int(out)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return int(time.time())


def debian_date() -> str:
    """RFC 2822 date for the changelog trailer."""
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(source_date_epoch()))


def write_gzip(path: Path, data: bytes) -> None:
    """gzip -9n: no name or timestamp in the header, as lintian expects."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        gz.write(data)


def write_changelog(doc: Path, package: str, version: str, note: str) -> None:
    """usr/share/doc/<package>/changelog.gz."""
    text = ("%s (%s) unstable; urgency=medium\n\n  * %s\n\n -- %s  %s\n"
            % (package, version, note, maintainer(), debian_date()))
    write_gzip(doc / "changelog.gz", text.encode("utf-8"))


def stage_agent_files(stage: Path, version: str, python: str, source: Path) -> None:
    """Conffile, drop-in folder, key folders, unit, launcher link, docs and lintian overrides."""
    etc = stage / "etc" / PACKAGE
    (etc / "keys").mkdir(parents=True)
    # Controller command keys live apart from the bundle keys (the agent refuses an overlap).
    (etc / "command-keys").mkdir()
    # Site settings beyond the few in agent.toml go into drop-ins here; the package never ships one.
    (etc / "agent.toml.d").mkdir()
    # The conffile holds only what a site must set; every default lives in the code.
    shutil.copy2(HERE / "agent.toml", etc / "agent.toml")
    unit_dir = stage / "lib" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copy2(HERE / "edge-agent.service", unit_dir / "edge-agent.service")
    usr_bin = stage / "usr" / "bin"
    usr_bin.mkdir(parents=True)
    os.symlink(PREFIX + "/bin/edge-agent", str(usr_bin / "edge-agent"))
    doc = stage / "usr" / "share" / "doc" / PACKAGE
    doc.mkdir(parents=True)
    shutil.copy2(HERE / "copyright", doc / "copyright")
    for name in ("install-jetson.md", "apt-repository.md"):
        if (source / "docs" / name).exists():
            shutil.copy2(source / "docs" / name, doc / name)
    # Every setting with its default and meaning: a reference to copy from, not read by the agent.
    shutil.copy2(source / "configs" / "agent.toml", doc / "agent.toml.example")
    write_changelog(doc, PACKAGE, version, "Release %s (built for Python %s)." % (version, python))
    overrides = stage / "usr" / "share" / "lintian" / "overrides"
    overrides.mkdir(parents=True)
    shutil.copy2(HERE / "lintian-overrides", overrides / PACKAGE)


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


def write_debian(stage: Path, control: str, *, conffiles: List[str], scripts: Dict[str, str]) -> None:
    """DEBIAN/: control, conffiles, maintainer scripts (name -> text), md5sums."""
    debian = stage / "DEBIAN"
    debian.mkdir()
    (debian / "control").write_text(control, encoding="utf-8")
    if conffiles:
        (debian / "conffiles").write_text("".join(c + "\n" for c in conffiles), encoding="utf-8")
    for name, text in scripts.items():
        (debian / name).write_text(text, encoding="utf-8")
        os.chmod(str(debian / name), 0o755)
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
    for name in ("control", "conffiles", "md5sums"):
        if (debian / name).exists():
            os.chmod(str(debian / name), 0o644)


def write_control(stage: Path, version: str, arch: str, python: str, glibc: str) -> None:
    """DEBIAN/ of the edge-agent package."""
    template = (HERE / "control.in").read_text(encoding="utf-8")
    control = template.format(
        package=PACKAGE, version=version, arch=arch, maintainer=maintainer(),
        installed_size=installed_size_kib(stage), python_depends=python_depends(python), glibc=glibc,
    )
    scripts = {name: (HERE / name).read_text(encoding="utf-8").replace("@PYTHON@", "python" + python)
               for name in ("postinst", "prerm", "postrm")}
    write_debian(stage, control, conffiles=(HERE / "conffiles").read_text(encoding="utf-8").split(),
                 scripts=scripts)
