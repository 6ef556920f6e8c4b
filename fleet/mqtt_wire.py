"""The few MQTT 5 packets the controller's report receiver (`fleet/ingest_link.py`) sends and reads, as
pure functions over bytes: CONNECT, SUBSCRIBE, PUBACK, PINGREQ and DISCONNECT out; CONNACK, SUBACK,
PUBLISH, PINGRESP and DISCONNECT in (OASIS MQTT Version 5.0, section 3).

`PacketReader.feed` is the hot path: it takes every whole packet from a receive buffer in one loop,
checks every length against what is left of its packet before using it, and gives PUBLISHes as
(topic, payload) pairs. A packet whose Remaining Length is over the reader's bound is skipped unread as
its bytes arrive (counted, the connection stays up); anything malformed raises `WireError`, after which
the caller closes the connection.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

PUBLISH, PUBACK, CONNACK, SUBACK, PINGRESP, DISCONNECT = 3, 4, 2, 9, 13, 14
PINGREQ_BYTES = b"\xc0\x00"
#: A normal DISCONNECT (reason 0x00, no properties).
DISCONNECT_BYTES = b"\xe0\x00"
#: MQTT's Remaining Length is at most four 7-bit groups.
MAX_REMAINING = 268435455


class WireError(Exception):
    """The broker sent something this receiver cannot accept (the connection is closed)."""


def varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer."""
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError("variable byte integer out of range: %d" % n)
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise ValueError("string of %d bytes is over MQTT's 65,535" % len(b))
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(client_id: str, *, keepalive_s: int, username: Optional[str] = None,
            password: Optional[str] = None, max_packet_bytes: int = 0) -> bytes:
    """CONNECT: MQTT 5, clean start, session expiry 0, the packet size we accept (0: not stated)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    props = b"\x11" + struct.pack("!I", 0)
    if max_packet_bytes:
        props += b"\x27" + struct.pack("!I", max_packet_bytes)
    body = b"\x00\x04MQTT\x05" + bytes([flags]) + struct.pack("!H", keepalive_s) + varint(len(props)) + props
    body += _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        pw = password.encode("utf-8")
        body += struct.pack("!H", len(pw)) + pw
    return _packet(0x10, body)


def subscribe(packet_id: int, filters: List[Tuple[str, int]]) -> bytes:
    """SUBSCRIBE of (filter, QoS) pairs, no properties."""
    body = struct.pack("!H", packet_id) + b"\x00"
    for f, qos in filters:
        body += _utf8(f) + bytes([qos & 0x03])
    return _packet(0x82, body)


def puback(packet_id: int) -> bytes:
    """PUBACK, reason Success (the short form)."""
    return b"\x40\x02" + struct.pack("!H", packet_id)


def read_varint(buf, pos: int, end: int) -> Tuple[int, int]:
    """(value, position after it); (-1, pos) when the buffer ends inside it. WireError when malformed."""
    value = shift = 0
    for i in range(4):
        if pos + i >= end:
            return -1, pos
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise WireError("variable byte integer longer than 4 bytes")


# Property identifier -> width: 1, 2, 4 bytes, 'v' varint, 's' two-byte length prefixed (string/binary),
# 'p' string pair (MQTT 5, 2.2.2.2).
_PROPS = {0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "s", 0x0B: "v", 0x11: 4, 0x12: "s", 0x13: 2,
          0x15: "s", 0x16: "s", 0x17: 1, 0x19: 1, 0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: 2, 0x22: 2,
          0x23: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}


def properties(body: bytes, pos: int) -> Tuple[dict, int]:
    """The properties at `pos` of a control packet's body as {identifier: value} (user properties
    dropped) and the position after them; WireError when a length runs past the body."""
    n, pos = read_varint(body, pos, len(body))
    end = pos + n
    if n < 0 or end > len(body):
        raise WireError("properties run past the packet")
    out = {}
    while pos < end:
        pid = body[pos]
        kind = _PROPS.get(pid)
        pos += 1
        if kind is None:
            raise WireError("unknown property 0x%02x" % pid)
        if kind == "v":
            v, pos = read_varint(body, pos, end)
            if v < 0:
                raise WireError("property runs past the properties")
        elif kind in ("s", "p"):
            start = pos
            for _ in range(2 if kind == "p" else 1):
                if pos + 2 > end:
                    raise WireError("property runs past the properties")
                pos += 2 + (body[pos] << 8 | body[pos + 1])
            v = body[start:pos]
        else:
            v = int.from_bytes(body[pos:pos + kind], "big")
            pos += kind
        if pos > end:
            raise WireError("property runs past the properties")
        if pid != 0x26:
            out[pid] = v
    return out, end


class PacketReader:
    """Splits a receive buffer into packets; PUBLISHes become (topic, payload) pairs."""

    def __init__(self, max_packet_bytes: int) -> None:
        #: Larger packets are skipped unread (`oversize`), not kept.
        self.max_packet_bytes = max_packet_bytes
        self.skip = 0
        self.oversize = 0

    def feed(self, buf, start: int, end: int, out: list, acks: list, control: list) -> int:  # noqa: PLR0917
        """Take every whole packet in buf[start:end]; returns where the first incomplete one begins.

        PUBLISH: (topic, payload) appended to `out`, and its packet id to `acks` when it is QoS 1.
        Any other packet: (type, flags, body) appended to `control`. WireError on a malformed packet."""
        if self.skip:
            n = min(self.skip, end - start)
            self.skip -= n
            start += n
        limit = self.max_packet_bytes
        while start < end:
            first = buf[start]
            b1 = buf[start + 1] if start + 1 < end else 0x80
            if b1 < 0x80:  # one-byte Remaining Length (acks, small messages)
                length, pos = b1, start + 2
            elif start + 2 < end and buf[start + 2] < 0x80:  # two bytes: up to 16 KiB (telemetry)
                length, pos = (b1 & 0x7F) | buf[start + 2] << 7, start + 3
            else:
                length, pos = read_varint(buf, start + 1, end)
                if length < 0:
                    return start
            if length > limit:
                if first >> 4 == PUBLISH and first & 0x06:
                    # QoS 1: acknowledged even though skipped, or the broker's send window fills
                    # with it (mosquitto stops sending QoS 1 messages after 20 unacknowledged).
                    if pos + 2 > end or pos + 4 + (buf[pos] << 8 | buf[pos + 1]) > end:
                        return start  # wait for the topic and packet id
                    tlen = buf[pos] << 8 | buf[pos + 1]
                    if tlen + 4 > length:
                        raise WireError("PUBLISH shorter than its topic and packet id")
                    acks.append(buf[pos + 2 + tlen] << 8 | buf[pos + 3 + tlen])
                self.oversize += 1
                n = min(length, end - pos)
                self.skip = length - n
                start = pos + n
                continue
            stop = pos + length
            if stop > end:
                return start
            if first >> 4 == PUBLISH:
                self._publish(buf, first, pos, stop, out, acks)
            else:
                control.append((first >> 4, first & 0x0F, bytes(buf[pos:stop])))
            start = stop
        return start

    @staticmethod
    def _publish(buf, first: int, pos: int, stop: int, out: list, acks: list) -> None:  # noqa: PLR0917
        qos = (first >> 1) & 0x03
        if pos + 2 > stop:
            raise WireError("PUBLISH shorter than its topic length")
        tlen = buf[pos] << 8 | buf[pos + 1]
        t0 = pos + 2
        pos = t0 + tlen
        if qos:
            if qos > 1:
                raise WireError("PUBLISH with QoS %d on a QoS 1 subscription" % qos)
            if pos + 2 > stop:
                raise WireError("PUBLISH shorter than its packet id")
            acks.append(buf[pos] << 8 | buf[pos + 1])
            pos += 2
        if pos >= stop:
            raise WireError("PUBLISH shorter than its header")
        plen = buf[pos]
        if plen & 0x80:
            plen, pos = read_varint(buf, pos, stop)
            if plen < 0:
                raise WireError("PUBLISH properties length runs past the packet")
        else:
            pos += 1
        pos += plen
        if pos > stop or not tlen:
            raise WireError("PUBLISH properties run past the packet" if tlen else "PUBLISH without a topic")
        try:
            topic = str(buf[t0:t0 + tlen], "utf-8")
        except UnicodeDecodeError:
            raise WireError("PUBLISH topic is not UTF-8")
        out.append((topic, bytes(buf[pos:stop])))
