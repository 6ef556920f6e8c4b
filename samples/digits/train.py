"""Train the sample small/large digit classifiers in numpy and export them to ONNX.

Data: scikit-learn's bundled 8x8 digits (1797 images, no download). Pixels are scaled to [0, 1]
(value / 16) and split, stratified with a fixed seed, into train / calib / heldout.

* small: MLP 64 -> 16 (ReLU) -> 10. Outputs `logits` and `features` (the 16 hidden activations).
* large: CNN  Conv 1->64 3x3 p1, ReLU, Conv 64->96 3x3 p1, ReLU, Conv 96->96 3x3 p1, ReLU,
  Conv 96->96 3x3 s2 p1, ReLU, Flatten (96*4*4), Gemm -> 10. Outputs `logits`. About 20 MFLOPs per
  item: a few hundred microseconds on one CPU core, so serving overhead is small next to it, as it is
  for a real vision model.

Writes into this folder: small.onnx, large.onnx, train.npz, calib.npz, heldout.npz, golden.npz
(golden inputs for the bundle's self-test) and prints FLOPs and heldout accuracies.

Usage: python samples/digits/train.py [--out DIR] [--epochs-small N] [--epochs-large N]
Needs numpy, scikit-learn and onnx (onnxruntime to check the export).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import count_flops

SEED = 20240601
HERE = Path(__file__).resolve().parent
OPSET = 13

# --------------------------------------------------------------------------------------------- data


def load_splits(seed: int = SEED) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Stratified train (60%) / calib (20%) / heldout (20%) splits of the bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_rest, x_held, y_rest, y_held = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr, x_cal, y_tr, y_cal = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=seed + 1
    )
    return {"train": (x_tr, y_tr), "calib": (x_cal, y_cal), "heldout": (x_held, y_held)}


# ------------------------------------------------------------------------------------ numpy layers


def _pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def im2col(x: np.ndarray, k: int, stride: int, pad: int) -> Tuple[np.ndarray, int, int]:
    """(N, C, H, W) -> (N*Ho*Wo, C*k*k) patches, in the (C, kh, kw) order of a Conv weight."""
    n, c, h, w = x.shape
    xp = _pad(x, pad)
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    cols = np.empty((n, c, k * k, ho, wo), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i * k + j] = xp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * ho * wo, c * k * k), ho, wo


def col2im(
    dcols: np.ndarray, xshape: Tuple[int, ...], k: int, stride: int, pad: int, *, ho: int, wo: int
) -> np.ndarray:
    """Adjoint of im2col: scatter-add patch gradients back to the input."""
    n, c, h, w = xshape
    d = dcols.reshape(n, ho, wo, c, k * k).transpose(0, 3, 4, 1, 2)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += d[:, :, i * k + j]
    return dxp[:, :, pad : pad + h, pad : pad + w] if pad else dxp


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int):
    """2-D convolution (cross-correlation, as ONNX Conv) via im2col; returns output and a cache."""
    o, _, k, _ = w.shape
    cols, ho, wo = im2col(x, k, stride, pad)
    out = cols @ w.reshape(o, -1).T + b
    n = x.shape[0]
    return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2), (x.shape, cols, ho, wo)


def conv_backward(dout: np.ndarray, w: np.ndarray, cache, stride: int, pad: int):
    """Gradients of conv_forward: (dx, dw, db)."""
    xshape, cols, ho, wo = cache
    o, _, k, _ = w.shape
    d = dout.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = (d.T @ cols).reshape(w.shape)
    db = d.sum(axis=0)
    dcols = d @ w.reshape(o, -1)
    return col2im(dcols, xshape, k, stride, pad, ho=ho, wo=wo), dw, db


def softmax_xent(logits: np.ndarray, y: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    g = p
    g[np.arange(n), y] -= 1.0
    return loss, (g / n).astype(np.float32)


class Adam:
    """Adam with decoupled weight decay on the weight matrices (not biases)."""

    def __init__(self, params: Dict[str, np.ndarray], lr: float, wd: float = 0.0) -> None:
        self.p = params
        self.lr = lr
        self.wd = wd
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: Dict[str, np.ndarray], lr: float) -> None:
        """One update."""
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            mh = self.m[k] / (1 - b1**self.t)
            vh = self.v[k] / (1 - b2**self.t)
            if self.wd and k.startswith("w"):
                self.p[k] -= lr * self.wd * self.p[k]
            self.p[k] -= (lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)


# ------------------------------------------------------------------------------------------ models


def small_init(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """He-initialised MLP 64 -> 16 -> 10 (Gemm weights stored as (out, in))."""
    return {
        "w1": (rng.standard_normal((16, 64)) * np.sqrt(2 / 64)).astype(np.float32),
        "b1": np.zeros(16, np.float32),
        "w2": (rng.standard_normal((10, 16)) * np.sqrt(2 / 16)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }


def small_forward(p: Dict[str, np.ndarray], x: np.ndarray) -> Dict[str, np.ndarray]:
    """Numpy forward pass of the small model: {'logits', 'features'}."""
    h = np.maximum(x.reshape(len(x), -1) @ p["w1"].T + p["b1"], 0)
    return {"logits": h @ p["w2"].T + p["b2"], "features": h}


def small_grads(p: Dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
    """Loss and gradients of the small model on one batch."""
    xf = x.reshape(len(x), -1)
    a = xf @ p["w1"].T + p["b1"]
    h = np.maximum(a, 0)
    logits = h @ p["w2"].T + p["b2"]
    loss, g = softmax_xent(logits, y)
    dh = (g @ p["w2"]) * (a > 0)
    return loss, {"w2": g.T @ h, "b2": g.sum(0), "w1": dh.T @ xf, "b1": dh.sum(0)}


#: (weight, bias, stride, pad) of the large model's convolutions, in order; LARGE_CHANNELS their widths.
LARGE_CONVS = (("w1", "b1", 1, 1), ("w2", "b2", 1, 1), ("w3", "b3", 1, 1), ("w4", "b4", 2, 1))
LARGE_CHANNELS = (1, 64, 96, 96, 96)
LARGE_FC = "w5", "b5"  # Gemm (96*4*4) -> 10


def large_init(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """He-initialised CNN weights."""

    def he(shape: Tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)

    p: Dict[str, np.ndarray] = {}
    for (wk, bk, _, _), cin, cout in zip(LARGE_CONVS, LARGE_CHANNELS, LARGE_CHANNELS[1:]):
        p[wk] = he((cout, cin, 3, 3), cin * 9)
        p[bk] = np.zeros(cout, np.float32)
    flat = LARGE_CHANNELS[-1] * 4 * 4
    p[LARGE_FC[0]] = he((10, flat), flat) * np.float32(0.5)
    p[LARGE_FC[1]] = np.zeros(10, np.float32)
    return p


def large_forward(p: Dict[str, np.ndarray], x: np.ndarray) -> Dict[str, np.ndarray]:
    """Numpy forward pass of the large model: {'logits'}."""
    h = x
    for wk, bk, s, pad in LARGE_CONVS:
        h = np.maximum(conv_forward(h, p[wk], p[bk], s, pad)[0], 0)
    wf, bf = LARGE_FC
    return {"logits": h.reshape(len(h), -1) @ p[wf].T + p[bf]}


def large_grads(p: Dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
    """Loss and gradients of the large model on one batch."""
    caches = []
    h = x
    for wk, bk, s, pad in LARGE_CONVS:
        a, cache = conv_forward(h, p[wk], p[bk], s, pad)
        caches.append((cache, a))
        h = np.maximum(a, 0)
    wf, bf = LARGE_FC
    flat = h.reshape(len(h), -1)
    logits = flat @ p[wf].T + p[bf]
    loss, g = softmax_xent(logits, y)
    grads = {wf: g.T @ flat, bf: g.sum(0)}
    dh = (g @ p[wf]).reshape(h.shape)
    for (wk, bk, s, pad), (cache, a) in zip(reversed(LARGE_CONVS), reversed(caches)):
        dh, grads[wk], grads[bk] = conv_backward(dh * (a > 0), p[wk], cache, s, pad)
    return loss, grads


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shifts of up to one pixel (zero fill): cheap, and what a camera crop does."""
    out = np.zeros_like(x)
    xp = _pad(x, 1)
    dy = rng.integers(0, 3, len(x))
    dx = rng.integers(0, 3, len(x))
    for i in range(len(x)):
        out[i] = xp[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train(
    grads_fn, params: Dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, wd: float,
    batch: int, rng: np.random.Generator, aug: bool
) -> Dict[str, np.ndarray]:
    """Mini-batch Adam with a cosine learning-rate schedule."""
    opt = Adam(params, lr, wd)
    steps = epochs * ((len(x) + batch - 1) // batch)
    t = 0
    for ep in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            xb = augment(x[idx], rng) if aug else x[idx]
            loss, g = grads_fn(params, xb, y[idx])
            opt.step(g, lr * 0.5 * (1 + np.cos(np.pi * t / steps)))
            losses.append(loss)
            t += 1
        if ep % 10 == 0 or ep == epochs - 1:
            print("  epoch %3d  loss %.4f" % (ep, float(np.mean(losses))))
    return params


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == y).mean())


# --------------------------------------------------------------------------------------------- ONNX


def _init(name: str, a: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name)


def _io(name: str, dims: List):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def small_onnx(p: Dict[str, np.ndarray]):
    """The small model as an ONNX graph (Flatten, Gemm, Relu, Gemm)."""
    from onnx import helper

    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["features"]),
        helper.make_node("Gemm", ["features", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_small",
        [_io("image", ["N", 1, 8, 8])],
        [_io("logits", ["N", 10]), _io("features", ["N", 16])],
        [_init(k, p[k]) for k in ("w1", "b1", "w2", "b2")],
    )
    return _model(graph)


def large_onnx(p: Dict[str, np.ndarray]):
    """The large model as an ONNX graph (4x Conv+Relu, Flatten, Gemm)."""
    from onnx import helper

    nodes = []
    prev = "image"
    for i, (wk, bk, s, pad) in enumerate(LARGE_CONVS, 1):
        nodes.append(
            helper.make_node(
                "Conv", [prev, wk, bk], ["conv%d" % i], kernel_shape=[3, 3], strides=[s, s], pads=[pad] * 4
            )
        )
        nodes.append(helper.make_node("Relu", ["conv%d" % i], ["relu%d" % i]))
        prev = "relu%d" % i
    nodes.append(helper.make_node("Flatten", [prev], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", *LARGE_FC], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "digits_large",
        [_io("image", ["N", 1, 8, 8])],
        [_io("logits", ["N", 10])],
        [_init(k, p[k]) for k in sorted(p)],
    )
    return _model(graph)


def _model(graph):
    from onnx import helper

    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-agent-samples")
    m.ir_version = 7  # readable by onnxruntime >= 1.8 (JetPack 5 wheels)
    return m


def params_from_onnx(path: Path) -> Dict[str, np.ndarray]:
    """The initializers of an ONNX model, by name (to rerun the numpy forward pass)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def check_onnx(path: Path, forward, params: Dict[str, np.ndarray], x: np.ndarray) -> float:
    """onnx.checker plus ORT-vs-numpy comparison; returns the max abs difference over all outputs."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = forward(params, x)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"image": x})))
    return max(float(np.abs(got[k] - ref[k]).max()) for k in ref)


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Train both models, export, check, and write the splits."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--epochs-small", type=int, default=150)
    ap.add_argument("--epochs-large", type=int, default=30)
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    splits = load_splits()
    for name, (x, y) in splits.items():
        np.savez_compressed(out / ("%s.npz" % name), x=x, y=y)
        print("%-8s %4d items" % (name, len(y)))
    x_tr, y_tr = splits["train"]
    x_held, y_held = splits["heldout"]
    x_cal, _ = splits["calib"]
    # golden inputs for the bundle self-test: from calib, 4 of each class
    gold_idx = np.concatenate([np.where(splits["calib"][1] == c)[0][:4] for c in range(10)])
    np.savez_compressed(out / "golden.npz", image=x_cal[np.sort(gold_idx)])

    print("training small (MLP 64-16-10)")
    rng = np.random.default_rng(SEED)
    small = train(small_grads, small_init(rng), x_tr, y_tr, epochs=args.epochs_small, lr=3e-3, wd=1e-4,
                  batch=32, rng=rng, aug=False)
    print("training large (CNN %s)" % "-".join(str(c) for c in LARGE_CHANNELS[1:]))
    large = train(large_grads, large_init(rng), x_tr, y_tr, epochs=args.epochs_large, lr=2e-3, wd=1e-4,
                  batch=32, rng=rng, aug=True)

    import onnx

    onnx.save(small_onnx(small), str(out / "small.onnx"))
    onnx.save(large_onnx(large), str(out / "large.onnx"))
    d_small = check_onnx(out / "small.onnx", small_forward, small, x_held)
    d_large = check_onnx(out / "large.onnx", large_forward, large, x_held)
    f_small = count_flops(out / "small.onnx")
    f_large = count_flops(out / "large.onnx")
    a_small = accuracy(small_forward(small, x_held)["logits"], y_held)
    a_large = accuracy(large_forward(large, x_held)["logits"], y_held)
    print()
    print("model  FLOPs/item  heldout acc  size(bytes)  max|ort-numpy|")
    for n, f, a, d in (("small", f_small, a_small, d_small), ("large", f_large, a_large, d_large)):
        print("%-5s  %10d  %11.4f  %11d  %.2e" % (n, f, a, (out / ("%s.onnx" % n)).stat().st_size, d))
    print("FLOPs ratio large/small: %.0fx   took %.0f s" % (f_large / f_small, time.time() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
