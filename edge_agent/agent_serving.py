"""The agent's serving model: engine hooks for the deployer, activation, restore after a start, retune,
and the video/folder sources that feed the model once it serves.

`AgentServing` is a mixin of `edge_agent.agent.Agent`: it holds no state of its own, it works on the
agent's `_service`/`_models` (swapped under `_serve_lock`), store, deployer and fetcher.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store_state import BundleRecord
from edge_agent.errors import CommandError, EdgeAgentError, EngineError, TransportError
from edge_agent.protocol import topics
from edge_agent.protocol.messages import DeployState, Result
from edge_agent.transfer.fetcher import TransferCancelled

log = logging.getLogger(__name__)


class AgentServing:
    """Model preparation, activation, restore, retune and sources (mixin of `edge_agent.agent.Agent`)."""

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
