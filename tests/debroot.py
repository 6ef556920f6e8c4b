"""A clean Debian root made by debootstrap, cached between runs, and commands run inside it.

The root is Debian 12 (minbase plus python3, adduser and ca-certificates, the packages' Depends), built
once and kept as a tarball under ~/.cache/edge-agent/debootstrap/ (EDGE_AGENT_DEBOOTSTRAP_CACHE to
move it), keyed by suite and package list; each test unpacks a fresh copy. Commands run in a private
mount namespace with /proc mounted in the root (the agent reads /proc/meminfo), chrooted, and as a
given user through setpriv, the way systemd would run the unit's ExecStart (no systemd in a chroot).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

SUITE = "bookworm"
INCLUDE = ["python3", "adduser", "ca-certificates"]
MIRROR = os.environ.get("EDGE_AGENT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_dir() -> Path:
    """Where root tarballs are kept."""
    default = Path.home() / ".cache" / "edge-agent" / "debootstrap"
    return Path(os.environ.get("EDGE_AGENT_DEBOOTSTRAP_CACHE", str(default)))


def run(cmd: List[str], *, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run with sbin on PATH; a failure raises with the output's tail."""
    env = dict(os.environ, PATH=SBIN_PATH + ":" + os.environ.get("PATH", ""))
    env.update(kw.pop("env", {}))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(cmd), proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:]))
    return proc


def cached_root_tarball() -> Dict[str, object]:
    """The root tarball, made with debootstrap when missing (one builder at a time, others wait).

    Returns {"path": Path, "built": bool, "seconds": float}."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    key = "%s-minbase-%s" % (SUITE, "+".join(INCLUDE))
    tarball = d / (key + ".tar")
    start = time.monotonic()
    with open(str(d / (key + ".lock")), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return {"path": tarball, "built": False, "seconds": time.monotonic() - start}
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=str(d)))
        try:
            root = work / "root"
            run(["debootstrap", "--variant=minbase", "--include=" + ",".join(INCLUDE), SUITE, str(root), MIRROR],
                timeout=1800)
            # The root's own apt sources point at Debian's archive; the tests replace them.
            run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(work / "root.tar"), "."], timeout=600)
            os.replace(str(work / "root.tar"), str(tarball))
        finally:
            shutil.rmtree(str(work), ignore_errors=True)
    return {"path": tarball, "built": True, "seconds": time.monotonic() - start}


class Root:
    """A fresh copy of the cached root."""

    def __init__(self, tarball: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="edge-agent-chroot-"))
        os.chmod(str(self.path), 0o755)
        run(["tar", "-C", str(self.path), "--numeric-owner", "-xf", str(tarball)], timeout=600)

    def command(self, argv: List[str], *, user: Optional[str] = None, cwd: str = "/", umask: str = "0022",
                env: Optional[Dict[str, str]] = None) -> List[str]:
        """`argv` chrooted into this root (with /proc), as `user` with its groups when given."""
        inner = ["env", "-i", "PATH=" + SBIN_PATH, "LANG=C.UTF-8"]
        inner += ["%s=%s" % kv for kv in sorted((env or {}).items())]
        if user is not None:
            inner += ["setpriv", "--reuid", user, "--regid", user, "--init-groups"]
        inner += ["sh", "-c", 'cd "$0" && umask "$1" && shift && exec "$@"', cwd, umask]
        script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.path), *inner, *argv]

    def run(self, argv: List[str], *, user: Optional[str] = None, check: bool = True, timeout: float = 600,
            env: Optional[Dict[str, str]] = None, cwd: str = "/", umask: str = "0022",
            **kw) -> subprocess.CompletedProcess:
        """Run `argv` in the root and wait."""
        return run(self.command(argv, user=user, env=env, cwd=cwd, umask=umask), check=check, timeout=timeout,
                   **kw)

    def apt(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """apt-get, non-interactive, stdin closed: a prompt fails instead of waiting."""
        return self.run(["apt-get", "-q", "-y", *args], env={"DEBIAN_FRONTEND": "noninteractive"},
                        timeout=timeout, stdin=subprocess.DEVNULL)

    def passwd(self, name: str) -> Optional[List[str]]:
        """The user's /etc/passwd fields in the root, or None."""
        for line in (self.path / "etc" / "passwd").read_text().splitlines():
            if line.split(":")[0] == name:
                return line.split(":")
        return None

    def cleanup(self) -> None:
        """Delete the copy."""
        shutil.rmtree(str(self.path), ignore_errors=True)
