"""Checks on model outputs shared by the one-item and the batch paths of the inference service: non-finite
values (a NaN or Inf is an inference error, never an answer) and the confidence gate's score of a
detector's frame."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from edge_agent.errors import InferenceError
from edge_agent.runtime.postprocess import Postprocessor, decode_yolo, nms_per_class
from edge_agent.runtime.router import (
    DETECTION_FLOOR_RATIO,
    detection_certainty,
)


def detection_gate_score(post: Postprocessor, out: np.ndarray) -> float:
    """The confidence gate's score for one frame of the small detector: `detection_certainty` of its
    candidate boxes after NMS at a floor under the score threshold."""
    boxes, scores, cls = decode_yolo(out)
    floor = post.score_threshold * DETECTION_FLOOR_RATIO
    keep = nms_per_class(boxes, scores, cls, score_threshold=floor, iou_threshold=post.iou_threshold,
                         max_detections=post.post.max_detections)
    return detection_certainty(scores[keep], post.score_threshold)


def check_finite(route: str, outputs: Dict[str, np.ndarray], names: Tuple[str, ...]) -> None:
    """A NaN or Inf in the outputs an answer is made of is an inference error, not an answer."""
    for name in names:
        v = outputs[name]
        if v.dtype.kind != "f":
            continue
        # Small outputs (one item's logits): a Python sum in double precision is finite exactly when every
        # value is (float32/16 values cannot overflow it) and costs a tenth of np.isfinite(v).all().
        finite = math.isfinite(sum(v.ravel().tolist())) if v.size <= 256 else bool(np.isfinite(v).all())
        if not finite:
            raise InferenceError("the %s model returned a non-finite value (NaN or Inf) in output %r" % (route, name))


def non_finite_rows(to_large: np.ndarray, small_out: Optional[Dict[str, np.ndarray]],
                     large_out: Optional[Dict[str, np.ndarray]],
                     names: Dict[str, Tuple[str, ...]]) -> Optional[Tuple[str, int]]:
    """(route, number of items) of the first route whose answering rows hold a NaN/Inf in the outputs
    answers are made of, else None (one vectorised check per chunk)."""
    for route, outs, rows in (("large", large_out, None), ("small", small_out, ~to_large)):
        if outs is None:
            continue
        for name in names[route]:
            v = outs[name]
            if v.dtype.kind != "f":
                continue
            ok = np.isfinite(v.reshape(len(v), -1)).all(axis=1)
            if rows is not None:
                ok = ok | ~rows  # rows answered by the large model do not count against the small one
            if not ok.all():
                return route, int(np.count_nonzero(~ok))
    return None
