"""The engine cache: built plans under `<cache_dir>/engines/`, each with a metadata JSON beside it.

An entry is used only when its metadata matches this device and this request exactly (TensorRT version,
compute capability, L4T release, device name, precision, profile, ONNX sha256) and the plan's sha256 is
what the metadata says. Anything else — missing, mismatched, corrupt, or a plan TensorRT refuses to
deserialize — is a miss, and the caller rebuilds. The cache never raises for bad entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from edge_agent.errors import ResourceError
from edge_agent.fsutil import sha256_file, write_atomic

log = logging.getLogger(__name__)

META_SCHEMA = "edge-agent/engine-meta/1"
STALE_TEMP_S = 3600.0  #: temporaries older than this are leftovers of a killed build, not one in progress


def _clear_squatter(path: Path) -> None:
    """Remove whatever sits at `path` when it is not a regular file (a directory, a link, a device left
    by hand or by a broken tool), so the rebuilt entry can be written where it belongs."""
    if os.path.lexists(str(path)) and (path.is_symlink() or not path.is_file()):
        log.warning("engine cache: %s is not a regular file; removing it", path)
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(str(path))
        else:
            path.unlink()


@dataclass(frozen=True)
class EngineKey:
    """What a plan depends on. `digest` names the cache entry."""

    onnx_sha256: str
    platform_key: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    flags: List[str] = field(default_factory=list)

    def digest(self) -> str:
        """Stable 32-hex-digit name for this key."""
        raw = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:32]


class EngineCache:
    """Plans + metadata, timing caches and batch-tuning results under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("engines", "timing", "tuning"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResourceError("engine cache %s is not writable (%s): fix its owner or permissions"
                                % (self.root, e.strerror))
        if not os.access(str(self.root / "engines"), os.W_OK):
            raise ResourceError("engine cache %s is not writable: fix its owner or permissions" % self.root)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self, older_than_s: float = STALE_TEMP_S) -> None:
        """Half-written files of builds killed mid-write (young ones may belong to a build in progress)."""
        import time

        now = time.time()
        for sub in ("engines", "timing", "tuning"):
            for p in (self.root / sub).glob(".*.tmp"):
                try:
                    if now - p.stat().st_mtime > older_than_s:
                        p.unlink()
                except OSError:
                    pass

    def plan_path(self, key: EngineKey) -> Path:
        """Where the plan for `key` lives."""
        return self.root / "engines" / ("%s.plan" % key.digest())

    def meta_path(self, key: EngineKey) -> Path:
        """Where the metadata for `key` lives."""
        return self.root / "engines" / ("%s.json" % key.digest())

    def timing_cache_path(self, platform_key: str) -> Path:
        """The persisted TensorRT timing cache for a platform."""
        return self.root / "timing" / ("%s.cache" % platform_key)

    def lookup(self, key: EngineKey, expected: Dict[str, Any]) -> Optional[Path]:
        """The plan path when a valid entry matches `key` and every `expected` metadata field; else None."""
        meta_file, plan_file = self.meta_path(key), self.plan_path(key)
        if not meta_file.exists() or not plan_file.exists():
            return None
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            log.warning("engine cache entry %s has unreadable metadata (%s): rebuilding", meta_file.name, e)
            return None
        if not isinstance(meta, dict) or meta.get("schema") != META_SCHEMA:
            log.warning("engine cache entry %s has unknown metadata: rebuilding", meta_file.name)
            return None
        want = dict(expected, key=asdict(key))
        for name, value in want.items():
            if meta.get(name) != value:
                log.info("engine cache entry %s: %s is %r, need %r: rebuilding", meta_file.name, name,
                         meta.get(name), value)
                return None
        try:
            actual = sha256_file(plan_file)
        except OSError:
            return None
        if actual != meta.get("plan_sha256"):
            log.warning("engine cache plan %s does not match its metadata hash: rebuilding", plan_file.name)
            return None
        return plan_file

    def store(self, key: EngineKey, plan_file: Path, meta: Dict[str, Any]) -> Path:
        """Move a freshly built plan into the cache and write its metadata (plan first, then metadata)."""
        dest = self.plan_path(key)
        if Path(plan_file) != dest:
            _clear_squatter(dest)
            os.replace(str(plan_file), str(dest))
        _clear_squatter(self.meta_path(key))
        body = dict(meta, schema=META_SCHEMA, key=asdict(key), plan_sha256=sha256_file(dest),
                    plan_bytes=dest.stat().st_size)
        write_atomic(self.meta_path(key), json.dumps(body, indent=1, sort_keys=True).encode(), make_parents=True)
        return dest

    def read_meta(self, key: EngineKey) -> Optional[Dict[str, Any]]:
        """The metadata of an entry, or None."""
        try:
            meta = json.loads(self.meta_path(key).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def invalidate(self, key: EngineKey) -> None:
        """Remove an entry (metadata first, so a crash in between leaves a plan without metadata = a miss)."""
        for path in (self.meta_path(key), self.plan_path(key)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove %s: %s", path, e.strerror)

    # ---------------------------------------------------------------------------------- tuning results

    def tuning_path(self, name: str) -> Path:
        """Where a tuning result is persisted."""
        return self.root / "tuning" / ("%s.json" % name)

    def load_tuning(self, name: str) -> Optional[Dict[str, Any]]:
        """A persisted tuning result, or None."""
        try:
            data = json.loads(self.tuning_path(name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_tuning(self, name: str, data: Dict[str, Any]) -> None:
        """Persist a tuning result atomically."""
        _clear_squatter(self.tuning_path(name))
        write_atomic(self.tuning_path(name), json.dumps(data, indent=1, sort_keys=True).encode(), make_parents=True)
