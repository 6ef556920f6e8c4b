"""Topic builders. `{p}` is the configured prefix (default ``edge/v1``), `{id}` the device id."""

from __future__ import annotations

import re
from typing import Optional

DEFAULT_PREFIX = "edge/v1"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

DEVICE_CHANNELS = ("status", "telemetry", "events", "results", "fetch", "commands", "chunks")


def _check_id(device_id: str) -> str:
    if not _ID_RE.match(device_id):
        raise ValueError("invalid device id %r (letters, digits, '_', '.', '-'; at most 64)" % device_id)
    return device_id


def device_topic(prefix: str, device_id: str, channel: str) -> str:
    """`{p}/devices/{id}/{channel}`."""
    if channel not in DEVICE_CHANNELS:
        raise ValueError("unknown device channel %r" % channel)
    return "%s/devices/%s/%s" % (prefix, _check_id(device_id), channel)


def status(prefix: str, device_id: str) -> str:
    """Retained device status; the Last Will marks it offline."""
    return device_topic(prefix, device_id, "status")


def telemetry(prefix: str, device_id: str) -> str:
    """Periodic metrics."""
    return device_topic(prefix, device_id, "telemetry")


def events(prefix: str, device_id: str) -> str:
    """Deployment transitions, errors, rollbacks, build progress."""
    return device_topic(prefix, device_id, "events")


def results(prefix: str, device_id: str) -> str:
    """Inference results of configured sources."""
    return device_topic(prefix, device_id, "results")


def commands(prefix: str, device_id: str) -> str:
    """Signed commands to one device."""
    return device_topic(prefix, device_id, "commands")


def chunks(prefix: str, device_id: str) -> str:
    """Raw chunk bytes answering this device's fetch requests."""
    return device_topic(prefix, device_id, "chunks")


def fetch(prefix: str, device_id: str) -> str:
    """This device's chunk requests to the controller. The broker lets only this device publish here, so the
    controller takes the requester's id from the topic, not from the payload."""
    return device_topic(prefix, device_id, "fetch")


def fleet_rpc(prefix: str) -> str:
    """CLI → controller requests (MQTT 5 request/response)."""
    return "%s/fleet/rpc" % prefix


def all_devices(prefix: str, channel: str) -> str:
    """Subscription filter for one channel of every device."""
    if channel not in DEVICE_CHANNELS:
        raise ValueError("unknown device channel %r" % channel)
    return "%s/devices/+/%s" % (prefix, channel)


def parse_device_topic(prefix: str, topic: str) -> Optional[tuple]:
    """(device_id, channel) for a device topic under `prefix`, else None."""
    head = prefix + "/devices/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :].split("/")
    if len(rest) != 2 or rest[1] not in DEVICE_CHANNELS or not _ID_RE.match(rest[0]):
        return None
    return rest[0], rest[1]
