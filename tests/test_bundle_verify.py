"""The manifest verifier, one test per attack: each asserts the error type, and the verifier is pure
(it is handed bytes and returns a value; trusted state passed in is never modified)."""

from __future__ import annotations

import base64
import json

import pytest
from bundle_helpers import MIB, NOW, body_dict, doc_bytes, signed_bytes

from edge_agent.bundle.verify import manifest_digest, trusted_now, verify_manifest
from edge_agent.errors import ExpiredError, ManifestError, RollbackError, SignatureError
from edge_agent.signing import PrivateKey


@pytest.fixture(scope="module")
def keys():
    return [PrivateKey.generate("k%d" % i) for i in range(3)]


def _verify(raw, trusted_keys, *, threshold=1, now=NOW, highest=None, max_bytes=MIB):
    highest = {} if highest is None else highest
    return verify_manifest(
        raw,
        trusted={k.keyid: k.public for k in trusted_keys},
        threshold=threshold,
        now=now,
        highest_versions=highest,
        max_manifest_bytes=max_bytes,
    )


def test_valid_manifest_verifies(keys):
    body = _verify(signed_bytes(body_dict(), keys[:1]), keys[:1])
    assert (body.name, body.version) == ("digits", 3)
    assert body.to_signed_dict() == body_dict()


def test_unsigned_manifest_refused(keys):
    with pytest.raises(SignatureError, match="unsigned"):
        _verify(doc_bytes(body_dict(), []), keys)


def test_manifest_signed_by_untrusted_key_refused(keys):
    raw = signed_bytes(body_dict(), [PrivateKey.generate("mallory")])
    with pytest.raises(SignatureError, match="does not trust"):
        _verify(raw, keys)


def test_signature_below_threshold_refused(keys):
    raw = signed_bytes(body_dict(), keys[:1])
    with pytest.raises(SignatureError, match=r"1 valid trusted signature.*2 required"):
        _verify(raw, keys[:2], threshold=2)


def test_threshold_met_by_two_distinct_keys(keys):
    assert _verify(signed_bytes(body_dict(), keys[:2]), keys, threshold=2).version == 3


def test_same_key_signing_twice_counts_once(keys):
    raw = signed_bytes(body_dict(), [keys[0], keys[0]])
    with pytest.raises(SignatureError, match="2 required"):
        _verify(raw, keys, threshold=2)


def test_untrusted_signatures_do_not_count_toward_threshold(keys):
    raw = signed_bytes(body_dict(), [keys[0], PrivateKey.generate("other")])
    with pytest.raises(SignatureError):
        _verify(raw, keys[:1] + keys[2:], threshold=2)


def test_tampered_manifest_field_refused(keys):
    doc = json.loads(signed_bytes(body_dict(), keys[:1]))
    doc["signed"]["version"] = 99
    with pytest.raises(SignatureError):
        _verify(doc_bytes(doc["signed"], doc["signatures"]), keys[:1])


def test_tampered_file_hash_in_manifest_refused(keys):
    doc = json.loads(signed_bytes(body_dict(), keys[:1]))
    doc["signed"]["files"]["models/large.onnx"]["sha256"] = "0" * 64
    with pytest.raises(SignatureError):
        _verify(doc_bytes(doc["signed"], doc["signatures"]), keys[:1])


def test_signature_from_another_manifest_refused(keys):
    other = json.loads(signed_bytes(body_dict(version=4), keys[:1]))
    doc = json.loads(signed_bytes(body_dict(version=5), keys[:1]))
    with pytest.raises(SignatureError):
        _verify(doc_bytes(doc["signed"], other["signatures"]), keys[:1])


def test_respelled_signature_refused(keys):
    doc = json.loads(signed_bytes(body_dict(), keys[:1]))
    sig = doc["signatures"][0]["sig"]  # 64 bytes -> ends in "==" with 4 slack bits before the padding
    alt = sig[:-3] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[
        ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".index(sig[-3]) ^ 1)
    ] + "=="
    assert base64.b64decode(alt) == base64.b64decode(sig)
    doc["signatures"][0]["sig"] = alt
    with pytest.raises(ManifestError, match="canonical base64"):
        _verify(doc_bytes(doc["signed"], doc["signatures"]), keys[:1])


def test_expired_manifest_refused(keys):
    raw = signed_bytes(body_dict(expires=NOW - 1), keys[:1])
    with pytest.raises(ExpiredError, match="expired"):
        _verify(raw, keys[:1])


def test_expiry_uses_the_persisted_floor_when_the_clock_is_behind(keys):
    raw = signed_bytes(body_dict(expires=NOW - 1), keys[:1])
    # a Jetson that booted at 1970: the system clock alone would accept the expired manifest
    with pytest.raises(ExpiredError):
        _verify(raw, keys[:1], now=trusted_now(system_time=0.0, time_floor=NOW))


def test_clock_at_1970_does_not_refuse_a_fresh_manifest(keys):
    raw = signed_bytes(body_dict(), keys[:1])
    assert _verify(raw, keys[:1], now=trusted_now(system_time=0.0, time_floor=0)).version == 3


def test_trusted_now_is_the_later_of_clock_and_floor():
    assert trusted_now(100.9, 50) == 100
    assert trusted_now(10.0, 50) == 50


@pytest.mark.parametrize("installed", [3, 7])
def test_version_not_above_installed_refused(keys, installed):
    raw = signed_bytes(body_dict(version=3), keys[:1])
    highest = {"digits": installed, "other": 1}
    with pytest.raises(RollbackError, match="not above"):
        _verify(raw, keys[:1], highest=highest)
    assert highest == {"digits": installed, "other": 1}


def test_rollback_is_checked_even_when_the_manifest_also_expired(keys):
    raw = signed_bytes(body_dict(version=2, expires=NOW - 1), keys[:1])
    with pytest.raises(RollbackError):
        _verify(raw, keys[:1], highest={"digits": 3})


def test_other_bundle_names_do_not_block_a_version(keys):
    raw = signed_bytes(body_dict(version=3), keys[:1])
    assert _verify(raw, keys[:1], highest={"cats": 9}).version == 3


def test_oversized_manifest_refused_before_parsing(keys):
    raw = signed_bytes(body_dict(), keys[:1])
    with pytest.raises(ManifestError, match="over the"):
        _verify(raw, keys[:1], max_bytes=len(raw) - 1)


def test_manifest_that_is_not_json_refused(keys):
    with pytest.raises(ManifestError, match="not valid JSON"):
        _verify(b"{not json", keys)
    with pytest.raises(ManifestError, match="UTF-8"):
        _verify(b"\xff\xfe", keys)


def test_duplicate_json_keys_refused(keys):
    raw = signed_bytes(body_dict(), keys[:1])
    # a second "version" key: a naive parser keeps the last one, the signer may have seen the first
    evil = raw.replace(b'"version":3', b'"version":3,"version":9')
    assert evil != raw
    with pytest.raises(ManifestError, match="duplicate key"):
        _verify(evil, keys[:1])


@pytest.mark.parametrize("depth", [600, 100000])
def test_deeply_nested_json_refused(keys, depth):
    with pytest.raises(ManifestError):
        _verify(b'{"signed":' + b"[" * depth + b"]" * depth + b',"signatures":[]}', keys, max_bytes=10 * MIB)


@pytest.mark.parametrize(
    "doc",
    [
        b"[]",
        b'{"signed": {}}',
        b'{"signed": [], "signatures": []}',
        b'{"signed": {}, "signatures": {}}',
        b'{"signed": {}, "signatures": [], "extra": 1}',
    ],
)
def test_wrong_document_shape_refused(keys, doc):
    with pytest.raises(ManifestError):
        _verify(doc, keys)


def test_too_many_signatures_refused(keys):
    doc = json.loads(signed_bytes(body_dict(), keys[:1]))
    with pytest.raises(ManifestError, match="signatures"):
        _verify(doc_bytes(doc["signed"], doc["signatures"] * 33), keys[:1])


def test_float_in_signed_part_refused(keys):
    doc = json.loads(signed_bytes(body_dict(), keys[:1]))
    doc["signed"]["router"]["tau"] = 0.9
    with pytest.raises(ManifestError, match="floats"):
        _verify(doc_bytes(doc["signed"], doc["signatures"]), keys[:1])


def test_signed_but_invalid_body_refused(keys):
    body = body_dict()
    body["files"]["../escape"] = {"sha256": "0" * 64, "size": 1}
    with pytest.raises(ManifestError, match=r"\.\."):
        _verify(signed_bytes(body, keys[:1]), keys[:1])


def test_signed_body_with_unknown_field_refused(keys):
    body = body_dict()
    body["surprise"] = 1
    with pytest.raises(ManifestError, match="surprise"):
        _verify(signed_bytes(body, keys[:1]), keys[:1])


def test_manifest_digest_is_sha256_of_the_bytes():
    assert manifest_digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
