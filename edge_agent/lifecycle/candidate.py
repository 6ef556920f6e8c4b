"""The agent's side of shadow and A/B deployments: one candidate bundle beside the active one.

A deploy command with ``mode = "shadow"`` or ``"ab"`` goes through the usual deployer steps (fetch,
verify, prepare, self-test) with two differences: the candidate's engines are prepared against the
memory left beside the active bundle's (refused with a clear reason when even its weights cannot fit;
a smaller max batch otherwise), and after its self-test the candidate is *not* activated. Instead:

* shadow: the serving service becomes a `ShadowService` (the active bundle answers every request; a
  sampled share is mirrored to the candidate off the request path). A `ShadowJudge` watches the
  manifest's gates; when the window has passed over at least the minimum inputs, the candidate is
  promoted automatically (event ``promoted``) or refused (``candidate-refused``, the reason names the
  gate). A refused candidate is closed without ever having answered a request.
* ab: the serving service becomes a `SplitService` that answers ``ab_split`` % of requests with the
  candidate, until the operator promotes or drops it (or a rollback / another deploy replaces it).

`state.json` keeps the deploy command in ``pending`` while the candidate runs, so an agent restarted
in the middle prepares the candidate again and starts a fresh window. Promotion makes the candidate the
active bundle (the previous active one becomes ``previous``); its shadow window stands in for probation.
Decisions run on the agent's worker thread, in order with commands.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store_state import BundleRecord
from edge_agent.errors import CommandError, EngineError, ResourceError
from edge_agent.lifecycle.deploy import CandidateRefusedError
from edge_agent.lifecycle.shadow import ShadowGates, ShadowJudge, ShadowVerdict
from edge_agent.protocol.messages import BundleRef, DeployArgs, PromoteArgs

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: How often the watcher looks at the shadow gates (seconds).
WATCH_POLL_S = 0.25


def candidate_weight_bytes(manifest: ManifestBody, platform_key: Optional[str] = None) -> int:
    """A lower bound of the candidate's engine memory: the size of the files its engines load (a prebuilt
    engine for this platform when the bundle has one, else the ONNX file), for both models."""
    total = 0
    for spec in manifest.models.values():
        path = spec.engines.get(platform_key or "") or spec.path
        total += manifest.files[path].size
    return total


def check_candidate_memory(*, need_bytes: int, budget_bytes: int, active_bytes: int, name: str) -> None:
    """Refuse a candidate whose weights alone exceed the memory budget left beside the active engines."""
    if need_bytes > budget_bytes:
        raise CandidateRefusedError(
            "not enough memory to run candidate %s beside the active bundle: its engines need at least %.1f MB, "
            "the budget left with the active engines (%.1f MB) loaded is %.1f MB; deploy it normally instead"
            % (name, need_bytes / MIB, active_bytes / MIB, budget_bytes / MIB))


@dataclass
class _Candidate:
    args: DeployArgs
    record: BundleRecord
    manifest: ManifestBody
    bundle_dir: Path
    models: Any
    active: Any
    wrapper: Any
    judge: Optional[ShadowJudge]
    started: float = field(default_factory=time.monotonic)

    @property
    def ref(self) -> BundleRef:
        return BundleRef(name=self.record.name, version=self.record.version)


class CandidateManager:
    """Runs at most one shadow / A-B candidate for an `Agent` (wired into its deployer's hooks)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.cfg = agent.cfg.shadow
        self._cand: Optional[_Candidate] = None
        hooks = agent.deployer.hooks
        self._activate_plain = hooks.activate
        hooks.prepare_candidate = self._prepare
        hooks.start_candidate = self._start
        hooks.activate = self._activate_replacing

    @property
    def running(self) -> Optional[_Candidate]:
        """The running candidate, if any."""
        return self._cand

    # ------------------------------------------------------------------------------------ commands

    def deploy(self, args: DeployArgs, *, command_seq: Optional[int] = None) -> None:
        """A shadow / A-B deploy command (worker thread)."""
        if self.agent.get_service() is None:
            raise CommandError("a %s deploy needs an active bundle to run beside; deploy one normally first"
                               % args.mode)
        if args.mode == "ab" and args.ab_split is None:
            raise CommandError("an ab deploy needs ab_split (percent of requests the candidate serves)")
        c = self._cand
        if c is not None:
            if c.record.manifest_sha256 == args.manifest_sha256 and (c.args.mode, c.args.ab_split) == (
                    args.mode, args.ab_split):
                self.agent.emit("command-accepted", "%s v%d is already running in %s mode"
                                % (c.record.name, c.record.version, args.mode), bundle=c.ref,
                                rollout_id=args.rollout_id, command_seq=command_seq, data={"already_running": True})
                return
            self._drop(c, "replaced by a %s deploy of %s v%d" % (args.mode, args.bundle.name, args.bundle.version),
                       state=False)
        self.agent.deployer.deploy(args, command_seq=command_seq)

    def promote(self, args: PromoteArgs, *, command_seq: Optional[int] = None) -> None:
        """The operator promotes (``accept``) or drops the running candidate (worker thread)."""
        c = self._cand
        verb = "promote" if args.accept else "drop"
        if c is None:
            raise CommandError("no shadow or A/B candidate is running; nothing to %s" % verb)
        if args.rollout_id and c.args.rollout_id and args.rollout_id != c.args.rollout_id:
            raise CommandError("the running candidate belongs to rollout %s, not %s" % (c.args.rollout_id,
                                                                                      args.rollout_id))
        note = (": " + args.reason) if args.reason else ""
        if args.accept:
            self._promote(c, "promoted by the operator%s" % note, self._figures(c), command_seq=command_seq)
        else:
            self._drop(c, "dropped by the operator%s" % note, command_seq=command_seq, by="operator")

    def drop(self, reason: str) -> None:
        """Drop a running candidate (e.g. before a rollback); nothing happens when none runs."""
        c = self._cand
        if c is not None:
            self._drop(c, reason, by="agent")

    def close(self) -> None:
        """Agent shutdown: stop the candidate and free its engines; `pending` stays, a restart resumes."""
        c, self._cand = self._cand, None
        if c is not None:
            self._stop_candidate(c)
            self._close_models(c)

    # ------------------------------------------------------------------------------------ deployer hooks

    def _prepare(self, bundle_dir: Path, manifest: ManifestBody) -> Any:
        try:
            from edge_agent.engines.prepare import current_budget, prepare_engines
        except ImportError as e:
            raise EngineError("engine preparation is not available in this installation: %s" % e)
        active = self.agent._models
        platform = getattr(active, "platform", None)
        backend = getattr(active, "backend", None) or "onnxruntime"
        cfg = self.agent.cfg.engine
        budget = current_budget(cfg, platform, backend)
        active_bytes = sum((getattr(active, "memory_bytes", None) or {}).values())
        name = "%s v%d" % (manifest.name, manifest.version)
        check_candidate_memory(need_bytes=candidate_weight_bytes(manifest, getattr(platform, "key", None)),
                               budget_bytes=budget.budget_bytes, active_bytes=active_bytes, name=name)
        try:
            return prepare_engines(bundle_dir=bundle_dir, manifest=manifest, cfg=cfg,
                                   cache_dir=self.agent.cfg.state_dir / "engines", emit=self.agent._emit_engine,
                                   platform=platform, budget=budget)
        except ResourceError as e:
            raise CandidateRefusedError("not enough memory to run candidate %s beside the active bundle: %s"
                                        % (name, e))

    def _start(self, models: Any, bundle_dir: Path, manifest: ManifestBody, args: DeployArgs,
               record: BundleRecord) -> None:
        from edge_agent.runtime.ab import SplitService
        from edge_agent.runtime.mirror import ShadowService
        from edge_agent.runtime.service import InferenceService

        agent = self.agent
        active = agent.get_service()
        if active is None:
            raise CandidateRefusedError("no active bundle is serving to run the candidate beside")
        rt = agent.cfg.runtime
        service = InferenceService(models, manifest, bundle_dir, rt)
        ref = {"name": manifest.name, "version": manifest.version}
        judge = None
        data: Dict[str, Any] = {"mode": args.mode, "max_batch": getattr(models, "max_batch", None),
                                "batch": dict(getattr(models, "batch", {}) or {})}
        if args.mode == "shadow":
            gates = ShadowGates.from_health(manifest.health, max_window_s=self.cfg.max_window_s,
                                            latency_slack_ms=self.cfg.latency_slack_ms)
            judge = ShadowJudge(gates)
            wrapper: Any = ShadowService(active, service, candidate_ref=ref, fraction=self.cfg.mirror_fraction,
                                         queue_size=self.cfg.mirror_queue, shed_in_flight=self.cfg.shed_in_flight,
                                         judge=judge, timeout_s=rt.request_timeout_s)
            data.update(fraction=self.cfg.mirror_fraction, gates=gates._asdict())
            detail = "mirroring %.0f%% of requests for %.0f s / %d inputs" % (
                self.cfg.mirror_fraction * 100, gates.window_s, gates.min_inputs)
        else:
            split = float(args.ab_split or 0)
            wrapper = SplitService(active, service, candidate_ref=ref, split=split)
            data.update(split=split)
            detail = "serving %g%% of requests" % split
        c = _Candidate(args=args, record=record, manifest=manifest, bundle_dir=bundle_dir, models=models,
                       active=active, wrapper=wrapper, judge=judge)
        with agent._serve_lock:
            agent._service = wrapper
        self._cand = c
        agent.deployer._state(args.mode, c.ref, detail, args.rollout_id)
        agent.emit("shadow-started", "%s v%d runs in %s mode: %s" % (manifest.name, manifest.version, args.mode,
                                                                      detail),
                   bundle=c.ref, rollout_id=args.rollout_id, data=data)
        threading.Thread(target=self._watch, args=(c,), name="shadow-watch", daemon=True).start()

    def _activate_replacing(self, models: Any, bundle_dir: Path, manifest: ManifestBody) -> None:
        """Any other activation (normal deploy, rollback) first drops a running candidate."""
        c = self._cand
        if c is not None:
            self._drop(c, "replaced by %s v%d" % (manifest.name, manifest.version), state=False, clear_pending=False)
        self._activate_plain(models, bundle_dir, manifest)

    # ------------------------------------------------------------------------------------ decisions

    def _watch(self, c: _Candidate) -> None:
        """Poll the gates (shadow) and send periodic reports until the candidate is decided or replaced."""
        stop = self.agent.stop_event
        next_report = time.monotonic() + self.cfg.report_interval_s
        while not stop.wait(WATCH_POLL_S):
            if self._cand is not c:
                return
            if c.judge is not None:
                v = c.judge.verdict()
                if v is not None:
                    self._submit(functools.partial(self._decide, c, v))
                    return
            if time.monotonic() >= next_report:
                next_report += self.cfg.report_interval_s
                self._report(c, "%s report" % c.args.mode, self._figures(c))

    def _submit(self, fn: Callable[[], None]) -> None:
        """Hand a decision to the worker thread (in order with commands)."""
        while not self.agent.stop_event.is_set():
            try:
                self.agent._work.put(("call", fn), timeout=1.0)
                return
            except queue.Full:
                continue

    def _decide(self, c: _Candidate, v: ShadowVerdict) -> None:
        if self._cand is not c:
            return  # replaced or dropped meanwhile
        self._report(c, v.reason, v.measured)
        if v.promote:
            self._promote(c, "promoted automatically: %s" % v.reason, v.measured)
        else:
            self._drop(c, "refused: %s" % v.reason, data=v.measured, by="gates")

    def _figures(self, c: _Candidate) -> Dict[str, Any]:
        if c.judge is not None:
            return c.judge.measured()
        return {"elapsed_s": round(time.monotonic() - c.started, 3), "split": float(c.args.ab_split or 0)}

    def _report(self, c: _Candidate, message: str, figures: Dict[str, Any]) -> None:
        self.agent.emit("shadow-report", message, bundle=c.ref, rollout_id=c.args.rollout_id,
                        data=dict(figures, mode=c.args.mode))

    def _promote(self, c: _Candidate, reason: str, figures: Dict[str, Any], *,
                 command_seq: Optional[int] = None) -> None:
        agent = self.agent
        store = agent.store
        self._stop_candidate(c)
        self._cand = None
        try:
            # A fresh service for the candidate's engines; the active service and its engines are closed.
            self._activate_plain(c.models, c.bundle_dir, c.manifest)
        except BaseException:
            self._close_models(c)
            store.update_state(pending=None)
            raise
        agent._serving = c.record
        store.record_activation(c.record)
        store.update_state(pending=None)
        agent.emit("promoted", "%s v%d is active: %s" % (c.record.name, c.record.version, reason), bundle=c.ref,
                   rollout_id=c.args.rollout_id, command_seq=command_seq, data=dict(figures, mode=c.args.mode))
        agent.deployer._state("active", c.ref, reason[:500], c.args.rollout_id)
        store.gc()

    def _drop(self, c: _Candidate, reason: str, *, data: Optional[Dict[str, Any]] = None,
              command_seq: Optional[int] = None, by: str = "agent", state: bool = True,
              clear_pending: bool = True) -> None:
        agent = self.agent
        self._stop_candidate(c)
        self._cand = None
        self._close_models(c)
        if clear_pending:
            agent.store.update_state(pending=None)
        agent.emit("candidate-refused", "%s v%d %s" % (c.record.name, c.record.version, reason),
                   level="warning", bundle=c.ref, rollout_id=c.args.rollout_id, command_seq=command_seq,
                   data=dict(data or self._figures(c), mode=c.args.mode, by=by))
        if state:
            st = agent.store.state
            if by == "gates":
                agent.deployer._state("failed", c.ref, reason[:500], c.args.rollout_id)
            else:
                agent.deployer._state("active" if st.active else "idle", st.active.ref if st.active else None,
                                      "candidate %s v%d %s" % (c.record.name, c.record.version, reason)[:500],
                                      c.args.rollout_id)
        if clear_pending:
            agent.store.gc()

    def _stop_candidate(self, c: _Candidate) -> None:
        """Put the plain active service back in front and stop the candidate's service."""
        agent = self.agent
        with agent._serve_lock:
            if agent._service is c.wrapper:
                agent._service = c.active
        stop = getattr(c.wrapper, "close_mirror", None) or c.wrapper.close_candidate
        try:
            stop()
        except Exception:
            log.exception("stopping the candidate failed")

    @staticmethod
    def _close_models(c: _Candidate) -> None:
        try:
            c.models.close()
        except Exception:
            log.exception("closing the candidate's engines failed")
