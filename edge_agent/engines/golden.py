"""The golden self-test: run the bundle's golden inputs through both prepared engines and compare with the
reference outputs recorded when the bundle was built, with the manifest's tolerance for the precision the
engine runs at, and top-1 agreement for classifiers. A failure means the bundle is not activated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np

from edge_agent.bundle.manifest import ManifestBody, Tolerance
from edge_agent.engines.base import Engine
from edge_agent.errors import BundleError, EdgeAgentError

log = logging.getLogger(__name__)


@dataclass
class GoldenReport:
    """Outcome of the golden self-test; `details` carries the measured disagreement per model."""

    passed: bool
    message: str
    details: Dict[str, Any] = field(default_factory=dict)


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    from edge_agent.npz import NpzError, load_npz

    try:
        return load_npz(path)
    except NpzError as e:
        raise BundleError("golden file %s" % e) from None


def run_engine_batched(engine: Engine, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run all items through `engine` in chunks of at most its max batch; concatenate the outputs."""
    n = len(next(iter(inputs.values())))
    parts: Dict[str, list] = {}
    for start in range(0, n, engine.max_batch):
        chunk = {k: np.ascontiguousarray(v[start : start + engine.max_batch]) for k, v in inputs.items()}
        for k, v in engine.infer(chunk).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def compare_outputs(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: Tolerance, *,
                    classify_output: str = "") -> Dict[str, Any]:
    """Measured disagreement: per output max |diff|, share of elements outside atol + rtol·|ref|, and
    top-1 agreement on `classify_output` (when given). `passed` applies the tolerance."""
    atol, rtol, min_top1 = float(tol.atol), float(tol.rtol), float(tol.min_top1_agreement)
    out: Dict[str, Any] = {"atol": atol, "rtol": rtol, "min_top1_agreement": min_top1, "outputs": {}}
    passed = True
    problems = []
    for name, want in ref.items():
        if name not in got:
            passed = False
            problems.append("output %s missing" % name)
            continue
        have = got[name]
        if have.shape != want.shape:
            passed = False
            problems.append("output %s has shape %s, reference %s" % (name, have.shape, want.shape))
            continue
        diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
        bad = diff > atol + rtol * np.abs(want.astype(np.float64))
        frac = float(bad.mean()) if bad.size else 0.0
        out["outputs"][name] = {"max_abs_diff": float(diff.max()) if diff.size else 0.0, "outside_tolerance": frac}
        if frac > 0:
            passed = False
            problems.append("%s: %.2f%% of values outside atol %g + rtol %g (max |diff| %.4g)"
                            % (name, 100 * frac, atol, rtol, float(diff.max())))
    if classify_output and classify_output in got and classify_output in ref:
        a = got[classify_output].reshape(len(got[classify_output]), -1).argmax(1)
        b = ref[classify_output].reshape(len(ref[classify_output]), -1).argmax(1)
        agreement = float((a == b).mean()) if len(a) else 1.0
        out["top1_agreement"] = agreement
        if agreement < min_top1:
            passed = False
            problems.append("top-1 agreement %.3f < %.3f" % (agreement, min_top1))
    out["passed"] = passed
    out["problems"] = problems
    return out


def run_golden(models: Any, bundle_dir: Path, manifest: ManifestBody) -> GoldenReport:
    """Golden self-test of a `PreparedModels` against the bundle's reference outputs."""
    bundle_dir = Path(bundle_dir)
    golden = manifest.golden
    try:
        inputs = _load_npz(bundle_dir / golden.inputs)
        refs = {"small": _load_npz(bundle_dir / golden.small_outputs),
                "large": _load_npz(bundle_dir / golden.large_outputs)}
    except BundleError as e:
        return GoldenReport(False, str(e), {})
    post = manifest.postprocessing
    details: Dict[str, Any] = {"backend": getattr(models, "backend", None), "items": 0}
    failures = []
    for name in ("small", "large"):
        engine: Engine = models.small if name == "small" else models.large
        precision = (getattr(models, "precisions", {}) or {}).get(name) or getattr(models, "precision", "fp32")
        tol = golden.tolerances.get(precision) or golden.tolerances.get("fp16") or Tolerance()
        if precision not in golden.tolerances:
            # prebuilt plans of unknown precision are held to the fp16 tolerance (the usual Jetson build)
            precision = "fp16" if "fp16" in golden.tolerances else precision
        want_names = {s.name for s in engine.inputs}
        missing = want_names - set(inputs)
        if missing:
            failures.append("%s: golden inputs lack %s" % (name, ", ".join(sorted(missing))))
            continue
        feed = {k: inputs[k] for k in want_names}
        details["items"] = len(next(iter(feed.values())))
        try:
            got = run_engine_batched(engine, feed)
        except EdgeAgentError as e:
            failures.append("%s model failed on the golden inputs: %s" % (name, e))
            details[name] = {"error": str(e)}
            continue
        classify = ""
        if post.kind == "classification":
            classify = post.output or engine.outputs[0].name
        cmp = compare_outputs(got, refs[name], tol, classify_output=classify)
        cmp["precision"] = precision
        details[name] = cmp
        if not cmp["passed"]:
            failures.append("%s model (%s): %s" % (name, precision, "; ".join(cmp["problems"])))
    if failures:
        return GoldenReport(False, "golden self-test failed: " + " | ".join(failures), details)
    summary = ", ".join("%s top-1 %.3f max|diff| %.2g" % (
        n, details[n].get("top1_agreement", float("nan")),
        max((o["max_abs_diff"] for o in details[n]["outputs"].values()), default=0.0)) for n in ("small", "large"))
    return GoldenReport(True, "golden self-test passed on %d items (%s)" % (details["items"], summary), details)
