"""Train the sample shape detectors (small and large, YOLO output layout) with PyTorch; export to ONNX.

Data: synthetic scenes from `samples/synth.py` (0-4 circles, squares and triangles of random colours,
sizes and rotations over textured colour backgrounds, 128x128 RGB, JPEG round trip), generated for
training (`--scenes` of them, seeded); calib and heldout scenes are stored as JPEG folders with their
ground truth in `labels.json` (boxes as x1, y1, x2, y2 pixels, class ids).

Both models predict one box per cell of a 16x16 grid (stride 8) and decode it inside the graph, so the
output `detections` is (N, 256, 8) rows of cx, cy, w, h (input pixels), objectness, 3 class scores --
the layout `edge_agent.runtime.postprocess.decode_yolo` reads (score = objectness x class score):
    cx, cy = (cell centre + 4 * sigmoid(t) - 2) * 8,   w, h = 96 * sigmoid(t)^2,
    objectness = sigmoid, class scores = softmax.
* small: Conv 3->16 s2, 16->32 s2, 32->48 s2, 48->48, 48->48 (each + ReLU), 1x1 heads.
* large: Conv 3->24 s2, 24->48 s2, 48->64 s2, two residual blocks at 64 channels, Conv 64->96, 1x1 heads.
A ground-truth box is assigned to the cell holding its centre and to the neighbouring cells whose centres
fall in the middle half of the box. Losses: objectness BCE over all cells, L1 on the decoded box (in
cells) and class cross-entropy on assigned cells.

The score threshold (for the bundle's postprocessing) is the one with the best matched-box F1 on the
calib scenes; the script prints it with the heldout F1 of both models.

Usage (PyTorch in its own venv, see samples/digits96/train.py):
    /tmp/train-venv/bin/python samples/shapes/train.py [--scenes N] [--epochs-small N] [--epochs-large N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402
import synth  # noqa: E402

SEED = 20240607
SIZE = 128
STRIDE = 8
GRID = SIZE // STRIDE
NUM_CLASSES = len(synth.SHAPES)
MAX_WH = 96.0
OPSET = 13
JPEG_QUALITY = 90
SPLIT_SCENES = {"calib": 100, "heldout": 100}
GOLDEN_SCENES = 4
IOU_MATCH = 0.5
NMS_IOU = 0.45

# --------------------------------------------------------------------------------------------- data


def jpeg_roundtrip(img: np.ndarray) -> np.ndarray:
    """The scene as a camera/JPEG pipeline delivers it (RGB in, RGB out)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]


def scenes(n: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]:
    """n scenes: uint8 (n, 128, 128, 3) RGB after a JPEG round trip, boxes and classes per scene."""
    imgs, boxes, classes = [], [], []
    for _ in range(n):
        img, b, c = synth.shape_scene(rng, SIZE)
        imgs.append(jpeg_roundtrip(img))
        boxes.append(b)
        classes.append(c)
    return np.stack(imgs), boxes, classes


def targets(boxes: List[np.ndarray], classes: List[np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-cell training targets: obj (n, 256), box (n, 256, 4) cx cy w h px, cls (n, 256) (-1 = none)."""
    n = len(boxes)
    obj = np.zeros((n, GRID * GRID), np.float32)
    box = np.zeros((n, GRID * GRID, 4), np.float32)
    cls = -np.ones((n, GRID * GRID), np.int64)
    for i, (bs, cs) in enumerate(zip(boxes, classes)):
        for (x1, y1, x2, y2), c in sorted(zip(bs.tolist(), cs.tolist()), key=lambda t: -(t[0][2] - t[0][0])):
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            gx, gy = int(min(cx // STRIDE, GRID - 1)), int(min(cy // STRIDE, GRID - 1))
            for yy in range(max(gy - 1, 0), min(gy + 2, GRID)):
                for xx in range(max(gx - 1, 0), min(gx + 2, GRID)):
                    ccx, ccy = (xx + 0.5) * STRIDE, (yy + 0.5) * STRIDE
                    if (xx, yy) != (gx, gy) and (abs(ccx - cx) > w / 4 or abs(ccy - cy) > h / 4):
                        continue
                    k = yy * GRID + xx
                    obj[i, k] = 1.0
                    box[i, k] = (cx, cy, w, h)
                    cls[i, k] = c
    return {"obj": obj, "box": box, "cls": cls}


# ------------------------------------------------------------------------------------------ models


def build_models():
    """(small, large) torch modules returning raw head maps (N, 8, 16, 16)."""
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, stride: int = 1, k: int = 3):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
            self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    class Det(nn.Module):
        def __init__(self, body: nn.Module, width: int) -> None:
            super().__init__()
            self.body = body
            self.head = nn.Conv2d(width, 4 + 1 + NUM_CLASSES, 1)
            with torch.no_grad():
                self.head.bias[4] = -4.0  # objectness starts near 0 (most cells are background)

        def forward(self, x):
            return self.head(self.body(x))

    small = Det(nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 48, 2), cbr(48, 48), cbr(48, 48)), 48)
    large = Det(nn.Sequential(cbr(3, 24, 2), cbr(24, 48, 2), cbr(48, 64, 2), Block(64), Block(64), cbr(64, 96)), 96)
    return small, large


def _grid_centres() -> np.ndarray:
    """(256, 2) cell centres in pixels, row-major (y then x), as the output rows are ordered."""
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    return (np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1).astype(np.float32) + 0.5) * STRIDE


def decode_torch(raw):
    """Raw head maps (N, 8, 16, 16) -> decoded (N, 256, 8) as the ONNX graph computes them, plus obj/cls logits."""
    import torch

    n = raw.shape[0]
    t = raw.reshape(n, 4 + 1 + NUM_CLASSES, GRID * GRID).transpose(1, 2)
    centres = torch.from_numpy(_grid_centres())
    xy = centres + (4.0 * torch.sigmoid(t[..., 0:2]) - 2.0) * STRIDE
    wh = MAX_WH * torch.sigmoid(t[..., 2:4]) ** 2
    out = torch.cat([xy, wh, torch.sigmoid(t[..., 4:5]), torch.softmax(t[..., 5:], dim=-1)], dim=-1)
    return out, t[..., 4], t[..., 5:]


def train_model(model, pool: np.ndarray, tg: Dict[str, np.ndarray], *, epochs: int, lr: float, seed: int,
                batch: int = 32) -> None:
    """AdamW with a one-cycle schedule, `epochs` passes over a pool of scenes (uint8 (N, 128, 128, 3))
    and their per-cell targets."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    per_epoch = len(pool) // batch
    steps = epochs * per_epoch
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    t0 = time.time()
    hist: List[float] = []
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(epochs)])
    for step in range(steps):
        part = order[step * batch : (step + 1) * batch]
        x = torch.from_numpy(pool[part].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        tgb = {k: v[part] for k, v in tg.items()}
        out, obj_logit, cls_logit = decode_torch(model(x))
        obj_t = torch.from_numpy(tgb["obj"])
        pos = obj_t > 0.5
        loss = F.binary_cross_entropy_with_logits(obj_logit, obj_t, pos_weight=torch.tensor(4.0))
        if bool(pos.any()):
            box_t = torch.from_numpy(tgb["box"])[pos] / STRIDE
            loss = loss + F.smooth_l1_loss(out[..., :4][pos] / STRIDE, box_t)
            loss = loss + F.cross_entropy(cls_logit[pos], torch.from_numpy(tgb["cls"])[pos])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            print("  step %4d  loss %.4f  %.0f s" % (step, np.mean(hist[-100:]), time.time() - t0), flush=True)
    model.eval()
    model.to(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------- ONNX


def _fold(conv, bn) -> Tuple[np.ndarray, np.ndarray]:
    w = conv.weight.detach().numpy().astype(np.float64)
    g = (bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)).astype(np.float64)
    b = bn.bias.detach().numpy() - bn.running_mean.numpy() * g
    return (w * g[:, None, None, None]).astype(np.float32), b.astype(np.float32)


def to_onnx(model, name: str):
    """The detector with BN folded and the YOLO decode in the graph: `image` (N,3,128,128) -> `detections`."""
    from onnx import TensorProto, helper, numpy_helper
    from torch import nn

    nodes: List = []
    inits: List = []
    count = [0]

    def fresh(stem: str) -> str:
        count[0] += 1
        return "%s%d" % (stem, count[0])

    def const(a: np.ndarray, dtype=np.float32) -> str:
        n = fresh("c")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a, dtype), n))
        return n

    def op(t: str, ins: List[str], out: str = "", **kw) -> str:
        out = out or fresh(t.lower())
        nodes.append(helper.make_node(t, ins, [out], **kw))
        return out

    def conv(x: str, c, bn=None, relu=True) -> str:
        w, b = _fold(c, bn) if bn is not None else (c.weight.detach().numpy(), c.bias.detach().numpy())
        k = c.kernel_size[0]
        y = op("Conv", [x, const(w), const(b)], kernel_shape=[k, k], strides=list(c.stride), pads=[k // 2] * 4)
        return op("Relu", [y]) if relu else y

    x = "image"
    for m in model.body:
        if isinstance(m, nn.Sequential):  # Conv, BN, ReLU
            x = conv(x, m[0], m[1])
        else:  # residual block
            h = conv(x, m.a[0], m.a[1])
            h = conv(h, m.b[0], m.b[1], relu=False)
            x = op("Relu", [op("Add", [x, h])])
    raw = conv(x, model.head, relu=False)  # (N, 8, 16, 16)
    t = op("Transpose", [op("Reshape", [raw, const(np.array([0, 8, GRID * GRID]), np.int64)])], perm=[0, 2, 1])

    def cols(a: int, b: int) -> str:
        return op("Slice", [t, const(np.array([a]), np.int64), const(np.array([b]), np.int64),
                            const(np.array([2]), np.int64)])

    xy = op("Add", [op("Mul", [op("Sigmoid", [cols(0, 2)]), const(np.array(4.0 * STRIDE))]),
                    const(_grid_centres() - 2.0 * STRIDE)])
    s = op("Sigmoid", [cols(2, 4)])
    wh = op("Mul", [op("Mul", [s, s]), const(np.array(MAX_WH))])
    obj = op("Sigmoid", [cols(4, 5)])
    cls = op("Softmax", [cols(5, 5 + NUM_CLASSES)], axis=-1)
    op("Concat", [xy, wh, obj, cls], "detections", axis=2)
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", GRID * GRID, 5 + NUM_CLASSES])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-agent-samples")
    m.ir_version = 7
    return m


# ---------------------------------------------------------------------------------------- evaluation


def detect(rows: np.ndarray, score_threshold: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One item's (256, 8) rows -> boxes, scores, classes after the threshold and class-aware NMS."""
    import cv2

    cls = rows[:, 5:].argmax(1)
    scores = rows[:, 4] * rows[np.arange(len(rows)), 5 + cls]
    b = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                  rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2], axis=1)
    keep: List[int] = []
    for c in np.unique(cls[scores >= score_threshold]):
        sel = np.where((cls == c) & (scores >= score_threshold))[0]
        xywh = [[float(v[0]), float(v[1]), float(v[2] - v[0]), float(v[3] - v[1])] for v in b[sel]]
        r = cv2.dnn.NMSBoxes(xywh, scores[sel].tolist(), score_threshold, NMS_IOU)
        keep.extend(int(sel[i]) for i in np.asarray(r).reshape(-1))
    k = np.array(keep, np.int64)
    return b[k].reshape(-1, 4), scores[k], cls[k]


def f1_at(outputs: np.ndarray, boxes: List[np.ndarray], classes: List[np.ndarray], thr: float) -> float:
    """Matched-box F1 over all scenes at one score threshold."""
    tp = fp = fn = 0
    for rows, gb, gc in zip(outputs, boxes, classes):
        pb, ps, pc = detect(rows, thr)
        a, b, c = synth.match_counts(pb, pc, ps, gb, gc, iou_threshold=IOU_MATCH)
        tp, fp, fn = tp + a, fp + b, fn + c
    return synth.f1_score(tp, fp, fn)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """`detections` of the ONNX model on float32 NCHW input."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["detections"], {"image": x})[0]


def write_split(out: Path, name: str, n: int, seed: int):
    """Render n scenes into out/name/*.jpg with labels.json (`harness.write_scenes`); returns (images as
    decoded, boxes, classes)."""
    import cv2

    names = harness.write_scenes(out / name, n, seed, size=SIZE, quality=JPEG_QUALITY)
    truth = harness.folder_truth(out / name)
    imgs = [cv2.imread(str(out / name / f), cv2.IMREAD_COLOR)[:, :, ::-1] for f in names]
    return np.stack(imgs), [truth[f][0] for f in names], [truth[f][1] for f in names]


def main(argv=None) -> int:
    """Write the scene splits, train both detectors, export, pick the threshold on calib, report heldout F1."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--scenes", type=int, default=4000, help="training scenes (default 4000)")
    ap.add_argument("--epochs-small", type=int, default=10, help="passes over the training scenes (default 10)")
    ap.add_argument("--epochs-large", type=int, default=8, help="passes over the training scenes (default 8)")
    ap.add_argument("--skip-large", action="store_true", help="keep the large.onnx already in --out (training is "
                    "seeded and deterministic, so it is the one a full run writes) and train the small only")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1)")
    args = ap.parse_args(argv)
    import onnx
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    t0 = time.time()
    splits = {name: write_split(out, name, n, SEED + 10 + k) for k, (name, n) in enumerate(SPLIT_SCENES.items())}
    as_x = lambda imgs: imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # noqa: E731
    np.savez_compressed(out / "golden.npz", image=as_x(splits["calib"][0][:GOLDEN_SCENES]))
    torch.manual_seed(SEED)  # the initial weights
    small, large = build_models()
    pool, pool_boxes, pool_classes = scenes(args.scenes, np.random.default_rng(SEED))
    tg = targets(pool_boxes, pool_classes)
    print("generated %d training scenes (%.0f s)" % (len(pool), time.time() - t0), flush=True)
    print("training small detector", flush=True)
    train_model(small, pool, tg, epochs=args.epochs_small, lr=5e-3, seed=SEED)
    if not args.skip_large:
        print("training large detector", flush=True)
        train_model(large, pool, tg, epochs=args.epochs_large, lr=4e-3, seed=SEED + 1)
    gold = {}
    print("\nmodel  FLOPs/item  size(bytes)  max|ort-torch|  calib-best thr  heldout F1")
    for name, model in (("small", small), ("large", large)):
        path = out / ("%s.onnx" % name)
        kept = name == "large" and args.skip_large
        if not kept:
            onnx.save(to_onnx(model, "shapes_" + name), str(path))
        onnx.checker.check_model(onnx.load(str(path)))
        xc, bc, cc = splits["calib"]
        got = run_onnx(path, as_x(xc))
        with torch.no_grad():
            ref = got if kept else decode_torch(model(torch.from_numpy(as_x(xc))))[0].numpy()
        thr = max((round(t, 2) for t in np.arange(0.2, 0.8, 0.05)), key=lambda t: f1_at(got, bc, cc, t))
        xh, bh, ch = splits["heldout"]
        f1 = f1_at(run_onnx(path, as_x(xh)), bh, ch, thr)
        print("%-5s  %10s  %11d  %14.2e  %14.2f  %10.4f" % (name, "-", path.stat().st_size,
                                                          float(np.abs(got - ref).max()), thr, f1), flush=True)
        gold["%s.detections" % name] = run_onnx(path, as_x(splits["calib"][0][:GOLDEN_SCENES]))
    np.savez_compressed(out / "golden_outputs.npz", **gold)
    print("took %.0f s" % (time.time() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
