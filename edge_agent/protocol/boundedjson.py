"""JSON from an untrusted sender, bounded before it is parsed.

`json.loads` recurses once per nesting level and raises RecursionError (not ValueError) on `"[" * 5000`;
it turns a megabyte of digits into an int in quadratic time; it accepts NaN and duplicate keys. Every
JSON payload that reaches the agent or the controller from the network goes through `loads` here:

1. the byte length is checked against `max_bytes` before anything is decoded;
2. the bytes must be UTF-8;
3. the nesting depth is measured with a linear scan (string literals removed first, so a `[` inside a
   string does not count) and refused above `max_depth`, before the recursive parser runs;
4. the parser refuses integers longer than `MAX_INT_DIGITS` digits, NaN/Infinity and duplicate keys.

Every refusal is a `JSONInputError` with a one-line reason; nothing else escapes.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Dict, List, Tuple, Union

from edge_agent.errors import EdgeAgentError

#: Deepest nesting of arrays and objects accepted (wire messages nest 4 levels; manifests about 5).
DEFAULT_MAX_DEPTH = 32
#: Longest integer literal accepted, in digits (a 64-bit value has at most 20).
MAX_INT_DIGITS = 64

# A JSON string literal, unrolled so that the regular expression engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Opening brackets count +1, closing -1; every other byte is deleted before the walk.
_KEEP = b"[]{}"
_DELETE = bytes(b for b in range(256) if b not in _KEEP)
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class JSONInputError(EdgeAgentError, ValueError):
    """A payload that is too big, too deep, not UTF-8 or not acceptable JSON."""


def nesting_depth(raw: bytes) -> int:
    """The deepest array/object nesting in `raw`, ignoring brackets inside string literals.

    Linear in the length and never recursive. An unterminated string leaves its brackets in the count,
    which can only over-estimate the depth of a document that would not parse anyway.
    """
    brackets = _STRING.sub(b"", raw).translate(None, _DELETE)
    if not brackets:
        return 0
    return max(accumulate(map(_STEP.__getitem__, brackets)))


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise JSONInputError("duplicate key %r" % k[:64])
        out[k] = v
    return out


def bounded_int(text: str) -> int:
    """`parse_int` for json.loads: refuses integer literals over MAX_INT_DIGITS digits (quadratic to convert)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONInputError("an integer of %d digits is over the %d digit limit" % (len(text), MAX_INT_DIGITS))
    return int(text)


def _no_constant(name: str) -> Any:
    raise JSONInputError("%s is not a JSON number" % name)


def loads(payload: Union[bytes, bytearray, memoryview, str], *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH,
          what: str = "payload") -> Any:
    """Parse `payload` after bounding its size and nesting depth; JSONInputError for every refusal.

    `what` names the payload in the message ("command", "manifest", "status from dev1").
    """
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else bytes(payload)
    if len(raw) > max_bytes:
        raise JSONInputError("%s of %d bytes is over the %d byte limit" % (what, len(raw), max_bytes))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONInputError("%s is not UTF-8 (byte %d)" % (what, e.start)) from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JSONInputError("%s nests %d levels deep, over the limit of %d" % (what, depth, max_depth))
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=bounded_int,
                          parse_constant=_no_constant)
    except JSONInputError as e:
        raise JSONInputError("%s is not acceptable JSON: %s" % (what, e)) from None
    except RecursionError:  # cannot happen below max_depth; kept so that nothing but our error escapes
        raise JSONInputError("%s nests too deeply" % what) from None
    except ValueError as e:
        raise JSONInputError("%s is not valid JSON: %s" % (what, e)) from None
