"""The on-disk format of the telemetry spool: segment file names and records (pure, no I/O).

A record is a 24-byte header (magic, body length, seq, CRC-32 of seq+body) followed by the body
(QoS byte, topic length, topic, payload). Segments are ``seg-<first seq, 20 digits>.log``.
"""

from __future__ import annotations

import struct
import zlib
from typing import Optional, Tuple

MAGIC = b"ESP1"
HEADER = struct.Struct(">4sIQI")  # magic, body length, seq, crc32(seq bytes + body)
BODY = struct.Struct(">BH")  # qos, topic length
SEQ = struct.Struct(">Q")
HEAD_FILE = "head.json"
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"
MAX_RECORD_BYTES = 16 * 1024 * 1024


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record has sequence number `first_seq`."""
    return "%s%020d%s" % (SEGMENT_PREFIX, first_seq, SEGMENT_SUFFIX)


def encode_record(seq: int, topic: str, payload: bytes, qos: int) -> bytes:
    """One record: header (magic, body length, seq, CRC-32 of seq + body) and body (QoS, topic, payload)."""
    t = topic.encode("utf-8")
    body = BODY.pack(qos, len(t)) + t + payload
    crc = zlib.crc32(SEQ.pack(seq) + body) & 0xFFFFFFFF
    return HEADER.pack(MAGIC, len(body), seq, crc) + body


def decode_body(body: bytes) -> Tuple[int, str, bytes]:
    """(qos, topic, payload) of a record body. Raises struct.error or UnicodeDecodeError when malformed."""
    qos, tlen = BODY.unpack_from(body)
    start = BODY.size
    topic = body[start:start + tlen].decode("utf-8")
    return qos, topic, body[start + tlen:]


def check_record(data: bytes, off: int, last_seq: int) -> Tuple[Optional[str], int, int]:
    """(what is wrong with the record at `off`, or None; its seq; its body length). A record must have a
    whole header with the magic, a body within MAX_RECORD_BYTES and inside `data`, a matching CRC, and a
    seq above `last_seq`."""
    if len(data) - off < HEADER.size:
        return "torn header", -1, 0
    magic, blen, seq, crc = HEADER.unpack_from(data, off)
    end = off + HEADER.size + blen
    if magic != MAGIC or blen > MAX_RECORD_BYTES:
        return "bad header", seq, blen
    if end > len(data):
        return "torn record", seq, blen
    if zlib.crc32(SEQ.pack(seq) + data[off + HEADER.size:end]) & 0xFFFFFFFF != crc:
        return "checksum mismatch", seq, blen
    if seq <= last_seq:
        return "sequence out of order", seq, blen
    return None, seq, blen
