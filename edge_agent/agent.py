"""The agent process: wires the MQTT session, the store, the deployer, engines, runtime and telemetry.

Threads:
- the MQTT network thread (`MqttSession`): only queues inbound work, never blocks;
- the worker thread: verifies commands and runs deployments, rollbacks and the start-up restore one
  at a time, in order;
- the main thread (`run`): systemd notifications (ready, status, and the watchdog, fed only while the
  worker's heartbeat is fresh: edge_agent.watchdog), shutdown.

Start-up converges from whatever `state.json` says: objects are re-hashed (bad ones quarantined),
the active bundle is restored (missing objects fetched again first), and a deployment interrupted
by a crash or a SIGTERM is resumed.
"""

from __future__ import annotations

import hashlib
import logging
import platform as _platform
import queue
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from edge_agent import __version__
from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store import BundleRecord, BundleStore
from edge_agent.config import AgentConfig, TrustConfig
from edge_agent.errors import (
    CommandError,
    ConfigError,
    EdgeAgentError,
    EngineError,
    ResourceError,
    TransportError,
)
from edge_agent.lifecycle.deploy import Deployer, Hooks
from edge_agent.mqtt.session import MqttSession, Will
from edge_agent.protocol import topics
from edge_agent.protocol.commands import peek_command_meta, verify_command
from edge_agent.protocol.messages import (
    BundleRef,
    DeployArgs,
    DeployState,
    Event,
    PingArgs,
    PlatformInfo,
    PromoteArgs,
    ResetTimeFloorArgs,
    Result,
    RetuneArgs,
    RollbackArgs,
    SetRouterArgs,
    Status,
)
from edge_agent.signing import load_public_keys
from edge_agent.sysinfo.meminfo import read_meminfo_bytes
from edge_agent.transfer.fetcher import Fetcher, TransferCancelled
from edge_agent.watchdog import Heartbeat, ServiceNotifier, status_line

log = logging.getLogger(__name__)

#: Inbound commands waiting for the worker (more than this while busy are refused with an event).
COMMAND_QUEUE = 64


def platform_info(backend: str) -> PlatformInfo:
    """What this device is, for the retained status (never raises)."""
    info: Dict[str, Any] = {"machine": _platform.machine(), "python": _platform.python_version(), "backend": backend}
    try:
        from edge_agent.engines.platform import detect_platform

        p = detect_platform(probe_gpu=backend != "onnxruntime")
        d = p.describe()
        info.update(
            jetson_model=d.get("jetson_model"), l4t=d.get("l4t"), tensorrt=d.get("trt"), cuda=d.get("cuda"),
            compute_capability=("%d.%d" % p.compute_capability) if p.compute_capability else None,
            platform_key=d.get("platform_key"),
        )
    except Exception as e:  # platform probing must never stop the agent
        log.warning("platform detection failed: %s", e)
    try:
        total = read_meminfo_bytes().get("MemTotal")
        if total is not None:
            info["memory_total_mb"] = total // (1024 * 1024)
    except OSError:
        pass
    return PlatformInfo(**info)


def check_key_separation(trust: TrustConfig) -> None:
    """Refuse a configuration where a controller command key could also sign bundles.

    Every `*.pub` in `bundle_keys_dir` is a bundle key, so a command key file placed there (or a key
    listed in both sets) would let whoever holds the controller's key publish models. Raises
    ConfigError; checks the paths even when the key files are not installed yet. A command-key folder
    without any key is refused too (every command would be refused).
    """
    bdir = trust.bundle_keys_dir
    for p in trust.command_keys:
        rp, rb = p.resolve(), bdir.resolve()
        if rp == rb or (rp.parent == rb and rp.suffix == ".pub"):
            raise ConfigError(
                "trust.command_keys entry %s is inside trust.bundle_keys_dir %s, so the controller key would "
                "also be trusted to sign bundles; move it to a separate folder such as "
                "/etc/edge-agent/command-keys/" % (p, bdir))
    for p in trust.command_keys:
        if p.is_dir() and not any(p.glob("*.pub")):
            raise ConfigError(
                "trust.command_keys entry %s is a folder without any *.pub key, so every controller command "
                "would be refused; install the controller's public key there (controller.pub) or remove the entry"
                % p)
    try:
        command = load_public_keys([p for p in trust.command_keys if p.exists()])
        bundle = load_public_keys([bdir]) if bdir.exists() else {}
    except EdgeAgentError as e:
        raise ConfigError("cannot load trusted keys: %s" % e)
    if trust.command_keys and not command:
        log.warning("no controller key is installed (trust.command_keys: %s); every command will be refused "
                    "until one is", ", ".join(str(p) for p in trust.command_keys))
    both = sorted(set(command) & set(bundle))
    if both:
        raise ConfigError(
            "key %s (%s) is trusted both for controller commands and for bundles; a command key must not "
            "be a bundle key (remove it from trust.bundle_keys_dir %s)"
            % (both[0][:16], command[both[0]].name or "unnamed", bdir))


class Agent:
    """One device's agent."""

    def __init__(self, cfg: AgentConfig, *, notifier: Any = None) -> None:
        self.cfg = cfg
        self.device_id = cfg.device_id
        self.prefix = cfg.mqtt.prefix
        self.notifier = notifier
        self.store = BundleStore(cfg.state_dir, quota_bytes=cfg.limits.store_quota_bytes)
        self.stop_event = threading.Event()
        self._work: queue.Queue = queue.Queue(maxsize=COMMAND_QUEUE)
        self._event_seq = 0
        self._event_lock = threading.Lock()
        self._deploy_state = DeployState()
        self._service = None
        self._models = None
        self._serving: Optional[BundleRecord] = None
        self._serve_lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._platform: Optional[PlatformInfo] = None
        self.publisher = None
        self.api = None
        self.session: Optional[MqttSession] = None
        self.fetcher: Optional[Fetcher] = None
        self.deployer: Optional[Deployer] = None
        self.candidates = None  # CandidateManager: shadow / A-B candidates (edge_agent.lifecycle.candidate)
        self.malformed = 0
        self.worker_errors = 0  # work items that failed on an unexpected error (logged, counted)
        self._sources: list = []  # SourceRunner per [[sources]] entry, started once a model serves
        self._sources_lock = threading.Lock()
        self._lock_fd: Optional[int] = None
        self.worker_failed = False  # the worker died on an unexpected error: `run` exits non-zero
        # The worker's liveness for the systemd watchdog: hung after half of WatchdogSec without a beat.
        self.heartbeat = Heartbeat(getattr(notifier, "watchdog_interval_s", None) or 30.0)
        self._fetch_percent: Optional[float] = None

    # ------------------------------------------------------------------------------------ wiring

    def _command_keys(self):
        try:
            keys = load_public_keys([p for p in self.cfg.trust.command_keys if p.exists()])
            overlap = set(keys) & set(self._bundle_keys())
        except EdgeAgentError as e:
            raise CommandError("cannot load trusted keys: %s" % e)
        if overlap:
            # A bundle key added after start-up: refuse commands rather than trust a key for both.
            raise CommandError("a command key is also a trusted bundle key (%s); commands refused until the key "
                               "sets are separated" % sorted(overlap)[0][:16])
        return keys

    def _bundle_keys(self):
        d = self.cfg.trust.bundle_keys_dir
        return load_public_keys([d]) if d.exists() else {}

    def build(self, *, with_mqtt: bool = True) -> Agent:
        """Open the store and create the session, fetcher and deployer (nothing is started)."""
        check_key_separation(self.cfg.trust)
        self.store.open()
        self._lock_state_dir()
        bad = self.store.check_objects()
        if bad:
            log.error("%d store object(s) failed their hash check and were quarantined", len(bad))
        self._deploy_state = self.store.state.deploy
        if with_mqtt:
            offline = Status(device_id=self.device_id, online=False, ts=time.time(), agent_version=__version__)
            self.session = MqttSession(
                self.cfg.mqtt, client_id=self.device_id,
                will=Will(topics.status(self.prefix, self.device_id), offline.to_json(), qos=1, retain=True),
                outgoing_queue=self.cfg.mqtt.max_queued_messages, name="mqtt",
            )
            self.fetcher = Fetcher(self.session, self.store, self.cfg.transfer, prefix=self.prefix,
                                   device_id=self.device_id, emit=self._emit_fetch)
            self.fetcher.alive = self.heartbeat.beat
            self.session.subscribe(topics.commands(self.prefix, self.device_id), self._on_command, qos=1)
            self.session.subscribe(topics.chunks(self.prefix, self.device_id), self.fetcher.on_chunk, qos=1)
            self.session.on_connect(self.publish_status)
            self._setup_telemetry()
        hooks = Hooks(prepare=self._prepare, selftest=self._selftest, activate=self._activate, discard=self._discard)
        if self.publisher is not None:
            hooks.probation = self._probation_hook()
        self.deployer = Deployer(
            self.store, hooks=hooks, trusted_keys=self._bundle_keys, threshold=self.cfg.trust.signature_threshold,
            limits=self.cfg.limits, emit=self.emit, on_state=self._on_deploy_state, fetcher=self.fetcher,
            stopping=self.stop_event.is_set, max_clock_skew_s=self.cfg.trust.max_clock_skew_s,
        )
        from edge_agent.lifecycle.candidate import CandidateManager

        self.candidates = CandidateManager(self)
        if bad:
            self.emit("error", "%d store object(s) failed their hash check; quarantined, will be fetched again"
                      % len(bad), level="error", data={"objects": bad[:20]})
        return self

    def _setup_telemetry(self) -> None:
        """Telemetry and events leave through one ordered path that spools while the broker is away."""
        from edge_agent.telemetry.publisher import create_publisher, session_publish

        self.publisher = create_publisher(
            self.cfg.telemetry, device_id=self.device_id, prefix=self.prefix, spool_dir=self.cfg.state_dir / "spool",
            publish=session_publish(self.session), get_stats=self._period_stats,
            bundle=lambda: self.store.state.active.ref if self.store.state.active else None,
            engine=lambda: self._models.describe() if self._models is not None and hasattr(
                self._models, "describe") else None,
            malformed=lambda: self.malformed + (self.fetcher.malformed if self.fetcher is not None else 0),
        )
        self.session.on_connect(self.publisher.notify_connected)

    def _period_stats(self):
        svc = self._service
        return svc.stats_snapshot(reset=True) if svc is not None else None

    def _probation_hook(self):
        from edge_agent.lifecycle.probation import make_probation_hook

        def recheck(record, manifest):
            return self._selftest(self._models, self.store.bundle_dir(manifest.name, manifest.version), manifest)

        pub = self.publisher
        return make_probation_hook(
            self.cfg.probation, stop=self.heartbeat.pacing(self.stop_event), add_listener=pub.add_stats_listener,
            remove_listener=pub.remove_stats_listener,
            golden_recheck=recheck if self.cfg.probation.golden_recheck else None,
        )

    def _lock_state_dir(self) -> None:
        """One process per state dir: a second agent, or an install while the service runs, is refused."""
        import fcntl
        import os

        fd = os.open(str(self.cfg.state_dir / "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ResourceError("state dir %s is in use by another edge-agent process (is the service running?)"
                                % self.cfg.state_dir)
        self._lock_fd = fd

    # ------------------------------------------------------------------------------------ engines/runtime

    def _prepare(self, bundle_dir: Path, manifest: ManifestBody):
        try:
            from edge_agent.engines.prepare import prepare_engines
        except ImportError as e:
            raise EngineError("engine preparation is not available in this installation: %s" % e)
        # Engine builds block without a beat, bounded by build_timeout_s each (engine events beat between).
        with self.heartbeat.allow(self.cfg.engine.build_timeout_s + 60.0, "preparing engines"):
            return prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=self.cfg.engine,
                                   cache_dir=self.cfg.state_dir / "engines", emit=self._emit_engine)

    def _selftest(self, models, bundle_dir: Path, manifest: ManifestBody):
        try:
            from edge_agent.engines.golden import run_golden
        except ImportError as e:
            raise EngineError("the golden self-test is not available in this installation: %s" % e)
        with self.heartbeat.allow(self.cfg.engine.build_timeout_s, "golden self-test"):
            return run_golden(models, bundle_dir, manifest)

    def _activate(self, models, bundle_dir: Path, manifest: ManifestBody) -> None:
        from edge_agent.runtime.service import InferenceService

        service = InferenceService(models, manifest, bundle_dir, self.cfg.runtime)
        with self._serve_lock:
            old_service, old_models = self._service, self._models
            self._service, self._models = service, models
        for thing in (old_service, old_models):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing the old model must not undo the new one
                    log.exception("closing the previous model failed")
        self._start_sources()

    def _discard(self, models) -> None:
        try:
            models.close()
        except Exception:
            log.exception("closing unused models failed")

    def retune(self, *, command_seq: Optional[int] = None) -> None:
        """The `retune` command: re-measure the serving engines' batch sizes now (each model reports
        `batch-tuned`) and apply them to the running service."""
        with self._serve_lock:
            svc, models = self._service, self._models
        if svc is None or models is None:
            raise CommandError("no model is serving; nothing to retune")
        try:
            from edge_agent.engines.prepare import retune_if_needed
        except ImportError as e:
            raise EngineError("engine tuning is not available in this installation: %s" % e)
        try:
            retune_if_needed(models, cfg=self.cfg.engine, cache_dir=self.cfg.state_dir / "engines",
                             emit=self._emit_engine, force=True)
        except EdgeAgentError as e:
            self.emit("error", "retune failed: %s" % e, level="error", command_seq=command_seq)
            raise
        if hasattr(svc, "set_batch_sizes"):
            applied = svc.set_batch_sizes(dict(models.batch))
            log.info("retune (command seq %s): serving with batch sizes %s", command_seq, applied)

    # ------------------------------------------------------------------------------------ sources

    def _start_sources(self) -> None:
        """Start one SourceRunner per `[[sources]]` entry, once, when a model first serves (a folder or
        file played before any model is active would be lost)."""
        if not self.cfg.sources or self.stop_event.is_set():
            return
        with self._sources_lock:
            if self._sources:
                return
            try:
                from edge_agent.runtime.sources import SourceRunner

                for sc in self.cfg.sources:
                    runner = SourceRunner(sc, get_service=self.get_service, publish=self._publish_result,
                                          device_id=self.device_id, emit=self._emit_source,
                                          infer_timeout_s=self.cfg.runtime.request_timeout_s)
                    runner.start()
                    self._sources.append(runner)
            except Exception as e:  # a source must never undo an activation
                log.exception("starting the sources failed")
                self.emit("error", "starting the sources failed: %s" % e, level="error")
                return
            log.info("started %d source(s): %s", len(self._sources), ", ".join(sc.name for sc in self.cfg.sources))

    def _stop_sources(self, timeout_s: float = 5.0) -> None:
        with self._sources_lock:
            runners, self._sources = self._sources, []
        for r in runners:
            r.stop(timeout_s)

    def _publish_result(self, result: Result) -> None:
        """A source's answer for one frame, on `{p}/devices/{id}/results` (QoS 0: live data, not spooled)."""
        if self.session is not None:
            self.session.publish(topics.results(self.prefix, self.device_id), result.to_json(), qos=0)

    def _emit_source(self, kind: str, message: str, data: dict) -> None:
        self.emit(kind, message, level="warning" if kind in ("source-lost", "error") else "info", data=data)

    def get_service(self):
        """The serving InferenceService (None while no model is active)."""
        return self._service

    def is_ready(self) -> bool:
        """A verified, self-tested model is serving."""
        return self._service is not None

    # ------------------------------------------------------------------------------------ publishing

    def emit(self, kind: str, message: str, *, level: str = "info", bundle: Optional[BundleRef] = None,
             rollout_id: Optional[str] = None, command_seq: Optional[int] = None,
             data: Optional[Dict[str, Any]] = None) -> None:
        """Publish an event (QoS 1) and log it."""
        with self._event_lock:
            seq = self._event_seq
            self._event_seq += 1
        if bundle is None and self._deploy_state.bundle is not None and kind.startswith(("fetch", "engine")):
            bundle = self._deploy_state.bundle
        ev = Event(device_id=self.device_id, ts=time.time(), seq=seq, kind=kind, level=level, message=message[:2000],
                   bundle=bundle, rollout_id=rollout_id, command_seq=command_seq, data=data or {})
        getattr(log, "warning" if level != "info" else "info")("event %s: %s", kind, message)
        if self.publisher is not None:
            self.publisher.submit_message(topics.events(self.prefix, self.device_id), ev, qos=1)
        elif self.session is not None:
            self.session.publish(topics.events(self.prefix, self.device_id), ev.to_json(), qos=1)

    def _emit_fetch(self, kind: str, message: str, data: dict) -> None:
        self.heartbeat.beat()
        if kind == "fetch-progress":
            self._fetch_percent = data.get("percent")
        ds = self._deploy_state
        self.emit(kind, message, bundle=ds.bundle, rollout_id=ds.rollout_id, data=data)

    def _emit_engine(self, kind: str, message: str, data: dict) -> None:
        self._emit_fetch(kind, message, data)

    def status(self, online: bool = True) -> Status:
        """The retained status message as it stands."""
        st = self.store.state
        return Status(
            device_id=self.device_id, online=online, ts=time.time(), agent_version=__version__,
            platform=self._platform, active=st.active.ref if st.active else None,
            previous=st.previous.ref if st.previous else None, deploy=self._deploy_state,
            ready=self.is_ready(), last_command_seq=st.last_command_seq,
        )

    def publish_status(self) -> None:
        """Publish the retained status (QoS 1)."""
        if self.session is not None:
            self.session.publish(topics.status(self.prefix, self.device_id), self.status().to_json(), qos=1,
                                 retain=True)

    def _on_deploy_state(self, ds: DeployState) -> None:
        self.heartbeat.beat()
        if ds.state != "fetching":
            self._fetch_percent = None
        self._deploy_state = ds
        self.publish_status()

    def status_line(self) -> str:
        """systemd's STATUS= text: broker link, serving bundle, deployment and its progress."""
        ds, active = self._deploy_state, self.store.state.active
        return status_line(
            connected=self.session is not None and self.session.connected.is_set(),
            serving="%s v%d" % (active.name, active.version) if active is not None and self.is_ready() else None,
            deploy_state=ds.state, percent=self._fetch_percent,
            deploy_bundle="%s v%d" % (ds.bundle.name, ds.bundle.version) if ds.bundle else None)

    # ------------------------------------------------------------------------------------ commands

    def _on_command(self, msg) -> None:
        """Network thread: queue the raw command for the worker (never blocks)."""
        try:
            self._work.put_nowait(("command", msg.payload))
        except queue.Full:
            meta = peek_command_meta(msg.payload)
            self.emit("command-refused", "agent busy: %d commands already queued" % COMMAND_QUEUE, level="warning",
                      command_seq=meta.get("seq"), data={"reason": "busy"})

    def _floor_after(self, body) -> dict:
        """State changes for the trusted time floor once command `body` is accepted: bounded by the device
        clock (protocol/trusted_time.py); a `reset-time-floor` command sets it to its own `issued_at`."""
        if isinstance(body.args, ResetTimeFloorArgs):
            return {"time_floor": body.issued_at, "signed_time_seen": {"bundle": body.issued_at,
                                                                      "command": body.issued_at}}
        return self.deployer.floor_update(body.issued_at, "command")

    def handle_command(self, raw: bytes) -> None:
        """Verify and run one command (worker thread). Refusals change nothing but the event."""
        st = self.store.state
        digest = hashlib.sha256(raw).hexdigest()
        if digest == st.last_command_sha256:
            # The same bytes as the command just accepted: a QoS 1 redelivery, not an attack. Commands
            # are idempotent, so it is dropped quietly (a refusal event would read as a failed deploy).
            log.info("duplicate delivery of command seq %d ignored", st.last_command_seq)
            return
        try:
            body = verify_command(
                raw, device_id=self.device_id, trusted=self._command_keys(), last_seq=st.last_command_seq,
                now=self.deployer.now(), max_age_s=self.cfg.trust.max_command_age_s,
                clock=self.deployer.clock(), floor=st.time_floor, max_skew_s=self.cfg.trust.max_clock_skew_s,
            )
        except CommandError as e:
            meta = peek_command_meta(raw)
            if not meta:
                self.malformed += 1  # not even a command envelope (telemetry `malformed_messages`)
            self.emit("command-refused", str(e), level="warning", command_seq=meta.get("seq"),
                      data={"reason": str(e), "kind": meta.get("kind")})
            return
        args = body.args
        # Persist the sequence number first: a replay of this command is refused even after a crash.
        try:
            self.store.update_state(last_command_seq=body.seq, last_command_sha256=digest,
                                    **self._floor_after(body))
        except OSError as e:
            # Without a durable sequence number a replay could not be refused: refuse the command itself.
            self.emit("command-refused", "cannot record command seq %d in state.json (%s); refused"
                      % (body.seq, e.strerror or e), level="error", command_seq=body.seq,
                      data={"reason": "state not writable"})
            return
        self.emit("command-accepted", "%s command seq %d accepted" % (args.kind, body.seq), command_seq=body.seq,
                  rollout_id=getattr(args, "rollout_id", None), data={"kind": args.kind})
        try:
            if isinstance(args, DeployArgs):
                if args.mode != "normal":
                    self.candidates.deploy(args, command_seq=body.seq)
                else:
                    self.deployer.deploy(args, command_seq=body.seq)
            elif isinstance(args, PromoteArgs):
                self.candidates.promote(args, command_seq=body.seq)
            elif isinstance(args, RollbackArgs):
                self.candidates.drop("dropped: rollback requested")
                self.deployer.rollback(args, command_seq=body.seq)
            elif isinstance(args, PingArgs):
                self.publish_status()
            elif isinstance(args, ResetTimeFloorArgs):
                self.emit("time-floor-reset", "trusted time floor set to %d (was %d)%s"
                          % (body.issued_at, st.time_floor, (": " + args.reason) if args.reason else ""),
                          level="warning", command_seq=body.seq,
                          data={"from": st.time_floor, "to": body.issued_at, "reason": args.reason})
            elif isinstance(args, RetuneArgs):
                self.retune(command_seq=body.seq)
            elif isinstance(args, SetRouterArgs):
                svc = self._service
                if svc is None:
                    raise CommandError("no model is serving; router unchanged")
                try:
                    svc.set_router(gate=args.gate, tau=args.tau, target_large_fraction=args.target_large_fraction,
                                   adaptive=args.adaptive)
                except ConfigError as e:  # RouterPolicyError: the operator must see why nothing changed
                    raise CommandError("router unchanged: %s" % e)
                self.emit("router-changed", "router policy changed", command_seq=body.seq,
                          data=svc.router_state() if hasattr(svc, "router_state") else {})
            else:
                raise CommandError("command kind %r is not supported by this agent" % args.kind)
        except TransferCancelled:
            raise
        except CommandError as e:
            self.emit("command-refused", str(e), level="warning", command_seq=body.seq, data={"reason": str(e)})
        except EdgeAgentError as e:
            log.warning("command seq %d failed: %s", body.seq, e)
        except OSError as e:  # e.g. the disk filled up: report it, keep the agent (and its model) running
            log.error("command seq %d failed: %s", body.seq, e)
            self.emit("error", "command seq %d failed: %s" % (body.seq, e), level="error", command_seq=body.seq)
        self.publish_status()

    # ------------------------------------------------------------------------------------ start-up

    def restore(self) -> None:
        """Bring the active bundle back after a start (worker thread), then resume an interrupted deploy."""
        st = self.store.state
        if st.active is not None:
            try:
                self._restore_active(st.active)
            except TransferCancelled:
                raise
            except EdgeAgentError as e:
                self.emit("error", "could not restore the active bundle %s v%d: %s"
                          % (st.active.name, st.active.version, e), level="error", bundle=st.active.ref)
        st = self.store.state
        if (st.deploy.state == "probation" and st.active is not None and self.is_ready()
                and self.deployer.hooks.probation is not None):
            # The agent stopped during probation: the bundle is not proven yet, watch it again.
            body = self.store.load_manifest(st.active.manifest_sha256)
            self.deployer._state("probation", st.active.ref, "resumed after restart", st.deploy.rollout_id)
            self.deployer.run_probation(st.active, body, rollout_id=st.deploy.rollout_id)
        pending = self.store.state.pending
        if pending is not None:
            self.emit("command-accepted", "resuming the interrupted deployment of %s v%d"
                      % (pending.args.bundle.name, pending.args.bundle.version), bundle=pending.args.bundle,
                      rollout_id=pending.args.rollout_id, command_seq=pending.command_seq, data={"resumed": True})
            try:
                self.deployer.deploy(pending.args, command_seq=pending.command_seq, resumed=True)
            except TransferCancelled:
                raise
            except EdgeAgentError:
                pass  # reported by the deployer
        elif self.store.state.deploy.state not in ("idle", "active", "failed", "rolled-back", "probation"):
            # Interrupted between steps with nothing to resume: say where we are.
            self._on_deploy_state(DeployState(state="active" if st.active else "idle",
                                              bundle=st.active.ref if st.active else None, since=time.time()))
        self.publish_status()

    def _restore_active(self, record: BundleRecord) -> None:
        body = self.store.load_manifest(record.manifest_sha256)
        missing = self.store.missing_files(body)
        if missing:
            if self.fetcher is None:
                raise TransportError("%d file(s) of the active bundle are missing and there is no broker"
                                     % len(missing))
            self.emit("fetch-started", "re-fetching %d quarantined or missing file(s) of the active bundle"
                      % len(missing), bundle=record.ref)
            self.fetcher.fetch_files(record.ref, missing)
        bundle_dir = self.store.materialize(body)
        models = self._prepare(bundle_dir, body)
        try:
            report = self._selftest(models, bundle_dir, body)
            if not report.passed:
                raise EngineError("active bundle fails its self-test after restart: %s" % report.message)
            self._activate(models, bundle_dir, body)
        except BaseException:
            self._discard(models)
            raise
        self._serving = record
        log.info("restored active bundle %s v%d", record.name, record.version)

    # ------------------------------------------------------------------------------------ threads

    def _work_loop(self) -> None:
        try:
            # No waiting for the broker: a complete active bundle serves even when the broker is down.
            self.restore()
            while not self.stop_event.is_set():
                self.heartbeat.beat()
                try:
                    item = self._work.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._run_item(item)
        except TransferCancelled:
            log.info("transfer cancelled for shutdown; it resumes on the next start")
        except Exception:
            log.exception("worker thread failed")
            self.worker_failed = True
            self.stop_event.set()

    def _run_item(self, item) -> None:
        """One unit of work; a bug in one command or call is logged and counted, never ends the worker."""
        try:
            if item[0] == "command":
                self.handle_command(item[1])
            elif item[0] == "call":  # a decision handed over by another thread (shadow gates)
                item[1]()
        except TransferCancelled:
            raise
        except Exception as e:
            self.worker_errors += 1
            log.exception("worker step %s failed", item[0])
            try:
                self.emit("error", "internal error in a %s step: %s" % (item[0], str(e)[:200] or type(e).__name__),
                          level="error")
            except Exception:
                log.exception("reporting a failed worker step failed")

    def metrics_text(self) -> str:
        """Prometheus text of the latest telemetry."""
        return self.publisher.metrics_text() if self.publisher is not None else ""

    def start(self) -> None:
        """Start the session, the worker and the HTTP API."""
        if self.deployer is None:
            self.build()
        self._platform = platform_info(self.cfg.engine.backend)
        if self.session is not None:
            self.session.start()
        if self.publisher is not None:
            self.publisher.start()
        if self.cfg.api.enabled:
            from edge_agent.runtime.http_api import ApiServer

            self.api = ApiServer(self.cfg.api, get_service=self.get_service, is_ready=self.is_ready,
                                 metrics_text=self.metrics_text)
            self.api.start()
        self._worker = threading.Thread(target=self._work_loop, name="worker", daemon=True)
        self._worker.start()
        self.emit("agent-started", "edge-agent %s started" % __version__,
                  data={"state_dir": str(self.cfg.state_dir)})

    def run(self) -> int:
        """Main loop until `stop_event`: systemd readiness, status and watchdog (edge_agent.watchdog).

        READY=1 once connected to the broker or serving a model; WATCHDOG=1 only while the worker thread's
        heartbeat is fresh. Returns 0 after a requested stop, 1 when the worker thread died on an
        unexpected error (so systemd's `Restart=on-failure` starts the agent again)."""
        self.start()
        sn = None
        if self.notifier is not None:
            sn = ServiceNotifier(self.notifier, self.heartbeat, describe=self.status_line, is_up=self._is_up)
            sn.tick()
        tick = min(self.heartbeat.max_age_s / 2, 1.0)
        while not self.stop_event.wait(tick):
            if sn is not None:
                sn.tick()
        self.shutdown()
        return 1 if self.worker_failed else 0

    def _is_up(self) -> bool:
        """READY=1 condition: connected to the broker, or serving a model while the broker is away."""
        return self.is_ready() or (self.session is not None and self.session.connected.is_set())

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop cleanly: cancel a transfer (its partial data is kept), stop the worker, publish the
        offline status, disconnect, close the model."""
        self.stop_event.set()
        if self.notifier is not None:
            self.notifier.stopping()
        if self.fetcher is not None:
            self.fetcher.cancel()
        self.emit("agent-stopping", "edge-agent stopping")
        if self._worker is not None:
            self._worker.join(timeout_s)
        self._stop_sources()
        if self.api is not None:
            self.api.stop()
        if self.publisher is not None:
            self.publisher.stop()  # flushes queued events while still connected, spools the rest
        if self.session is not None:
            final = self.status(online=False)
            self.session.stop(final=(topics.status(self.prefix, self.device_id), final.to_json(), 1, True))
        if self.candidates is not None:
            self.candidates.close()
        with self._serve_lock:
            svc, models = self._service, self._models
            self._service = self._models = None
        for thing in (svc, models):
            if thing is not None:
                try:
                    thing.close()
                except Exception:
                    log.exception("closing the model failed")
        if self._lock_fd is not None:
            import os

            os.close(self._lock_fd)
            self._lock_fd = None
