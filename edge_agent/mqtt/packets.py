"""What goes in and out of an `MqttSession`: the Last Will, a received message, a queued publish and its
delivery. Plain values (and one event), no paho."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes when the session dies without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Inbound:
    """One received message, with its MQTT 5 metadata decoded into plain values."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    user_properties: Dict[str, str] = field(default_factory=dict)
    response_topic: Optional[str] = None
    correlation_data: Optional[bytes] = None


Handler = Callable[[Inbound], None]


class Delivery:
    """The fate of one publish: `wait()` for the broker's acknowledgement (QoS 1) or the write (QoS 0)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.ok = False
        self.error: Optional[str] = None
        self.mid: Optional[int] = None

    def _finish(self, ok: bool, error: Optional[str] = None) -> None:
        if self._done.is_set():
            return
        self.ok = ok
        self.error = error
        self._done.set()

    def wait(self, timeout_s: float) -> bool:
        """True when delivered within `timeout_s`; False on timeout or failure (see `.error`)."""
        self._done.wait(timeout_s)
        return self._done.is_set() and self.ok

    @property
    def done(self) -> bool:
        """True once delivered or failed."""
        return self._done.is_set()


@dataclass
class Outgoing:
    """A publish waiting in the session's queue for the network thread, with the Delivery it completes."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: Optional[Dict[str, str]]
    response_topic: Optional[str]
    correlation_data: Optional[bytes]
    delivery: Delivery
    expiry_s: Optional[int] = None  # MQTT 5 message expiry interval (seconds); None: never expires
