"""Cheap MQTT load for bench/fleet.py: simulated devices' telemetry written as pre-built PUBLISH packets
over a few raw sockets in bulk, and a raw subscriber that only counts what the broker delivers.

A paho client per message costs more CPU than the controller it is meant to load; here a message is one
bytes-format of its template and a few concatenations, and each 50 ms slice of a second goes out in one
`sendall` per socket. Packets are MQTT 5 (fleet/mqtt_wire.py builds CONNECT and SUBSCRIBE).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Dict, List, Sequence, Tuple

from fleet import mqtt_wire as wire


def connect_raw(host: str, port: int, client_id: str) -> socket.socket:
    """A connected MQTT 5 socket (clean start, keep-alive off), after its CONNACK."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.sendall(wire.connect(client_id, keepalive_s=0))
    head = _recv_exact(sock, 2)
    body = _recv_exact(sock, head[1])
    if head[0] >> 4 != wire.CONNACK or body[1] >= 0x80:
        raise RuntimeError("broker refused %s: %r" % (client_id, head + body))
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        out += chunk
    return out


def publish_packet(topic: bytes, body: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    """One PUBLISH (no properties)."""
    n = 2 + len(topic) + (2 if qos else 0) + 1 + len(body)
    pid = packet_id.to_bytes(2, "big") if qos else b""
    return bytes([0x30 | (qos << 1)]) + wire.varint(n) + len(topic).to_bytes(2, "big") + topic + pid + b"\x00" + body


def fill(tmpl: bytes, now_ts: float, seq: int, boot: float) -> bytes:
    """A telemetry body from its template (see bench/fleet.py `_telemetry_template`)."""
    return tmpl % {b"ts": b"%.3f" % now_ts, b"seq": seq, b"up": b"%.3f" % (now_ts - boot)}


def publisher_main(job: Dict[str, Any], out: Any) -> None:
    """One publisher process: every device in ``job["devices"]`` sends seq 1, 2, … one per second for
    ``job["seconds"]``, spread over 20 slices a second, over ``job["sockets"]`` raw connections. With
    ``job["drop_every"]`` = k, one message in k (spread over devices and seconds) is counted as sent but
    never written: a lossy link between the device and the broker."""
    host, port, seconds, start_at = job["host"], job["port"], job["seconds"], job["start_at"]
    devices: List[Tuple[bytes, bytes]] = job["devices"]  # (topic, body template)
    socks = [connect_raw(host, port, "pub-%d-%d" % (os.getpid(), k)) for k in range(job["sockets"])]
    while time.time() < start_at:
        time.sleep(min(0.05, max(0.0, start_at - time.time())))
    boot = job["boot"]
    slices = 20
    per_slice = (len(devices) + slices - 1) // slices
    sent = link_lost = 0
    drop_every = job.get("drop_every", 0)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    for second in range(int(seconds)):
        seq = second + 1
        for s in range(slices):
            due = t0 + second + s / float(slices)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now_ts = time.time()
            chunk = devices[s * per_slice:(s + 1) * per_slice]
            packets = [publish_packet(topic, fill(tmpl, now_ts, seq, boot)) for topic, tmpl in chunk]
            sent += len(packets)
            if drop_every:  # simulated loss on the devices' links: sent by the device, never by the broker
                keep = [p for i, p in enumerate(packets) if (s * per_slice + i + seq) % drop_every]
                link_lost += len(packets) - len(keep)
                packets = keep
            k = len(socks)
            for i, sock in enumerate(socks):
                sock.sendall(b"".join(packets[i::k]))
    behind = time.monotonic() - (t0 + seconds)
    cpu = time.process_time() - cpu0
    for sock in socks:
        sock.sendall(wire.DISCONNECT_BYTES)
        sock.close()
    out.put({"sent": sent, "link_lost": link_lost, "behind_s": behind, "cpu_s": cpu})


def send_round(host: str, port: int, devices: Sequence[Tuple[bytes, bytes]], seq: int, boot: float, *,
               window: int = 500) -> int:
    """Every device sends one message with `seq`, QoS 1, at most `window` unacknowledged at a time: the
    broker has taken each one (a round before and after the measured window makes every device's first
    and last measured sequence number visible to the controllers). Returns how many were sent."""
    sock = connect_raw(host, port, "round-%d-%d" % (os.getpid(), seq))
    try:
        for i in range(0, len(devices), window):
            chunk = devices[i:i + window]
            now_ts = time.time()
            sock.sendall(b"".join(publish_packet(t, fill(tmpl, now_ts, seq, boot), qos=1, packet_id=1 + j)
                                  for j, (t, tmpl) in enumerate(chunk)))
            _recv_exact(sock, 4 * len(chunk))  # the PUBACKs (40 02 id id: success, no properties)
        sock.sendall(wire.DISCONNECT_BYTES)
    finally:
        sock.close()
    return len(devices)


def raw_subscriber_main(host: str, port: int, topic_filter: str, ready: Any, out: Any,  # noqa: PLR0917
                        stop: Any) -> None:
    """The baseline: count the PUBLISH packets the broker delivers (walking the headers only)."""
    sock = connect_raw(host, port, "raw-%d" % os.getpid())
    sock.sendall(wire.subscribe(1, [(topic_filter, 0)]))
    sock.settimeout(0.1)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    start = end = n = 0
    first = last = None
    ready.set()
    while not stop.is_set():
        try:
            got = sock.recv_into(view[end:], len(buf) - end)
        except socket.timeout:
            continue
        if not got:
            break
        end += got
        while True:  # whole packets only
            if end - start < 2:
                break
            length, pos = wire.read_varint(buf, start + 1, end)
            if length < 0 or pos + length > end:
                break
            if buf[start] >> 4 == wire.PUBLISH:
                n += 1
            start = pos + length
        now = time.monotonic()
        first = first or now
        last = now
        buf[0:end - start] = buf[start:end]
        start, end = 0, end - start
    sock.close()
    out.put({"received": n, "first": first, "last": last})
