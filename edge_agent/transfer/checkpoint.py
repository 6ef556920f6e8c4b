"""Saving download progress off the transfer thread: sync a partial file's data, then its chunk map."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Dict, Optional

from edge_agent.bundle.store import BundleStore

log = logging.getLogger(__name__)


class Checkpointer:
    """Syncs partial files and saves their chunk maps off the transfer thread, so a checkpoint (an
    fdatasync of up to a second of received data) never stalls the pull. The map saved is a snapshot
    taken before the sync started: it never claims a chunk whose bytes are not on disk."""

    def __init__(self, store: BundleStore) -> None:
        self.store = store
        self._q: queue.Queue = queue.Queue()
        self._busy: set = set()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None

    def submit(self, fd: int, sha256: str, snapshot: Dict[str, Any]) -> bool:
        """Queue a checkpoint (False: one for this file is still running; try again later)."""
        with self._lock:
            if sha256 in self._busy:
                return False
            self._busy.add(sha256)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
            self._thread.start()
        self._q.put((os.dup(fd), sha256, snapshot))
        return True

    def wait(self) -> None:
        """Until every queued checkpoint is done."""
        self._q.join()

    def _run(self) -> None:
        while True:
            fd, sha256, snapshot = self._q.get()
            try:
                getattr(os, "fdatasync", os.fsync)(fd)
                self.store.save_chunk_map(sha256, snapshot)
            except OSError as e:
                self.error = "cannot save download progress: %s" % e
                log.error("%s", self.error)
            finally:
                os.close(fd)
                with self._lock:
                    self._busy.discard(sha256)
                self._q.task_done()
