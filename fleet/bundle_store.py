"""The controller's bundle store: bundles it can serve, as ``objects/sha256/<hex>`` plus
``bundles/<name>/<version>.json`` records naming each bundle's manifest and files."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, Tuple

from edge_agent.bundle.archive import read_bundle
from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.verify import manifest_digest, read_unverified, verify_manifest
from edge_agent.errors import BundleError, IntegrityError
from edge_agent.fsutil import fsync_dir, sha256_file, write_atomic


class BundleRecordError(BundleError):
    """The controller does not hold the named bundle."""


class ControllerStore:
    """Bundles the controller can serve: ``objects/sha256/<hex>`` plus ``bundles/<name>/<version>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects" / "sha256"
        self.bundles = self.root / "bundles"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.bundles.mkdir(parents=True, exist_ok=True)
        self._index: Dict[Tuple[str, int], Dict[str, int]] = {}
        self._lock = threading.Lock()

    def add_bundle(
        self, path: Path, *, max_manifest_bytes: int, max_bundle_bytes: int, trusted=None, threshold: int = 1
    ) -> Tuple[ManifestBody, str, int]:
        """Copy a bundle file's manifest and members into the store after checking every member's
        hash (and the signatures when `trusted` keys are given). Returns (manifest, sha256, size)."""
        raw, reader = read_bundle(Path(path), max_manifest_bytes=max_manifest_bytes, max_bundle_bytes=max_bundle_bytes)
        with reader:
            early = read_unverified(raw, max_manifest_bytes=max_manifest_bytes)
            try:
                held = self.record(early.name, early.version)
            except BundleRecordError:
                held = None
            if held is not None and held.get("manifest_sha256") != manifest_digest(raw):
                # Devices may be fetching the stored one right now; a new build needs a new version.
                raise BundleRecordError(
                    "bundle %s v%d is already stored with a different manifest; build it with a higher version"
                    % (early.name, early.version)
                )
            if trusted:
                body = verify_manifest(
                    raw, trusted=trusted, threshold=threshold, now=int(time.time()), highest_versions={},
                    max_manifest_bytes=max_manifest_bytes,
                )
            else:
                body = read_unverified(raw, max_manifest_bytes=max_manifest_bytes)
            names = {m.name for m in reader.files()}
            missing = sorted(set(body.files) - names)
            if missing:
                raise IntegrityError("bundle %s lacks manifest file(s): %s" % (path, ", ".join(missing)))
            for member_path, entry in body.files.items():
                dest = self.objects / entry.sha256
                if dest.is_file():
                    continue
                tmp = self.objects / (".%s.tmp" % entry.sha256)
                with open(tmp, "wb") as f:
                    for block in reader.iter_chunks(member_path):
                        f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
                if tmp.stat().st_size != entry.size or sha256_file(tmp) != entry.sha256:
                    tmp.unlink()
                    raise IntegrityError("bundle %s: %s does not match its manifest entry" % (path, member_path))
                os.replace(str(tmp), str(dest))
            msha = manifest_digest(raw)
            mdest = self.objects / msha
            if not mdest.is_file():
                write_atomic(mdest, raw)
        record = {"name": body.name, "version": body.version, "manifest_sha256": msha, "manifest_size": len(raw)}
        rdir = self.bundles / body.name
        rdir.mkdir(parents=True, exist_ok=True)
        write_atomic(rdir / ("%d.json" % body.version), json.dumps(record, sort_keys=True).encode())
        fsync_dir(self.objects)
        with self._lock:
            self._index.pop((body.name, body.version), None)
        return body, msha, len(raw)

    def record(self, name: str, version: int) -> Dict[str, object]:
        """The stored record of a bundle (BundleRecordError when unknown)."""
        p = self.bundles / name / ("%d.json" % version)
        try:
            return json.loads(p.read_bytes())
        except (OSError, ValueError):
            raise BundleRecordError("the controller does not store bundle %s v%d" % (name, version))

    def allowed(self, name: str, version: int) -> Dict[str, int]:
        """Hash -> size of everything a device may fetch for this bundle (manifest included)."""
        key = (name, version)
        with self._lock:
            hit = self._index.get(key)
        if hit is not None:
            return hit
        rec = self.record(name, version)
        msha = str(rec["manifest_sha256"])
        raw = self.read_object(msha)
        body = read_unverified(raw, max_manifest_bytes=len(raw) + 1)
        allowed = {msha: len(raw)}
        for entry in body.files.values():
            allowed[entry.sha256] = entry.size
        with self._lock:
            self._index[key] = allowed
        return allowed

    def object_path(self, sha256: str) -> Path:
        """Where an object lives."""
        return self.objects / sha256

    def open_object(self, sha256: str) -> int:
        """A read-only file descriptor of an object, for serving; give it back with `release_object`
        (a store with a bounded cache never evicts an object while a descriptor of it is out)."""
        return os.open(str(self.object_path(sha256)), os.O_RDONLY)

    def release_object(self, sha256: str, fd: int) -> None:
        """Close a descriptor from `open_object`."""
        os.close(fd)

    def touch(self, sha256: str) -> None:
        """The object was just served (a bounded cache keeps recently served objects longest)."""

    def read_object(self, sha256: str) -> bytes:
        """An object's bytes (small objects: manifests)."""
        fd = self.open_object(sha256)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            self.release_object(sha256, fd)
