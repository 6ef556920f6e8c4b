"""Runs rollouts: feeds the pure planner (`fleet.rollouts.plan`) with status, events and time, persists every
step to the registry, and carries out the planner's actions by sending commands.

Commands go through `send_command(device_id, args)`, a function the controller supplies: it signs the
command (with a fresh per-device sequence number) and publishes it. The runner persists the new state
*before* sending, so a controller that dies in between resumes with the device marked as sent; the
device then either shows it got the command (its status is retained, so the restarted controller sees
where it stands) or, after a grace period, is sent the command again (commands are idempotent on the
device); a device that never answers times out.

All public methods are thread-safe (the MQTT thread, the RPC handler and the ticker call them).

With several controllers on one PostgreSQL registry, a runner is given `RolloutLeases` and drives only
the rollouts it owns; how is in `fleet.rollouts.sharing`. Action -> command mapping: `fleet.rollouts.commands`;
publishing them (and what is not published): `fleet.rollouts.sender`.

This module stays over 400 lines: one class around one lock and the active rollouts, whose inputs,
operator requests and queries each read best next to `_apply`, the one place actions are carried out.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.messages import (
    BundleRef,
    CommandArgs,
    Event,
    RollbackArgs,
    Status,
)
from fleet.leases import LeaseLost, RolloutLeases
from fleet.registry import Registry
from fleet.registry_db import RegistryError
from fleet.registry_rollouts import RELEASE_CLAIMS, TAKE_CLAIMS, DevicesClaimed, release_claims
from fleet.rollouts.actions import Action, Note
from fleet.rollouts.classify import classify_event, classify_status
from fleet.rollouts.commands import command_for
from fleet.rollouts.plan import Rollout
from fleet.rollouts.record import RolloutParams
from fleet.rollouts.sender import RolloutSender
from fleet.rollouts.sharing import OWNED_STATES, SharedRollouts
from fleet.rollouts.states import (
    D_ROLLBACK_SENT,
    DEFAULT_WAVES,
    SUCCEEDED,
    RolloutError,
)
from fleet.rollouts.waves import check_explicit_waves, resolve_waves

log = logging.getLogger(__name__)

#: Most devices a rollout.status answer lists when the caller leaves the choice to the controller.
AUTO_DEVICE_LIST = 500

SendCommand = Callable[[str, CommandArgs], None]



def new_rollout_id(now: float) -> str:
    """A sortable, readable, unique rollout id such as ``r20261122-0815-3fa2``."""
    return "r%s-%s" % (time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)), os.urandom(2).hex())


class RolloutRunner(RolloutSender, SharedRollouts):
    """Owns the active rollouts of one controller (with several controllers, see `SharedRollouts`)."""

    def __init__(
        self,
        registry: Registry,
        send_command: SendCommand,
        *,
        defaults: Optional[RolloutParams] = None,
        default_waves: Optional[Sequence[float]] = None,
        resend_grace_s: float = 15.0,
        clock: Callable[[], float] = time.time,
        leases: Optional[RolloutLeases] = None,
        forward_timeout_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self.send_command = send_command
        self.defaults = defaults or RolloutParams()
        self.default_waves = list(default_waves or DEFAULT_WAVES)
        #: After a restart, how long a device has to show (by its retained status or an event) that it
        #: got a command sent just before the restart, before the command is sent again.
        self.resend_grace_s = resend_grace_s
        self.clock = clock
        self._lock = threading.RLock()
        self._active: Dict[str, Rollout] = {}
        self.send_failures = 0
        # Commands are signed and published by a sender thread once started, so a wave of a thousand
        # deploys never holds up whoever reported the event that started it (the ingest worker).
        self._outbox: queue.Queue = queue.Queue()
        self._sender: Optional[threading.Thread] = None
        #: Several controllers: the leases this runner holds (None: the only controller, owns all).
        self.leases = leases
        self.forward_timeout_s = forward_timeout_s
        self.takeovers = 0
        self.forwarded = 0
        #: Commands not published because the lease may have expired meanwhile (see `_hold_back`).
        self.held_back = 0
        #: Deploys still queued when their rollout stopped, not published.
        self.stale_dropped = 0

    # ------------------------------------------------------------------------------------ lifecycle

    def resume_from_registry(self) -> List[str]:
        """Load every rollout that was running, paused or stalled when the controller stopped (with
        leases: every such rollout no live controller owns)."""
        with self._lock:
            resumed = []
            for row in self.registry.list_rollouts(states=OWNED_STATES, limit=1000):
                if row["rollout_id"] not in self._active and self._adopt(row["rollout_id"]):
                    resumed.append(row["rollout_id"])
            if resumed:
                log.info("resumed %d rollout(s) from the registry: %s", len(resumed), ", ".join(resumed))
            return resumed

    def _adopt(self, rollout_id: str) -> bool:
        """Drive a saved rollout from here (after a restart or a takeover); False when it needs no
        owner or (with leases) another live controller owns it."""
        if self.leases is not None and not self.leases.acquire(rollout_id):
            return False
        body = self.registry.load_rollout(rollout_id)
        if body is None:
            return False
        r = Rollout.from_dict(body)
        if r.final and not rollbacks_outstanding(r):
            if not holds_devices(r):
                release_claims(self.registry, rollout_id)  # (normally released by its final save)
            if self.leases is not None:
                self.leases.settle(rollout_id)
            return False  # ended, nothing outstanding
        self._active[r.rollout_id] = r
        acts = r.restarted(self.clock(), self.resend_grace_s)
        self._apply(r, acts)
        if self.leases is not None:
            self._replay_statuses(r)
        return rollout_id in self._active

    def start(
        self,
        *,
        bundle: Dict[str, Any],
        manifest_sha256: str,
        manifest_size: int,
        percents: Optional[Sequence[float]] = None,
        wave_devices: Optional[Sequence[Sequence[str]]] = None,
        devices: Optional[Sequence[str]] = None,
        mode: str = "normal",
        ab_split: Optional[float] = None,
        params: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """Create and start a rollout; returns its summary. Raises RolloutError on a bad request."""
        now = self.clock()
        bref = BundleRef(name=bundle["name"], version=int(bundle["version"])).model_dump()
        known = {d["device_id"]: d for d in self.registry.list_devices()}
        if wave_devices:
            waves = check_explicit_waves(wave_devices)
            unknown = sorted(d for w in waves for d in w if d not in known)
            if unknown:
                raise RolloutError("unknown device(s): %s" % ", ".join(unknown[:10]))
        else:
            if devices:
                unknown = sorted(d for d in devices if d not in known)
                if unknown:
                    raise RolloutError("unknown device(s): %s" % ", ".join(unknown[:10]))
                targets = list(dict.fromkeys(devices))
            else:
                targets = list(known)
            if not targets:
                raise RolloutError("the registry knows no devices yet; nothing to roll out to")
            # Online devices first, so the first (canary) wave is made of devices that can answer.
            targets.sort(key=lambda d: (not known[d]["online"], d))
            waves = resolve_waves(targets, list(percents or self.default_waves))
        merged = self.defaults.to_dict()
        merged.update({k: v for k, v in (params or {}).items() if v is not None})
        try:
            rparams = RolloutParams(**merged)
        except TypeError as e:
            raise RolloutError("bad rollout parameter: %s" % e)
        with self._lock:
            r = Rollout.create(
                rollout_id=new_rollout_id(now),
                bundle=bref,
                manifest_sha256=manifest_sha256,
                manifest_size=manifest_size,
                waves=waves,
                priors={d: known[d]["active"] for d in known},
                params=rparams,
                mode=mode,
                ab_split=ab_split,
                now=now,
            )
            if self.leases is not None and not self.leases.acquire(r.rollout_id):
                raise RolloutError("rollout %s: could not take its lease" % r.rollout_id)
            self._active[r.rollout_id] = r
            try:
                # Its devices are claimed in the transaction that first saves it (before any command).
                self._apply(r, r.start(now), claims=TAKE_CLAIMS)
            except DevicesClaimed as e:
                self._forget_new(r.rollout_id)
                raise RolloutError("device(s) %s are already in rollout %s; wait for it to end or abort it first"
                                   % (", ".join(e.devices[:5]), e.rollout_id))
            except BaseException:
                # Not saved, or saved with the connection lost before we heard (then, its lease dropped, it
                # is an orphan that the next tick of any controller adopts from the registry).
                self._forget_new(r.rollout_id)
                raise
            return r.summary()

    def _forget_new(self, rollout_id: str) -> None:
        self._active.pop(rollout_id, None)
        if self.leases is not None:
            try:
                self.leases.drop(rollout_id)
            except RegistryError as e:
                log.warning("rollout %s: lease not dropped: %s", rollout_id, e)  # it expires after lease_s

    # ------------------------------------------------------------------------------------- inputs

    def on_status(self, status: Status) -> None:
        """A device's status arrived (called by ingest)."""
        deploy = status.deploy
        with self._lock:
            for r in list(self._active.values()):
                if status.device_id not in r.devices:
                    continue
                self._observe_status(
                    r, status.device_id, online=status.online,
                    active=status.active.model_dump() if status.active else None,
                    deploy_state=deploy.state if deploy else None,
                    deploy_bundle=deploy.bundle.model_dump() if deploy and deploy.bundle else None,
                    deploy_rollout_id=deploy.rollout_id if deploy else None,
                    detail=deploy.detail if deploy else None,
                )

    def _observe_status(self, r: Rollout, device_id: str, *, online: bool, active: Optional[Dict[str, Any]],
                        deploy_state: Optional[str], deploy_bundle: Optional[Dict[str, Any]],
                        deploy_rollout_id: Optional[str], detail: Optional[str]) -> None:
        obs = classify_status(
            r, online=online, active=active, deploy_state=deploy_state, deploy_bundle=deploy_bundle,
            deploy_rollout_id=deploy_rollout_id,
        )
        if obs is not None:
            text = "status %s" % (deploy_state or "offline")
            if detail:
                text += ": %s" % detail
            self._apply(r, r.observe(device_id, obs, text, self.clock()))

    def on_event(self, event: Event, *, forward: bool = True) -> None:
        """A device's event arrived (called by ingest; `forward` False for one another controller
        forwarded, so it is never passed on again)."""
        with self._lock:
            for r in list(self._active.values()):
                if event.device_id not in r.devices:
                    continue
                obs = classify_event(
                    r,
                    kind=event.kind,
                    bundle=event.bundle.model_dump() if event.bundle else None,
                    rollout_id=event.rollout_id,
                )
                if obs is not None:
                    detail = "%s: %s" % (event.kind, event.message) if event.message else event.kind
                    self._apply(r, r.observe(event.device_id, obs, detail[:300], self.clock()))
            mine = [rid for rid, r in self._active.items() if event.device_id in r.devices]
        if self.leases is not None and forward:
            self._forward_event(event, set(mine))

    def tick(self) -> None:
        """Time passes: device timeouts (and, with leases: renew ours, take over orphaned rollouts).
        Call every second or so."""
        if self.leases is not None:
            self._keep_leases()
        now = self.clock()
        with self._lock:
            for r in list(self._active.values()):
                acts = r.tick(now)
                if acts:
                    self._apply(r, acts)

    # ----------------------------------------------------------------------------------- operator

    def _get(self, rollout_id: str) -> Rollout:
        r = self._active.get(rollout_id)
        if r is None:
            if self.registry.load_rollout(rollout_id) is not None:
                raise RolloutError("rollout %s has already ended" % rollout_id)
            raise RolloutError("no rollout %s" % rollout_id)
        return r

    def _operate(self, rollout_id: str, op: str, params: Dict[str, Any],
                 step: Callable[[Rollout], Any]) -> Dict[str, Any]:
        """Run an operator request: forwarded to the owning controller, or `step` on the active rollout."""
        fwd = self._forward_op(rollout_id, op, params)
        if fwd is not None:
            return fwd
        with self._lock:
            r = self._get(rollout_id)
            if not self._apply(r, step(r)):
                raise _moved(rollout_id)
            return r.summary()

    def pause(self, rollout_id: str) -> Dict[str, Any]:
        """Pause a running rollout."""
        return self._operate(rollout_id, "pause", {}, lambda r: r.pause(self.clock()))

    def resume(self, rollout_id: str) -> Dict[str, Any]:
        """Resume a paused rollout or push a stalled one onwards."""
        return self._operate(rollout_id, "resume", {}, lambda r: r.resume(self.clock()))

    def abort(self, rollout_id: str, *, rollback: bool = True) -> Dict[str, Any]:
        """Abort a rollout (rolling back the devices that took it unless `rollback` is False)."""
        return self._operate(rollout_id, "abort", {"rollback": rollback},
                             lambda r: r.abort(self.clock(), rollback=rollback))

    def promote(self, rollout_id: str, *, accept: bool = True) -> Dict[str, Any]:
        """Promote (or drop) a shadow/A-B rollout's candidate on its devices (also once it ended: an A/B
        rollout that succeeded keeps its devices until this is done)."""
        fwd = self._forward_op(rollout_id, "promote", {"accept": accept})
        if fwd is not None:
            return fwd
        with self._lock:
            r = self._active.get(rollout_id)
            borrowed = False
            if r is None:
                body = self.registry.load_rollout(rollout_id)
                if body is None:
                    raise RolloutError("no rollout %s" % rollout_id)
                r = Rollout.from_dict(body)
                if self.leases is not None:
                    # Ended: its lease is settled; take it for this one step (fenced like any other).
                    if not self.leases.acquire(rollout_id, settled_too=True):
                        raise _moved(rollout_id)
                    borrowed = True
            acts = r.promote(self.clock(), accept=accept)
            done = r.final and not rollbacks_outstanding(r)
            saved = self._apply(r, acts, claims=RELEASE_CLAIMS if done else None)
            if borrowed and saved and self.leases is not None:
                self.leases.settle(rollout_id)
            if not saved:
                raise _moved(rollout_id)
            return r.summary()

    def rollback_devices(
        self, devices: Sequence[str], *, to: Optional[Dict[str, Any]] = None, reason: str = "operator rollback"
    ) -> Dict[str, Any]:
        """Send a rollback to each device (outside any rollout); returns {sent: [...], failed: {...}}."""
        if not devices:
            raise RolloutError("no devices given")
        known = {d["device_id"] for d in self.registry.list_devices()}
        unknown = sorted(d for d in devices if d not in known)
        if unknown:
            raise RolloutError("unknown device(s): %s" % ", ".join(unknown[:10]))
        target = BundleRef(**to) if to else None
        sent: List[str] = []
        failed: Dict[str, str] = {}
        for d in dict.fromkeys(devices):
            try:
                self.send_command(d, RollbackArgs(to=target, reason=reason[:200]))
                sent.append(d)
            except EdgeAgentError as e:
                failed[d] = str(e)
        return {"sent": sent, "failed": failed}

    # ------------------------------------------------------------------------------------- queries

    def get(self, rollout_id: Optional[str] = None, *, history: int = 50, devices: Any = True) -> Dict[str, Any]:
        """A rollout's summary, devices and recent history (the newest rollout when no id is given).

        `devices`: True lists every device, False none (a 10,000-device list is over a megabyte), "auto"
        lists them when there are at most AUTO_DEVICE_LIST of them."""
        with self._lock:
            if rollout_id is None:
                rows = self.registry.list_rollouts(limit=1)
                if not rows:
                    raise RolloutError("no rollouts yet")
                rollout_id = rows[0]["rollout_id"]
            # With several controllers the registry is the view every controller answers with (ours in
            # memory may be stale for a moment after another controller took the rollout over).
            r = self._active.get(rollout_id) if self.leases is None else None
            if r is None:
                body = self.registry.load_rollout(rollout_id)
                if body is None:
                    raise RolloutError("no rollout %s" % rollout_id)
                r = Rollout.from_dict(body)
            out = r.summary()
            if devices is True or (devices == "auto" and len(r.devices) <= AUTO_DEVICE_LIST):
                out["devices"] = [e.to_dict() for e in r.devices.values()]
            out["history"] = self.registry.rollout_history(rollout_id, limit=history)
            return out

    def list(self, *, limit: int = 20) -> List[Dict[str, Any]]:
        """Recent rollouts, newest first."""
        return self.registry.list_rollouts(limit=limit)

    def active_ids(self) -> List[str]:
        """Ids of the rollouts this runner is driving."""
        with self._lock:
            return [rid for rid, r in self._active.items() if not r.final]

    # ------------------------------------------------------------------------------------ internals

    def _apply(self, r: Rollout, acts: List[Action], *, claims: Optional[str] = None) -> bool:
        """Persist the rollout with its history, then send the commands the actions ask for. False when
        another controller took the rollout over (nothing was saved or sent). `claims`: TAKE_CLAIMS on
        the first save (DevicesClaimed when another rollout holds a device); released here once the
        rollout can send nothing more."""
        now = self.clock()
        history = []
        for a in acts:
            if isinstance(a, Note):
                history.append((now, a.kind, a.device_id, a.message))
                log.info(
                    "rollout %s: %s%s: %s", r.rollout_id, a.kind, " " + a.device_id if a.device_id else "", a.message
                )
        dirty = r.take_dirty()
        if not acts and not dirty:
            return True  # e.g. a progress detail: nothing a restart would need
        if claims is None and not holds_devices(r):
            claims = RELEASE_CLAIMS
        try:
            self.registry.save_rollout(r.row_dict(), history, devices=dirty, owner=self._owner(), claims=claims)
        except LeaseLost as e:
            self._lost(r.rollout_id, e)  # another controller drives it now; send nothing
            return False
        for a in acts:
            if isinstance(a, Note):
                continue
            item = (r.rollout_id, a.device_id, command_for(r, a))
            if self._sender is not None:
                self._outbox.put(item)
            else:
                self._send(*item)
        if r.final and r.rollout_id in self._active and not rollbacks_outstanding(r):
            # Keep a stopped rollout in memory while rollbacks are outstanding, so their results
            # (and late activations) are still tracked; otherwise it lives on in the registry only.
            del self._active[r.rollout_id]
            if self.leases is not None:
                self.leases.settle(r.rollout_id)
        return True


def _moved(rollout_id: str) -> RolloutError:
    return RolloutError("rollout %s was taken over by another controller while this request ran; nothing was "
                        "done here, try again" % rollout_id)


def rollbacks_outstanding(r: Rollout) -> bool:
    """True while some device of the rollout has been sent a rollback it has not confirmed."""
    return any(e.state == D_ROLLBACK_SENT for e in r.devices.values())


def holds_devices(r: Rollout) -> bool:
    """True while the rollout may still command its devices (so they stay claimed): until it ends and
    its rollbacks are confirmed, and an A/B rollout that succeeded until the operator promotes or drops
    its candidate."""
    if not r.final or rollbacks_outstanding(r):
        return True
    return r.mode == "ab" and r.state == SUCCEEDED
