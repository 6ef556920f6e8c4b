"""Region-only MQTT 5 property parsing gives exactly what paho's own parser gives, valid input or not."""

from __future__ import annotations

import os
import random

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt.props import install


def _original():
    install()
    return Properties.unpack.__wrapped__


def _parse(unpack, buf):
    props = Properties(PacketTypes.PUBLISH)
    try:
        _, used = unpack(props, buf)
    except Exception as e:  # the type of failure must match too
        return ("error", type(e).__name__)
    return ("ok", used, sorted((k, repr(v)) for k, v in props.__dict__.items()))


def _chunk_props(rng: random.Random) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("sha256", os.urandom(32).hex()), ("offset", str(rng.randrange(1 << 40))),
                      ("length", str(rng.randrange(1 << 20))), ("total", str(rng.randrange(1 << 40)))]
    p.CorrelationData = os.urandom(rng.randrange(1, 40))
    if rng.random() < 0.5:
        p.ResponseTopic = "fleet/devices/dev-%d/chunks" % rng.randrange(1000)
    if rng.random() < 0.3:
        p.MessageExpiryInterval = rng.randrange(1 << 31)
    if rng.random() < 0.3:
        p.PayloadFormatIndicator = 0
    return p


def test_install_is_idempotent_and_keeps_the_original_reachable():
    assert install() and install()
    assert Properties.unpack.__wrapped__ is _original()
    assert not hasattr(Properties.unpack.__wrapped__, "__wrapped__")


def test_well_formed_chunk_properties_parse_the_same_without_reading_the_payload():
    original = _original()
    rng = random.Random(7)
    for _ in range(200):
        packed = bytes(_chunk_props(rng).pack())
        buf = packed + os.urandom(rng.choice([0, 1, 100, 4096, 256 * 1024]))
        fast = _parse(Properties.unpack, buf)
        assert fast[0] == "ok"
        assert fast == _parse(original, buf)
        assert fast[1] == len(packed)  # the payload starts right where paho would cut it


def test_corrupted_property_bytes_fail_or_parse_exactly_as_paho_does():
    original = _original()
    rng = random.Random(11)
    outcomes = set()
    for _ in range(3000):
        # Payloads beyond 64 KiB too: older paho parses the region plus 64 KiB (see the module).
        tail = os.urandom(rng.randrange(0, 64) if rng.random() < 0.7 else 70000 + rng.randrange(64))
        buf = bytearray(bytes(_chunk_props(rng).pack()) + tail)
        for _ in range(rng.randrange(1, 4)):  # flip bytes, mostly inside the property region
            buf[rng.randrange(min(len(buf), 120))] = rng.randrange(256)
        if rng.random() < 0.2:
            buf = buf[: rng.randrange(len(buf) + 1)]  # or cut the packet short
        data = bytes(buf)
        got = _parse(Properties.unpack, data)
        assert got == _parse(original, data), data.hex()
        outcomes.add(got[0])
    assert outcomes == {"ok", "error"}  # both paths were exercised


@pytest.mark.parametrize("buf", [b"", b"\x80", b"\xff\xff\xff\xff\x01", b"\x05\x01", b"\x00" + b"p" * 10])
def test_degenerate_buffers_behave_like_paho(buf):
    assert _parse(Properties.unpack, buf) == _parse(_original(), buf)
