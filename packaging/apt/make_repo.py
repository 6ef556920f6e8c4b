#!/usr/bin/env python3
"""Build a signed apt repository from the packages of each target, one suite per target.

    python3 packaging/apt/make_repo.py --out build/apt-repo bookworm=dist/bookworm jetpack5=dist/jetpack5 ...

Each SUITE=DIR argument puts DIR's .deb files into pool/main/<suite>/ and indexes them as
dists/<suite>/main/binary-<arch>/Packages, so the JetPack 5 and JetPack 6 builds of one release (both
arm64, versions 0.1.0+jp5 and 0.1.0+jp6) sit side by side and a device's sources entry names the
suite of its JetPack. The indexes are written by apt-ftparchive (apt-utils); Release is signed with
gpg as InRelease (inline) and Release.gpg (detached). The public key is exported beside them as
edge-agent-archive-keyring.gpg, for /etc/apt/keyrings/ and a `signed-by=` sources entry
(docs/apt-repository.md).

--key-id signs with a key already in the gpg keyring (--gnupg-home); without it a signing key for
testing is generated once in --gnupg-home and reused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

ORIGIN = "edge-agent"
COMPONENT = "main"
TEST_KEY_UID = "edge-agent test repository <repo@edge-agent.invalid>"


class RepoError(Exception):
    """A repository step failed; the message says which."""


def run(cmd: List[str], **kw) -> str:
    """Run a command, return its stdout; a failure is a RepoError with its stderr."""
    proc = subprocess.run(cmd, check=False, capture_output=True, **kw)
    if proc.returncode != 0:
        raise RepoError("%s failed (exit %d): %s" % (" ".join(cmd[:4]), proc.returncode,
                                                     proc.stderr.decode(errors="replace")[-2000:]))
    return proc.stdout.decode()


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb."""
    return run(["dpkg-deb", "-f", str(deb), field]).strip()


def ensure_key(home: Path, key_id: Optional[str]) -> str:
    """The signing key's fingerprint: `key_id`'s, or a test key generated once in `home`."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(str(home), 0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    wanted = key_id or TEST_KEY_UID
    listing = subprocess.run([*gpg, "--with-colons", "--list-secret-keys", wanted], check=False,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode()
    if "fpr:" not in listing:
        if key_id:
            raise RepoError("no secret key %s in %s" % (key_id, home))
        run([*gpg, "--passphrase", "", "--quick-gen-key", TEST_KEY_UID, "ed25519", "sign", "2y"])
        listing = run([*gpg, "--with-colons", "--list-secret-keys", wanted])
    return next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))


def add_suite(repo: Path, suite: str, debs: List[Path]) -> List[str]:
    """Copy the debs into the pool and write the suite's Packages indexes; returns its architectures."""
    pool = repo / "pool" / COMPONENT / suite
    pool.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.copy2(str(deb), str(pool / deb.name))
    arches = sorted({deb_field(d, "Architecture") for d in debs} - {"all"})
    if not arches:
        raise RepoError("suite %s has no architecture-specific package" % suite)
    for arch in arches:
        out = repo / "dists" / suite / COMPONENT / ("binary-" + arch)
        out.mkdir(parents=True, exist_ok=True)
        # --arch: this architecture's packages plus Architecture: all ones.
        text = run(["apt-ftparchive", "--arch", arch, "packages", "pool/%s/%s" % (COMPONENT, suite)], cwd=str(repo))
        (out / "Packages").write_text(text, encoding="utf-8")
        run(["gzip", "-9nkf", str(out / "Packages")])
    return arches


def write_release(repo: Path, suite: str, arches: List[str], home: Path, fingerprint: str) -> None:
    """dists/<suite>/Release, signed as InRelease and Release.gpg."""
    dist = repo / "dists" / suite
    opts = {"Origin": ORIGIN, "Label": ORIGIN, "Suite": suite, "Codename": suite,
            "Architectures": " ".join(arches), "Components": COMPONENT,
            "Description": "edge-agent packages for %s" % suite}
    cmd = ["apt-ftparchive"]
    for key, value in opts.items():
        cmd += ["-o", "APT::FTPArchive::Release::%s=%s" % (key, value)]
    for name in ("Release", "InRelease", "Release.gpg"):
        if (dist / name).exists():
            (dist / name).unlink()
    release = run([*cmd, "release", "."], cwd=str(dist))
    (dist / "Release").write_text(release, encoding="utf-8")
    gpg = ["gpg", "--homedir", str(home), "--batch", "--yes", "--local-user", fingerprint]
    run([*gpg, "--clearsign", "--output", str(dist / "InRelease"), str(dist / "Release")])
    run([*gpg, "--armor", "--detach-sign", "--output", str(dist / "Release.gpg"), str(dist / "Release")])


def build_repo(out: Path, suites: Dict[str, Path], home: Path, key_id: Optional[str]) -> Path:
    """The whole repository at `out` (rebuilt from scratch)."""
    for tool in ("apt-ftparchive", "gpg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RepoError("%s not found: apt-get install apt-utils gnupg dpkg" % tool)
    fingerprint = ensure_key(home, key_id)
    shutil.rmtree(str(out), ignore_errors=True)
    out.mkdir(parents=True)
    for suite, folder in sorted(suites.items()):
        debs = sorted(folder.glob("*.deb"))
        if not debs:
            raise RepoError("no .deb files in %s (suite %s)" % (folder, suite))
        arches = add_suite(out, suite, debs)
        write_release(out, suite, arches, home, fingerprint)
    key = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export", fingerprint], check=True,
                         stdout=subprocess.PIPE).stdout
    (out / "edge-agent-archive-keyring.gpg").write_bytes(key)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suites", nargs="+", metavar="SUITE=DIR", help="a suite and the folder with its .deb files")
    p.add_argument("--out", type=Path, required=True, help="repository folder (replaced)")
    p.add_argument("--gnupg-home", type=Path, required=True, help="gpg home holding (or receiving) the key")
    p.add_argument("--key-id", help="sign with this key (default: a generated test key)")
    a = p.parse_args(argv)
    try:
        suites = {}
        for item in a.suites:
            suite, sep, folder = item.partition("=")
            if not sep or not suite:
                raise RepoError("expected SUITE=DIR, got %r" % item)
            suites[suite] = Path(folder)
        repo = build_repo(a.out, suites, a.gnupg_home, a.key_id)
    except RepoError as e:
        print("make-repo: error: %s" % e, file=sys.stderr)
        return 1
    print(repo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
