"""Signed controller commands: every way a command can be forged, replayed or misaddressed is refused."""

from __future__ import annotations

import json

import pytest

from edge_agent.errors import CommandError
from edge_agent.protocol.commands import sign_command, verify_command
from edge_agent.protocol.messages import BundleRef, DeployArgs, PingArgs
from edge_agent.signing import PrivateKey

NOW = 1_800_000_000


@pytest.fixture(scope="module")
def controller():
    return PrivateKey.generate("controller")


def _trusted(key):
    return {key.keyid: key.public}


def _verify(raw, key, *, last_seq=0, now=NOW, device_id="dev1", max_age_s=600):
    return verify_command(raw, device_id=device_id, trusted=_trusted(key), last_seq=last_seq, now=now,
                          max_age_s=max_age_s)


def _deploy():
    return DeployArgs(bundle=BundleRef(name="digits", version=2), manifest_sha256="a" * 64, manifest_size=100)


def test_valid_command_verifies_and_round_trips(controller):
    raw = sign_command(_deploy(), device_id="dev1", seq=5, keys=[controller], now=NOW)
    body = _verify(raw, controller, last_seq=4)
    assert body.seq == 5 and body.args.kind == "deploy" and body.args.bundle.version == 2


def test_unsigned_command_refused(controller):
    doc = json.loads(sign_command(PingArgs(), device_id="dev1", seq=1, keys=[controller], now=NOW))
    doc["signatures"] = []
    with pytest.raises(CommandError, match="unsigned"):
        _verify(json.dumps(doc).encode(), controller)


def test_command_signed_by_untrusted_key_refused(controller):
    rogue = PrivateKey.generate("rogue")
    raw = sign_command(PingArgs(), device_id="dev1", seq=1, keys=[rogue], now=NOW)
    with pytest.raises(CommandError, match=r"does not trust"):
        _verify(raw, controller)


def test_tampered_command_refused(controller):
    doc = json.loads(sign_command(_deploy(), device_id="dev1", seq=1, keys=[controller], now=NOW))
    doc["signed"]["args"]["bundle"]["version"] = 9
    with pytest.raises(CommandError, match="signature"):
        _verify(json.dumps(doc).encode(), controller)


def test_replayed_command_refused(controller):
    raw = sign_command(PingArgs(), device_id="dev1", seq=7, keys=[controller], now=NOW)
    _verify(raw, controller, last_seq=6)
    with pytest.raises(CommandError, match="replayed"):
        _verify(raw, controller, last_seq=7)
    older = sign_command(PingArgs(), device_id="dev1", seq=3, keys=[controller], now=NOW)
    with pytest.raises(CommandError, match="replayed"):
        _verify(older, controller, last_seq=7)


def test_expired_command_refused_against_trusted_time(controller):
    raw = sign_command(PingArgs(), device_id="dev1", seq=1, keys=[controller], now=NOW, ttl_s=60)
    with pytest.raises(CommandError, match="expired"):
        _verify(raw, controller, now=NOW + 61)


def test_command_issued_too_long_ago_refused(controller):
    raw = sign_command(PingArgs(), device_id="dev1", seq=1, keys=[controller], now=NOW, ttl_s=10_000)
    with pytest.raises(CommandError, match="max_command_age_s"):
        _verify(raw, controller, now=NOW + 700, max_age_s=600)


def test_command_for_another_device_refused(controller):
    raw = sign_command(PingArgs(), device_id="dev2", seq=1, keys=[controller], now=NOW)
    with pytest.raises(CommandError, match="dev2"):
        _verify(raw, controller, device_id="dev1")


def test_garbage_and_oversize_payloads_refused(controller):
    with pytest.raises(CommandError, match="malformed"):
        _verify(b"\xff\x00not json", controller)
    with pytest.raises(CommandError, match="limit"):
        _verify(b"{" + b" " * 70_000 + b"}", controller)


def test_no_trusted_key_refuses_everything(controller):
    raw = sign_command(PingArgs(), device_id="dev1", seq=1, keys=[controller], now=NOW)
    with pytest.raises(CommandError, match="no controller key"):
        verify_command(raw, device_id="dev1", trusted={}, last_seq=0, now=NOW, max_age_s=600)
