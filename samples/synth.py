"""Synthetic camera-like images for the vision samples, from data that ships in packages (no download).

* `digit_item`: one of scikit-learn's bundled 8x8 digits, upscaled, randomly rotated/sheared/scaled and
  shifted, in a random ink brightness over a textured background, with sensor noise and blur: a gray
  96x96 image (uint8).
* `shape_scene`: circles, squares and triangles of random colours and sizes over a textured colour
  background, with their ground-truth boxes: an RGB scene (uint8) for the sample detector.

Everything is driven by a `numpy.random.Generator`, so a seed reproduces the same images (for a given
numpy and OpenCV version). Needs numpy and OpenCV.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

#: Class names of the shape scenes, in class-id order.
SHAPES = ("circle", "square", "triangle")


def _cv2():
    import cv2

    return cv2


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 (h, w) texture in [0, 1]: low-frequency blotches, stripes, a few lines and fine grain."""
    cv2 = _cv2()
    g = rng.integers(3, 9)
    t = cv2.resize(rng.random((g, g)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    freq = rng.uniform(0.05, 0.35)
    stripes = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * freq + rng.uniform(0, 6.3))
    t = t + rng.uniform(0.0, 0.35) * stripes
    for _ in range(rng.integers(0, 4)):  # clutter: thin lines
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(t, p1, p2, float(rng.uniform(-0.5, 1.5)), int(rng.integers(1, 3)))
    t = t + rng.normal(0.0, 0.08, (h, w)).astype(np.float32)
    t -= t.min()
    return (t / max(float(t.max()), 1e-6)).astype(np.float32)


def digit_item(digit8: np.ndarray, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One 8x8 digit (values 0..16) rendered as a camera-like gray (size, size) uint8 image."""
    cv2 = _cv2()
    glyph = cv2.resize((digit8.astype(np.float32) / 16.0), (32, 32), interpolation=cv2.INTER_CUBIC)
    glyph = np.clip(glyph, 0.0, 1.0)
    scale = rng.uniform(0.55, 0.85) * size / 32.0
    ang = rng.uniform(-12, 12)
    m = cv2.getRotationMatrix2D((16.0, 16.0), ang, scale)
    m[0, 1] += rng.uniform(-0.15, 0.15) * scale  # shear
    span = 32 * scale
    slack = max(0.0, (size - span) / 2.0)
    m[0, 2] += size / 2.0 - 16.0 + rng.uniform(-slack, slack) * 0.6
    m[1, 2] += size / 2.0 - 16.0 + rng.uniform(-slack, slack) * 0.6
    alpha = cv2.warpAffine(glyph, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    # dark ink on a lighter textured surface (paper, a sign, a meter face)
    bg_level = rng.uniform(0.5, 0.9)
    bg = bg_level + (texture(rng, size, size) - 0.5) * rng.uniform(0.1, 0.35)
    ink = bg_level - rng.uniform(0.3, 0.5)
    img = bg * (1.0 - alpha) + ink * alpha
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.04), img.shape)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _draw_shape(img: np.ndarray, cls: int, *, cx: float, cy: float, s: float, ang: float,
                color: Tuple[float, float, float]) -> Tuple[float, float, float, float]:
    """Draw one filled shape; returns its tight box (x1, y1, x2, y2)."""
    cv2 = _cv2()
    if cls == 0:
        r = s / 2.0
        cv2.circle(img, (round(cx * 16), round(cy * 16)), round(r * 16), color, -1,
                   cv2.LINE_AA, 4)
        return cx - r, cy - r, cx + r, cy + r
    n = 4 if cls == 1 else 3
    r = s / 2.0 * (math.sqrt(2.0) if n == 4 else 1.15)
    pts = np.array([[cx + r * math.cos(ang + 2 * math.pi * k / n), cy + r * math.sin(ang + 2 * math.pi * k / n)]
                    for k in range(n)], dtype=np.float64)
    cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], color, cv2.LINE_AA, 4)
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def shape_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB (size, size, 3) uint8 scene, its boxes (M, 4) as x1, y1, x2, y2 in pixels and class ids (M,)."""
    cv2 = _cv2()
    base = rng.uniform(0.2, 0.8, 3)
    img = np.stack([base[c] + (texture(rng, size, size) - 0.5) * rng.uniform(0.2, 0.6) for c in range(3)], axis=2)
    img = np.ascontiguousarray(img.astype(np.float32))
    boxes: List[Tuple[float, float, float, float]] = []
    classes: List[int] = []
    for _ in range(int(rng.integers(0, max_objects + 1))):
        s = rng.uniform(0.12, 0.34) * size
        for _attempt in range(10):
            cx, cy = rng.uniform(s * 0.6, size - s * 0.6, 2)
            # keep objects apart: no centre inside another object's box
            if all(not (b[0] - 2 <= cx <= b[2] + 2 and b[1] - 2 <= cy <= b[3] + 2) for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(SHAPES)))
        col = rng.uniform(0, 1, 3)
        while float(np.abs(col - img[int(cy), int(cx)]).max()) < 0.3:
            col = rng.uniform(0, 1, 3)
        box = _draw_shape(img, cls, cx=float(cx), cy=float(cy), s=float(s), ang=float(rng.uniform(0, 2 * math.pi)),
                          color=tuple(float(c) for c in col))
        boxes.append(tuple(min(max(v, 0.0), float(size)) for v in box))
        classes.append(cls)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.0))
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.05), img.shape).astype(np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x1, y1, x2, y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match_counts(pred_boxes: np.ndarray, pred_cls: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray,
                 gt_cls: np.ndarray, *, iou_threshold: float = 0.5) -> Tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one image: predictions, best score first,
    each matched greedily to the unmatched ground-truth box of the same class with the highest IoU >=
    `iou_threshold`."""
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return 0, len(pred_boxes), len(gt_boxes)
    iou = box_iou(pred_boxes, gt_boxes)
    used = np.zeros(len(gt_boxes), bool)
    tp = 0
    for i in np.argsort(-np.asarray(pred_scores, np.float64), kind="stable"):
        cand = np.where(~used & (np.asarray(gt_cls) == pred_cls[i]) & (iou[i] >= iou_threshold))[0]
        if cand.size:
            used[cand[np.argmax(iou[i, cand])]] = True
            tp += 1
    return tp, len(pred_boxes) - tp, len(gt_boxes) - tp


def f1_score(tp: int, fp: int, fn: int) -> float:
    """F1 of matched boxes (1.0 when there is nothing to find and nothing was found)."""
    if tp + fp + fn == 0:
        return 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn)
