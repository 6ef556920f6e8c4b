"""Canonical JSON and Ed25519 signatures shared by bundle manifests and controller commands.

A signed document is ``{"signed": {...}, "signatures": [{"keyid": ..., "sig": ...}]}``. The signature
is Ed25519 over the canonical JSON of ``signed``: keys sorted, no insignificant whitespace, UTF-8,
integers only (floats are refused, their text form is not canonical across languages).
The key id is the hex sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

from edge_agent.errors import SignatureError

PUBLIC_KEY_HEADER = "edge-agent-ed25519-pub"
PRIVATE_KEY_HEADER = "edge-agent-ed25519-key"


class CanonicalJSONError(ValueError):
    """The value cannot be written as canonical JSON."""


def _check_canonical(value: Any, path: str = "$") -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        raise CanonicalJSONError("%s: floats are not allowed in signed documents; use integers or strings" % path)
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_canonical(v, "%s[%d]" % (path, i))
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalJSONError("%s: object keys must be strings" % path)
            _check_canonical(v, "%s.%s" % (path, k))
        return
    raise CanonicalJSONError("%s: %s is not a JSON type" % (path, type(value).__name__))


def canonical_json(value: Any) -> bytes:
    """The canonical encoding that signatures cover."""
    _check_canonical(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def keyid_of(public_raw: bytes) -> str:
    """Key id: hex sha256 of the raw public key."""
    return hashlib.sha256(public_raw).hexdigest()


class PublicKey:
    """A trusted Ed25519 public key with its key id."""

    def __init__(self, raw: bytes, name: str = "") -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if len(raw) != 32:
            raise SignatureError("an Ed25519 public key is 32 bytes, got %d" % len(raw))
        self.raw = raw
        self.name = name
        self.keyid = keyid_of(raw)
        self._key = Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, sig: bytes, data: bytes) -> bool:
        """True when `sig` is this key's signature over `data`."""
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(sig, data)
        except InvalidSignature:
            return False
        return True

    def to_text(self) -> str:
        """The `.pub` file form."""
        return "%s %s %s\n" % (PUBLIC_KEY_HEADER, base64.b64encode(self.raw).decode("ascii"), self.name)

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse the `.pub` file form."""
        parts = text.strip().split()
        if len(parts) < 2 or parts[0] != PUBLIC_KEY_HEADER:
            raise SignatureError("not an edge-agent public key (expected '%s <base64> [name]')" % PUBLIC_KEY_HEADER)
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except ValueError:
            raise SignatureError("public key is not valid base64")
        return cls(raw, parts[2] if len(parts) > 2 else "")

    @classmethod
    def load(cls, path: Path) -> PublicKey:
        """Read a `.pub` file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SignatureError("cannot read public key %s: %s" % (path, e))
        return cls.from_text(text)


class PrivateKey:
    """An Ed25519 signing key."""

    def __init__(self, seed: bytes, name: str = "") -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if len(seed) != 32:
            raise SignatureError("an Ed25519 private key is 32 bytes, got %d" % len(seed))
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._seed = seed
        self.name = name
        self.public = PublicKey(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), name)
        self.keyid = self.public.keyid

    @classmethod
    def generate(cls, name: str = "") -> PrivateKey:
        """A new random key."""
        return cls(os.urandom(32), name)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature over `data`."""
        return self._key.sign(data)

    def to_text(self) -> str:
        """The `.key` file form (keep it mode 0600)."""
        return "%s %s %s\n" % (PRIVATE_KEY_HEADER, base64.b64encode(self._seed).decode("ascii"), self.name)

    @classmethod
    def load(cls, path: Path) -> PrivateKey:
        """Read a `.key` file."""
        try:
            parts = Path(path).read_text(encoding="utf-8").strip().split()
        except (OSError, UnicodeDecodeError) as e:
            raise SignatureError("cannot read private key %s: %s" % (path, e))
        if len(parts) < 2 or parts[0] != PRIVATE_KEY_HEADER:
            raise SignatureError("%s is not an edge-agent private key" % path)
        try:
            seed = base64.b64decode(parts[1], validate=True)
        except ValueError:
            raise SignatureError("%s: private key is not valid base64" % path)
        return cls(seed, parts[2] if len(parts) > 2 else "")


def load_public_keys(paths: Iterable[Path]) -> Dict[str, PublicKey]:
    """Load `.pub` files (a directory means every `*.pub` in it), keyed by key id."""
    keys: Dict[str, PublicKey] = {}
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
        for f in files:
            k = PublicKey.load(f)
            keys[k.keyid] = k
    return keys


def sign_document(signed: Dict[str, Any], keys: Iterable[PrivateKey]) -> Dict[str, Any]:
    """Wrap `signed` with one signature per key."""
    data = canonical_json(signed)
    sigs: List[Dict[str, str]] = []
    for k in keys:
        sigs.append({"keyid": k.keyid, "sig": base64.b64encode(k.sign(data)).decode("ascii")})
    return {"signed": signed, "signatures": sigs}


def verify_signatures(
    signed: Mapping[str, Any], signatures: Any, trusted: Mapping[str, PublicKey], threshold: int
) -> List[str]:
    """Check that at least `threshold` distinct trusted keys signed `signed`.

    Returns the key ids whose signatures verified; raises SignatureError otherwise. Signatures by
    unknown keys are ignored (they may belong to a key rotated out), duplicates count once.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if not isinstance(signatures, list) or not signatures:
        raise SignatureError("document is unsigned")
    try:
        data = canonical_json(signed)
    except CanonicalJSONError as e:
        raise SignatureError("signed part is not canonical: %s" % e)
    good: List[str] = []
    seen_untrusted = False
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str) or not isinstance(
            entry.get("sig"), str
        ):
            raise SignatureError("malformed signature entry")
        key = trusted.get(entry["keyid"])
        if key is None:
            seen_untrusted = True
            continue
        if entry["keyid"] in good:
            continue
        try:
            sig = base64.b64decode(entry["sig"], validate=True)
        except ValueError:
            raise SignatureError("signature of key %s is not valid base64" % entry["keyid"][:12])
        if key.verify(sig, data):
            good.append(entry["keyid"])
    if len(good) < threshold:
        if not good and seen_untrusted:
            raise SignatureError("signed only by keys this device does not trust")
        raise SignatureError("%d valid trusted signature(s), %d required" % (len(good), threshold))
    return good
