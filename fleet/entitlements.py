"""Which device may fetch which bundle: the record of deploy commands the controller sent.

A device may fetch only a bundle that a deploy command (any mode) named for it. `Controller.send_command`
grants the entitlement just before it publishes the command, and the chunk server asks `allows` before it
reads a byte. The record survives restarts (a device resuming an interrupted pull after a controller
restart is still entitled) and is shared by every controller process that may answer the device:
`Entitlements` keeps it in a small SQLite file in the state dir (`fleet push` and `fleet serve` on one
host), `RegistryEntitlements` in the registry when several controllers share one (``registry.url``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Set, Tuple

Key = Tuple[str, str, int]


class Entitlements:
    """Grants (device, bundle name, version) when a deploy command is sent; answers `allows`."""

    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout_s, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS entitlements (device_id TEXT NOT NULL, name TEXT NOT NULL, "
                "version INTEGER NOT NULL, granted_at REAL NOT NULL, PRIMARY KEY (device_id, name, version))"
            )
        self._known: Set[Key] = set()

    def grant(self, device_id: str, name: str, version: int) -> None:
        """Let `device_id` fetch bundle `name` v`version` (idempotent)."""
        key = (device_id, name, int(version))
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO entitlements VALUES (?, ?, ?, ?)", (*key, time.time()))
            self._known.add(key)

    def allows(self, device_id: str, name: str, version: int) -> bool:
        """True when a deploy of this bundle was sent to this device (by this or another controller
        process sharing the state dir)."""
        key = (device_id, name, int(version))
        with self._lock:
            if key in self._known:
                return True
            row = self._db.execute(
                "SELECT 1 FROM entitlements WHERE device_id = ? AND name = ? AND version = ?", key
            ).fetchone()
            if row is not None:
                self._known.add(key)
            return row is not None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


class RegistryEntitlements:
    """The same record in the registry shared by several controllers (table ``fetch_entitlements``)."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self._known: Set[Key] = set()
        self._lock = threading.Lock()

    def grant(self, device_id: str, name: str, version: int) -> None:
        """Let `device_id` fetch bundle `name` v`version` (idempotent)."""
        self.registry.grant_fetch(device_id, name, int(version), now=time.time())
        with self._lock:
            self._known.add((device_id, name, int(version)))

    def allows(self, device_id: str, name: str, version: int) -> bool:
        """True when any controller sharing the registry sent this device a deploy of this bundle."""
        key = (device_id, name, int(version))
        with self._lock:
            if key in self._known:
                return True
        ok = self.registry.fetch_allowed(device_id, name, int(version))
        if ok:
            with self._lock:
                self._known.add(key)
        return ok

    def close(self) -> None:
        """Nothing to close: the registry belongs to the controller."""
