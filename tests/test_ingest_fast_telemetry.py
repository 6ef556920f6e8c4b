"""The msgspec telemetry mirror (fleet/telemetry_fast.py) is only ever a shortcut: every payload it accepts,
the pydantic `Telemetry` model accepts with the same values, and `parse_telemetry` (mirror first, pydantic
for the rest) answers every payload exactly as pydantic alone does — same values, same refusals, same
messages."""

from __future__ import annotations

import json
from typing import Any, List

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.protocol.messages import MessageError, Telemetry
from fleet.telemetry_fast import fast_telemetry
from fleet.telemetry_view import MAX_TELEMETRY_SEQ, _pydantic_telemetry, parse_telemetry

BASE = {
    "schema": "edge-agent/telemetry/1", "device_id": "jetson-01", "ts": 1700000000.5, "seq": 7, "period_s": 1.0,
    "uptime_s": 100.0, "qps": 42.0, "requests": 42, "errors": 1, "error_rate": 0.02,
    "latency_ms": {"p50": 3.1, "p95": 5.2, "p99": 7.9}, "queue_depth": 1, "mean_batch": 3.5,
    "large_fraction": 0.2, "tau": 0.8, "routes": {"small": {"requests": 40, "errors": 0,
                                                            "latency_ms": {"p99": 4.0}, "queue_depth": 0}},
    "cpu_percent": 35.0, "mem_used_mb": 2100.0, "mem_available_mb": 5900.0,
    "temperatures_c": {"cpu": 48.5, "gpu": 47}, "throttled": False, "bundle": {"name": "digits", "version": 1},
    "engine": {"backend": "onnxruntime", "precision": "fp32", "batch": 8, "ms": 1.5, "note": None},
}

# Values that differ in kind from what a field holds: coercions pydantic's lax mode makes and msgspec does
# not, out-of-range numbers, wrong containers.
ODD_VALUES: List[Any] = [
    None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30, -(2 ** 63) - 1, 1.0, 1.5,
    -0.0, 1e308, "1", "1.5", "true", "", "x" * 70, "sim-1\n", "é", [], {}, [1], {"p50": 1},
    {"name": "digits", "version": 1}, {"name": "Digits", "version": 1}, {"name": "digits\n", "version": 1},
    {"name": "digits", "version": 0}, {"name": "digits", "version": "1"}, {"name": "digits", "version": 1, "x": 1},
]


def _payloads() -> List[bytes]:
    out = [json.dumps(BASE).encode(), json.dumps({k: BASE[k] for k in ("device_id", "ts", "seq", "period_s",
                                                                         "uptime_s")}).encode()]
    for key in [*BASE, "shadow", "source", "spool_dropped", "gpu_util", "unknown"]:
        for v in ODD_VALUES:
            out.append(json.dumps(dict(BASE, **{key: v})).encode())
        out.append(json.dumps({k: x for k, x in BASE.items() if k != key}).encode())
    raw = json.dumps(BASE)
    out += [
        raw.replace('"schema"', '"schema_"').encode(),  # pydantic's populate_by_name spelling
        raw.replace('"seq": 7', '"seq": 7, "seq": 8').encode(),  # duplicate key
        raw.replace('"seq": 7', '"seq": %d' % (MAX_TELEMETRY_SEQ + 1)).encode(),
        raw.replace('"seq": 7', '"seq": 1e3').encode(),
        raw.replace('"ts": 1700000000.5', '"ts": 1e400').encode(),
        raw.replace('"ts": 1700000000.5', '"ts": -1E-400').encode(),
        raw.replace('"ts": 1700000000.5', '"ts": 17e8').encode(),
        raw.replace('"jetson-01"', '"jetson-01\\n"').encode(),
        raw.replace('"jetson-01"', '"jetson\\u002d01"').encode(),
        raw.replace('"onnxruntime"', '"\\ud800"').encode(),  # lone surrogate
        raw.replace('"onnxruntime"', '"onnx\xff"').encode("latin-1"),  # invalid UTF-8
        raw.encode() + b" ", raw.encode() + b"x", raw.encode() + b"{}", b" " + raw.encode(),
        raw.replace('"throttled": false', '"throttled": 0').encode(),
        raw.replace('"requests": 42', '"requests": 42.0').encode(),
        raw.replace('"gpu": 47', '"gpu": "47"').encode(),
        b"", b"null", b"[]", b"{}", b"7", b'"x"', b"{" * 5000, b"[" * 5000 + b"]" * 5000,
        json.dumps(dict(BASE, shadow={"mode": "shadow", "candidate": {"name": "digits", "version": 2}})).encode(),
        json.dumps(dict(BASE, routes={"a": {"latency_ms": {"p99": "x"}}})).encode(),
        json.dumps(dict(BASE, engine={"a": True})).encode(),
        json.dumps(dict(BASE, engine={"a": [1]})).encode(),
        json.dumps(dict(BASE, temperatures_c={"cpu": None})).encode(),
    ]
    return out


def _pydantic(payload: bytes):
    try:
        return _pydantic_telemetry(payload)
    except MessageError as e:
        return e


def _check(payload: bytes) -> bool:
    """The mirror accepts only what pydantic accepts, with the same values; parse_telemetry answers as
    pydantic does. True when the mirror took the payload."""
    ref = _pydantic(payload)
    fast = fast_telemetry(payload)
    if fast is not None:
        assert isinstance(ref, Telemetry), (payload[:200], ref)
        assert msgspec.to_builtins(fast) == ref.model_dump(by_alias=True), payload[:200]
    guarded = b"NaN" in payload or b"Infinity" in payload
    try:
        got: Any = parse_telemetry(payload, max_bytes=1 << 20)
    except MessageError as e:
        got = e
    if isinstance(ref, Telemetry) and not guarded and ref.seq <= MAX_TELEMETRY_SEQ:
        assert not isinstance(got, Exception), (payload[:200], got)
        got_d = got.model_dump(by_alias=True) if isinstance(got, Telemetry) else msgspec.to_builtins(got)
        assert got_d == ref.model_dump(by_alias=True), payload[:200]
    else:
        assert isinstance(got, MessageError), payload[:200]
        if not guarded and not isinstance(ref, Telemetry):
            assert str(got) == str(ref)
    return fast is not None


def test_the_mirror_accepts_only_what_pydantic_accepts_with_the_same_values():
    payloads = _payloads()
    taken = [_check(p) for p in payloads]
    # The shortcut is real: the ordinary messages go through it, and the odd ones exercise both sides.
    assert taken[0] and taken[1]
    refs = [_pydantic(p) for p in payloads]
    assert sum(isinstance(r, Telemetry) for r in refs) > sum(taken) > 20
    assert sum(not isinstance(r, Telemetry) for r in refs) > 100


def test_a_shadow_report_is_decided_by_pydantic():
    p = json.dumps(dict(BASE, shadow={"mode": "ab", "candidate": {"name": "digits", "version": 2},
                                      "split": 10.0})).encode()
    assert fast_telemetry(p) is None
    t = parse_telemetry(p, max_bytes=1 << 20)
    assert isinstance(t, Telemetry) and t.shadow is not None and t.shadow.split == 10.0


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["p50", "p99", "name", "version", "requests",
                                                                 "x"]), inner, max_size=3)), max_leaves=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(sorted(set(BASE) | {"shadow", "source", "refused", "z"})),
                               _json_values, max_size=4),
       dropped=st.sets(st.sampled_from(sorted(BASE)), max_size=2))
def test_generated_reports_get_the_same_answer_from_both(changes, dropped):
    doc = {k: v for k, v in dict(BASE, **changes).items() if k not in dropped}
    _check(json.dumps(doc).encode())


@pytest.mark.parametrize("text", ["sim-1", "a" * 64, "A.b_c-9"])
def test_device_ids_the_model_allows_take_the_shortcut(text):
    p = json.dumps(dict(BASE, device_id=text)).encode()
    assert fast_telemetry(p) is not None and parse_telemetry(p, max_bytes=4096).device_id == text


def test_summary_text_reads_back_as_the_summary():
    """The registry's JSON text of a summary (msgspec, sorted keys) reads back to the same values."""
    from fleet.telemetry_fast import summary_json
    from fleet.telemetry_view import telemetry_summary

    for doc in (BASE, dict(BASE, engine={"név": "é", "n": 1e16}, bundle=None)):
        s = telemetry_summary(parse_telemetry(json.dumps(doc).encode(), max_bytes=1 << 20))
        text = summary_json(s)
        assert json.loads(text) == json.loads(json.dumps(s)) and list(json.loads(text)) == sorted(s)
