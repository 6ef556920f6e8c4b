"""Build a signed bundle from a SPEC (TOML): check the models, record golden outputs, sign, pack.

A SPEC names the small and large ONNX models (with their declared inputs and outputs), the pre- and
post-processing, the router policy, the health gates, the version and expiry, and the golden input
set. Paths in the SPEC are relative to the SPEC file. Decimal settings may be written as TOML floats
(``tau = 0.9``); they are stored as decimal strings because signed documents carry no floats.

The build refuses, with a one-line `SpecError`, a model whose inputs or outputs differ from the
declaration (names, dtypes, fixed dims) or whose batch axis is not dynamic, golden inputs that do not
match the model inputs, and any SPEC field it does not know. The SPEC's own model and its parsing are
in `fleet.bundle_spec`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from pydantic import ValidationError

from edge_agent.bundle.archive import pack_bundle, read_bundle
from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.verify import verify_manifest
from edge_agent.config import format_validation_error
from edge_agent.errors import BundleError
from edge_agent.signing import PrivateKey, canonical_json, sign_document
from fleet.bundle_spec import (
    BundleSpec,
    ModelSpecDecl,
    SpecError,
    TensorSpecDecl,
    decimals_as_strings,
    load_spec,
)
from fleet.spec_checks import postprocessing_problem

log = logging.getLogger(__name__)

DAY_S = 86400

#: ONNX Runtime type strings -> the manifest's dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


# ------------------------------------------------------------------------------------- model checks


def _session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SpecError("building a bundle needs onnxruntime (pip install onnxruntime)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        text = str(e).strip().splitlines()
        raise SpecError("onnxruntime cannot load %s: %s" % (path.name, text[0] if text else type(e).__name__))


def _actual_decls(what: str, model: str, args: Sequence[Any]) -> List[TensorSpecDecl]:
    out = []
    for a in args:
        dtype = ORT_DTYPES.get(a.type)
        if dtype is None:
            raise SpecError("%s model %s %r has type %s, which bundles do not support" % (model, what, a.name, a.type))
        shape = list(a.shape)
        if not shape or (isinstance(shape[0], int) and shape[0] > 0):
            raise SpecError(
                "%s model %s %r has a fixed batch axis %s; export it with a dynamic first axis"
                % (model, what, a.name, shape[:1] or "(scalar)")
            )
        dims = [d if isinstance(d, int) else -1 for d in shape[1:]]
        out.append(TensorSpecDecl(name=a.name, dtype=dtype, shape=[-1, *dims]))
    return out


def _check_decls(what: str, model: str, declared: Optional[List[TensorSpecDecl]], actual: List[TensorSpecDecl]):
    """Declared vs actual tensors: same names, same dtypes, compatible shapes. Returns the declarations."""
    if declared is None:
        for a in actual:
            if any(d < 1 for d in a.shape[1:]):
                raise SpecError(
                    "%s model %s %r has symbolic dims %s; declare its shape in the SPEC"
                    % (model, what, a.name, a.shape)
                )
        return actual
    dn = [d.name for d in declared]
    an = [a.name for a in actual]
    if sorted(dn) != sorted(an):
        raise SpecError("%s model %ss are %s, the SPEC declares %s" % (model, what, an, dn))
    by_name = {a.name: a for a in actual}
    for d in declared:
        a = by_name[d.name]
        if d.dtype != a.dtype:
            raise SpecError("%s model %s %r is %s, the SPEC declares %s" % (model, what, d.name, a.dtype, d.dtype))
        if not d.shape or d.shape[0] != -1:
            raise SpecError("%s model %s %r: the SPEC must declare the batch axis as -1" % (model, what, d.name))
        if len(d.shape) != len(a.shape) or any(ad > 0 and dd != ad for dd, ad in zip(d.shape[1:], a.shape[1:])):
            raise SpecError(
                "%s model %s %r has shape %s, the SPEC declares %s" % (model, what, d.name, a.shape, d.shape)
            )
    return declared


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    from edge_agent.npz import NpzError, load_npz

    try:
        return load_npz(path)
    except NpzError as e:
        raise SpecError("cannot read npz %s: %s" % (path, e)) from None


def _check_golden(inputs: Dict[str, np.ndarray], decls: List[TensorSpecDecl], path: Path) -> int:
    want = sorted(d.name for d in decls)
    if sorted(inputs) != want:
        raise SpecError("golden inputs %s hold %s, the models take %s" % (path.name, sorted(inputs), want))
    batch = None
    for d in decls:
        x = inputs[d.name]
        if x.dtype != np.dtype(d.dtype):
            raise SpecError("golden input %r is %s, the models take %s" % (d.name, x.dtype, d.dtype))
        if x.ndim != len(d.shape) or any(dd > 0 and dd != xd for dd, xd in zip(d.shape[1:], x.shape[1:])):
            raise SpecError("golden input %r has shape %s, the models take %s" % (d.name, list(x.shape), d.shape))
        if batch is not None and x.shape[0] != batch:
            raise SpecError("golden inputs disagree on the number of items")
        batch = x.shape[0]
    if not batch:
        raise SpecError("golden inputs %s hold no items" % path.name)
    return int(batch)


# -------------------------------------------------------------------------------------------- build


def _file_entry(path: Path) -> Dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for buf in iter(lambda: f.read(1 << 20), b""):
            h.update(buf)
            size += len(buf)
    return {"sha256": h.hexdigest(), "size": size}


def _existing(base: Path, rel: str, what: str) -> Path:
    p = (base / rel) if not Path(rel).is_absolute() else Path(rel)
    if not p.is_file():
        raise SpecError("%s %s does not exist" % (what, p))
    return p


def build_bundle(
    spec_path: Path,
    key: Union[PrivateKey, Sequence[PrivateKey]],
    out: Path,
    engines: Optional[Sequence[Tuple[str, str, Path]]] = None,
    *,
    now: Optional[int] = None,
) -> ManifestBody:
    """Build, sign (with one or more keys) and write the bundle described by `spec_path` to `out`.

    `engines`: (platform key, model name, plan path) triples of prebuilt engines to include.
    Returns the signed manifest body. Raises SpecError for any problem with the SPEC or its files.
    """
    spec_path = Path(spec_path)
    keys = [key] if isinstance(key, PrivateKey) else list(key)
    if not keys:
        raise SpecError("at least one signing key is needed")
    spec = load_spec(spec_path)
    base = spec_path.parent
    created = int(time.time()) if now is None else int(now)

    files: Dict[str, Path] = {}  # path in the bundle -> source file
    models: Dict[str, Dict[str, Any]] = {}
    sessions = {}
    model_inputs: Dict[str, List[TensorSpecDecl]] = {}
    for mname in ("small", "large"):
        models[mname], sessions[mname], model_inputs[mname] = _model_entry(mname, spec.models[mname], base, files)
    _check_same_inputs(model_inputs)
    _add_engines(engines or [], files, models)
    router = _router_section(spec, base, files)
    golden_in_path = _existing(base, spec.golden.inputs, "golden inputs")
    golden_inputs = _load_npz(golden_in_path)
    _check_golden(golden_inputs, model_inputs["small"], golden_in_path)

    stage = Path(tempfile.mkdtemp(prefix=".bundle-build-", dir=str(Path(out).resolve().parent)))
    try:
        files["golden/inputs.npz"] = golden_in_path
        golden = _golden_section(spec, sessions, golden_inputs, stage, files)
        body = _manifest_body(spec, spec_path, created=created, files=files, models=models,
                              router=router, golden=golden)
        problem = postprocessing_problem(body, {m: _load_npz(files["golden/%s_outputs.npz" % m])
                                                for m in ("small", "large")})
        if problem:
            raise SpecError("SPEC %s: %s" % (spec_path, problem))
        raw = canonical_json(sign_document(body.to_signed_dict(), keys))
        pack_bundle(raw, files, Path(out))
    finally:
        shutil.rmtree(str(stage), ignore_errors=True)
    _verify_written(Path(out), raw, keys, created)
    log.info("built bundle %s v%d (%d files) at %s", body.name, body.version, len(body.files), out)
    return body


def _model_entry(
    mname: str, m: ModelSpecDecl, base: Path, files: Dict[str, Path]
) -> Tuple[Dict[str, Any], Any, List[TensorSpecDecl]]:
    """Check one model against its declaration; add its files to `files`.

    Returns (its manifest entry, its ONNX Runtime session, its checked inputs)."""
    onnx_path = _existing(base, m.onnx, "%s model" % mname)
    sess = _session(onnx_path)
    ins = _check_decls("input", mname, m.inputs, _actual_decls("input", mname, sess.get_inputs()))
    outs = _check_decls("output", mname, m.outputs, _actual_decls("output", mname, sess.get_outputs()))
    if m.features_output and m.features_output not in {o.name for o in outs}:
        raise SpecError("%s model has no output %r (features_output)" % (mname, m.features_output))
    bpath = "models/%s.onnx" % mname
    files[bpath] = onnx_path
    entry: Dict[str, Any] = {
        "path": bpath,
        "inputs": [d.model_dump() for d in ins],
        "outputs": [d.model_dump() for d in outs],
        "precisions": list(m.precisions),
        "engines": {},
    }
    if m.features_output:
        entry["features_output"] = m.features_output
    if m.calibration_cache:
        cpath = "calibration/%s.cache" % mname
        files[cpath] = _existing(base, m.calibration_cache, "%s calibration cache" % mname)
        entry["calibration_cache"] = cpath
    return entry, sess, ins


def _check_same_inputs(model_inputs: Dict[str, List[TensorSpecDecl]]) -> None:
    """The router feeds both models the same tensor, so their inputs must match (in any order)."""

    def _sig(decls: List[TensorSpecDecl]) -> List[Tuple[str, str, Tuple[int, ...]]]:
        return sorted((d.name, d.dtype, tuple(d.shape)) for d in decls)

    if _sig(model_inputs["small"]) != _sig(model_inputs["large"]):
        raise SpecError("the small and large models must take the same inputs (the router feeds both the same tensor)")


def _add_engines(engines: Sequence[Tuple[str, str, Path]], files: Dict[str, Path],
                 models: Dict[str, Dict[str, Any]]) -> None:
    """Add prebuilt engine plans as engines/<model>/<platform key>.plan and name them in the model entries."""
    for pk, mname, plan in engines:
        plan = Path(plan)
        if not plan.is_file():
            raise SpecError("engine plan %s does not exist" % plan)
        bpath = "engines/%s/%s.plan" % (mname, pk)
        files[bpath] = plan
        models[mname]["engines"][pk] = bpath


def _router_section(spec: BundleSpec, base: Path, files: Dict[str, Path]) -> Dict[str, Any]:
    """The router policy with decimals as strings; a linear head file is carried as router/linear_head.npz."""
    router = decimals_as_strings(dict(spec.router))
    if router.get("linear_head"):
        files["router/linear_head.npz"] = _existing(base, router["linear_head"], "router linear head")
        router["linear_head"] = "router/linear_head.npz"
    return router


def _golden_section(spec: BundleSpec, sessions: Dict[str, Any], golden_inputs: Dict[str, np.ndarray],
                    stage: Path, files: Dict[str, Path]) -> Dict[str, Any]:
    """Run each model on the golden inputs, write its outputs under `stage` and add them to `files`;
    return the manifest's golden section."""
    for mname, sess in sessions.items():
        names = [o.name for o in sess.get_outputs()]
        try:
            values = sess.run(names, golden_inputs)
        except Exception as e:  # onnxruntime's own exception types
            raise SpecError("%s model fails on the golden inputs: %s" % (mname, str(e).strip().splitlines()[0]))
        ref = stage / ("%s_outputs.npz" % mname)
        np.savez(str(ref), **dict(zip(names, values)))
        files["golden/%s_outputs.npz" % mname] = ref
    golden: Dict[str, Any] = {
        "inputs": "golden/inputs.npz",
        "small_outputs": "golden/small_outputs.npz",
        "large_outputs": "golden/large_outputs.npz",
    }
    if spec.golden.tolerances is not None:
        golden["tolerances"] = decimals_as_strings(spec.golden.tolerances)
    return golden


def _manifest_body(spec: BundleSpec, spec_path: Path, *, created: int, files: Dict[str, Path],
                   models: Dict[str, Dict[str, Any]], router: Dict[str, Any],
                   golden: Dict[str, Any]) -> ManifestBody:
    """The manifest body (hashing every file), validated as a device will validate it."""
    expires = spec.expires if spec.expires is not None else created + round(float(spec.expires_in_days) * DAY_S)
    signed = {
        "schema": "edge-agent/manifest/1",
        "name": spec.name,
        "version": spec.version,
        "created": created,
        "expires": expires,
        "min_agent_version": spec.min_agent_version,
        "description": spec.description,
        "files": {p: _file_entry(src) for p, src in sorted(files.items())},
        "models": models,
        "preprocessing": decimals_as_strings(spec.preprocessing),
        "postprocessing": decimals_as_strings(spec.postprocessing),
        "router": router,
        "golden": golden,
        "health": decimals_as_strings(spec.health),
    }
    try:
        return ManifestBody.model_validate(signed)
    except ValidationError as e:
        raise SpecError("SPEC %s gives an invalid manifest: %s" % (spec_path, format_validation_error(e)))


def _verify_written(out: Path, raw: bytes, keys: List[PrivateKey], created: int) -> None:
    """Read back what was written, as a device would (minus the version history); remove it if it fails."""
    try:
        got, reader = read_bundle(out, max_manifest_bytes=max(len(raw), 1 << 20), max_bundle_bytes=1 << 40)
        reader.close()
        verify_manifest(
            got,
            trusted={k.keyid: k.public for k in keys},
            threshold=len({k.keyid for k in keys}),
            now=created,
            highest_versions={},
            max_manifest_bytes=max(len(raw), 1 << 20),
        )
    except BundleError as e:
        os.unlink(str(out))
        raise SpecError("the written bundle does not verify: %s" % e)
