"""The bundle store shared by several controllers: bundle records and objects in the registry's
database (PostgreSQL), each object in rows of `CHUNK_BYTES`, with a local cache of whole objects.

`fleet push` on any controller checks the bundle exactly as the file store does (hashes, signatures;
fleet/bundle_store.py), then uploads every object in chunks and marks it complete, and only then writes
the bundle's record, so a record always names objects that are all there. A controller that never saw
the push serves the bundle's chunks from its local cache: the first request for an object copies it
from the database into ``<state_dir>/store/objects`` (hash and size checked before it is renamed into
place), later requests are a `pread` like on a single controller. Serving stays off the database's hot
path; the database holds each object once however many controllers serve it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.errors import IntegrityError
from fleet.bundle_store import BundleRecordError, ControllerStore

log = logging.getLogger(__name__)

#: Bytes per database row of an object (bytea); a 4 GiB bundle is 4,096 rows.
CHUNK_BYTES = 1 << 20


class SharedBundleStore(ControllerStore):
    """`ControllerStore` whose records and objects live in the registry database."""

    def __init__(self, root: Path, registry) -> None:
        super().__init__(root)
        self.registry = registry
        self._fetch_lock = threading.Lock()
        self.materialized = 0

    def add_bundle(
        self, path: Path, *, max_manifest_bytes: int, max_bundle_bytes: int, trusted=None, threshold: int = 1
    ) -> Tuple[ManifestBody, str, int]:
        """Check and store a bundle locally (as the file store does), then upload it and its record."""
        body, msha, size = super().add_bundle(
            path, max_manifest_bytes=max_manifest_bytes, max_bundle_bytes=max_bundle_bytes, trusted=trusted,
            threshold=threshold,
        )
        self._upload(msha, size)
        for entry in body.files.values():
            self._upload(entry.sha256, entry.size)
        self._put_record(body.name, body.version, msha, size)
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
        """The local copy of an object, copied from the database first when this controller lacks it."""
        dest = super().object_path(sha256)
        if not dest.is_file():
            with self._fetch_lock:
                if not dest.is_file():
                    self._materialize(sha256, dest)
        return dest

    # ------------------------------------------------------------------------------------ internals

    def _upload(self, sha256: str, size: int) -> None:
        rows = self.registry.read("SELECT complete FROM bundle_objects WHERE sha256 = ?", (sha256,))
        if rows and rows[0]["complete"]:
            return
        self.registry.write(lambda tx: tx.execute(
            "INSERT INTO bundle_objects (sha256, size, chunk_bytes, complete) VALUES (?, ?, ?, 0) "
            "ON CONFLICT(sha256) DO NOTHING", (sha256, int(size), CHUNK_BYTES)))
        with open(str(super().object_path(sha256)), "rb") as f:
            idx = 0
            while True:
                data = f.read(CHUNK_BYTES)
                if not data and idx > 0:
                    break
                self.registry.write(lambda tx, i=idx, d=data: tx.execute(
                    "INSERT INTO bundle_chunks (sha256, idx, data) VALUES (?, ?, ?) "
                    "ON CONFLICT(sha256, idx) DO UPDATE SET data = excluded.data", (sha256, i, d)))
                idx += 1
                if len(data) < CHUNK_BYTES:
                    break
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
