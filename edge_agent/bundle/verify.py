"""The manifest verifier: bytes in, a verified `ManifestBody` or a typed error out.

Pure: no disk, no network, no clock. The caller passes the trusted keys, the threshold, the trusted
time (`trusted_now`) and the highest version it already trusts per bundle name, and persists new
trusted state only after this returns. Checks, in order (cheapest and least trusting first):

1. size limit on the raw bytes (ManifestError)
2. strict JSON: UTF-8, no duplicate keys, canonical form (one spelling per content, so the manifest's
   sha256 pins it), ``{"signed": {...}, "signatures": [...]}`` (ManifestError)
3. at least `threshold` distinct trusted Ed25519 signatures over the canonical JSON of ``signed``
   (SignatureError) — before the body is interpreted at all
4. the body validates as a ManifestBody (ManifestError)
5. version strictly above the highest trusted version for the name (RollbackError); checked even when
   the manifest has also expired
6. not expired against the trusted clock (ExpiredError)
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict, List, Mapping, Tuple

from pydantic import ValidationError

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.errors import ExpiredError, ManifestError, RollbackError
from edge_agent.protocol import boundedjson
from edge_agent.protocol.trusted_time import trusted_now  # noqa: F401 - re-exported for callers
from edge_agent.signing import CanonicalJSONError, PublicKey, canonical_json, verify_signatures

#: More signatures than this is not a manifest anyone wrote on purpose.
MAX_SIGNATURES = 32


def manifest_digest(raw: bytes) -> str:
    """Hex sha256 of the manifest bytes, as deploy commands and chunk requests name it."""
    return hashlib.sha256(raw).hexdigest()


def parse_document(raw: bytes, *, max_manifest_bytes: int) -> Tuple[Dict[str, Any], List[Any]]:
    """Split raw manifest bytes into (signed, signatures) without trusting either.

    Raises ManifestError for oversize, non-UTF-8, invalid or ambiguous JSON, or the wrong shape.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise ManifestError("manifest must be bytes")
    try:
        doc = boundedjson.loads(raw, max_bytes=max_manifest_bytes, what="manifest")
    except boundedjson.JSONInputError as e:
        raise ManifestError(str(e)) from None
    try:
        canonical = canonical_json(doc) == bytes(raw)
    except CanonicalJSONError as e:
        raise ManifestError("manifest is not canonical JSON: %s" % e)
    except RecursionError:
        raise ManifestError("manifest JSON is nested too deeply")
    if not canonical:
        # One spelling per content: the manifest's sha256 (which commands name) pins the document.
        raise ManifestError("manifest is not canonical JSON (sorted keys, no spaces, UTF-8)")
    if not isinstance(doc, dict) or set(doc) != {"signed", "signatures"}:
        raise ManifestError('manifest must be an object with exactly "signed" and "signatures"')
    signed, signatures = doc["signed"], doc["signatures"]
    if not isinstance(signed, dict):
        raise ManifestError('manifest "signed" must be an object')
    if not isinstance(signatures, list):
        raise ManifestError('manifest "signatures" must be a list')
    if len(signatures) > MAX_SIGNATURES:
        raise ManifestError("manifest carries %d signatures, at most %d allowed" % (len(signatures), MAX_SIGNATURES))
    for entry in signatures:
        sig = entry.get("sig") if isinstance(entry, dict) else None
        if isinstance(sig, str) and not _canonical_base64(sig):
            raise ManifestError("a manifest signature is not canonical base64")
    return signed, signatures


def _canonical_base64(text: str) -> bool:
    """True when `text` is the one standard base64 spelling of its bytes (no slack in the padding bits,
    so a signature cannot be re-spelled into a different manifest that still verifies)."""
    try:
        return base64.b64encode(base64.b64decode(text, validate=True)).decode("ascii") == text
    except (ValueError, UnicodeEncodeError):
        return False


def parse_body(signed: Mapping[str, Any]) -> ManifestBody:
    """Validate the ``signed`` part into a ManifestBody (ManifestError with the first problem)."""
    try:
        return ManifestBody.model_validate(dict(signed))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = " (and %d more problems)" % (e.error_count() - 1) if e.error_count() > 1 else ""
        raise ManifestError("manifest field %s: %s%s" % (loc, first["msg"], more))


def read_unverified(raw: bytes, *, max_manifest_bytes: int) -> ManifestBody:
    """Parse a manifest WITHOUT checking signatures, expiry or version (for `inspect` only)."""
    signed, _ = parse_document(raw, max_manifest_bytes=max_manifest_bytes)
    return parse_body(signed)


def verify_manifest(
    raw: bytes,
    *,
    trusted: Mapping[str, PublicKey],
    threshold: int,
    now: int,
    highest_versions: Mapping[str, int],
    max_manifest_bytes: int,
) -> ManifestBody:
    """Verify raw manifest bytes completely; returns the body only when every check passes.

    `trusted`: key id -> PublicKey. `now`: trusted Unix time (see `trusted_now`). `highest_versions`:
    bundle name -> highest version already trusted (absent = none). Raises ManifestError,
    SignatureError, RollbackError or ExpiredError.
    """
    signed, signatures = parse_document(raw, max_manifest_bytes=max_manifest_bytes)
    verify_signatures(signed, signatures, trusted, threshold)
    body = parse_body(signed)
    highest = int(highest_versions.get(body.name, 0))
    if body.version <= highest:
        raise RollbackError(
            "bundle %s version %d is not above the highest trusted version %d" % (body.name, body.version, highest)
        )
    if body.expires <= now:
        raise ExpiredError(
            "bundle %s version %d expired at %d (trusted time is %d)" % (body.name, body.version, body.expires, now)
        )
    return body
