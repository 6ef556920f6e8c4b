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
import io
import lzma
import os
import tarfile
from pathlib import Path
from typing import Iterable, List, Optional

#: Compression name -> (file suffix, how to compress bytes).
COMPRESSORS = {
    "xz": (".xz", lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)),
    "gzip": (".gz", lambda data: gzip.compress(data, compresslevel=9, mtime=0)),
    "none": ("", lambda data: data),
}


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


def tar_bytes(root: Path, names: Iterable[str], mtime: int) -> bytes:
    """A GNU tar of `names` (relative to `root`) as ./name, root-owned, with a fixed mtime."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
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
    return buf.getvalue()


def _ar_member(name: str, data: bytes, mtime: int) -> bytes:
    header = "%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name, mtime, 0, 0, "100644", len(data))
    assert len(header) == 60
    return header.encode("ascii") + data + (b"\n" if len(data) % 2 else b"")


def pack(stage: Path, out: Path, *, compress: str, mtime: int, unowned: Optional[List[str]] = None) -> Path:
    """Write `out` from `stage` (its DEBIAN/ folder is the control part)."""
    suffix, squeeze = COMPRESSORS[compress]
    control_names = [n for n in _entries(stage / "DEBIAN")]
    control = gzip.compress(tar_bytes(stage / "DEBIAN", control_names, mtime), compresslevel=9, mtime=0)
    skip = set(unowned or [])
    data_names = [n for n in _entries(stage, skip_top="DEBIAN") if n != "DEBIAN" and n not in skip]
    data = squeeze(tar_bytes(stage, data_names, mtime))
    blob = b"!<arch>\n"
    blob += _ar_member("debian-binary", b"2.0\n", mtime)
    blob += _ar_member("control.tar.gz", control, mtime)
    blob += _ar_member("data.tar" + suffix, data, mtime)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(str(tmp), str(out))
    return out
