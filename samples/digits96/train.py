"""Train the vision-sized sample classifiers (96x96 camera-like digits) with PyTorch and export them to ONNX.

Data: scikit-learn's bundled 8x8 digits (no download), split like samples/digits (stratified, fixed
seed: 60% train / 20% calib / 20% heldout glyphs), each glyph rendered by `samples/synth.py` as a gray
96x96 image: upscaled, rotated, sheared, scaled and shifted, in a random ink brightness over a textured
background, with blur and sensor noise. Training renders every training glyph `--renders` times;
calib and heldout are rendered at run time by `harness.load_split` (from glyphs never trained on).

* small: 4x (Conv 3x3 stride 2 + ReLU) 16-32-64-64, Flatten (64x6x6), Gemm -> 64 + ReLU = `features`,
  Gemm -> `logits`.
* large: ResNet-like: stem Conv 1->32 s2, a residual block at 32 channels (48x48), Conv 32->64 s2, a
  block at 64 (24x24), Conv 64->128 s2, a block at 128 (12x12), GlobalAveragePool, Gemm -> `logits`.
Batch norms are folded into the convolutions; the ONNX graphs use only Conv, Relu, Add,
GlobalAveragePool, Flatten and Gemm (opset 13, IR 7, dynamic batch axis `N`).

Writes into this folder: small.onnx, large.onnx, golden.npz (`image`, float32 inputs for the bundle
self-test: the first 2 items of each class of the generated calib split) and golden_outputs.npz (the ONNX
Runtime outputs of both models on them), and prints FLOPs and heldout accuracies.

Usage (PyTorch only for training, in its own venv; the agent never needs it):
    python -m venv /tmp/train-venv && /tmp/train-venv/bin/pip install torch numpy scikit-learn onnx \
        onnxruntime opencv-python-headless
    /tmp/train-venv/bin/python samples/digits96/train.py [--epochs-small N] [--epochs-large N] [--skip-large]
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

SEED = harness.DIGITS_SEED
SIZE = 96
OPSET = 13
SMALL_WIDTHS = (16, 32, 64, 64)
SMALL_FEATURES = 64
GOLDEN_PER_CLASS = 2

# --------------------------------------------------------------------------------------------- data


def render(glyphs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 1, 96, 96) images of the glyphs."""
    return np.stack([synth.digit_item(g, rng, SIZE) for g in glyphs])[:, None]


# ------------------------------------------------------------------------------------------ models


def build_models():
    """(small, large) torch modules."""
    import torch
    from torch import nn

    class ConvBN(nn.Sequential):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    class Block(nn.Module):
        """relu(x + bn(conv(relu(bn(conv(x))))))"""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.a = ConvBN(c, c)
            self.b = ConvBN(c, c)

        def forward(self, x):
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = (1, *SMALL_WIDTHS)
            self.convs = nn.ModuleList([ConvBN(w[i], w[i + 1], 2) for i in range(len(SMALL_WIDTHS))])
            self.hidden = nn.Linear(w[-1] * 6 * 6, SMALL_FEATURES)
            self.fc = nn.Linear(SMALL_FEATURES, 10)

        def forward(self, x):
            for c in self.convs:
                x = torch.relu(c(x))
            f = torch.relu(self.hidden(x.flatten(1)))
            return self.fc(f), f

    class Large(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = ConvBN(1, 32, 2)
            self.block1 = Block(32)
            self.down1 = ConvBN(32, 64, 2)
            self.block2 = Block(64)
            self.down2 = ConvBN(64, 128, 2)
            self.block3 = Block(128)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            x = self.block1(torch.relu(self.stem(x)))
            x = self.block2(torch.relu(self.down1(x)))
            x = self.block3(torch.relu(self.down2(x)))
            return self.fc(x.mean(dim=(2, 3))), None

    return Small(), Large()


def train_model(model, pool: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float, seed: int) -> None:
    """AdamW with a one-cycle schedule over a pool of rendered images (uint8 (N, 1, 96, 96)), `epochs` passes."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    batch = 64
    steps = epochs * ((len(pool) + batch - 1) // batch)
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for ep in range(epochs):
        t0 = time.time()
        idx = rng.permutation(len(pool))
        losses, correct = [], 0
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            xb = torch.from_numpy(pool[part].astype(np.float32) / 255.0).to(memory_format=torch.channels_last)
            yb = torch.from_numpy(labels[part])
            logits, _ = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == yb).sum())
            if (s // batch) % 20 == 0:
                print("    step %4d  loss %.4f" % (s // batch, np.mean(losses[-20:])), flush=True)
        print("  epoch %2d  loss %.4f  train acc %.4f  %.0f s" % (ep, np.mean(losses), correct / len(idx),
                                                                time.time() - t0), flush=True)
    model.eval()
    model.to(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------- ONNX


def _fold(cbn) -> Tuple[np.ndarray, np.ndarray]:
    """Conv + BatchNorm (eval) -> one Conv's weight and bias."""
    conv, bn = cbn[0], cbn[1]
    w = conv.weight.detach().numpy().astype(np.float64)
    g = (bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)).astype(np.float64)
    b = bn.bias.detach().numpy() - bn.running_mean.numpy() * g
    return (w * g[:, None, None, None]).astype(np.float32), b.astype(np.float32)


class _Graph:
    """A tiny ONNX graph builder (nodes + initializers)."""

    def __init__(self) -> None:
        self.nodes: List = []
        self.inits: List = []
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return "%s%d" % (stem, self.n)

    def const(self, stem: str, a: np.ndarray) -> str:
        from onnx import numpy_helper

        n = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a, np.float32), n))
        return n

    def op(self, op_type: str, inputs: List[str], out: str = "", **attrs) -> str:
        from onnx import helper

        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x: str, cbn, stride: int, relu: bool = True) -> str:
        w, b = _fold(cbn)
        y = self.op("Conv", [x, self.const("w", w), self.const("b", b)], kernel_shape=[3, 3],
                    strides=[stride, stride], pads=[1, 1, 1, 1])
        return self.op("Relu", [y]) if relu else y

    def block(self, x: str, blk) -> str:
        h = self.conv(x, blk.a, 1)
        h = self.conv(h, blk.b, 1, relu=False)
        return self.op("Relu", [self.op("Add", [x, h])])

    def head(self, x: str, fc, features: str = "") -> str:
        pooled = self.op("Flatten", [self.op("GlobalAveragePool", [x])], features or "", axis=1)
        w = fc.weight.detach().numpy()
        b = fc.bias.detach().numpy()
        return self.op("Gemm", [pooled, self.const("fc_w", w), self.const("fc_b", b)], "logits", transB=1)

    def model(self, name: str, outputs: List[Tuple[str, int]]):
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", d]) for o, d in outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edge-agent-samples")
        m.ir_version = 7  # readable by onnxruntime >= 1.8 (JetPack 5 wheels)
        return m


def small_onnx(model):
    """The small model's ONNX graph: `logits` (N, 10), `features` (N, 64)."""
    g = _Graph()
    x = "image"
    for c in model.convs:
        x = g.conv(x, c, 2)
    flat = g.op("Flatten", [x], axis=1)
    hidden = g.op("Gemm", [flat, g.const("h_w", model.hidden.weight.detach().numpy()),
                           g.const("h_b", model.hidden.bias.detach().numpy())], transB=1)
    feats = g.op("Relu", [hidden], "features")
    g.op("Gemm", [feats, g.const("fc_w", model.fc.weight.detach().numpy()),
                  g.const("fc_b", model.fc.bias.detach().numpy())], "logits", transB=1)
    return g.model("digits96_small", [("logits", 10), ("features", SMALL_FEATURES)])


def large_onnx(model):
    """The large model's ONNX graph: `logits` (N, 10)."""
    g = _Graph()
    x = g.block(g.conv("image", model.stem, 2), model.block1)
    x = g.block(g.conv(x, model.down1, 2), model.block2)
    x = g.block(g.conv(x, model.down2, 2), model.block3)
    g.head(x, model.fc)
    return g.model("digits96_large", [("logits", 10)])


count_flops = harness.count_flops


def run_onnx(path: Path, x: np.ndarray) -> Dict[str, np.ndarray]:
    """Every output of the model on float32 input x."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"image": x})))


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Render the training pool, train both models, export, check against PyTorch, write everything."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--renders", type=int, default=12, help="renderings of each training glyph (default 12)")
    ap.add_argument("--epochs-small", type=int, default=6, help="passes over the rendered pool (default 6)")
    ap.add_argument("--epochs-large", type=int, default=2, help="passes over the rendered pool (default 2)")
    ap.add_argument("--skip-large", action="store_true", help="keep the large.onnx already in --out (training "
                    "is seeded and deterministic, so it is the one a full run writes) and train the small only")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1: spinning threads "
                    "waste a shared machine)")
    args = ap.parse_args(argv)
    import onnx
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    xc, yc = harness.rendered_split("calib")
    gold = np.sort(np.concatenate([np.where(yc == c)[0][:GOLDEN_PER_CLASS] for c in range(10)]))
    golden = xc[gold].astype(np.float32) / 255.0
    np.savez_compressed(out / "golden.npz", image=golden)

    torch.manual_seed(SEED)  # the initial weights
    small, large = build_models()
    xg, yg = harness.glyph_splits()["train"]
    rng = np.random.default_rng(SEED + 7)
    order = np.concatenate([rng.permutation(len(yg)) for _ in range(args.renders)])
    pool, pool_y = render(xg[order], rng), yg[order]
    print("rendered %d training images from %d glyphs (%.0f s)" % (len(pool), len(yg), time.time() - t0),
          flush=True)
    print("training small (convs %s, hidden %d)" % ("-".join(map(str, SMALL_WIDTHS)), SMALL_FEATURES), flush=True)
    train_model(small, pool, pool_y, epochs=args.epochs_small, lr=5e-3, seed=SEED)
    onnx.save(small_onnx(small), str(out / "small.onnx"))
    if not args.skip_large:
        print("training large (ResNet-like 32-64-128)", flush=True)
        train_model(large, pool, pool_y, epochs=args.epochs_large, lr=5e-3, seed=SEED + 1)
        onnx.save(large_onnx(large), str(out / "large.onnx"))
    report(out, {"small": small, "large": None if args.skip_large else large}, golden)
    print("took %.0f s" % (time.time() - t0))
    return 0


def report(out: Path, models: Dict, golden: np.ndarray) -> None:
    """Check the ONNX files (against PyTorch where a module is given), print FLOPs and heldout accuracy on
    the generated heldout split, and write golden_outputs.npz."""
    import onnx
    import torch

    xh, yh = harness.load_split("heldout")
    print()
    print("model  FLOPs/item  heldout acc (%d items)  size(bytes)  max|ort-torch|" % len(yh))
    gold_out = {}
    for name, model in models.items():
        path = out / ("%s.onnx" % name)
        onnx.checker.check_model(onnx.load(str(path)))
        got = run_onnx(path, xh)
        diff = float("nan")
        if model is not None:
            with torch.no_grad():
                ref = model(torch.from_numpy(xh[:256]))[0].numpy()
            diff = float(np.abs(got["logits"][:256] - ref).max())
        acc = float((got["logits"].argmax(1) == yh).mean())
        print("%-5s  %10d  %11.4f  %11d  %.2e" % (name, count_flops(path), acc, path.stat().st_size, diff))
        for k, v in run_onnx(path, golden).items():
            gold_out["%s.%s" % (name, k)] = v
    np.savez_compressed(out / "golden_outputs.npz", **gold_out)


if __name__ == "__main__":
    raise SystemExit(main())
