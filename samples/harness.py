"""Load the vision samples the way a device does, for the benchmarks, the tests and the demo.

* `build_unpacked`: `fleet bundle build` of a sample's bundle.toml (signed with a throwaway key), then
  the agent's `unpack_bundle` -- the manifest and files a device would serve from.
* `ort_models`: both models of an unpacked bundle on ONNX Runtime (CPU), one intra-op thread each by
  default, in the `PreparedModels` shape `InferenceService` takes.
* `glyph_splits` / `load_split`: the digits96 splits, rendered at run time from scikit-learn's bundled
  8x8 glyphs by `synth.digit_item` with fixed seeds (calib and heldout: `SPLIT_ITEMS` items each from
  glyphs never trained on), cached in the process.
* `scene_truth` / `detection_counts`: the ground truth of a shapes split and matched-box counts of
  answers against it (F1 via `synth.f1_score`).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

SAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(SAMPLES))

import synth  # noqa: E402

DIGITS96 = SAMPLES / "digits96"
SHAPES = SAMPLES / "shapes"
#: Seed of the digits96 glyph split and renderings (train.py uses the same).
DIGITS_SEED = 20240601
#: Items in the generated calib and heldout splits by default: 0.5 points is 15 items, and the
#: calibration's exact 95 % bound can certify a 0.5-point budget (it needs >= 598 items with no loss).
SPLIT_ITEMS = 3000
#: The rendering seed of each split (offset from DIGITS_SEED).
_SPLIT_SEEDS = {"calib": 100, "heldout": 101}


class OrtModels:
    """`.small`, `.large`, `.batch` (engine batch per model), `.backend`, `close()`."""

    def __init__(self, small: Any, large: Any, batch: int) -> None:
        self.small = small
        self.large = large
        self.batch = {"small": batch, "large": batch}
        self.backend = "onnxruntime"

    def close(self) -> None:
        """Close both engines."""
        self.small.close()
        self.large.close()


def build_unpacked(sample_dir: Path, work: Path) -> Tuple[Path, Any]:
    """Build and sign the sample's bundle into `work`, unpack it; returns (bundle dir, manifest)."""
    from edge_agent.bundle.archive import unpack_bundle
    from edge_agent.signing import PrivateKey
    from fleet.bundle_builder import build_bundle

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / ("%s.bundle" % Path(sample_dir).name)
    manifest = build_bundle(Path(sample_dir) / "bundle.toml", PrivateKey.generate("samples"), out)
    dest = work / ("%s-unpacked" % Path(sample_dir).name)
    unpack_bundle(out, dest, manifest, max_bundle_bytes=1 << 30)
    return dest, manifest


def count_flops(path: Path) -> int:
    """Multiply-adds x 2 of every Conv and Gemm/MatMul for ONE item, read from an ONNX graph (needs onnx)."""
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        shapes[vi.name] = [d.dim_value if d.dim_value else 1 for d in vi.type.tensor_type.shape.dim]
    weights = {t.name: list(t.dims) for t in m.graph.initializer}
    flops = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            flops += 2 * int(np.prod(shapes[node.output[0]])) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            flops += 2 * int(np.prod(weights[node.input[1]]))
    return flops


def ort_models(bundle_dir: Path, manifest: Any, *, batch: int = 16, threads: int = 1) -> OrtModels:
    """Both models on ONNX Runtime with engine batch `batch` and `threads` intra-op threads each."""
    from edge_agent.engines.ort import OrtEngine

    def one(name: str) -> Any:
        return OrtEngine(Path(bundle_dir) / manifest.models[name].path, max_batch=batch, intra_op_threads=threads)

    return OrtModels(one("small"), one("large"), batch)


@functools.lru_cache(maxsize=1)
def glyph_splits() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digit glyphs (0..16) and labels split stratified with a fixed seed: 60 % train,
    20 % calib, 20 % heldout (as samples/digits splits them)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = d.images.astype(np.float32), d.target.astype(np.int64)
    x_rest, x_held, y_rest, y_held = train_test_split(x, y, test_size=0.2, stratify=y, random_state=DIGITS_SEED)
    x_tr, x_cal, y_tr, y_cal = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest,
                                                random_state=DIGITS_SEED + 1)
    return {"train": (x_tr, y_tr), "calib": (x_cal, y_cal), "heldout": (x_held, y_held)}


@functools.lru_cache(maxsize=4)
def rendered_split(name: str, items: int = SPLIT_ITEMS) -> Tuple[np.ndarray, np.ndarray]:
    """(x uint8 (items, 1, 96, 96), y int64) of the calib or heldout split: its glyphs in their
    (stratified, shuffled) order, cycled, each rendering a fresh draw of one seeded generator."""
    if name not in _SPLIT_SEEDS:
        raise ValueError("no generated split %r (calib or heldout)" % name)
    g, y = glyph_splits()[name]
    order = np.arange(items) % len(y)
    rng = np.random.default_rng(DIGITS_SEED + _SPLIT_SEEDS[name])
    x = np.stack([synth.digit_item(g[i], rng, 96) for i in order])[:, None]
    x.setflags(write=False)
    return x, y[order]


def load_split(name: str, items: int = SPLIT_ITEMS) -> Tuple[np.ndarray, np.ndarray]:
    """(x float32 (N, 1, 96, 96) in [0, 1], y int64) of a generated digits96 split."""
    x, y = rendered_split(name, items)
    return x.astype(np.float32) / 255.0, y.copy()


def scene_truth(split: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{file name: (boxes (M, 4) x1 y1 x2 y2 pixels, class ids (M,))} of a shapes split."""
    return folder_truth(SHAPES / split)


def folder_truth(folder: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The ground truth of a scene folder's labels.json, as `scene_truth` returns it."""
    doc = json.loads((Path(folder) / "labels.json").read_text())
    return {name: (np.array(v["boxes"], np.float32).reshape(-1, 4), np.array(v["classes"], np.int64))
            for name, v in doc["scenes"].items()}


def write_scenes(folder: Path, n: int, seed: int, *, size: int = 128, quality: int = 90) -> List[str]:
    """Render n shape scenes (`synth.shape_scene`, one seeded generator) into `folder` as
    scene-NNN.jpg (JPEG `quality`) with their labels.json (boxes rounded to 0.01 px); earlier .jpg files
    there are removed. Returns the file names in order. samples/shapes/train.py writes its splits so."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        img, b, c = synth.shape_scene(rng, size)
        fname = "scene-%03d.jpg" % i
        cv2.imwrite(str(folder / fname), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        labels[fname] = {"boxes": np.round(b, 2).tolist(), "classes": c.tolist()}
    (folder / "labels.json").write_text(json.dumps({"classes": list(synth.SHAPES), "scenes": labels}, indent=1)
                                        + "\n")
    return list(labels)


def detection_counts(answers: Iterable[Tuple[str, Mapping[str, Any]]],
                     truth: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                     iou_threshold: float = 0.5) -> Tuple[int, int, int]:
    """Summed (tp, fp, fn) of detection answers (file name, `output` of a Result) against the truth."""
    tp = fp = fn = 0
    for name, output in answers:
        dets = output.get("detections") or []
        boxes = np.array([d["box"] for d in dets], np.float32).reshape(-1, 4)
        cls = np.array([d["class"] for d in dets], np.int64)
        scores = np.array([d["score"] for d in dets], np.float32)
        gb, gc = truth[name]
        a, b, c = synth.match_counts(boxes, cls, scores, gb, gc, iou_threshold=iou_threshold)
        tp, fp, fn = tp + a, fp + b, fn + c
    return tp, fp, fn


def detection_gate_table(bundle_dir: Path, manifest: Any, split: str = "calib",
                         folder: Optional[Path] = None) -> Dict[str, Any]:
    """Per scene of a shapes split (or of a scene `folder` with its labels.json): the gate score of the
    small detector (the service's `detection_certainty`) and the matched-box counts of the small and the
    large detector's answers."""
    import cv2

    from edge_agent.runtime.postprocess import Postprocessor, decode_yolo, nms_per_class
    from edge_agent.runtime.router import DETECTION_FLOOR_RATIO, detection_certainty

    folder = Path(folder) if folder is not None else SHAPES / split
    truth = folder_truth(folder)
    names = sorted(truth)
    x = np.stack([cv2.imread(str(folder / n), cv2.IMREAD_COLOR)[:, :, ::-1] for n in names])
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    models = ort_models(bundle_dir, manifest, batch=len(names))
    post = Postprocessor(manifest.postprocessing, ["detections"])
    try:
        outs = {m: getattr(models, m).infer({"image": x})["detections"] for m in ("small", "large")}
    finally:
        models.close()
    floor = post.score_threshold * DETECTION_FLOOR_RATIO
    scores, counts = [], {"small": [], "large": []}
    for i, n in enumerate(names):
        b, s, c = decode_yolo(outs["small"][i])
        keep = nms_per_class(b, s, c, score_threshold=floor, iou_threshold=post.iou_threshold,
                             max_detections=post.post.max_detections)
        scores.append(detection_certainty(s[keep], post.score_threshold))
        for m, rows in counts.items():
            rows.append(detection_counts([(n, post.detect(outs[m][i]))], truth))
    return {"names": names, "scores": np.array(scores), "small": np.array(counts["small"]),
            "large": np.array(counts["large"])}


def routed_f1(table: Mapping[str, Any], tau: float) -> Tuple[float, float]:
    """(F1, large fraction) of the router at τ over a `detection_gate_table`."""
    up = np.asarray(table["scores"]) < tau
    counts = np.where(up[:, None], table["large"], table["small"]).sum(axis=0)
    return synth.f1_score(*[int(v) for v in counts]), float(up.mean())


def choose_detection_tau(table: Mapping[str, Any], max_drop: float = 0.01) -> float:
    """The τ sending the fewest frames to large whose routed F1 is within `max_drop` of large-only."""
    f1_large = synth.f1_score(*[int(v) for v in np.asarray(table["large"]).sum(axis=0)])
    s = np.unique(np.asarray(table["scores"]))
    cands = [0.0, *((s[:-1] + s[1:]) / 2.0).tolist(), float(s[-1]) + 1e-06]
    ok = [t for t in cands if routed_f1(table, t)[0] >= f1_large - max_drop]
    return float(min(ok, key=lambda t: routed_f1(table, t)[1])) if ok else 1.0
