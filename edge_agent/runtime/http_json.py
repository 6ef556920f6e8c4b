"""JSON requests of the HTTP API: parsed and bounded here, pure (bytes in, a `JsonRequest` or an
`InputError` out; no sockets, no model).

One request is an object with exactly one of:

* ``"image_base64"``: a base64 PNG/JPEG string, or a list of them (answered as ``results``);
* ``"tensor"``: nested lists of numbers, one item (the model input's item shape, or with a leading
  batch axis of 1) or N items ``[N, *item shape]`` (answered as ``results``);

and optionally ``"top_k"`` (1..the bundle's `postprocessing.top_k`), which shortens classification and
detection answers. A list holds at most `max_items` entries (the runtime's `max_queue`, 256 by default).
Decoding the base64 images is left to the caller (it needs OpenCV); this module only checks and
decodes the base64 text.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from edge_agent.errors import InputError
from edge_agent.protocol import boundedjson

#: Deepest nesting of a request body (an object holding a [N, C, H, W] tensor is 5 levels).
MAX_JSON_DEPTH = boundedjson.DEFAULT_MAX_DEPTH
#: Keys a request object may hold.
KEYS = ("image_base64", "tensor", "top_k")


@dataclass(frozen=True)
class JsonRequest:
    """A checked JSON request: `images` (encoded bytes) or `tensor` (float64 or int64), never both."""

    images: Optional[List[bytes]] = None
    tensor: Optional[np.ndarray] = None
    many: bool = False  # answer with "results" (a list of images)
    top_k: Optional[int] = None


def _reject_constant(name: str) -> Any:
    raise InputError("JSON %s is not a number this API accepts" % name)


def parse_json_request(body: bytes, *, max_items: int, integer_input: bool = False) -> JsonRequest:
    """Parse one JSON request body; every malformed part is an InputError with a one-line reason.

    `integer_input` says the model input is an integer type (tensor values must then be whole numbers).
    """
    if boundedjson.nesting_depth(body) > MAX_JSON_DEPTH:  # measured before the recursive parser runs
        raise InputError("JSON body is nested too deeply (more than %d levels)" % MAX_JSON_DEPTH)
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_int=boundedjson.bounded_int)
    except UnicodeDecodeError:
        raise InputError("JSON body is not UTF-8")
    except RecursionError:
        raise InputError("JSON body is nested too deeply")
    except ValueError as e:
        raise InputError("body is not JSON: %s" % str(e).splitlines()[0])
    if not isinstance(obj, dict):
        raise InputError("JSON body must be an object with image_base64 or tensor")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise InputError("unknown key %r (expected %s)" % (unknown[0], ", ".join(KEYS)))
    top_k = _top_k(obj.get("top_k"))
    if ("image_base64" in obj) == ("tensor" in obj):
        raise InputError("give exactly one of image_base64 and tensor")
    if "image_base64" in obj:
        images, many = _images(obj["image_base64"], max_items)
        return JsonRequest(images=images, many=many, top_k=top_k)
    return JsonRequest(tensor=_tensor(obj["tensor"], integer_input), top_k=top_k)


def _top_k(v: Any) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError("top_k must be a whole number >= 1")
    return int(v)


def _images(v: Any, max_items: int) -> Tuple[List[bytes], bool]:
    many = isinstance(v, list)
    items = v if many else [v]
    if many and not 1 <= len(items) <= max_items:
        raise InputError("a request may hold 1 to %d images, this one holds %d" % (max_items, len(items)))
    out = []
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InputError("image_base64%s must be a base64 string" % ("[%d]" % i if many else ""))
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise InputError("image_base64%s is not valid base64" % ("[%d]" % i if many else ""))
    return out, many


def _tensor(v: Any, integer_input: bool) -> np.ndarray:
    if not isinstance(v, list):
        raise InputError("tensor must be nested lists of numbers")
    try:
        # float64 holds every JSON number a float input can use; booleans and strings are refused below
        arr = np.array(v, dtype=object)
    except ValueError as e:  # ragged nesting
        raise InputError("tensor is not a rectangular array: %s" % str(e).splitlines()[0])
    if arr.dtype != object or arr.size == 0:
        raise InputError("tensor is empty or not a rectangular array of numbers")
    flat = arr.reshape(-1)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat.tolist()):
        raise InputError("tensor is not a rectangular array of numbers")
    try:
        out = arr.astype(np.float64)
    except OverflowError:
        raise InputError("tensor holds a number too large for float64")
    if not np.all(np.isfinite(out)):  # 1e999 parses as infinity
        raise InputError("tensor contains NaN or infinite values")
    if integer_input:
        if not np.all(np.isfinite(out)) or not np.all(out == np.rint(out)) or np.any(np.abs(out) > 2 ** 53):
            raise InputError("tensor values must be whole numbers for this model's integer input")
        return out.astype(np.int64)
    return out


def query_top_k(path: str) -> Optional[int]:
    """``top_k`` from a request path's query string (``/v1/infer?top_k=3``), None when absent."""
    if "?" not in path:
        return None
    from urllib.parse import parse_qs

    values = parse_qs(path.split("?", 1)[1], max_num_fields=8).get("top_k")
    if not values:
        return None
    try:
        return _top_k(int(values[-1]))
    except ValueError:
        raise InputError("top_k must be a whole number >= 1")


def check_top_k(top_k: Optional[int], svc: Any) -> None:
    """A top_k must not ask for more than the bundle's post-processing gives, nor apply to raw outputs."""
    if top_k is None:
        return
    post = svc.manifest.postprocessing
    if post.kind == "raw":
        raise InputError("top_k does not apply to this model's raw outputs")
    limit = int(post.top_k) if post.kind == "classification" else int(post.max_detections)
    if top_k > limit:
        raise InputError("top_k %d is over this bundle's %d (postprocessing.%s)"
                         % (top_k, limit, "top_k" if post.kind == "classification" else "max_detections"))
