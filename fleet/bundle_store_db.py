"""The bundle store shared by several controllers: bundle records and objects in the registry's
database (PostgreSQL), each object in rows of `CHUNK_BYTES`, with a local cache of whole objects.

`fleet push` on any controller checks the bundle exactly as the file store does (hashes, signatures;
fleet/bundle_store.py), then uploads every object in chunks and marks it complete, and only then writes
the bundle's record, so a record always names objects that are all there. A controller that never saw
the push serves the bundle's chunks from its local cache: the first request for an object copies it
from the database into ``<state_dir>/store/objects`` (hash and size checked before it is renamed into
place), later requests are a `pread` like on a single controller. Serving stays off the database's hot
path; the database holds each object once however many controllers serve it.

The local cache is bounded (`cache_bytes`, ``[registry] store_cache_bytes``): when a new copy takes it
over the bound, the least recently used copies are deleted (used = opened for serving, or served a
chunk of), never one with a descriptor out for serving (`open_object` .. `release_object`; the chunk
server gives its descriptors back as soon as it has no request waiting), so the cache can exceed the
bound only by the objects being served at that moment. An evicted object is copied again on its next
request. A cached copy is hashed before this process first serves it and again whenever its size,
inode or modification time changed since, and a copy that does not match its hash is deleted and
copied again from the database: a damaged cached copy is never served (damage that leaves the file's
metadata alone is caught at the next controller start).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.errors import IntegrityError
from edge_agent.fsutil import sha256_file
from fleet.bundle_store import BundleRecordError, ControllerStore

log = logging.getLogger(__name__)

#: Bytes per database row of an object (bytea); a 4 GiB bundle is 4,096 rows.
CHUNK_BYTES = 1 << 20
#: Default bound of the local object cache (bytes).
CACHE_BYTES = 8 << 30

#: What identifies a file's content between two hash checks: (inode, size, modification time in ns).
_Stamp = Tuple[int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class SharedBundleStore(ControllerStore):
    """`ControllerStore` whose records and objects live in the registry database."""

    def __init__(self, root: Path, registry, *, cache_bytes: int = CACHE_BYTES) -> None:
        super().__init__(root)
        self.registry = registry
        self.cache_bytes = int(cache_bytes)
        self._fetch_lock = threading.Lock()  # one copy or hash check at a time
        self._cache_lock = threading.Lock()  # the LRU order, sizes, pins
        #: Local copies, least recently used first: sha256 -> size.
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._verified: Dict[str, _Stamp] = {}
        self._pins: Dict[str, int] = {}
        self.materialized = 0
        self.evicted = 0
        self.corrupt = 0
        self._scan()

    def add_bundle(
        self, path: Path, *, max_manifest_bytes: int, max_bundle_bytes: int, trusted=None, threshold: int = 1
    ) -> Tuple[ManifestBody, str, int]:
        """Check and store a bundle locally (as the file store does), then upload it and its record."""
        body, msha, size = super().add_bundle(
            path, max_manifest_bytes=max_manifest_bytes, max_bundle_bytes=max_bundle_bytes, trusted=trusted,
            threshold=threshold,
        )
        shas = [msha, *(entry.sha256 for entry in body.files.values())]
        with self._cache_lock:  # uploaded from the local copies: none may go before it is in the database
            for sha in shas:
                self._pins[sha] = self._pins.get(sha, 0) + 1
        try:
            self._upload(msha, size)
            for entry in body.files.values():
                self._upload(entry.sha256, entry.size)
            self._put_record(body.name, body.version, msha, size)
            for sha in shas:
                self._remember(sha, verified=False)
        finally:
            for sha in shas:
                self._unpin(sha)
        self._evict()
        return body, msha, size

    def record(self, name: str, version: int) -> Dict[str, object]:
        """The shared record of a bundle (BundleRecordError when no controller stored it)."""
        rows = self.registry.read(
            "SELECT manifest_sha256, manifest_size FROM bundle_records WHERE name = ? AND version = ?",
            (name, int(version)),
        )
        if not rows:
            raise BundleRecordError("the controller does not store bundle %s v%d" % (name, version))
        return {"name": name, "version": int(version), "manifest_sha256": rows[0]["manifest_sha256"],
                "manifest_size": int(rows[0]["manifest_size"])}

    def object_path(self, sha256: str) -> Path:
        """The local copy of an object, checked against its hash, copied from the database first when
        this controller lacks it. (It may be evicted once this returns: to read it, `open_object`.)"""
        self._pin(sha256)
        try:
            return self._local(sha256)
        finally:
            self._unpin(sha256)
            self._evict()

    def open_object(self, sha256: str) -> int:
        """A descriptor of the checked local copy; the copy is not evicted until `release_object`."""
        self._pin(sha256)
        try:
            return os.open(str(self._local(sha256)), os.O_RDONLY)
        except BaseException:
            self._unpin(sha256)
            raise
        finally:
            self._evict()

    def release_object(self, sha256: str, fd: int) -> None:
        """Close a descriptor from `open_object`; the copy may be evicted from now on."""
        os.close(fd)
        self._unpin(sha256)

    def touch(self, sha256: str) -> None:
        """The object was just served: it is the most recently used."""
        with self._cache_lock:
            if sha256 in self._lru:
                self._lru.move_to_end(sha256)

    def cached_bytes(self) -> int:
        """Bytes of the local copies."""
        with self._cache_lock:
            return sum(self._lru.values())

    # ------------------------------------------------------------------------------------ cache

    def _scan(self) -> None:
        """The copies already on disk (from before a restart), oldest modification first."""
        found = []
        for p in self.objects.iterdir():
            if p.name.startswith("."):
                continue  # a copy in progress (another process sharing this folder) or left by a crash
            try:
                st = p.stat()
            except OSError:
                continue
            found.append((st.st_mtime_ns, p.name, st.st_size))
        for _mtime, sha, size in sorted(found):
            self._lru[sha] = size
        self._evict()

    def _local(self, sha256: str) -> Path:
        """Make sure the local copy is there and matches its hash (copying it again when it does not)."""
        dest = ControllerStore.object_path(self, sha256)
        with self._fetch_lock:
            try:
                st: Optional[os.stat_result] = dest.stat()
            except FileNotFoundError:
                st = None
            if st is not None and self._verified.get(sha256) != _stamp(st):
                if sha256_file(dest) == sha256:
                    self._verified[sha256] = _stamp(st)
                else:
                    self.corrupt += 1
                    log.warning("cached bundle object %s… does not match its hash; copying it again", sha256[:12])
                    dest.unlink()
                    st = None
            if st is None:
                self._materialize(sha256, dest)
                self._verified[sha256] = _stamp(dest.stat())
        self._remember(sha256, verified=True)
        return dest

    def _remember(self, sha256: str, *, verified: bool) -> None:
        dest = ControllerStore.object_path(self, sha256)
        try:
            st = dest.stat()
        except FileNotFoundError:
            return
        with self._cache_lock:
            self._lru[sha256] = st.st_size
            self._lru.move_to_end(sha256)
            if verified and sha256 not in self._verified:
                self._verified[sha256] = _stamp(st)

    def _pin(self, sha256: str) -> None:
        with self._cache_lock:
            self._pins[sha256] = self._pins.get(sha256, 0) + 1

    def _unpin(self, sha256: str) -> None:
        with self._cache_lock:
            n = self._pins.get(sha256, 0) - 1
            if n > 0:
                self._pins[sha256] = n
            else:
                self._pins.pop(sha256, None)

    def _evict(self) -> None:
        """Delete least recently used copies until the cache fits its bound: never a pinned one, nor the
        most recently used (the one a caller just asked for, even when it alone is over the bound)."""
        with self._cache_lock:
            total = sum(self._lru.values())
            for sha in list(self._lru)[:-1]:
                if total <= self.cache_bytes:
                    break
                if self._pins.get(sha):
                    continue
                try:
                    os.unlink(str(ControllerStore.object_path(self, sha)))
                except FileNotFoundError:
                    pass
                total -= self._lru.pop(sha)
                self._verified.pop(sha, None)
                self.evicted += 1
                log.info("bundle object %s… evicted from the local cache", sha[:12])

    # ------------------------------------------------------------------------------------ internals

    def _upload(self, sha256: str, size: int) -> None:
        rows = self.registry.read("SELECT complete FROM bundle_objects WHERE sha256 = ?", (sha256,))
        if rows and rows[0]["complete"]:
            return
        self.registry.write(lambda tx: tx.execute(
            "INSERT INTO bundle_objects (sha256, size, chunk_bytes, complete) VALUES (?, ?, ?, 0) "
            "ON CONFLICT(sha256) DO NOTHING", (sha256, int(size), CHUNK_BYTES)))
        h = hashlib.sha256()
        with open(str(ControllerStore.object_path(self, sha256)), "rb") as f:
            idx = 0
            while True:
                data = f.read(CHUNK_BYTES)
                h.update(data)
                if not data and idx > 0:
                    break
                self.registry.write(lambda tx, i=idx, d=data: tx.execute(
                    "INSERT INTO bundle_chunks (sha256, idx, data) VALUES (?, ?, ?) "
                    "ON CONFLICT(sha256, idx) DO UPDATE SET data = excluded.data", (sha256, i, d)))
                idx += 1
                if len(data) < CHUNK_BYTES:
                    break
        if h.hexdigest() != sha256:  # a damaged local copy never becomes every controller's copy
            raise IntegrityError("local bundle object %s… does not match its hash; not uploaded" % sha256[:12])
        self.registry.write(lambda tx: tx.execute("UPDATE bundle_objects SET complete = 1 WHERE sha256 = ?",
                                                  (sha256,)))

    def _put_record(self, name: str, version: int, msha: str, size: int) -> None:
        def write(tx) -> Optional[str]:
            tx.execute(
                "INSERT INTO bundle_records (name, version, manifest_sha256, manifest_size, created) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name, version) DO NOTHING",
                (name, int(version), msha, int(size), time.time()),
            )
            rows = tx.fetchall("SELECT manifest_sha256 FROM bundle_records WHERE name = ? AND version = ?",
                               (name, int(version)))
            return str(rows[0]["manifest_sha256"])

        held = self.registry.write(write)
        if held != msha:  # another controller stored a different build under this version meanwhile
            raise BundleRecordError(
                "bundle %s v%d is already stored with a different manifest; build it with a higher version"
                % (name, version)
            )

    def _chunks(self, sha256: str) -> Iterator[bytes]:
        rows = self.registry.read("SELECT size, chunk_bytes, complete FROM bundle_objects WHERE sha256 = ?",
                                  (sha256,))
        if not rows or not rows[0]["complete"]:
            raise BundleRecordError("object %s… is not in the shared store" % sha256[:12])
        size, step = int(rows[0]["size"]), int(rows[0]["chunk_bytes"])
        for idx in range(max(1, -(-size // step))):
            got = self.registry.read("SELECT data FROM bundle_chunks WHERE sha256 = ? AND idx = ?", (sha256, idx))
            if not got:
                raise IntegrityError("object %s… lacks chunk %d in the shared store" % (sha256[:12], idx))
            yield bytes(got[0]["data"])

    def _materialize(self, sha256: str, dest: Path) -> None:
        tmp = dest.with_name(".%s.fetch" % sha256)
        h = hashlib.sha256()
        n = 0
        try:
            with open(str(tmp), "wb") as f:
                for data in self._chunks(sha256):
                    h.update(data)
                    n += len(data)
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if h.hexdigest() != sha256:
                raise IntegrityError("object %s… from the shared store does not match its hash" % sha256[:12])
            os.replace(str(tmp), str(dest))
        finally:
            if tmp.exists():
                tmp.unlink()
        self.materialized += 1
        log.info("bundle object %s… (%d bytes) copied from the shared store", sha256[:12], n)
