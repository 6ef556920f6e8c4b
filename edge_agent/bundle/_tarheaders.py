"""Our own walk over tar headers, so that no header is read before it is bounded.

`tarfile` reads a pax extended header or a GNU long-name header whole into memory, and a pax header's
``size`` record changes where `tarfile` looks for the next header: a raw pre-scan of the 512-byte
headers (what bundles used to rely on) could be led past a 300 MB pax header that `tarfile` then read.
Here every header is parsed by this module alone, with the pax ``path``/``size`` records applied as
`tarfile` would, and every metadata header is refused above `MAX_META_BYTES` before its data is read.

Understood: POSIX ustar (with ``prefix``), pax ``x`` headers (records ``path``, ``size``; the others are
ignored), GNU ``L``/``K`` long names and links. Refused: pax global headers (``g``), GNU sparse files
(``S`` and ``GNU.sparse.*`` records), ``hdrcharset=BINARY``, bad checksums, negative or malformed numbers,
more than `MAX_META_CHAIN` metadata headers before one member.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterator, Optional

from edge_agent.errors import ArchiveError

BLOCK = 512
#: Largest pax / GNU long-name header accepted (they hold paths of at most 255 characters).
MAX_META_BYTES = 64 * 1024
#: Metadata headers allowed in front of one member (a pax header and a GNU long name, with room).
MAX_META_CHAIN = 4
_META = (b"x", b"g", b"L", b"K")
_POSIX_MAGIC = b"ustar\x0000"


@dataclass(frozen=True)
class RawHeader:
    """One member as the archive describes it: path, one-byte type flag, data size and data offset."""

    name: str
    type: bytes
    size: int
    offset: int


def _nts(field: bytes) -> bytes:
    """A NUL-terminated field."""
    return field.split(b"\0", 1)[0]


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80); negative is refused."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise ArchiveError("bundle is not a valid tar archive: negative %s in a header" % what)
    text = _nts(field).strip(b" ")
    if text and not all(0x30 <= c <= 0x37 for c in text):
        raise ArchiveError("bundle is not a valid tar archive: bad %s field in a header" % what)
    return int(text, 8) if text else 0


def _checksum_ok(buf: bytes) -> bool:
    stored = _number(buf[148:156], "checksum")
    unsigned = 256 + sum(buf[:148]) + sum(buf[156:])
    signed = 256 + sum(struct.unpack("148b8x356b", buf))
    return stored in (unsigned, signed)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError("bundle member %s is not UTF-8" % what) from None


def parse_pax(data: bytes) -> Dict[str, str]:
    """The records of a pax extended header (``"%d %s=%s\\n"``, the length counting the whole record)."""
    out: Dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if not data[pos:].strip(b"\0"):
            break
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ArchiveError("bundle has a malformed pax header record")
        length = int(digits)
        record = data[space + 1:pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("bundle has a malformed pax header record")
        key, _, value = record[:-1].partition(b"=")
        out[_text(key, "pax key")] = _text(value, "pax value")
        pos += length
    if out.get("hdrcharset") == "BINARY" or any(k.startswith("GNU.sparse.") for k in out):
        raise ArchiveError("bundle has a sparse or binary-named member; only plain files are allowed")
    return out


def _read(f: BinaryIO, pos: int, n: int) -> bytes:
    f.seek(pos)
    return f.read(n)


def _meta_data(f: BinaryIO, pos: int, size: int, file_size: int, kind: bytes) -> bytes:
    """The data of a metadata header, refused before it is read when over `MAX_META_BYTES`."""
    if size > MAX_META_BYTES:
        raise ArchiveError("bundle has a %d byte metadata header of type %r (at most %d)"
                           % (size, kind.decode("latin-1"), MAX_META_BYTES))
    if pos + size > file_size:
        raise ArchiveError("bundle is truncated inside a metadata header")
    return _read(f, pos, size)


def iter_headers(f: BinaryIO, file_size: int, *, max_headers: int) -> Iterator[RawHeader]:
    """Every member header of an uncompressed tar, metadata applied; stops at the first zero block."""
    pos = 0
    headers = 0
    pax: Dict[str, str] = {}
    long_name: Optional[str] = None
    chain = 0
    while True:
        buf = _read(f, pos, BLOCK)
        if len(buf) < BLOCK:
            if pos == 0:
                raise ArchiveError("bundle archive is empty")
            raise ArchiveError("bundle is truncated: no end-of-archive marker")
        if buf == b"\0" * BLOCK:
            if chain:
                raise ArchiveError("bundle is truncated: a metadata header without its member")
            return
        headers += 1
        if headers > max_headers:
            raise ArchiveError("bundle has more than %d headers" % max_headers)
        if not _checksum_ok(buf):
            raise ArchiveError("bundle is not a valid tar archive: bad header checksum at byte %d" % pos)
        kind = buf[156:157]
        size = _number(buf[124:136], "size")
        data = pos + BLOCK
        if kind in _META:
            chain += 1
            if chain > MAX_META_CHAIN:
                raise ArchiveError("bundle has more than %d metadata headers before one member" % MAX_META_CHAIN)
            meta = _meta_data(f, data, size, file_size, kind)
            if kind == b"g":
                raise ArchiveError("bundle has a pax global header; bundles carry none")
            if kind == b"x":
                pax.update(parse_pax(meta))
            elif kind == b"L":
                long_name = _text(_nts(meta), "name")
            pos = data + -(-size // BLOCK) * BLOCK
            continue
        name = _text(_nts(buf[0:100]), "name")
        if buf[257:265] == _POSIX_MAGIC:
            prefix = _text(_nts(buf[345:500]), "name prefix")
            if prefix:
                name = prefix + "/" + name
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            if not pax["size"].isdigit() or len(pax["size"]) > 20:
                raise ArchiveError("bundle has a malformed pax size record")
            size = int(pax["size"])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # an old-style directory
        if kind == b"5":
            name = name.rstrip("/")
        yield RawHeader(name=name, type=kind, size=size, offset=data)
        data_blocks = -(-size // BLOCK) * BLOCK if kind in (b"0", b"\0", b"7", b"S") else 0
        pos = data + data_blocks
        pax, long_name, chain = {}, None, 0
