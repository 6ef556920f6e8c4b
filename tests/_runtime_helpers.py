"""Shared helpers for the runtime tests: the sample digit models, a manifest for them, a models holder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from edge_agent.bundle.manifest import ManifestBody

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def digits_manifest(bundle_dir: Path, *, router: Optional[dict] = None, preprocessing: Optional[dict] = None,
                    postprocessing: Optional[dict] = None) -> ManifestBody:
    """A manifest for the sample digit models; files named by `router` must already be in `bundle_dir`."""
    files: Dict[str, dict] = {
        "small.onnx": _entry(DIGITS / "small.onnx"),
        "large.onnx": _entry(DIGITS / "large.onnx"),
        "golden.npz": _entry(DIGITS / "golden.npz"),
    }
    router = dict(router or {})
    if router.get("linear_head"):
        files[router["linear_head"]] = _entry(Path(bundle_dir) / router["linear_head"])
    io = {"inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 1, 8, 8]}]}
    return ManifestBody.model_validate({
        "schema": "edge-agent/manifest/1",
        "name": "digits",
        "version": 1,
        "created": 1_700_000_000,
        "expires": 2_000_000_000,
        "files": files,
        "models": {
            "small": dict(io, path="small.onnx", features_output="features", outputs=[
                {"name": "logits", "dtype": "float32", "shape": [-1, 10]},
                {"name": "features", "dtype": "float32", "shape": [-1, 16]},
            ]),
            "large": dict(io, path="large.onnx", outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, 10]}]),
        },
        "preprocessing": preprocessing or {"color": "gray", "resize": [8, 8], "scale": "0.0625"},
        "postprocessing": postprocessing
        or {"kind": "classification", "top_k": 3, "labels": [str(i) for i in range(10)]},
        "router": router,
        "golden": {"inputs": "golden.npz", "small_outputs": "golden.npz", "large_outputs": "golden.npz"},
    })


class Models:
    """The PreparedModels shape the service takes: `.small`, `.large`, `.batch`."""

    def __init__(self, small, large, batch: Dict[str, int]) -> None:
        self.small = small
        self.large = large
        self.batch = batch
        self.backend = "onnxruntime"

    def close(self) -> None:
        """Close both engines."""
        self.small.close()
        self.large.close()


def digits_models(max_batch: int = 32, threads: int = 1) -> Models:
    """Both sample models on ONNX Runtime (CPU)."""
    from edge_agent.engines.ort import OrtEngine

    small = OrtEngine(DIGITS / "small.onnx", max_batch=max_batch, intra_op_threads=threads)
    large = OrtEngine(DIGITS / "large.onnx", max_batch=max_batch, intra_op_threads=threads)
    return Models(small, large, {"small": max_batch, "large": max_batch})


def load_split(name: str):
    """(x, y) of a digits split."""
    with np.load(str(DIGITS / ("%s.npz" % name))) as z:
        return z["x"].astype(np.float32), z["y"].astype(np.int64)


class GatedEngine:
    """Wraps a real engine; `infer` waits until the gate opens (to hold a batch in flight on purpose) and
    records every batch size it ran."""

    def __init__(self, inner, *, open_gate: bool = False) -> None:
        import threading

        self.inner = inner
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.max_batch = inner.max_batch
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list = []
        if open_gate:
            self.gate.set()

    def infer(self, feed):
        """Block on the gate, then run the real engine."""
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("gate never opened")
        self.batches.append(len(next(iter(feed.values()))))
        return self.inner.infer(feed)

    def close(self) -> None:
        """Close the real engine."""
        self.inner.close()
