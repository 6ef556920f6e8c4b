"""Helpers for the shadow / A-B tests: honest candidate models (real ONNX) and bundles with short shadow
gates, built and signed like any release."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

from agent_helpers import SAMPLE_SPEC

from edge_agent.signing import PrivateKey

DIGITS = SAMPLE_SPEC.parent


def permuted_model(src: Path, out: Path, *, shift: int = 1, output: str = "logits") -> Path:
    """`src` with its `output` classes permuted (class i is reported as class (i + shift) mod C): a real
    ONNX model, one Gather node added after the original graph; every other output is unchanged."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    (out_decl,) = [o for o in g.output if o.name == output]
    classes = out_decl.type.tensor_type.shape.dim[1].dim_value
    raw = output + "_unpermuted"
    for node in g.node:
        node.output[:] = [raw if o == output else o for o in node.output]
        node.input[:] = [raw if i == output else i for i in node.input]
    # reported[:, j] = raw[:, (j - shift) mod C]: the argmax moves from i to i + shift
    perm = np.array([(j - shift) % classes for j in range(classes)], dtype=np.int64)
    g.initializer.append(numpy_helper.from_array(perm, "class_permutation"))
    g.node.append(helper.make_node("Gather", [raw, "class_permutation"], [output], axis=1, name="permute_classes"))
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


def build_bundle(out_dir: Path, key: PrivateKey, *, version: int, health: Optional[Dict[str, object]] = None,
                 small: Optional[Path] = None, large: Optional[Path] = None, name: str = "digits") -> Path:
    """The sample bundle at `version` (optionally with other small/large ONNX files), `[health]` replaced by
    `health` merged over the sample's; golden references are recorded from the models it ships."""
    from fleet.bundle_builder import build_bundle as build

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = SAMPLE_SPEC.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^version = \d+", "version = %d" % version, text)
    text = re.sub(r'(?m)^name = "[^"]*"', 'name = "%s"' % name, text)
    files = {"small.onnx": small or DIGITS / "small.onnx", "large.onnx": large or DIGITS / "large.onnx",
             "golden.npz": DIGITS / "golden.npz"}
    for fname, path in files.items():
        text = text.replace('"%s"' % fname, '"%s"' % Path(path).resolve())
    gates = {"probation_s": 0, "max_error_rate": 0.01, "min_requests": 0}
    gates.update(health or {})
    head, _, _ = text.partition("[health]")
    text = head + "[health]\n" + "".join("%s = %s\n" % (k, _toml(v)) for k, v in gates.items())
    spec = out_dir / ("spec-%s-%d.toml" % (name, version))
    spec.write_text(text, encoding="utf-8")
    out = out_dir / ("%s-%d.bundle" % (name, version))
    build(spec, key, out)
    return out


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"%s"' % v
    return repr(v)
