"""Resolve a package's wheels for the target interpreter (architecture, Python, glibc), not the builder's.

pip evaluates environment markers for the interpreter running it; the dependency closure is re-walked
here with the target's markers. Used to write a target's lock file (wheellock.py) and by untargeted
development builds (`make deb`).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from buildutil import MACHINES, BuildError, log, run


def read_requirements(path: Path) -> List[str]:
    """Requirement lines of a requirements file, without comments."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


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


