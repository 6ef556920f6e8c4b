"""Write a .deb from a staged tree, byte for byte the same for the same tree and SOURCE_DATE_EPOCH.

A .deb is an ar archive of `debian-binary`, `control.tar.*` and `data.tar.*`. dpkg-deb builds it from
the whole tree, so every parent directory becomes a path the package owns; this writer leaves out
the directories named in `unowned` (the package's files under /opt/edge-agent do not make it the owner
of /opt, which base-files creates on Debian and Ubuntu and nothing owns). dpkg creates a missing
parent directory on unpacking only if it exists on the system, which /opt always does.

Every member is owned by root:root with its mode from the tree and the mtime SOURCE_DATE_EPOCH, in
sorted order, so a rebuild of the same tree gives the same bytes.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional


class _Uncompressed:
    """The "none" compressor: writes through, and closing leaves the wrapped file open like the others."""

    def __init__(self, raw) -> None:
        self._raw = raw

    def write(self, data: bytes) -> int:
        return self._raw.write(data)

    def close(self) -> None:
        pass


#: Compression name -> (file suffix, a writable file object compressing into the file it wraps).
COMPRESSORS = {
    "xz": (".xz", lambda raw: lzma.LZMAFile(raw, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)),
    "gzip": (".gz", lambda raw: gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0)),
    "none": ("", _Uncompressed),
}

#: Bytes copied at a time when streaming members.
CHUNK = 1024 * 1024


def _entries(root: Path, skip_top: str = "") -> List[str]:
    """Relative paths under `root` in sorted, parent-first order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(str(root)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, str(root))
        if skip_top and rel.split(os.sep)[0] == skip_top:
            dirnames[:] = []
            continue
        if rel != ".":
            out.append(rel)
        for name in sorted(filenames):
            out.append(os.path.normpath(os.path.join(rel, name)))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out.append(os.path.normpath(os.path.join(rel, name)))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return sorted(out, key=lambda p: p.split(os.sep))


def write_tar(out, root: Path, names: Iterable[str], mtime: int) -> None:
    """A GNU tar of `names` (relative to `root`) as ./name into the file object `out`, root-owned, with a
    fixed mtime; streamed, so a large tree is never held in memory."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        top = tarfile.TarInfo("./")
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, mtime
        top.uname = top.gname = "root"
        tar.addfile(top)
        for name in names:
            full = root / name
            info = tar.gettarinfo(str(full), arcname="./" + name.replace(os.sep, "/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = mtime
            if info.isdir():
                info.name += "/"
            if info.isreg():
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def _compressed_member(path: Path, root: Path, names: List[str], mtime: int, compress: str) -> None:
    """Write the tar of `names`, compressed, to `path`."""
    with open(path, "wb") as raw:
        stream = COMPRESSORS[compress][1](raw)
        try:
            write_tar(stream, root, names, mtime)
        finally:
            stream.close()


def _ar_header(name: str, size: int, mtime: int) -> bytes:
    header = "%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name, mtime, 0, 0, "100644", size)
    assert len(header) == 60
    return header.encode("ascii")


def _ar_append(out, name: str, member: Path, mtime: int) -> None:
    size = member.stat().st_size
    out.write(_ar_header(name, size, mtime))
    with open(member, "rb") as f:
        shutil.copyfileobj(f, out, CHUNK)
    if size % 2:
        out.write(b"\n")


def pack(stage: Path, out: Path, *, compress: str, mtime: int, unowned: Optional[List[str]] = None) -> Path:
    """Write `out` from `stage` (its DEBIAN/ folder is the control part)."""
    suffix = COMPRESSORS[compress][0]
    skip = set(unowned or [])
    control_names = _entries(stage / "DEBIAN")
    data_names = [n for n in _entries(stage, skip_top="DEBIAN") if n != "DEBIAN" and n not in skip]
    with tempfile.TemporaryDirectory(prefix="debpack-", dir=str(out.parent)) as tmp:
        control, data = Path(tmp) / "control.tar.gz", Path(tmp) / ("data.tar" + suffix)
        _compressed_member(control, stage / "DEBIAN", control_names, mtime, "gzip")
        _compressed_member(data, stage, data_names, mtime, compress)
        binary = Path(tmp) / "debian-binary"
        binary.write_bytes(b"2.0\n")
        partial = Path(tmp) / out.name
        with open(partial, "wb") as f:
            f.write(b"!<arch>\n")
            _ar_append(f, "debian-binary", binary, mtime)
            _ar_append(f, "control.tar.gz", control, mtime)
            _ar_append(f, "data.tar" + suffix, data, mtime)
        os.replace(str(partial), str(out))
    return out
