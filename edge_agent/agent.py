"""The agent process: wires the MQTT session, the store, the deployer, engines, runtime and telemetry.

Threads:
- the MQTT network thread (`MqttSession`): only queues inbound work, never blocks;
- the worker thread: verifies commands and runs deployments, rollbacks and the start-up restore one
  at a time, in order;
- the main thread (`run`): systemd notifications (ready, status, and the watchdog, fed only while the
  worker's heartbeat is fresh: edge_agent.watchdog), shutdown.

The Agent's command handling is in `edge_agent.agent_commands`, its serving model (engine hooks,
activation, restore, retune, sources) in `edge_agent.agent_serving`; what the device is, for its status,
in `edge_agent.sysinfo.device`.

Start-up converges from whatever `state.json` says: objects are re-hashed (bad ones quarantined),
the active bundle is restored (missing objects fetched again first), and a deployment interrupted
by a crash or a SIGTERM is resumed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Dict, Optional

from edge_agent import __version__
from edge_agent.agent_commands import COMMAND_QUEUE, AgentCommands, check_key_separation
from edge_agent.agent_serving import AgentServing
from edge_agent.bundle.store import BundleStore
from edge_agent.bundle.store_state import BundleRecord
from edge_agent.config import AgentConfig
from edge_agent.errors import ResourceError
from edge_agent.lifecycle.deploy import Deployer, Hooks
from edge_agent.mqtt.packets import Will
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import (
    BundleRef,
    DeployState,
    Event,
    PlatformInfo,
    Status,
)
from edge_agent.sysinfo.device import platform_info
from edge_agent.transfer.fetcher import Fetcher, TransferCancelled
from edge_agent.watchdog import Heartbeat, ServiceNotifier, status_line

log = logging.getLogger(__name__)


class Agent(AgentCommands, AgentServing):
    """One device's agent. Its command handling (`agent_commands`) and the serving model with its sources
    (`agent_serving`) are written in their own modules as mixins: one object, one set of attributes."""

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
            handler_errors=lambda: self.session.stats["handler_errors"] if self.session is not None else 0,
            worker_errors=lambda: self.worker_errors,
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
        heartbeat is fresh and no engine call has run past `runtime.engine_hang_s`. Returns 0 after a
        requested stop, 1 when the worker thread died on an unexpected error (so systemd's
        `Restart=on-failure` starts the agent again)."""
        self.start()
        sn = None
        if self.notifier is not None:
            sn = ServiceNotifier(self.notifier, self.heartbeat, describe=self.status_line, is_up=self._is_up,
                                 engine_call_age=self._engine_call_age, engine_hang_s=self.cfg.runtime.engine_hang_s)
            sn.tick()
        tick = min(self.heartbeat.max_age_s / 2, 1.0)
        while not self.stop_event.wait(tick):
            if sn is not None:
                sn.tick()
        self.shutdown()
        return 1 if self.worker_failed else 0

    def _engine_call_age(self) -> float:
        """Seconds the longest engine call in progress has run, over the serving models (0.0: none)."""
        svc = self._service
        age = getattr(svc, "engine_call_age_s", None)
        return float(age()) if age is not None else 0.0

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
