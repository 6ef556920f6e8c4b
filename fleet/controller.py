"""The controller's core: its bundle store, the chunk server, and signed commands to devices.

`fleet serve` builds a `Controller`; the registry, rollouts and RPC (``fleet/registry.py``,
``fleet/rollout.py``, ``fleet/rpc.py``) plug into it through `Controller.session` (subscribe to more
topics) and `Controller.send_command`.

Chunk serving: a device's `ChunkRequest` on ``{p}/bundles/fetch`` names a bundle, a hash (the
manifest's or one of its files') and a range. The server answers only for bundles it stores and hashes
that bundle names, only on the requesting device's own chunks topic, and never more than
`max_chunk_bytes` at a time. The answer is the raw bytes with ``sha256``/``offset``/``length``/``total``
user properties; a refusal carries an ``error`` property and no bytes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from edge_agent.bundle.archive import read_bundle
from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store import fsync_dir, sha256_file, write_atomic
from edge_agent.bundle.verify import manifest_digest, read_unverified, verify_manifest
from edge_agent.errors import BundleError, IntegrityError, ResourceError
from edge_agent.mqtt import Inbound, MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.commands import sign_command
from edge_agent.protocol.messages import BundleRef, ChunkRequest, CommandArgs, MessageError
from edge_agent.signing import PrivateKey, load_public_keys
from fleet.config import FleetConfig

log = logging.getLogger(__name__)


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
        raw = (self.objects / msha).read_bytes()
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


class SeqCounter:
    """Command sequence numbers that strictly increase per device across restarts and processes.

    One counter serves every device (a number above the last one a device saw is all it needs), handed
    out from a block reserved in the state file: the block's upper end (`ceiling`) is written atomically
    and fsynced *before* the first number of the block is returned, so a wave of a thousand commands
    costs one fsync instead of a thousand, and a restarted controller (or a crash at any point) starts at
    the persisted ceiling, above every number ever handed out. `fleet push` and `fleet serve` share the
    file under an flock; a process that sees the file changed by another one reserves a new block above
    it before handing out the next number. A fresh file starts from the clock in milliseconds, so even a
    lost state file does not go backwards (unless it is lost within `block` commands' worth of
    milliseconds of the last reservation).
    """

    #: Numbers reserved per persisted step.
    BLOCK = 4096

    def __init__(self, path: Path, *, block: int = BLOCK, clock=time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.block = max(1, int(block))
        self.clock = clock
        self._lock = threading.Lock()
        self._next = 0
        self._ceiling = 0  # exclusive: numbers below it (and >= _next) are reserved for this process
        self._written: Optional[bytes] = None
        self.reservations = 0

    def next(self, device_id: str) -> int:
        """The next sequence number for `device_id` (its block is persisted before it is returned)."""
        with self._lock:
            if self._next >= self._ceiling or self._file_bytes() != self._written:
                self._reserve()
            seq = self._next
            self._next += 1
        return seq

    def _file_bytes(self) -> Optional[bytes]:
        # A few microseconds, no lock: another process that reserved a block changed the file.
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def _reserve(self) -> None:
        with open(str(self.path) + ".lock", "a+") as lockf:
            fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    data = json.loads(self.path.read_bytes())
                except (OSError, ValueError):
                    data = {}
                if not isinstance(data, dict):
                    data = {}
                # Older files hold the last number per device instead of a ceiling: above all of them.
                floor = 0
                for v in data.values():
                    if isinstance(v, int) and not isinstance(v, bool):
                        floor = max(floor, v + 1)
                base = max(floor, int(self.clock() * 1000), self._next)
                ceiling = base + self.block
                raw = json.dumps({"ceiling": ceiling}, sort_keys=True).encode()
                write_atomic(self.path, raw)
                self._written = raw
            finally:
                fcntl.flock(lockf.fileno(), fcntl.LOCK_UN)
        self._next, self._ceiling = base, ceiling
        self.reservations += 1


class _RateLimit:
    """A token bucket over bytes per second (None = unlimited)."""

    def __init__(self, bytes_per_s: Optional[int]) -> None:
        self.rate = bytes_per_s
        # Bursts of at most a tenth of a second's worth: the cap holds over short intervals too.
        self.capacity = float(bytes_per_s or 0) / 10
        self.tokens = 0.0
        self.at = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        if not self.rate:
            return
        while not stop.is_set():
            now = time.monotonic()
            self.tokens = min(max(self.capacity, float(n)), self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            time.sleep(min(0.05, (n - self.tokens) / self.rate))


class ChunkServer:
    """Answers fetch requests from the store. Requests are queued by the network thread and served by
    one worker thread (file reads never block the MQTT loop)."""

    def __init__(self, session: MqttSession, store: ControllerStore, *, prefix: str, cfg) -> None:
        self.session = session
        self.store = store
        self.prefix = prefix
        self.cfg = cfg
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rate = _RateLimit(cfg.max_bytes_per_s)
        self._fds: Dict[str, int] = {}
        self.stats: Dict[str, int] = {"requests": 0, "served_bytes": 0, "refused": 0, "dropped": 0, "malformed": 0}

    def set_rate(self, bytes_per_s: Optional[int]) -> None:
        """Change the serving rate cap (None: unlimited)."""
        self._rate = _RateLimit(bytes_per_s)

    def on_request(self, msg: Inbound) -> None:
        """Network-thread handler for ``{p}/bundles/fetch``."""
        try:
            self._q.put_nowait(msg)
        except queue.Full:
            self.stats["dropped"] += 1  # the device times out and asks again

    def start(self) -> None:
        """Start the worker."""
        self._thread = threading.Thread(target=self._run, name="chunk-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker and close open files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.serve(msg)
            except Exception:  # one bad request must not stop the server
                log.exception("chunk request failed")

    def serve(self, msg: Inbound) -> None:
        """Answer one request (or drop it when it cannot be answered safely)."""
        self.stats["requests"] += 1
        try:
            req = ChunkRequest.from_json(msg.payload, max_bytes=4096)
        except MessageError as e:
            self.stats["malformed"] += 1
            log.warning("malformed chunk request: %s", e)
            return
        expected_topic = topics.chunks(self.prefix, req.device_id)
        if msg.response_topic != expected_topic:
            # Never send bundle bytes anywhere but the requesting device's own chunks topic.
            self.stats["refused"] += 1
            log.warning("chunk request from %s with response topic %r refused", req.device_id, msg.response_topic)
            return
        props = {"sha256": req.sha256, "offset": str(req.offset), "length": str(req.length)}
        error = None
        total = 0
        try:
            allowed = self.store.allowed(req.bundle.name, req.bundle.version)
            if req.sha256 not in allowed:
                error = "bundle %s v%d has no file %s" % (req.bundle.name, req.bundle.version, req.sha256[:12])
            else:
                total = allowed[req.sha256]
                if req.length > self.cfg.max_chunk_bytes:
                    error = "chunk of %d bytes is over the server's %d" % (req.length, self.cfg.max_chunk_bytes)
                elif req.offset + req.length > total:
                    error = "range %d+%d is past the end (%d)" % (req.offset, req.length, total)
        except (BundleError, OSError) as e:
            error = str(e)
        if error is not None:
            self.stats["refused"] += 1
            props["error"] = error
            self.session.publish(
                expected_topic, b"", qos=1, user_properties=props, correlation_data=msg.correlation_data
            )
            return
        self._rate.take(req.length, self._stop)
        data = os.pread(self._fd(req.sha256), req.length, req.offset)
        props["total"] = str(total)
        props["length"] = str(len(data))
        self.session.publish(
            expected_topic, data, qos=1, user_properties=props, correlation_data=msg.correlation_data, block_s=5.0
        )
        self.stats["served_bytes"] += len(data)

    def _fd(self, sha256: str) -> int:
        fd = self._fds.get(sha256)
        if fd is None:
            if len(self._fds) > 64:
                for old in list(self._fds.values()):
                    os.close(old)
                self._fds.clear()
            fd = os.open(str(self.store.object_path(sha256)), os.O_RDONLY)
            self._fds[sha256] = fd
        return fd


class Controller:
    """The controller process: one MQTT session, the store, the chunk server, signed commands."""

    def __init__(self, cfg: FleetConfig, *, key: Optional[PrivateKey] = None, client_id: Optional[str] = None,
                 serve_chunks: bool = True, manage_fleet: Optional[bool] = None) -> None:
        self.cfg = cfg
        self.prefix = cfg.mqtt.prefix
        state = cfg.controller.state_dir
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResourceError("controller state dir %s cannot be created: %s" % (state, e.strerror))
        self.store = ControllerStore(state / "store")
        self.seq = SeqCounter(state / "command-seq.json")
        self.key = key
        self.session = MqttSession(cfg.mqtt, client_id=client_id or cfg.controller.client_id, outgoing_queue=8192,
                                   name="controller")
        self.chunks = ChunkServer(self.session, self.store, prefix=self.prefix, cfg=cfg.chunks)
        self.serve_chunks = serve_chunks
        if serve_chunks:
            fetch = topics.bundles_fetch(self.prefix)
            if cfg.controller.shared_group:
                fetch = "$share/%s/%s" % (cfg.controller.shared_group, fetch)
            self.session.subscribe(fetch, self.chunks.on_request, qos=1)
        # Registry, ingest, rollouts and the operator RPC (fleet/control.py): only in the serving
        # controller, not in a one-shot `fleet push` (it would join the shared subscriptions).
        self.control = None
        if serve_chunks if manage_fleet is None else manage_fleet:
            self._init_control(cfg)

    def _init_control(self, cfg: FleetConfig) -> None:
        from fleet.control import ControlPlane
        from fleet.ingest import HealthPolicy
        from fleet.registry import Registry
        from fleet.rollout import RolloutParams

        r = cfg.rollouts
        self.registry = Registry(r.registry_file or cfg.controller.state_dir / "registry.sqlite")
        self.control = ControlPlane(
            self.session, prefix=self.prefix, registry=self.registry, send_command=self.send_command,
            resolve_bundle=self.resolve_bundle, share_group=cfg.controller.shared_group, default_waves=r.waves,
            defaults=RolloutParams(r.success_threshold, r.error_threshold, r.device_timeout_s),
            health=HealthPolicy(max_error_rate=r.unhealthy_error_rate), tick_interval_s=r.tick_interval_s,
            telemetry_flush_s=r.telemetry_flush_s, ingest_backlog=r.ingest_backlog,
        )

    def resolve_bundle(self, name: str, version: int) -> Tuple[str, int]:
        """(manifest sha256, manifest size) of a stored bundle (BundleRecordError when unknown)."""
        rec = self.store.record(name, version)
        return str(rec["manifest_sha256"]), int(rec["manifest_size"])

    @classmethod
    def load_key(cls, cfg: FleetConfig) -> PrivateKey:
        """The controller's command-signing key (`fleet keygen`), from controller.key_file."""
        from edge_agent.errors import SignatureError

        try:
            return PrivateKey.load(cfg.controller.key_file)
        except SignatureError as e:
            raise ResourceError("controller key: %s (create one with `fleet keygen --name controller`)" % e)

    def bundle_trust(self):
        """Trusted bundle keys for `add_bundle` (empty = only hashes are checked)."""
        d = self.cfg.trust.bundle_keys_dir
        return load_public_keys([d]) if d is not None else {}

    def add_bundle(self, path: Path) -> Tuple[ManifestBody, str, int]:
        """Store a bundle file so devices can fetch it."""
        t = self.cfg.trust
        return self.store.add_bundle(
            path, max_manifest_bytes=t.max_manifest_bytes, max_bundle_bytes=t.max_bundle_bytes,
            trusted=self.bundle_trust(), threshold=t.signature_threshold,
        )

    def sign(self, device_id: str, args: CommandArgs) -> bytes:
        """A signed command for one device with its next sequence number."""
        if self.key is None:
            raise ResourceError("no controller key loaded (controller.key_file)")
        return sign_command(
            args, device_id=device_id, seq=self.seq.next(device_id), keys=[self.key], now=int(time.time()),
            ttl_s=self.cfg.controller.command_ttl_s,
        )

    def send_command(self, device_id: str, args: CommandArgs):
        """Sign and publish a command to one device (QoS 1); returns the `Delivery`."""
        return self.session.publish(
            topics.commands(self.prefix, device_id), self.sign(device_id, args), qos=1, block_s=5.0
        )

    def deploy_args(self, name: str, version: int, rollout_id: Optional[str] = None):
        """DeployArgs for a stored bundle."""
        from edge_agent.protocol.messages import DeployArgs

        rec = self.store.record(name, version)
        return DeployArgs(
            bundle=BundleRef(name=name, version=version), manifest_sha256=str(rec["manifest_sha256"]),
            manifest_size=int(rec["manifest_size"]), rollout_id=rollout_id,
        )

    def start(self) -> None:
        """Connect and start serving."""
        if self.serve_chunks:
            self.chunks.start()
        if self.control is not None:
            self.control.start()
        self.session.start()

    def stop(self) -> None:
        """Stop serving and disconnect."""
        if self.control is not None:
            self.control.stop()
        self.chunks.stop()
        self.session.stop()
        if self.control is not None:
            self.registry.close()

