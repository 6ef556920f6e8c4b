"""Package data for `edge-agent selftest`: a tiny ONNX classifier (see `_make_model.py`)."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = Path(__file__).with_name("tiny.onnx")


def tiny_model_path() -> Path:
    """Path of the bundled tiny ONNX model."""
    return TINY_MODEL
