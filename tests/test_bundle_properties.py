"""Property tests: canonical JSON round-trips, and no mutation of a signed manifest ever verifies."""

from __future__ import annotations

import copy
import json

import pytest
from bundle_helpers import MIB, NOW, body_dict, doc_bytes, signed_bytes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent.bundle.verify import verify_manifest
from edge_agent.errors import BundleError
from edge_agent.signing import CanonicalJSONError, PrivateKey, canonical_json

KEY = PrivateKey.generate("prop")
TRUSTED = {KEY.keyid: KEY.public}
RAW = signed_bytes(body_dict(), [KEY])
DOC = json.loads(RAW)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def _verify(raw: bytes):
    return verify_manifest(raw, trusted=TRUSTED, threshold=1, now=NOW, highest_versions={}, max_manifest_bytes=MIB)


@given(json_values)
def test_canonical_json_round_trips(value):
    text = canonical_json(value)
    assert json.loads(text.decode("utf-8")) == value
    assert canonical_json(json.loads(text)) == text


@given(st.dictionaries(st.text(max_size=8), st.integers(), min_size=2, max_size=8))
def test_canonical_json_ignores_key_order(d):
    reordered = dict(reversed(list(d.items())))
    assert canonical_json(d) == canonical_json(reordered)


@given(st.floats(allow_nan=False))
def test_canonical_json_refuses_floats(x):
    with pytest.raises(CanonicalJSONError):
        canonical_json({"tau": x})


def test_the_unmutated_manifest_verifies():
    assert _verify(RAW).version == 3


def _paths(value, prefix=()):
    """Every (path) to a node of a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


SIGNED_PATHS = [p for p in _paths(DOC["signed"]) if p]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SIGNED_PATHS), json_values, st.sampled_from(["replace", "delete", "add"]))
def test_mutated_signed_part_never_verifies(path, new_value, how):
    signed = copy.deepcopy(DOC["signed"])
    parent = signed
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if how == "replace":
        parent[last] = new_value
    elif how == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    else:
        target = parent[last]
        if isinstance(target, dict):
            target["extra_key"] = new_value
        elif isinstance(target, list):
            target.append(new_value)
        else:
            parent[last] = [target, new_value]
    assume(signed != DOC["signed"])
    with pytest.raises(BundleError):
        _verify(doc_bytes(signed, DOC["signatures"]))


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=len(RAW) - 1), st.integers(min_value=1, max_value=255))
def test_any_byte_flip_never_verifies(pos, xor):
    mutated = bytearray(RAW)
    mutated[pos] ^= xor
    with pytest.raises(BundleError):
        _verify(bytes(mutated))


@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=len(RAW) - 1), st.binary(min_size=1, max_size=20))
def test_inserted_bytes_never_verify(pos, junk):
    mutated = RAW[:pos] + junk + RAW[pos:]
    with pytest.raises(BundleError):
        _verify(mutated)


@pytest.mark.parametrize("pos", [1, RAW.index(b'"signed"'), RAW.index(b'"version"') + len(b'"version":'), len(RAW)])
def test_whitespace_respelling_never_verifies(pos):
    # same content, different bytes: refused, so a manifest's sha256 names exactly one document
    with pytest.raises(BundleError, match="canonical"):
        _verify(RAW[:pos] + b" " + RAW[pos:])
