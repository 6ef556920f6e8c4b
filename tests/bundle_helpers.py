"""Helpers for bundle tests: small real files, signed manifests, and hand-crafted (hostile) tar archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.signing import PrivateKey, canonical_json, sign_document

NOW = 1_800_000_000
MIB = 1 << 20

FILES = {
    "models/small.onnx": b"small-model-bytes" * 10,
    "models/large.onnx": b"large-model-bytes" * 40,
    "golden/inputs.npz": b"golden-inputs",
    "golden/small_outputs.npz": b"small-outputs",
    "golden/large_outputs.npz": b"large-outputs",
}


def _tensor(name: str, shape: List[int]) -> Dict[str, Any]:
    return {"name": name, "dtype": "float32", "shape": shape}


def body_dict(files: Optional[Dict[str, bytes]] = None, **overrides: Any) -> Dict[str, Any]:
    """A valid manifest body (as a JSON value) pinning `files`."""
    files = FILES if files is None else files
    body: Dict[str, Any] = {
        "schema": "edge-agent/manifest/1",
        "name": "digits",
        "version": 3,
        "created": NOW - 100,
        "expires": NOW + 86400,
        "files": {p: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for p, d in files.items()},
        "models": {
            "small": {"path": "models/small.onnx", "inputs": [_tensor("image", [-1, 1, 8, 8])],
                      "outputs": [_tensor("logits", [-1, 10])]},
            "large": {"path": "models/large.onnx", "inputs": [_tensor("image", [-1, 1, 8, 8])],
                      "outputs": [_tensor("logits", [-1, 10])]},
        },
        "golden": {"inputs": "golden/inputs.npz", "small_outputs": "golden/small_outputs.npz",
                   "large_outputs": "golden/large_outputs.npz"},
    }
    body.update(overrides)
    return ManifestBody.model_validate(body).to_signed_dict()


def signed_bytes(body: Dict[str, Any], keys: Sequence[PrivateKey]) -> bytes:
    """The manifest.json bytes of `body` signed by `keys`."""
    return canonical_json(sign_document(body, keys))


def doc_bytes(signed: Any, signatures: Any) -> bytes:
    """Manifest bytes from arbitrary parts (for tampering)."""
    return json.dumps({"signed": signed, "signatures": signatures}, sort_keys=True, separators=(",", ":")).encode()


def write_files(root: Path, files: Optional[Dict[str, bytes]] = None) -> Dict[str, Path]:
    """Write `files` under `root`; bundle path -> file."""
    out = {}
    for name, data in (FILES if files is None else files).items():
        p = root / name.replace("/", "__")
        p.write_bytes(data)
        out[name] = p
    return out


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, *, size: Optional[int] = None,
           linkname: str = "") -> Tuple[tarfile.TarInfo, bytes]:
    """A tar member with any type and a size header that may lie."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if size is None else size
    ti.mode = 0o644
    ti.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, data


def write_tar(path: Path, members: Sequence[Tuple[tarfile.TarInfo, bytes]]) -> Path:
    """Write members exactly as given (names, types and sizes are not sanitised)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                tf.addfile(ti, io.BytesIO(data.ljust(ti.size, b"\0")[: ti.size]))
            else:
                tf.addfile(ti)
    path.write_bytes(buf.getvalue())
    return path


def good_members(manifest: bytes, files: Optional[Dict[str, bytes]] = None) -> List[Tuple[tarfile.TarInfo, bytes]]:
    """manifest.json first, then every file."""
    files = FILES if files is None else files
    return [member("manifest.json", manifest)] + [member(n, d) for n, d in sorted(files.items())]


def tree(root: Path) -> List[str]:
    """Every path under `root` (relative), sorted: to assert what is on disk."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
