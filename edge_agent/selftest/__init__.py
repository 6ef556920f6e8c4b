"""Package data for `edge-agent selftest`: a tiny ONNX classifier (see `_make_model.py`)."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = Path(__file__).with_name("tiny.onnx")
TINY_REFERENCE = Path(__file__).with_name("tiny_reference.npz")


def tiny_model_path() -> Path:
    """Path of the bundled tiny ONNX model."""
    return TINY_MODEL


def tiny_reference_path() -> Path:
    """Path of the fixed inputs and numpy-computed outputs of the tiny model."""
    return TINY_REFERENCE
