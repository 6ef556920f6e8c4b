"""Helpers shared by the package build scripts: errors, logging, commands, target platform tags."""

from __future__ import annotations

import subprocess
import sys
from typing import List

#: Debian architecture -> the machine name in manylinux platform tags.
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


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
