"""Model outputs to JSON-ready results, as the manifest's `Postprocessing` says.

* ``classification``: softmax (optional), top-k ``[{"index", "label", "score"}]``.
* ``detection``: YOLO-style decode, score threshold, class-aware NMS with OpenCV. Two layouts are
  recognised from the output's shape (one item, no batch axis):
  - rows are boxes, ``(num_boxes, 5 + C)``: ``cx, cy, w, h, objectness, class scores...`` (YOLOv5 style);
  - columns are boxes, ``(4 + C, num_boxes)`` with more boxes than rows: ``cx, cy, w, h, class scores...``
    and no objectness (YOLOv8 style).
  Boxes come out as ``[x1, y1, x2, y2]`` in model-input pixels, or in the original image's pixels when
  the caller passes the original size.
* ``raw``: every output as nested lists.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from edge_agent.bundle.manifest import Postprocessing
from edge_agent.errors import InferenceError
from edge_agent.runtime.router import softmax

#: Up to this many classes, classification post-processing runs in plain Python.
_SMALL_CLASSES = 64


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise InferenceError("detection post-processing needs OpenCV (pip install opencv-python-headless)") from e
    return cv2


def decode_yolo(out: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One item's raw detection tensor -> (boxes (M, 4) as x1, y1, x2, y2; scores (M,); class ids (M,))."""
    a = np.asarray(out, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InferenceError("detection output must be 2-D per item, got shape %s" % (a.shape,))
    if 5 <= a.shape[0] < a.shape[1]:  # (4 + C, boxes): class scores, no objectness
        a = a.T
        cls = a[:, 4:]
        obj = None
    elif a.shape[1] >= 6:  # (boxes, 5 + C)
        cls = a[:, 5:]
        obj = a[:, 4]
    else:
        raise InferenceError("detection output of shape %s is neither (N, 5+C) nor (4+C, N)" % (a.shape,))
    class_ids = cls.argmax(axis=1)
    scores = cls[np.arange(len(cls)), class_ids]
    if obj is not None:
        scores = scores * obj
    cx, cy, w, h = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, scores.astype(np.float32), class_ids.astype(np.int64)


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, *, score_threshold: float,
                  iou_threshold: float, max_detections: int) -> np.ndarray:
    """Indices kept by class-aware NMS (boxes of different classes never suppress each other),
    best score first, at most `max_detections`."""
    cv2 = _cv2()
    keep_mask = scores >= score_threshold
    idx = np.nonzero(keep_mask)[0]
    if idx.size == 0:
        return idx
    kept: List[int] = []
    for c in np.unique(class_ids[idx]):
        sel = idx[class_ids[idx] == c]
        b = boxes[sel]
        xywh = [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in b]
        r = cv2.dnn.NMSBoxes(xywh, [float(s) for s in scores[sel]], float(score_threshold), float(iou_threshold))
        kept.extend(int(sel[i]) for i in np.asarray(r).reshape(-1))
    order = sorted(kept, key=lambda i: -float(scores[i]))
    return np.array(order[:max_detections], dtype=np.int64)


class Postprocessor:
    """Turns one item's outputs into the JSON `output` of an answer."""

    def __init__(self, post: Postprocessing, output_names: List[str]) -> None:
        self.post = post
        self.output_name = post.output or output_names[0]
        if self.output_name not in output_names:
            raise InferenceError("postprocessing names output %r, which the model lacks" % self.output_name)
        self.labels = post.labels
        self.score_threshold = float(post.score_threshold)
        self.iou_threshold = float(post.iou_threshold)
        # read once: `classify` runs for every answer
        self._kind = post.kind
        self._top_k = int(post.top_k)
        self._softmax = bool(post.apply_softmax)
        self._label_list: List[Optional[str]] = list(post.labels or [])

    def __call__(self, outputs: Mapping[str, np.ndarray], *, input_hw: Optional[Tuple[int, int]] = None,
                 original_hw: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
        """JSON-ready result; `input_hw`/`original_hw` rescale detection boxes to the original image."""
        kind = self._kind
        if kind == "raw":
            return {"kind": "raw", "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()}}
        out = outputs[self.output_name]
        if kind == "classification":
            return self.classify(out)
        return self.detect(out, input_hw=input_hw, original_hw=original_hw)

    def many(self, outputs: Mapping[str, np.ndarray], n: int,
             input_hw: Optional[Tuple[int, int]] = None) -> List[Dict[str, Any]]:
        """Results for `n` items whose outputs carry a batch axis (classification is vectorised)."""
        if self.post.kind != "classification":
            return [self({k: v[i] for k, v in outputs.items()}, input_hw=input_hw) for i in range(n)]
        arr = np.asarray(outputs[self.output_name], dtype=np.float64).reshape(n, -1)
        p = softmax(arr) if self.post.apply_softmax else arr
        k = min(self.post.top_k, p.shape[1])
        top = np.argsort(-p, axis=1, kind="stable")[:, :k]
        scores = np.round(np.take_along_axis(p, top, axis=1), 6).tolist()
        return [
            {"kind": "classification",
             "top": [{"index": i, "label": self._label(i), "score": s} for i, s in zip(ti, si)]}
            for ti, si in zip(top.tolist(), scores)
        ]

    def _label(self, i: int) -> Optional[str]:
        if self.labels and 0 <= i < len(self.labels):
            return self.labels[i]
        return None

    def classify(self, out: np.ndarray) -> Dict[str, Any]:
        """Top-k classes of one item's scores/logits."""
        arr = np.asarray(out).reshape(-1)
        k = min(self._top_k, arr.size)
        if arr.size <= _SMALL_CLASSES:  # plain Python is several times faster than numpy here
            v = arr.tolist()
            if self._softmax:
                m = max(v)
                e = [math.exp(a - m) for a in v]
                s = sum(e)
                v = [a / s for a in e]
            # descending and stable (equal scores keep index order), as sorting by -score
            top = sorted(range(len(v)), key=v.__getitem__, reverse=True)[:k]
            labels = self._label_list
            n_labels = len(labels)
            return {
                "kind": "classification",
                "top": [{"index": i, "label": labels[i] if i < n_labels else None, "score": round(v[i], 6)}
                        for i in top],
            }
        p = softmax(arr.astype(np.float64)[None, :])[0] if self._softmax else arr.astype(np.float64)
        top = np.argsort(-p, kind="stable")[:k].tolist()
        scores = p[top].tolist()
        return {
            "kind": "classification",
            "top": [{"index": i, "label": self._label(i), "score": round(s, 6)} for i, s in zip(top, scores)],
        }

    def detect(self, out: np.ndarray, *, input_hw: Optional[Tuple[int, int]] = None,
               original_hw: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
        """Decoded, thresholded, NMS-filtered detections of one item."""
        boxes, scores, cls = decode_yolo(out)
        keep = nms_per_class(boxes, scores, cls, score_threshold=self.score_threshold,
                             iou_threshold=self.iou_threshold, max_detections=self.post.max_detections)
        if input_hw and original_hw:
            boxes = boxes * np.array(_box_scale(input_hw, original_hw), dtype=np.float32)
        dets = []
        for i in keep:
            dets.append({
                "box": [round(float(v), 2) for v in boxes[i]],
                "score": round(float(scores[i]), 6),
                "class": int(cls[i]),
                "label": self._label(int(cls[i])),
            })
        return {"kind": "detection", "detections": dets}


def _box_scale(input_hw: Tuple[int, int], original_hw: Tuple[int, int]) -> Tuple[float, float, float, float]:
    sy = original_hw[0] / float(input_hw[0])
    sx = original_hw[1] / float(input_hw[1])
    return sx, sy, sx, sy


def scale_boxes(output: Dict[str, Any], input_hw: Tuple[int, int], original_hw: Tuple[int, int]) -> Dict[str, Any]:
    """A detection answer in model-input pixels rescaled to the original image's pixels (a new dict)."""
    f = _box_scale(input_hw, original_hw)
    dets = [dict(d, box=[round(float(v) * k, 2) for v, k in zip(d["box"], f)]) for d in output["detections"]]
    return dict(output, detections=dets)


def shorten(output: Dict[str, Any], top_k: Optional[int]) -> Dict[str, Any]:
    """An answer cut to the `top_k` best classes or detections (both are sorted best first)."""
    if top_k is None:
        return output
    if output.get("kind") == "classification":
        return dict(output, top=output["top"][:top_k])
    if output.get("kind") == "detection":
        return dict(output, detections=output["detections"][:top_k])
    return output
