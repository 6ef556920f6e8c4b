"""Post-processing: classification top-k with labels, YOLO-style detection decode + class-aware NMS, raw."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.bundle.manifest import Postprocessing
from edge_agent.errors import InferenceError
from edge_agent.runtime.postprocess import Postprocessor, decode_yolo

pytest.importorskip("cv2")


def _row(*box_obj_cls_score, nc=3):
    cx, cy, w, h, obj, cls, score = box_obj_cls_score
    scores = [0.0] * nc
    scores[cls] = score
    return [cx, cy, w, h, obj, *scores]


def _detector(**kw) -> Postprocessor:
    args = dict(kind="detection", score_threshold="0.3", iou_threshold="0.5", labels=["cat", "dog", "car"])
    args.update(kw)
    return Postprocessor(Postprocessing(**args), ["out"])


def test_yolo_rows_decode_to_known_boxes_and_nms_keeps_the_best_of_each_overlap():
    out = np.array([
        _row(50, 50, 20, 20, 0.9, 0, 0.9),    # cat A, score .81
        _row(51, 51, 20, 20, 0.9, 0, 0.8),    # overlaps A (IoU ~0.9), same class: suppressed
        _row(50, 50, 20, 20, 0.9, 1, 0.7),    # same place, other class: kept (class-aware)
        _row(150, 100, 40, 10, 0.8, 2, 0.9),  # car far away, score .72
        _row(10, 10, 4, 4, 0.5, 0, 0.5),      # score .25 under the .3 threshold: dropped
    ] + [_row(0, 0, 1, 1, 0.0, 0, 0.0)] * 20, dtype=np.float32)  # as real heads: many more boxes than columns
    res = _detector()({"out": out})
    dets = res["detections"]
    assert res["kind"] == "detection"
    assert [(d["label"], d["score"]) for d in dets] == [("cat", pytest.approx(0.81)), ("car", pytest.approx(0.72)),
                                                        ("dog", pytest.approx(0.63))]
    assert dets[0]["box"] == [40.0, 40.0, 60.0, 60.0]
    assert dets[1]["box"] == [130.0, 95.0, 170.0, 105.0]
    assert dets[2]["class"] == 1


def test_transposed_layout_without_objectness_is_decoded_too():
    # (4 + C, boxes): YOLOv8-style, the class score is the score.
    boxes = np.array([[100, 100, 50, 50], [102, 101, 50, 50], [300, 200, 10, 20], [5, 5, 2, 2], [6, 6, 2, 2],
                      [7, 7, 2, 2], [8, 8, 2, 2], [9, 9, 2, 2]], dtype=np.float32)
    cls = np.zeros((8, 2), np.float32)
    cls[0, 1], cls[1, 1], cls[2, 0] = 0.95, 0.9, 0.6
    out = np.concatenate([boxes, cls], axis=1).T  # shape (6, 8)
    b, s, c = decode_yolo(out)
    assert b.shape == (8, 4) and s[0] == pytest.approx(0.95) and c[2] == 0
    dets = _detector(labels=None)({"out": out})["detections"]
    assert [(d["class"], d["score"]) for d in dets] == [(1, pytest.approx(0.95)), (0, pytest.approx(0.6))]
    assert dets[0]["box"] == [75.0, 75.0, 125.0, 125.0] and dets[0]["label"] is None


def test_boxes_scale_back_to_the_original_image_and_max_detections_caps():
    out = np.array([_row(32 + 64 * i, 32, 16, 16, 1.0, 0, 0.9 - 0.1 * i) for i in range(12)], dtype=np.float32)
    res = _detector(max_detections=2)({"out": out}, input_hw=(64, 256), original_hw=(128, 512))
    assert len(res["detections"]) == 2
    assert res["detections"][0]["box"] == [48.0, 48.0, 80.0, 80.0]


def test_nothing_over_threshold_gives_no_detections():
    out = np.array([_row(5, 5, 2, 2, 0.1, 0, 0.1)] * 30, dtype=np.float32)
    assert _detector()({"out": out})["detections"] == []


def test_detection_output_of_the_wrong_shape_is_refused():
    with pytest.raises(InferenceError, match="neither"):
        decode_yolo(np.zeros((3, 4), np.float32))
    with pytest.raises(InferenceError, match="2-D"):
        decode_yolo(np.zeros((2, 3, 4, 5), np.float32))


def test_classification_top_k_with_labels_and_softmax():
    post = Postprocessor(Postprocessing(kind="classification", top_k=2, labels=["a", "b", "c"]), ["logits"])
    res = post({"logits": np.array([1.0, 3.0, 2.0], np.float32)})
    assert [t["label"] for t in res["top"]] == ["b", "c"]
    p = np.exp([1.0, 3.0, 2.0]) / np.exp([1.0, 3.0, 2.0]).sum()
    assert res["top"][0]["score"] == pytest.approx(p[1], abs=1e-6)
    raw_scores = Postprocessor(Postprocessing(kind="classification", apply_softmax=False, top_k=1), ["p"])
    assert raw_scores({"p": np.array([0.2, 0.7, 0.1])})["top"] == [{"index": 1, "label": None, "score": 0.7}]


def test_raw_returns_every_output_and_unknown_output_is_refused():
    post = Postprocessor(Postprocessing(kind="raw"), ["a", "b"])
    res = post({"a": np.arange(3), "b": np.ones((2, 2))})
    assert res == {"kind": "raw", "outputs": {"a": [0, 1, 2], "b": [[1.0, 1.0], [1.0, 1.0]]}}
    with pytest.raises(InferenceError, match="lacks"):
        Postprocessor(Postprocessing(kind="classification", output="nope"), ["logits"])
