"""The bounded JSON loader every network payload goes through (`edge_agent/protocol/boundedjson.py`):
size, UTF-8 and nesting depth are checked before the recursive parser runs, and every refusal is a
JSONInputError — never RecursionError, UnicodeDecodeError or a quadratic int conversion."""

from __future__ import annotations

import pytest

from edge_agent.protocol.boundedjson import JSONInputError, loads, nesting_depth
from edge_agent.protocol.messages import CommandEnvelope, MessageError


@pytest.mark.parametrize("payload,depth", [
    (b"1", 0), (b"[]", 1), (b'{"a":[{"b":[]}]}', 4), (b'["[[[[", {"x": "]]]"}]', 2),
    (b'["\\"[[[["]', 1), (b"[" * 5000, 5000),
])
def test_nesting_depth_ignores_brackets_in_strings(payload, depth):
    assert nesting_depth(payload) == depth


@pytest.mark.parametrize("payload,reason", [
    (b"[" * 5000, "nests 5000 levels deep"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nests 5000 levels deep"),
    (b"[" * 100000 + b"]" * 100000, "nests 100000 levels deep"),
    (b'{"x":"\xff\xfe"}', "not UTF-8"),
    (b'{"a":1,"a":2}', "duplicate key"),
    (b"[" + b"9" * 5000 + b"]", "digit limit"),
    (b"[NaN]", "NaN"),
    (b"[Infinity]", "Infinity"),
    (b"{not json", "not valid JSON"),
])
def test_hostile_json_refused_with_one_line_reason(payload, reason):
    with pytest.raises(JSONInputError, match=reason) as e:
        loads(payload, max_bytes=1 << 20)
    assert "\n" not in str(e.value)


def test_oversized_payload_refused_before_decoding():
    with pytest.raises(JSONInputError, match="over the 100 byte limit"):
        loads(b"\xff" * 101, max_bytes=100)  # not UTF-8 either: the size is checked first


def test_depth_limit_is_configurable_and_brackets_in_strings_do_not_count():
    assert loads(b'{"a":"' + b"[" * 1000 + b'"}', max_bytes=1 << 20) == {"a": "[" * 1000}
    assert loads(b"[[[1]]]", max_bytes=100, max_depth=3) == [[[1]]]
    with pytest.raises(JSONInputError, match="nests 4 levels"):
        loads(b"[[[[1]]]]", max_bytes=100, max_depth=3)


def test_wire_messages_use_the_bounded_loader():
    with pytest.raises(MessageError, match="nests 5000 levels deep"):
        CommandEnvelope.from_json(b"[" * 5000)
    with pytest.raises(MessageError, match="not UTF-8"):
        CommandEnvelope.from_json(b'{"signed":"\xc3\x28"}')


def test_http_json_request_is_bounded_before_parsing():
    """The agent's HTTP API parses JSON bodies too: depth and integer length are checked the same way
    (a 100,000-digit integer is quadratic to convert on Python 3.8, which has no digit limit)."""
    from edge_agent.errors import InputError
    from edge_agent.runtime.http_json import parse_json_request

    with pytest.raises(InputError, match="nested too deeply"):
        parse_json_request(b'{"tensor": ' + b"[" * 5000 + b"]" * 5000 + b"}", max_items=4)
    with pytest.raises(InputError, match="digit limit"):
        parse_json_request(b'{"tensor": [' + b"9" * 100000 + b"]}", max_items=4)
    assert parse_json_request(b'{"tensor": [[1, 2], [3, 4]]}', max_items=4).tensor.shape == (2, 2)
