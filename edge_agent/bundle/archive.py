"""The offline bundle form: an uncompressed tar with ``manifest.json`` first, then the files.

`tarfile` is used only to write bundles; reading parses every header with `_tarheaders`, which bounds
pax and GNU long-name headers before reading them. Every member is validated here (regular files and
directories only; no absolute paths, ``..``, links, devices, fifos or duplicates; data inside the
file; a proper end-of-archive marker), and data is copied by hand — never `extract`/`extractall`
and never tarfile extraction filters (Python 3.8 on JetPack 5 may lack them). Unpacking writes into a
fresh directory created here, checks size and sha256 of every file against the verified manifest,
and only then renames it into place; on any failure nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from edge_agent.bundle._tarheaders import MAX_META_BYTES, RawHeader, iter_headers  # noqa: F401 - re-exported
from edge_agent.bundle.manifest import MANIFEST_NAME, ManifestBody
from edge_agent.bundle.paths import check_member_path
from edge_agent.errors import ArchiveError, IntegrityError, ResourceError
from edge_agent.fsutil import fsync_dir

log = logging.getLogger(__name__)

BLOCK = 512
COPY_BYTES = 1 << 20
#: A bundle with more members than this is refused before any data is read.
MAX_MEMBERS = 10000
_REGULAR = (b"0", b"\0")


@dataclass(frozen=True)
class Member:
    """One validated archive member: its path, kind, size and where its data starts."""

    name: str
    kind: str  # "file" or "dir"
    size: int
    offset: int


class BundleReader:
    """Read access to a validated bundle archive; use as a context manager (it holds the file open)."""

    def __init__(self, path: Path, f: BinaryIO, members: List[Member]) -> None:
        self.path = path
        self._f = f
        self.members: Dict[str, Member] = {m.name: m for m in members}

    def files(self) -> List[Member]:
        """The regular-file members other than the manifest, in archive order."""
        return [m for m in self.members.values() if m.kind == "file" and m.name != MANIFEST_NAME]

    def iter_chunks(self, name: str, chunk_bytes: int = COPY_BYTES) -> Iterator[bytes]:
        """The data of file member `name`, in chunks."""
        m = self.members.get(name)
        if m is None or m.kind != "file":
            raise ArchiveError("bundle has no file %r" % name)
        left = m.size
        pos = m.offset
        while left:
            self._f.seek(pos)
            buf = self._f.read(min(chunk_bytes, left))
            if not buf:
                raise ArchiveError("bundle is truncated inside %r" % name)
            pos += len(buf)
            left -= len(buf)
            yield buf

    def read(self, name: str, *, max_bytes: int) -> bytes:
        """The whole data of file member `name` (refused when larger than `max_bytes`)."""
        m = self.members.get(name)
        if m is not None and m.size > max_bytes:
            raise ArchiveError("bundle member %r of %d bytes is over the %d byte limit" % (name, m.size, max_bytes))
        return b"".join(self.iter_chunks(name))

    def close(self) -> None:
        """Close the archive file."""
        self._f.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- pack


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def pack_bundle(manifest_bytes: bytes, files: Mapping[str, Path], out: Path) -> Path:
    """Write the bundle tar: ``manifest.json`` first, then `files` (bundle path -> source file) sorted.

    The output is reproducible (zero mtimes and owners) and appears atomically at `out`.
    """
    out = Path(out)
    for name in files:
        check_member_path(name)
        if name == MANIFEST_NAME:
            raise ArchiveError("a bundle file may not be named %s" % MANIFEST_NAME)
    tmp = out.with_name(".%s.%d.tmp" % (out.name, os.getpid()))
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w:", format=tarfile.PAX_FORMAT) as tf:
            tf.addfile(_tarinfo(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            for name in sorted(files):
                src = Path(files[name])
                with open(src, "rb") as f:
                    tf.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size), f)
            tf.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except OSError as e:
        _unlink_quietly(tmp)
        raise ResourceError("cannot write bundle %s: %s" % (out, e.strerror or e))
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return out


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- read


_KINDS = {b"2": "symlink", b"1": "hardlink", b"3": "device", b"4": "device", b"6": "fifo"}


def _kind_of(h: RawHeader) -> str:
    if h.type in _REGULAR:
        return "file"
    if h.type == b"5":
        return "dir"
    what = _KINDS.get(h.type, "special member (type %r)" % h.type.decode("latin-1"))
    raise ArchiveError("bundle member %r is a %s; only regular files and directories are allowed" % (h.name, what))


def scan_members(f: BinaryIO, file_size: int, *, max_bundle_bytes: int) -> List[Member]:
    """Parse and validate every header of an open tar; the members in archive order.

    Headers are parsed by `_tarheaders` (not `tarfile`), which bounds every metadata header before
    reading it."""
    members: List[Member] = []
    seen: Dict[str, str] = {}
    implied_dirs: Set[str] = set()
    total = 0
    end = 0
    for h in iter_headers(f, file_size, max_headers=4 * MAX_MEMBERS):
        if len(members) >= MAX_MEMBERS:
            raise ArchiveError("bundle has more than %d members" % MAX_MEMBERS)
        name = check_member_path(h.name)
        kind = _kind_of(h)
        if name in seen:
            raise ArchiveError("bundle member %r appears twice" % name)
        # A file may not also be a parent of another member (it would have to be a directory).
        parts = name.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(seen.get(p) == "file" for p in parents) or (kind == "file" and name in implied_dirs):
            raise ArchiveError("bundle member %r is both a file and a directory" % name)
        implied_dirs.update(parents)
        size = h.size if kind == "file" else 0
        if h.offset + size > file_size:
            raise ArchiveError("bundle is truncated: member %r runs past the end of the file" % name)
        total += size
        if total > max_bundle_bytes:
            raise ArchiveError("bundle contents are over the %d byte limit" % max_bundle_bytes)
        seen[name] = kind
        members.append(Member(name=name, kind=kind, size=size, offset=h.offset))
        end = h.offset + ((size + BLOCK - 1) // BLOCK) * BLOCK
    if not members:
        raise ArchiveError("bundle archive is empty")
    # A complete archive ends with two zero blocks.
    f.seek(end)
    if f.read(2 * BLOCK) != b"\0" * (2 * BLOCK):
        raise ArchiveError("bundle is truncated: no end-of-archive marker")
    return members


def read_bundle(path: Path, *, max_manifest_bytes: int, max_bundle_bytes: int) -> Tuple[bytes, BundleReader]:
    """Open a bundle archive, validate every member header, and return (manifest bytes, reader).

    The manifest is NOT verified here; pass the bytes to `verify_manifest`. The caller closes the
    reader (it is a context manager).
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ArchiveError("cannot open bundle %s: %s" % (path, e.strerror or e))
    try:
        size = os.fstat(f.fileno()).st_size
        # tar framing: header + padding per member, pax headers, end blocks and record padding
        if size > max_bundle_bytes + max_manifest_bytes + 4 * BLOCK * MAX_MEMBERS + tarfile.RECORDSIZE:
            raise ArchiveError("bundle file of %d bytes is over the %d byte limit" % (size, max_bundle_bytes))
        members = scan_members(f, size, max_bundle_bytes=max_bundle_bytes)
        first = members[0]
        if first.name != MANIFEST_NAME or first.kind != "file":
            raise ArchiveError("the first bundle member must be %s, found %r" % (MANIFEST_NAME, first.name))
        reader = BundleReader(path, f, members)
        manifest = reader.read(MANIFEST_NAME, max_bytes=max_manifest_bytes)
    except BaseException:
        f.close()
        raise
    return manifest, reader


# --------------------------------------------------------------------------------------------- unpack


def _check_against_manifest(reader: BundleReader, manifest: ManifestBody, max_file_bytes: Optional[int]) -> None:
    """Every file member is listed with the same size; every listed file is present."""
    for m in reader.files():
        entry = manifest.files.get(m.name)
        if entry is None:
            raise ArchiveError("bundle member %r is not listed in the manifest" % m.name)
        if m.size != entry.size:
            raise IntegrityError(
                "bundle member %r is %d bytes, the manifest says %d" % (m.name, m.size, entry.size)
            )
        if max_file_bytes is not None and m.size > max_file_bytes:
            raise ArchiveError(
                "bundle member %r of %d bytes is over the %d byte limit" % (m.name, m.size, max_file_bytes)
            )
    missing = sorted(n for n in manifest.files if n not in reader.members or reader.members[n].kind != "file")
    if missing:
        raise IntegrityError("bundle lacks file(s) the manifest lists: %s" % ", ".join(missing[:5]))


def check_bundle_files(reader: BundleReader, manifest: ManifestBody, *, max_file_bytes: Optional[int] = None) -> None:
    """Check every file of an open bundle against a verified manifest (listing, size, sha256) without
    writing anything. Raises ArchiveError or IntegrityError."""
    _check_against_manifest(reader, manifest, max_file_bytes)
    for m in reader.files():
        h = hashlib.sha256()
        for buf in reader.iter_chunks(m.name):
            h.update(buf)
        want = manifest.files[m.name].sha256
        if h.hexdigest() != want:
            raise IntegrityError(
                "bundle file %r has sha256 %s..., the manifest says %s..." % (m.name, h.hexdigest()[:16], want[:16])
            )


def _write_member(reader: BundleReader, member: Member, root: Path, expected_sha256: str) -> None:
    target = root.joinpath(*member.name.split("/"))
    parent = target.parent
    parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(str(target), flags, 0o644)
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        for buf in reader.iter_chunks(member.name):
            h.update(buf)
            out.write(buf)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != expected_sha256:
        raise IntegrityError(
            "bundle file %r has sha256 %s..., the manifest says %s..."
            % (member.name, h.hexdigest()[:16], expected_sha256[:16])
        )


def unpack_bundle(
    path: Path,
    dest_dir: Path,
    manifest: ManifestBody,
    *,
    max_bundle_bytes: int,
    max_manifest_bytes: int = 1 << 20,
    max_file_bytes: Optional[int] = None,
) -> Path:
    """Unpack a bundle whose manifest was verified into `dest_dir` (which must not exist yet).

    Every member is validated, every file's size and sha256 must match `manifest`, and the archive's
    own manifest must be the one that was verified. Files are written into a fresh temporary
    directory beside `dest_dir` and renamed into place at the end; on any error the temporary
    directory is removed and `dest_dir` is untouched. The raw ``manifest.json`` is kept in the result.
    """
    from edge_agent.bundle.verify import read_unverified

    dest_dir = Path(dest_dir)
    if dest_dir.exists() or dest_dir.is_symlink():
        raise ResourceError("unpack destination %s already exists" % dest_dir)
    if manifest.total_size() > max_bundle_bytes:
        raise ArchiveError(
            "bundle files total %d bytes, over the %d byte limit" % (manifest.total_size(), max_bundle_bytes)
        )
    raw, reader = read_bundle(path, max_manifest_bytes=max_manifest_bytes, max_bundle_bytes=max_bundle_bytes)
    with reader:
        if read_unverified(raw, max_manifest_bytes=max_manifest_bytes) != manifest:
            raise IntegrityError("the archive's manifest.json is not the manifest that was verified")
        _check_against_manifest(reader, manifest, max_file_bytes)
        try:
            dest_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".%s.unpack-" % dest_dir.name, dir=str(dest_dir.parent)))
        except OSError as e:
            raise ResourceError("cannot create a directory beside %s: %s" % (dest_dir, e.strerror or e))
        try:
            os.chmod(str(tmp), 0o755)
            for m in reader.members.values():
                if m.kind == "dir":
                    tmp.joinpath(*m.name.split("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
            for m in reader.files():
                _write_member(reader, m, tmp, manifest.files[m.name].sha256)
            with open(tmp / MANIFEST_NAME, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
                fsync_dir(d)
            os.rename(str(tmp), str(dest_dir))
            fsync_dir(dest_dir.parent)
        except OSError as e:
            shutil.rmtree(str(tmp), ignore_errors=True)
            raise ResourceError("cannot unpack bundle into %s: %s" % (dest_dir, e.strerror or e))
        except BaseException:
            shutil.rmtree(str(tmp), ignore_errors=True)
            raise
    log.info("unpacked bundle %s v%d into %s", manifest.name, manifest.version, dest_dir)
    return dest_dir
