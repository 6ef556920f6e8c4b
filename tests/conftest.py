"""Shared pytest fixtures. Helpers add fixtures here additively."""

from __future__ import annotations

import os

import pytest
from mqtt_broker import Broker, MosquittoMissing


@pytest.fixture
def broker(tmp_path_factory):
    """A real mosquitto on a free loopback port (fails, not skips, when mosquitto is missing,
    unless EDGE_AGENT_SKIP_MQTT=1)."""
    try:
        b = Broker(tmp_path_factory.mktemp("mosquitto"))
    except MosquittoMissing as e:
        if os.environ.get("EDGE_AGENT_SKIP_MQTT") == "1":
            pytest.skip(str(e))
        raise
    try:
        yield b
    finally:
        b.close()
