"""The device's content-addressed bundle store and its persistent state.

Layout under the state directory::

    objects/sha256/<hex>     verified files (read-only), named by their sha256
    partial/<hex>.part       a download in progress; <hex>.map its chunk map (JSON)
    bundles/<name>/<ver>/    a bundle's tree, hard links to its objects (what the engines read)
    quarantine/              objects that failed their hash at start-up (kept for inspection)
    state.json               active, previous, highest version per name, time floor, command seq,
                             the deployment in progress

`state.json` is replaced atomically (temp file, fsync, rename, fsync dir), so after ``kill -9`` or a
power cut it is either the old or the new state, never a mix. Objects only enter `objects/` after their
hash matched, and the active bundle's objects are never removed, so the active model stays complete.
What `state.json` holds is modelled in `store_state`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from pydantic import ValidationError

from edge_agent.bundle.manifest import ManifestBody, SignedManifest
from edge_agent.bundle.store_state import STATE_FORMAT, BundleRecord, StoreSnapshot, StoreState
from edge_agent.errors import IntegrityError, ManifestError, ResourceError
from edge_agent.fsutil import fsync_dir, sha256_file, write_atomic
from edge_agent.protocol.messages import DeployState

log = logging.getLogger(__name__)

HASH_BLOCK = 1 << 20


class BundleStore:
    """The content-addressed store plus `state.json`. Not thread-safe: one owner (the deploy worker)
    writes; readers take `state` snapshots."""

    def __init__(self, root: Path, *, quota_bytes: Optional[int] = None) -> None:
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.objects_dir = self.root / "objects" / "sha256"
        self.partial_dir = self.root / "partial"
        self.bundles_dir = self.root / "bundles"
        self.quarantine_dir = self.root / "quarantine"
        self.state_path = self.root / "state.json"
        self._state = StoreState()

    # ---------------------------------------------------------------------------------- lifecycle

    def open(self) -> BundleStore:
        """Create the layout, check the directory is writable, load `state.json`."""
        try:
            for d in (self.objects_dir, self.partial_dir, self.bundles_dir, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / (".write-test-%d" % os.getpid())
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ResourceError(
                "state dir %s is not writable (%s); it must belong to the service user" % (self.root, e.strerror)
            )
        self._state = self._load_state()
        for stale in self.root.glob(".state.json.*.tmp"):
            stale.unlink()
        return self

    def _load_state(self) -> StoreState:
        if not self.state_path.exists():
            return StoreState()
        try:
            raw = self.state_path.read_bytes()
            st = StoreState.model_validate(json.loads(raw))
        except (OSError, ValueError, ValidationError) as e:
            raise ResourceError(
                "%s is unreadable or invalid (%s); move it aside to start from an empty state" % (self.state_path, e)
            )
        if st.format != STATE_FORMAT:
            raise ResourceError("%s has format %d, this agent reads %d" % (self.state_path, st.format, STATE_FORMAT))
        return st

    @property
    def state(self) -> StoreState:
        """A copy of the current state."""
        return self._state.model_copy(deep=True)

    def update_state(self, **changes: Any) -> StoreState:
        """Apply `changes` and persist atomically. Memory follows the disk only after the write."""
        new = self._state.model_copy(update=changes, deep=True)
        new = StoreState.model_validate(new.model_dump())
        write_atomic(self.state_path, json.dumps(new.model_dump(mode="json"), indent=1, sort_keys=True).encode())
        self._state = new
        return self.state

    def snapshot(self) -> StoreSnapshot:
        """What an operation that may be refused must leave as it was (see `restore`)."""
        raw = self.state_path.read_bytes() if self.state_path.exists() else None
        return StoreSnapshot(state=self.state, state_bytes=raw, entries=self._entries())

    def restore(self, snap: StoreSnapshot) -> None:
        """Undo everything added since `snap`: new objects, partial files and bundle trees are removed
        and `state.json` gets its old bytes back (or is removed when there was none)."""
        for rel in sorted(self._entries() - snap.entries, reverse=True):  # children before parents
            p = self.root / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(str(p), ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass
        if snap.state_bytes is None:
            if self.state_path.exists():
                self.state_path.unlink()
        else:
            write_atomic(self.state_path, snap.state_bytes)
        self._state = snap.state.model_copy(deep=True)

    def _entries(self) -> Set[str]:
        out: Set[str] = set()
        for d in (self.objects_dir, self.partial_dir, self.bundles_dir):
            if d.is_dir():
                out.update(str(p.relative_to(self.root)) for p in d.iterdir())
        if self.bundles_dir.is_dir():
            out.update(str(p.relative_to(self.root)) for p in self.bundles_dir.glob("*/*"))
        return out

    # ---------------------------------------------------------------------------------- objects

    def object_path(self, sha256: str) -> Path:
        """Where the object with this hash lives (whether or not it exists)."""
        return self.objects_dir / sha256

    def has_object(self, sha256: str) -> bool:
        """True when the object is present."""
        return self.object_path(sha256).is_file()

    def add_object_file(self, src: Path, sha256: str, size: int, *, hashed: bool = False) -> Path:
        """Move a finished download into `objects/` after checking its size and hash (`hashed=True`:
        the caller already hashed every byte it wrote, e.g. the fetcher's running hash)."""
        src = Path(src)
        actual_size = src.stat().st_size
        if actual_size != size:
            raise IntegrityError("file %s… is %d bytes, expected %d" % (sha256[:12], actual_size, size))
        if not hashed:
            actual = sha256_file(src)
            if actual != sha256:
                raise IntegrityError("file %s… hashes to %s…" % (sha256[:12], actual[:12]))
        with open(src, "rb+") as f:
            os.fsync(f.fileno())
        dest = self.object_path(sha256)
        os.chmod(str(src), 0o444)
        os.replace(str(src), str(dest))
        fsync_dir(self.objects_dir)
        return dest

    def add_object_bytes(self, data: bytes, sha256: Optional[str] = None) -> str:
        """Store `data` as an object (checked against `sha256` when given); returns its hash."""
        actual = hashlib.sha256(data).hexdigest()
        if sha256 is not None and actual != sha256:
            raise IntegrityError("object %s… hashes to %s…" % (sha256[:12], actual[:12]))
        if not self.has_object(actual):
            self.check_quota(len(data))
            tmp = self.partial_dir / (actual + ".obj.tmp")
            tmp.write_bytes(data)
            self.add_object_file(tmp, actual, len(data))
        return actual

    def read_object(self, sha256: str, max_bytes: int) -> bytes:
        """Read a (small) object, e.g. a manifest, with a length cap."""
        p = self.object_path(sha256)
        if p.stat().st_size > max_bytes:
            raise ResourceError("object %s… is larger than %d bytes" % (sha256[:12], max_bytes))
        return p.read_bytes()

    def load_manifest(self, manifest_sha256: str, max_bytes: int = 16 << 20) -> ManifestBody:
        """The manifest body of a held bundle (its object was verified when it was stored)."""
        try:
            raw = self.read_object(manifest_sha256, max_bytes)
        except OSError as e:
            raise ManifestError("manifest object %s… is missing: %s" % (manifest_sha256[:12], e.strerror))
        try:
            return SignedManifest.model_validate(json.loads(raw)).signed
        except (ValueError, ValidationError) as e:
            raise ManifestError("stored manifest %s… does not parse: %s" % (manifest_sha256[:12], e))

    def missing_files(self, manifest: ManifestBody) -> Dict[str, Tuple[str, int]]:
        """Files of `manifest` the store does not hold: sha256 -> (path, size), one entry per hash."""
        out: Dict[str, Tuple[str, int]] = {}
        for path, entry in manifest.files.items():
            if not self.has_object(entry.sha256) and entry.sha256 not in out:
                out[entry.sha256] = (path, entry.size)
        return out

    def usage_bytes(self) -> int:
        """Bytes used by objects and partial downloads."""
        total = 0
        for d in (self.objects_dir, self.partial_dir):
            for p in d.iterdir():
                try:
                    total += p.stat().st_size
                except OSError:
                    pass
        return total

    def check_quota(self, extra_bytes: int) -> None:
        """ResourceError when `extra_bytes` more would pass the quota or the free disk space."""
        if self.quota_bytes is not None:
            used = self.usage_bytes()
            if used + extra_bytes > self.quota_bytes:
                raise ResourceError(
                    "store quota: %d bytes used + %d needed > limits.store_quota_bytes %d"
                    % (used, extra_bytes, self.quota_bytes)
                )
        free = shutil.disk_usage(str(self.root)).free
        if extra_bytes > free:
            raise ResourceError("disk full: %d bytes needed, %d free under %s" % (extra_bytes, free, self.root))

    # ---------------------------------------------------------------------------------- partials

    def partial_path(self, sha256: str) -> Path:
        """The in-progress download file of an object."""
        return self.partial_dir / (sha256 + ".part")

    def chunk_map_path(self, sha256: str) -> Path:
        """The chunk map of an in-progress download."""
        return self.partial_dir / (sha256 + ".map")

    def load_chunk_map(self, sha256: str) -> Optional[Dict[str, Any]]:
        """The persisted chunk map, or None when there is none (or it is unreadable)."""
        p = self.chunk_map_path(sha256)
        try:
            data = json.loads(p.read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_chunk_map(self, sha256: str, data: Dict[str, Any]) -> None:
        """Persist a chunk map atomically (the caller fsyncs the data file first)."""
        write_atomic(self.chunk_map_path(sha256), json.dumps(data, sort_keys=True).encode())

    def drop_partial(self, sha256: str) -> None:
        """Forget an in-progress download."""
        for p in (self.partial_path(sha256), self.chunk_map_path(sha256)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------------------------- bundles

    def bundle_dir(self, name: str, version: int) -> Path:
        """Where a held bundle's file tree lives."""
        return self.bundles_dir / name / str(version)

    def materialize(self, manifest: ManifestBody) -> Path:
        """Build the bundle's file tree from objects (hard links; copies across filesystems)."""
        dest = self.bundle_dir(manifest.name, manifest.version)
        if dest.is_dir() and all((dest / p).is_file() for p in manifest.files):
            return dest
        missing = self.missing_files(manifest)
        if missing:
            raise IntegrityError(
                "bundle %s v%d is missing %d file(s)" % (manifest.name, manifest.version, len(missing))
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".%d." % manifest.version, dir=str(dest.parent)))
        try:
            for path, entry in manifest.files.items():
                target = tmp / path
                target.parent.mkdir(parents=True, exist_ok=True)
                src = self.object_path(entry.sha256)
                try:
                    os.link(str(src), str(target))
                except OSError:
                    shutil.copyfile(str(src), str(target))
            if dest.exists():
                shutil.rmtree(str(dest))
            os.replace(str(tmp), str(dest))
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(str(tmp), ignore_errors=True)
            raise
        return dest

    def record_activation(self, record: BundleRecord, *, deploy: Optional[DeployState] = None,
                          clear_pending: bool = False) -> StoreState:
        """`record` becomes active, the old active becomes previous; the highest version is raised (and,
        with `clear_pending`, the finished deployment is forgotten in the same atomic write)."""
        st = self._state
        highest = dict(st.highest_versions)
        highest[record.name] = max(highest.get(record.name, 0), record.version)
        replaced = st.active is not None and st.active.manifest_sha256 != record.manifest_sha256
        previous = st.active if replaced else st.previous
        changes: Dict[str, Any] = {"active": record, "previous": previous, "highest_versions": highest}
        if deploy is not None:
            changes["deploy"] = deploy
        if clear_pending:
            changes["pending"] = None
        return self.update_state(**changes)

    def referenced_objects(self, extra_manifests: Iterable[str] = ()) -> Set[str]:
        """Hashes of every object a kept bundle (active, previous, `extra_manifests`) needs."""
        keep: Set[str] = set()
        manifests = [r.manifest_sha256 for r in (self._state.active, self._state.previous) if r is not None]
        manifests.extend(extra_manifests)
        for msha in manifests:
            if not self.has_object(msha):
                continue
            keep.add(msha)
            try:
                body = self.load_manifest(msha)
            except ManifestError:
                continue
            keep.update(e.sha256 for e in body.files.values())
        return keep

    def gc(self, *, keep_manifests: Iterable[str] = (), keep_partials: Iterable[str] = ()) -> Tuple[int, int]:
        """Remove objects, bundle trees and partials no kept bundle needs; returns (files, bytes)."""
        keep_manifests = list(keep_manifests)
        keep = self.referenced_objects(keep_manifests)
        keep_partial = set(keep_partials)
        removed = 0
        freed = 0
        for p in list(self.objects_dir.iterdir()):
            if p.name not in keep:
                freed += p.stat().st_size
                p.unlink()
                removed += 1
        for p in list(self.partial_dir.iterdir()):
            if p.name.split(".")[0] not in keep_partial:
                freed += p.stat().st_size
                p.unlink()
                removed += 1
        kept_trees = set()
        for r in (self._state.active, self._state.previous):
            if r is not None:
                kept_trees.add((r.name, str(r.version)))
        for msha in keep_manifests:
            try:
                b = self.load_manifest(msha)
                kept_trees.add((b.name, str(b.version)))
            except ManifestError:
                pass
        for name_dir in list(self.bundles_dir.iterdir()):
            if not name_dir.is_dir():
                continue
            for ver_dir in list(name_dir.iterdir()):
                if (name_dir.name, ver_dir.name) not in kept_trees:
                    shutil.rmtree(str(ver_dir), ignore_errors=True)
                    removed += 1
        if removed:
            fsync_dir(self.objects_dir)
            log.info("store gc removed %d entries, %d bytes", removed, freed)
        return removed, freed

    def check_objects(self) -> List[str]:
        """Start-up check: re-hash every object; move bad ones to `quarantine/`. Returns their hashes."""
        bad: List[str] = []
        for p in sorted(self.objects_dir.iterdir()):
            try:
                ok = len(p.name) == 64 and sha256_file(p) == p.name
            except OSError:
                ok = False
            if not ok:
                dest = self.quarantine_dir / ("%s.%d" % (p.name, int(time.time())))
                os.replace(str(p), str(dest))
                bad.append(p.name)
                log.error("object %s failed its hash check; quarantined as %s", p.name, dest.name)
        if bad:
            fsync_dir(self.objects_dir)
            # Bundle trees hard-link the objects; rebuild them from good objects later.
            for r in (self._state.active, self._state.previous):
                if r is not None:
                    shutil.rmtree(str(self.bundle_dir(r.name, r.version)), ignore_errors=True)
        return bad
