"""Windowed, resumable pull of bundle files over MQTT 5.

The device publishes `ChunkRequest`s to its own ``{p}/devices/{id}/fetch`` with the MQTT 5 response topic
set to its own ``{p}/devices/{id}/chunks`` and a fresh correlation id per request. The controller answers with the
raw bytes; ``sha256``, ``offset``, ``length`` and ``total`` travel as user properties. At most
``transfer.window`` requests are outstanding. Every answer is checked against its request (hash, offset,
length, total); a bad one is re-requested, an unsolicited one is dropped. Chunks are written in place
into ``partial/<sha256>.part`` and the chunk map is saved (after an fsync of the data) every few
chunks, so a restarted agent, or one that lived through a broker outage, only asks for what it lacks.
A finished file must match its sha256 before it enters the store; if it does not (e.g. a forged chunk
slipped in), the whole file is fetched again, a bounded number of times.

A file being pulled is a `transfer.partial.PartialFile`; progress is saved by `transfer.checkpoint`.
This module stays over 400 lines on purpose: it is one transfer loop (`Fetcher._run` and its named
steps) over one shared run state, which reads best in one place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from edge_agent.bundle.store import BundleStore
from edge_agent.config import TransferConfig
from edge_agent.errors import IntegrityError, ManifestError, ResourceError, TransportError
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import BundleRef, ChunkRequest
from edge_agent.transfer.checkpoint import Checkpointer
from edge_agent.transfer.chunkmap import ChunkMap
from edge_agent.transfer.partial import PartialFile, PendingRequest

log = logging.getLogger(__name__)

Emit = Callable[[str, str, dict], None]

class TransferCancelled(TransportError):
    """The transfer was cancelled (agent shutting down)."""


@dataclass
class FetchStats:
    """What one transfer did, for events and the benchmark."""

    bytes_total: int = 0
    bytes_received: int = 0
    bytes_resumed: int = 0
    chunks_received: int = 0
    requests_sent: int = 0
    retries: int = 0
    bad_chunks: int = 0
    stray_chunks: int = 0
    files_refetched: int = 0
    elapsed_s: float = 0.0
    #: CPU seconds the whole agent process used during the transfer (all threads: receive, hash, write).
    cpu_s: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class _Run:
    bundle: BundleRef
    stats: FetchStats
    outstanding: Dict[bytes, PendingRequest] = field(default_factory=dict)
    remaining: Dict[str, PartialFile] = field(default_factory=dict)
    pending: List[Tuple[PartialFile, int]] = field(default_factory=list)
    started: float = 0.0
    #: When the last fetch-progress went out, and bytes_received then (for the rate).
    last_progress: float = 0.0
    bytes_at_last: int = 0
    #: Monotonic time the broker connection was found lost; None while connected.
    disconnected_since: Optional[float] = None


class Fetcher:
    """Pulls files of one bundle at a time for one device. `on_chunk` is the chunks-topic handler."""

    def __init__(
        self,
        session: MqttSession,
        store: BundleStore,
        cfg: TransferConfig,
        *,
        prefix: str,
        device_id: str,
        emit: Optional[Emit] = None,
    ) -> None:
        self.session = session
        self.store = store
        self.cfg = cfg
        #: Called on every turn of the transfer loop (the agent's watchdog heartbeat).
        self.alive: Callable[[], None] = lambda: None
        self.prefix = prefix
        self.device_id = device_id
        self.emit = emit or (lambda kind, message, data: None)
        self.chunks_topic = topics.chunks(prefix, device_id)
        self.fetch_topic = topics.fetch(prefix, device_id)
        self._inbox: queue.Queue = queue.Queue(maxsize=4 * cfg.window + 64)
        self._token = os.urandom(8)
        self._counter = 0
        self._cancel = threading.Event()
        self._checkpoints = Checkpointer(store)
        self.inbox_dropped = 0
        #: Chunk answers to our requests whose metadata or length was wrong (forged or broken), ever.
        self.malformed = 0

    # --------------------------------------------------------------------------------- public API

    def on_chunk(self, msg: Inbound) -> None:
        """Network-thread handler: hand the chunk to the transfer thread (never blocks)."""
        try:
            self._inbox.put_nowait(msg)
        except queue.Full:
            self.inbox_dropped += 1  # the request times out and is asked again

    def cancel(self) -> None:
        """Abort the running transfer (TransferCancelled in its thread); partial data is kept."""
        self._cancel.set()

    def fetch_manifest(self, bundle: BundleRef, sha256: str, size: int, *, max_bytes: int) -> bytes:
        """The raw manifest bytes (checked against `sha256`; size refused BEFORE any request)."""
        if size > max_bytes:
            raise ManifestError(
                "manifest of %d bytes announced for %s v%d is over limits.max_manifest_bytes %d; not fetched"
                % (size, bundle.name, bundle.version, max_bytes)
            )
        target = self._target(sha256, size, "manifest", keep_in_store=False)
        self._run(bundle, [target], FetchStats(bytes_total=size), progress=False)
        path = self.store.partial_path(sha256)
        data = path.read_bytes()
        self.store.drop_partial(sha256)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(
                "manifest of %s v%d does not match its announced sha256"
                % (bundle.name, bundle.version)
            )
        return data

    def fetch_files(self, bundle: BundleRef, files: Dict[str, Tuple[str, int]]) -> FetchStats:
        """Fetch every file in `files` (sha256 -> (path, size)) into the store's objects."""
        total = sum(size for _, size in files.values())
        self.store.check_quota(max(0, total - sum(
            self.store.partial_path(s).stat().st_size for s in files if self.store.partial_path(s).exists()
        )))
        ordered = sorted(files.items(), key=lambda kv: kv[1][0])
        targets = [self._target(sha, size, path) for sha, (path, size) in ordered]
        stats = FetchStats(bytes_total=total)
        stats.bytes_resumed = sum(t.cmap.bytes_done for t in targets)
        self.emit(
            "fetch-started",
            "fetching %d file(s), %d bytes (%d already held from an earlier attempt)"
            % (len(files), total, stats.bytes_resumed),
            {"files": len(files), "bytes": total, "bytes_resumed": stats.bytes_resumed},
        )
        self._run(bundle, targets, stats, progress=True)
        return stats

    # --------------------------------------------------------------------------------- internals

    def _target(self, sha256: str, size: int, label: str, keep_in_store: bool = True) -> PartialFile:
        chunk = self.cfg.chunk_bytes
        saved = self.store.load_chunk_map(sha256)
        part = self.store.partial_path(sha256)
        cmap = ChunkMap.from_json(saved if part.exists() else None, sha256=sha256, size=size, chunk_bytes=chunk)
        if cmap.done_count == 0 and part.exists():
            part.unlink()
        return PartialFile(sha256, size, label, cmap, keep_in_store=keep_in_store)

    def _corr(self) -> bytes:
        self._counter += 1
        return self._token + struct.pack(">Q", self._counter)

    def _send(self, bundle: BundleRef, req: PendingRequest, stats: FetchStats) -> None:
        offset, length = req.target.cmap.chunk_range(req.index)
        if not req.payload:
            req.payload = ChunkRequest(
                device_id=self.device_id, bundle=bundle, sha256=req.target.sha256, offset=offset, length=length
            ).to_json()
        req.sent_at = time.monotonic()
        req.attempts += 1
        stats.requests_sent += 1
        if req.attempts > 1:
            stats.retries += 1
        self.session.publish(
            self.fetch_topic, req.payload, qos=1, response_topic=self.chunks_topic, correlation_data=req.corr
        )

    def _open(self, t: PartialFile) -> None:
        if t.fd < 0:
            path = self.store.partial_path(t.sha256)
            t.fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
            t.saved_at = time.monotonic()

    def _persist(self, t: PartialFile, force: bool = False) -> None:
        """Checkpoint: the data the map claims must be on disk before the map is. In the background
        during the transfer; synchronously (`force`) when the transfer stops."""
        if t.fd < 0 or (not force and t.unsaved == 0):
            return
        if force:
            self._checkpoints.wait()
            getattr(os, "fdatasync", os.fsync)(t.fd)
            self.store.save_chunk_map(t.sha256, t.cmap.to_json())
        elif not self._checkpoints.submit(t.fd, t.sha256, t.cmap.to_json()):
            return  # the previous checkpoint of this file is still syncing
        t.unsaved = 0
        t.saved_at = time.monotonic()

    def _close(self, t: PartialFile, save_map: bool = True) -> None:
        if t.fd >= 0:
            try:
                if save_map:
                    self._persist(t, force=True)
                else:
                    self._checkpoints.wait()  # no late map write after the partial is gone
            finally:
                os.close(t.fd)
                t.fd = -1

    def _run(self, bundle: BundleRef, targets: List[PartialFile], stats: FetchStats, *, progress: bool) -> None:
        """Pull every missing chunk of `targets` and store each finished file; raises on cancel, an outage
        longer than the retries cover, a chunk that keeps failing, or a progress save that failed."""
        self._start_pull()
        run = _Run(bundle, stats)
        run.started = run.last_progress = time.monotonic()
        cpu_start = time.process_time()
        self._plan(run, targets)
        try:
            # Files that arrived completely before a restart only need their final check.
            for t in targets:
                if t.cmap.complete:
                    self._finish(t, run)
            while run.remaining:
                if self._cancel.is_set():
                    raise TransferCancelled("transfer of %s v%d cancelled" % (bundle.name, bundle.version))
                if self._wait_out_outage(run):
                    continue
                self._refill(run)
                self._receive(run)
                now = time.monotonic()
                self._retry_timed_out(run, now)
                self._checkpoint_due(run, now)
                if progress and now - run.last_progress >= self.cfg.progress_interval_s:
                    self._report_progress(run, now)
        finally:
            try:
                self._close_targets(targets)
            finally:
                stats.elapsed_s = time.monotonic() - run.started
                stats.cpu_s = round(time.process_time() - cpu_start, 3)

    def _start_pull(self) -> None:
        """Forget what an earlier pull left: the cancel flag, a failed progress save, stray answers."""
        self._cancel.clear()
        # A progress save that failed in an earlier pull (a disk since freed) must not fail this one.
        self._checkpoints.wait()
        self._checkpoints.error = None
        # Drop answers left over from an earlier transfer.
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break

    def _plan(self, run: _Run, targets: List[PartialFile]) -> None:
        """Open the partial files and queue every missing chunk, in file order."""
        for t in targets:
            self._open(t)
            if t.cmap.count and t.cmap.has(0):
                t.feed(0, None)  # chunks kept from an earlier attempt enter the running hash
            run.pending.extend((t, i) for i in t.cmap.missing())
        run.pending.reverse()  # pop() from the end = in file order
        run.remaining.update((t.sha256, t) for t in targets)

    def _wait_out_outage(self, run: _Run) -> bool:
        """While the broker is unreachable: handle what still arrives and give up after the outage limit
        (True: this turn is spent). When it is back, ask again for what was in flight (False)."""
        bundle = run.bundle
        now = time.monotonic()
        if not self.session.connected.is_set():
            if run.disconnected_since is None:
                run.disconnected_since = now
                log.warning("broker connection lost during transfer; waiting to resume")
            elif now - run.disconnected_since > self.cfg.chunk_timeout_s * (self.cfg.max_retries + 1):
                raise TransportError(
                    "broker unreachable for %.0f s during the transfer of %s v%d; partial data kept"
                    % (now - run.disconnected_since, bundle.name, bundle.version)
                )
            self._handle(self._get(0.2), run)
            return True
        if run.disconnected_since is not None:
            # Requests in flight when the link dropped are lost with the clean session: ask again.
            run.disconnected_since = None
            for req in run.outstanding.values():
                req.attempts = max(0, req.attempts - 1)
                self._send(bundle, req, run.stats)
        return False

    def _receive(self, run: _Run) -> None:
        """Wait for an answer until the oldest request times out (10 ms .. 0.5 s), then handle it and
        whatever else is already queued."""
        now = time.monotonic()
        oldest = min((r.sent_at for r in run.outstanding.values()), default=now)
        wait = max(0.01, min(0.5, oldest + self.cfg.chunk_timeout_s - time.monotonic()))
        msg = self._get(wait)
        if msg is None:
            return
        self._handle(msg, run)
        # Drain whatever else is already there before looking at timers.
        while True:
            more = self._get(0)
            if more is None:
                break
            self._handle(more, run)

    def _retry_timed_out(self, run: _Run, now: float) -> None:
        """Ask again for requests unanswered for chunk_timeout_s; give up after max_retries attempts."""
        for req in list(run.outstanding.values()):
            if now - req.sent_at > self.cfg.chunk_timeout_s and self.session.connected.is_set():
                if req.attempts > self.cfg.max_retries:
                    raise TransportError(
                        "no valid answer for %s offset %d after %d attempts; partial data kept"
                        % (req.target.label, req.target.cmap.chunk_range(req.index)[0], req.attempts)
                    )
                log.info("chunk %d of %s timed out; asking again", req.index, req.target.label)
                self._send(run.bundle, req, run.stats)

    def _checkpoint_due(self, run: _Run, now: float) -> None:
        """Fail on a background progress save that failed; start the checkpoints that are due."""
        if self._checkpoints.error:
            raise ResourceError(self._checkpoints.error)
        for t in run.remaining.values():
            if t.unsaved and now - t.saved_at > self.cfg.checkpoint_interval_s:
                self._persist(t)

    def _report_progress(self, run: _Run, now: float) -> None:
        """Emit fetch-progress: the share done and the rate since the last report."""
        stats = run.stats
        done = stats.bytes_resumed + stats.bytes_received
        rate = (stats.bytes_received - run.bytes_at_last) / (now - run.last_progress)
        self.emit(
            "fetch-progress",
            "%.0f%% of %d bytes, %.1f MB/s"
            % (100.0 * done / max(1, stats.bytes_total), stats.bytes_total, rate / 1e6),
            {
                "percent": round(100.0 * min(done, stats.bytes_total) / max(1, stats.bytes_total), 1),
                "bytes": done, "total": stats.bytes_total, "bytes_per_s": round(rate),
            },
        )
        run.last_progress = now
        run.bytes_at_last = stats.bytes_received

    def _close_targets(self, targets: List[PartialFile]) -> None:
        """Close every partial file even when saving one's progress fails (a full disk): none is left
        open. The first such error is raised unless the transfer is already failing with another."""
        close_error: Optional[OSError] = None
        for t in targets:
            try:
                self._close(t)
            except OSError as e:
                close_error = close_error or e
        if close_error is not None:
            if sys.exc_info()[1] is None:
                raise close_error
            log.error("saving download progress failed: %s", close_error)

    def _refill(self, run: _Run) -> None:
        """Send requests until `window` are outstanding (or nothing is left to ask for)."""
        pending, outstanding, remaining = run.pending, run.outstanding, run.remaining
        while pending and len(outstanding) < self.cfg.window:
            t, idx = pending.pop()
            if t.cmap.has(idx) or t.sha256 not in remaining:
                continue
            req = PendingRequest(t, idx, time.monotonic(), corr=self._corr())
            outstanding[req.corr] = req
            self._send(run.bundle, req, run.stats)

    def _get(self, timeout: float) -> Optional[Inbound]:
        self.alive()
        try:
            if timeout <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, msg: Optional[Inbound], run: _Run) -> None:
        if msg is None:
            return
        bundle, outstanding, remaining, stats = run.bundle, run.outstanding, run.remaining, run.stats
        req = outstanding.get(msg.correlation_data or b"")
        if req is None:
            stats.stray_chunks += 1
            return
        t = req.target
        offset, length = t.cmap.chunk_range(req.index)
        props = msg.user_properties
        error = props.get("error")
        if error:
            raise TransportError("controller refused %s of %s v%d: %s" % (t.label, bundle.name, bundle.version, error))
        problem = None
        if props.get("sha256") != t.sha256:
            problem = "wrong file"
        elif props.get("offset") != str(offset):
            problem = "offset %s, asked %d" % (props.get("offset"), offset)
        elif len(msg.payload) != length or props.get("length") != str(length):
            problem = "%d bytes, asked %d" % (len(msg.payload), length)
        elif props.get("total") != str(t.size):
            problem = "total %s, file is %d" % (props.get("total"), t.size)
        if problem is not None:
            stats.bad_chunks += 1
            self.malformed += 1
            log.warning("bad chunk for %s offset %d (%s); asking again", t.label, offset, problem)
            if req.attempts > self.cfg.max_retries:
                raise TransportError("chunk %d of %s kept arriving bad (%s)" % (req.index, t.label, problem))
            self._send(bundle, req, stats)
            return
        del outstanding[req.corr]
        if t.sha256 not in remaining or t.cmap.has(req.index):
            stats.stray_chunks += 1
            return
        if self.session.connected.is_set():
            # Keep the window full: the next request goes out before this chunk is written and hashed.
            self._refill(run)
        os.pwrite(t.fd, msg.payload, offset)
        t.cmap.mark(req.index)
        t.feed(req.index, msg.payload)
        t.unsaved += 1
        stats.chunks_received += 1
        stats.bytes_received += length
        if t.cmap.complete:
            self._finish(t, run)

    def _finish(self, t: PartialFile, run: _Run) -> None:
        """A file has all its chunks: check its hash and move it into the store (or fetch it again)."""
        remaining, pending, stats = run.remaining, run.pending, run.stats
        if t.hashed < t.cmap.count:
            t.feed(t.hashed, None)  # catch up over chunks the memory bound left on disk only
        got = t.hasher.hexdigest() if t.cmap.count else hashlib.sha256(b"").hexdigest()
        # A complete file needs no chunk map: storing it (fsync + rename) is its checkpoint.
        self._close(t, save_map=False)
        part = self.store.partial_path(t.sha256)
        try:
            if got != t.sha256:
                raise IntegrityError("%s hashes to %s…, expected %s…" % (t.label, got[:12], t.sha256[:12]))
            if t.keep_in_store:
                # The running hash covered every byte written; the store only syncs and renames.
                self.store.add_object_file(part, t.sha256, t.size, hashed=True)
                self.store.drop_partial(t.sha256)
        except IntegrityError as e:
            t.refetches += 1
            stats.files_refetched += 1
            log.warning("%s failed its sha256 after transfer (%s); fetching it again", t.label, e)
            self.emit(
                "error", "%s failed its sha256 check after transfer; fetching it again" % t.label,
                {"file": t.label, "sha256": t.sha256, "refetch": t.refetches},
            )
            if t.refetches > self.cfg.max_retries:
                self.store.drop_partial(t.sha256)
                raise IntegrityError("%s failed its sha256 check %d times; giving up" % (t.label, t.refetches))
            self.store.drop_partial(t.sha256)
            t.cmap.clear()
            t.reset_hash()
            self._open(t)
            pending.extend((t, i) for i in reversed(list(t.cmap.missing())))
            return
        remaining.pop(t.sha256, None)

