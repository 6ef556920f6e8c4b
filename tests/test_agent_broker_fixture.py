"""The test broker fixture itself: a real mosquitto that can be stopped and restarted."""

from __future__ import annotations

import socket

import pytest


@pytest.mark.mqtt
def test_broker_outage_and_restart_on_same_port(broker):
    """The fixture broker accepts connections, refuses them while stopped, and comes back on the same port."""
    socket.create_connection((broker.host, broker.port), 1).close()
    broker.stop()
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), 1).close()
    broker.start()
    socket.create_connection((broker.host, broker.port), 1).close()
