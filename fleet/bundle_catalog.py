"""What bundles the controller stores, for the `bundles.list` and `bundles.show` RPC methods (the
console's bundle pages and REST API): records from the file store or the shared registry, and the
manifest of one bundle (models, files, signatures) read from the store — not verified again here;
`fleet push` and uploads verify before storing."""

from __future__ import annotations

from typing import Any, Dict, List

from edge_agent.bundle.verify import parse_body, parse_document
from fleet.bundle_store import BundleRecordError, ControllerStore

#: Bundle records listed at most (newest versions first).
MAX_LISTED = 1000


def list_bundles(store: ControllerStore, *, limit: int = 200) -> List[Dict[str, Any]]:
    """Stored bundle records, name ascending and version descending, at most `limit`."""
    limit = max(1, min(int(limit), MAX_LISTED))
    registry = getattr(store, "registry", None)
    if registry is not None:
        rows = registry.read(
            "SELECT name, version, manifest_sha256, manifest_size FROM bundle_records "
            "ORDER BY name, version DESC LIMIT ?", (limit,))
        return [{"name": r["name"], "version": int(r["version"]), "manifest_sha256": r["manifest_sha256"],
                 "manifest_size": int(r["manifest_size"])} for r in rows]
    out: List[Dict[str, Any]] = []
    for d in sorted(p for p in store.bundles.iterdir() if p.is_dir()):
        versions = sorted((int(f.stem) for f in d.glob("*.json") if f.stem.isdigit()), reverse=True)
        for v in versions:
            try:
                out.append(dict(store.record(d.name, v)))
            except BundleRecordError:
                continue
            if len(out) >= limit:
                return out
    return out


def show_bundle(store: ControllerStore, name: str, version: int, *, max_manifest_bytes: int) -> Dict[str, Any]:
    """One stored bundle: its record, manifest body (models, files, router), and signatures' key ids."""
    rec = store.record(name, int(version))
    try:
        raw = store.read_object(str(rec["manifest_sha256"]))
    except OSError as e:
        raise BundleRecordError("the controller does not store bundle %s v%d: its manifest object is unreadable "
                                "(%s)" % (name, int(version), e.strerror))
    signed, signatures = parse_document(raw, max_manifest_bytes=max_manifest_bytes)
    body = parse_body(signed)
    models = {
        m: {"path": spec.path,
            "inputs": [t.model_dump(mode="json") for t in spec.inputs],
            "outputs": [t.model_dump(mode="json") for t in spec.outputs],
            "engines": dict(spec.engines)}
        for m, spec in sorted(body.models.items())
    }
    return {
        "record": dict(rec),
        "name": body.name,
        "version": body.version,
        "description": body.description,
        "created": body.created,
        "expires": body.expires,
        "signatures": [{"keyid": str(s.get("keyid", "")), "alg": str(s.get("alg", s.get("algorithm", "")))}
                       for s in signatures if isinstance(s, dict)],
        "models": models,
        "router": body.router.model_dump(mode="json"),
        "postprocessing": body.postprocessing.kind,
        "files": [{"path": p, "size": f.size, "sha256": f.sha256} for p, f in sorted(body.files.items())],
        "total_size": body.total_size(),
        "verified_at_store": True,
    }
