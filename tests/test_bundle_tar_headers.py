"""Tar headers are bounded before they are read (`edge_agent/bundle/_tarheaders.py`).

The attack: a signed bundle with a pax header whose `size=0` record makes the next member's data empty,
so a reader that follows pax (as `tarfile` does) finds a 300 MB pax header where a raw 512-byte walk
(the old pre-check) saw only file data; `tarfile` then read all 300 MB into memory — `edge-agent install`
reached 0.9 GB RSS and `fleet bundle verify` passed it. Each test asserts the refusal and, for the real
commands, the peak RSS of the process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from agent_helpers import REPO, agent_toml, build_sample_bundle, write_key

from edge_agent.bundle._tarheaders import MAX_META_BYTES, iter_headers, parse_pax
from edge_agent.bundle.archive import read_bundle
from edge_agent.errors import ArchiveError

MIB = 1 << 20
HIDDEN = 300 * MIB
#: Peak RSS allowed for a CLI refusing the bundle: the interpreter and its imports, not the header.
RSS_BOUND_MB = 200


def _hdr(name: str, kind: bytes, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = kind, size, 0
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _pax(records: bytes) -> bytes:
    return _hdr("pax", tarfile.XHDTYPE, len(records)) + records + b"\0" * (-len(records) % 512)


def _end_of_members(bundle: Path) -> int:
    _, reader = read_bundle(bundle, max_manifest_bytes=MIB, max_bundle_bytes=1 << 30)
    with reader:
        last = list(reader.members.values())[-1]
    return last.offset + -(-last.size // 512) * 512


def hide_pax_header(bundle: Path, out: Path, hidden: int = HIDDEN, then: bytes = b"") -> Path:
    """`bundle` with a pax `size=0` member whose raw size field covers a `hidden`-byte pax header."""
    head = bundle.read_bytes()[:_end_of_members(bundle)]
    with open(out, "wb") as f:
        f.write(head)
        f.write(_pax(b"9 size=0\n"))
        f.write(_hdr("decoy", tarfile.REGTYPE, 512 + hidden))  # a raw walk skips the next 512 + hidden bytes
        f.write(_hdr("hidden", tarfile.XHDTYPE, hidden))  # where a pax-following reader looks next
        f.seek(hidden, os.SEEK_CUR)  # a sparse hole: cheap on disk, 300 MB of zeros to a reader
        f.write(then + b"\0" * 10240)
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("tarhdr")
    key = write_key(d / "keys", "release")
    return {"dir": d, "bundle": build_sample_bundle(d, key, version=1)}


#: Runs argv[1:] and reports its peak RSS. The measured command is started by this small launcher, not by
#: the test process: a child's peak RSS counts the address space it was forked (or vforked) from until its
#: exec, so a command started straight from a pytest process that has grown to 400 MB reports 400 MB.
_LAUNCHER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
sys.stdout.flush()
print("\\npeak-rss-kib=%d" % usage.ru_maxrss, flush=True)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
"""


def _run_measured(cmd, **kw):
    """Run `cmd`; (exit code, output, peak RSS in MB of that process alone)."""
    p = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], check=False, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, cwd=str(REPO), **kw)
    out, _, tail = p.stdout.decode(errors="replace").rpartition("\npeak-rss-kib=")
    return p.returncode, out, int(tail) / 1024.0  # Linux reports KiB


def test_hidden_300mb_pax_header_refused_by_fleet_bundle_verify_with_bounded_memory(signed):
    bad = hide_pax_header(signed["bundle"], signed["dir"] / "hidden-pax.bundle")
    code, out, rss_mb = _run_measured([sys.executable, "-m", "fleet.cli", "bundle", "verify", str(bad),
                                       "--trusted", str(signed["dir"] / "keys")])
    assert rss_mb < RSS_BOUND_MB, "peak RSS %.0f MB" % rss_mb
    assert code != 0 and "metadata header" in out, out
    assert "Traceback" not in out


def test_hidden_300mb_pax_header_refused_by_edge_agent_install_with_bounded_memory(signed, tmp_path):
    bad = hide_pax_header(signed["bundle"], tmp_path / "hidden-pax.bundle")
    cfg = agent_toml(tmp_path / "agent.toml", device_id="dev1", state_dir=tmp_path / "state", port=1,
                     bundle_keys=signed["dir"] / "keys", command_key=tmp_path / "command-keys" / "c.pub")
    write_key(tmp_path / "command-keys", "c")
    code, out, rss_mb = _run_measured([sys.executable, "-m", "edge_agent.cli", "install", str(bad),
                                       "--config", str(cfg)])
    assert rss_mb < RSS_BOUND_MB, "peak RSS %.0f MB" % rss_mb
    assert code != 0 and "metadata header" in out, out
    assert "Traceback" not in out
    objects = tmp_path / "state" / "objects" / "sha256"
    assert not objects.exists() or not list(objects.iterdir())


def test_the_same_bundle_with_a_small_hidden_header_is_seen_the_way_tarfile_sees_it(signed, tmp_path):
    """The walk follows pax records exactly as tarfile does: with a hidden header under the limit,
    both find the same members (so no header can hide from the bound)."""
    bad = hide_pax_header(signed["bundle"], tmp_path / "small.bundle", hidden=1024,
                          then=_hdr("after", tarfile.REGTYPE, 0))
    with open(bad, "rb") as f:
        ours = [(h.name, h.size) for h in iter_headers(f, bad.stat().st_size, max_headers=100)]
    with tarfile.open(bad) as tf:
        theirs = [(ti.name, ti.size) for ti in tf.getmembers()]
    assert ours == theirs and ours[-2:] == [("decoy", 0), ("after", 0)]


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                                  tarfile.XGLTYPE])
def test_oversized_gnu_longname_longlink_and_pax_headers_refused_before_reading(tmp_path, kind):
    data = _hdr("meta", kind, MAX_META_BYTES + 1) + b"\0" * (MAX_META_BYTES + 1024)

    class Counting(io.BytesIO):
        largest = 0

        def read(self, n=-1):
            Counting.largest = max(Counting.largest, n)
            return super().read(n)

    f = Counting(data)
    with pytest.raises(ArchiveError, match="metadata header"):
        list(iter_headers(f, len(data), max_headers=10))
    assert Counting.largest <= 512  # nothing beyond the header block itself was read


def test_gnu_long_names_and_pax_paths_within_limits_are_read(tmp_path):
    name = "models/" + "d" * 150 + "/x.onnx"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:", format=fmt) as tf:
            ti = tarfile.TarInfo(name)
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"abc"))
        data = buf.getvalue()
        headers = list(iter_headers(io.BytesIO(data), len(data), max_headers=10))
        assert [(h.name, h.size) for h in headers] == [(name, 3)]
        assert data[headers[0].offset:headers[0].offset + 3] == b"abc"


@pytest.mark.parametrize("records,match", [
    (b"29 GNU.sparse.map=0,10,20,30\n", "sparse"),
    (b"21 hdrcharset=BINARY\n", "binary"),
    (b"99 path=x\n", "malformed"),
    (b"x path=x\n", "malformed"),
])
def test_hostile_pax_records_refused(records, match):
    with pytest.raises(ArchiveError, match=match):
        parse_pax(records)


def test_bad_checksum_and_pax_global_header_refused():
    good = _hdr("a", tarfile.REGTYPE, 0) + b"\0" * 1024
    bad = bytearray(good)
    bad[0] ^= 1
    with pytest.raises(ArchiveError, match="checksum"):
        list(iter_headers(io.BytesIO(bytes(bad)), len(bad), max_headers=10))
    glob = _hdr("g", tarfile.XGLTYPE, 9) + b"9 path=x\n" + b"\0" * 503 + good
    with pytest.raises(ArchiveError, match="global"):
        list(iter_headers(io.BytesIO(glob), len(glob), max_headers=10))
