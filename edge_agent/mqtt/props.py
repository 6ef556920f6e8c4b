"""Faster MQTT 5 property parsing for large messages (paho-mqtt).

paho decodes the properties of a received PUBLISH with `Properties.unpack(rest_of_packet)`, where the
rest of the packet still holds the payload, and its parser strips every byte it reads with a slice
(``buffer = buffer[n:]``), so each property costs several copies of the whole payload. A 256 KiB chunk
with four user properties and correlation data is copied ~20 times: on a small device that is most of
the CPU a bundle pull spends.

`install()` wraps `Properties.unpack` so that it parses only the property region (the length prefix
says where it ends) and never touches the payload. The result is the same by construction: paho's reads
of fixed-size values and variable byte integers fail on a short buffer, and its length-prefixed reads
are checked against the region, so when the parse of the region alone succeeds every read stayed inside
it and the full parse would have read the same bytes; when it fails for any reason, the original parse
runs on the full buffer and succeeds or fails exactly as paho always did. Older paho releases (2.1)
do not check binary values against the region, and one may run up to 64 KiB past it: there the parse
gets the region plus that much (still far less than a large payload).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Tuple

log = logging.getLogger(__name__)

_lock = threading.Lock()
_MARK = "_edge_agent_region_only"
#: How far past the property region an unchecked binary value (2-byte length) plus one more fixed-size
#: read can reach.
_UNCHECKED_MARGIN = 2 + 0xFFFF + 4


def _binary_values_are_bounded(unpack: Any, properties_cls: Any, packet_type: int) -> bool:
    """True when `unpack` refuses binary data that claims more bytes than the property region holds."""
    # Region of 3 bytes: CorrelationData (9) claiming 5 bytes; the buffer holds them past the region.
    probe = b"\x03\x09\x00\x05abcde"
    try:
        unpack(properties_cls(packet_type), probe)
    except Exception:
        return True
    return False


def install() -> bool:
    """Wrap paho's `Properties.unpack` (once per process). False when paho's layout is unexpected."""
    try:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties, VariableByteIntegers
    except ImportError:  # pragma: no cover - paho is a dependency
        return False
    with _lock:
        current = Properties.unpack
        if getattr(current, _MARK, False):
            return True
        if not callable(getattr(VariableByteIntegers, "decode", None)):
            log.debug("paho has no VariableByteIntegers.decode; property parsing left as is")
            return False
        original = current
        margin = 0 if _binary_values_are_bounded(original, Properties, PacketTypes.PUBLISH) else _UNCHECKED_MARGIN

        def unpack(self: Any, buffer: Any) -> Tuple[Any, int]:
            try:
                propslen, vbilen = VariableByteIntegers.decode(buffer[:4])
                end = propslen + vbilen + margin
                if end < len(buffer):
                    return original(self, buffer[:end])
            except Exception:  # any doubt: let paho parse the full buffer its own way
                pass
            return original(self, buffer)

        setattr(unpack, _MARK, True)
        unpack.__doc__ = original.__doc__
        unpack.__wrapped__ = original  # type: ignore[attr-defined]
        Properties.unpack = unpack  # type: ignore[method-assign]
        return True
