"""The rollout planner: a pure state machine for staged, health-gated rollouts.

A `Rollout` holds the waves (device lists), one `DeviceEntry` per target device and the rollout's own
state. Its methods take observations and the current time and return `Action`s (send a deploy, a
rollback, a promote; write a history note). Nothing here does I/O or reads the clock: the runner
(`fleet.rollout_runner`) persists the rollout and carries the actions out.

Rules:

* A wave starts by deploying to every device in it. It is *complete* when every one of its devices is
  terminal (succeeded, failed or timed out). It *passes* when the fraction that succeeded reaches
  ``success_threshold``. Success means the device passed self-test and probation: the event
  ``probation-passed`` or a status ``active`` with the rollout's bundle. A shadow rollout's device
  succeeds when its candidate is *promoted* (the device's shadow gates held, or the operator promoted
  it) and fails when the candidate is refused, so its waves advance on the shadow gates; an A/B
  rollout's device succeeds once it serves the split (``shadow-started`` / status ``ab``) and keeps
  it until the operator promotes or drops the candidate.
* When failures exceed ``error_threshold`` × (devices in the waves started so far) the rollout halts:
  every device that took the bundle gets a rollback to the bundle it ran before, pending devices are
  skipped, so later waves never receive it.
* A device that does not finish within ``device_timeout_s`` of its deploy is timed out (typically
  offline). Timeouts are not failures, but they count against the success threshold; a wave that
  completes under the threshold only because of timeouts *stalls*, and the operator decides (resume
  advances anyway, abort rolls back).
* pause stops new waves from starting; in-flight devices are still tracked. abort rolls back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Union

from edge_agent.errors import EdgeAgentError

DEFAULT_WAVES = (10.0, 30.0, 100.0)

# Rollout states.
RUNNING = "running"
PAUSED = "paused"
STALLED = "stalled"
SUCCEEDED = "succeeded"
HALTED = "halted"
ABORTED = "aborted"
ROLLOUT_STATES = (RUNNING, PAUSED, STALLED, SUCCEEDED, HALTED, ABORTED)
ACTIVE_STATES = (RUNNING, PAUSED, STALLED)
FINAL_STATES = (SUCCEEDED, HALTED, ABORTED)

# Per-device states.
D_PENDING = "pending"
D_SENT = "sent"
D_PROGRESS = "in-progress"
D_SUCCEEDED = "succeeded"
D_FAILED = "failed"
D_TIMED_OUT = "timed-out"
D_SKIPPED = "skipped"
D_ROLLBACK_SENT = "rollback-sent"
D_ROLLED_BACK = "rolled-back"
D_ROLLBACK_FAILED = "rollback-failed"
DEVICE_STATES = (
    D_PENDING,
    D_SENT,
    D_PROGRESS,
    D_SUCCEEDED,
    D_FAILED,
    D_TIMED_OUT,
    D_SKIPPED,
    D_ROLLBACK_SENT,
    D_ROLLED_BACK,
    D_ROLLBACK_FAILED,
)
IN_FLIGHT = (D_SENT, D_PROGRESS)
#: Devices that may be running the bundle and need a rollback when the rollout halts.
TOOK_IT = (D_SENT, D_PROGRESS, D_SUCCEEDED)
WAVE_TERMINAL = (D_SUCCEEDED, D_FAILED, D_TIMED_OUT, D_ROLLBACK_SENT, D_ROLLED_BACK, D_ROLLBACK_FAILED)

MAX_ROLLBACK_ATTEMPTS = 3

# Observations (what an event or a status means for one device of one rollout).
OBS_PROGRESS = "progress"
OBS_SUCCESS = "success"
OBS_FAILURE = "failure"
OBS_ROLLED_BACK = "rolled-back"
OBS_ROLLBACK_FAILED = "rollback-failed"
OBS_OFFLINE = "offline"

_SUCCESS_EVENTS = {"normal": ("probation-passed",), "shadow": ("promoted",), "ab": ("shadow-started",)}
_SUCCESS_STATES = {"normal": ("active",), "shadow": ("active",), "ab": ("ab",)}
_FAILURE_EVENTS = (
    "command-refused",
    "fetch-failed",
    "bundle-refused",
    "engine-build-failed",
    "selftest-failed",
    "probation-failed",
    "candidate-refused",
)
_PROGRESS_EVENTS = (
    "command-accepted",
    "fetch-started",
    "fetch-progress",
    "fetch-done",
    "bundle-installed",
    "engine-build-started",
    "engine-build-progress",
    "engine-build-done",
    "engine-loaded",
    "batch-tuned",
    "selftest-passed",
    "activated",
    "shadow-started",
    "shadow-report",
)
_PROGRESS_STATES = ("fetching", "verifying", "preparing", "self-testing", "activating", "probation", "shadow")


class RolloutError(EdgeAgentError):
    """A rollout request that cannot be carried out (bad waves, unknown devices, wrong state)."""


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class SendDeploy:
    """Send the rollout's deploy command to one device."""

    device_id: str


@dataclass(frozen=True)
class SendRollback:
    """Send a rollback to one device; `to` is the bundle it ran before (None: its previous one)."""

    device_id: str
    to: Optional[Dict[str, Any]]
    reason: str


@dataclass(frozen=True)
class SendPromote:
    """Promote (accept) or drop the shadow/A-B candidate on one device."""

    device_id: str
    accept: bool
    reason: str = ""


@dataclass(frozen=True)
class Note:
    """A line for the rollout's history (and the controller's log)."""

    kind: str
    message: str
    device_id: Optional[str] = None


Action = Union[SendDeploy, SendRollback, SendPromote, Note]


# ------------------------------------------------------------------------------------------------ model


@dataclass
class RolloutParams:
    """Health-gate thresholds and timeouts of one rollout."""

    success_threshold: float = 0.9
    error_threshold: float = 0.1
    device_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not 0.0 < self.success_threshold <= 1.0:
            raise RolloutError("success threshold must be in (0, 1], got %r" % self.success_threshold)
        if not 0.0 <= self.error_threshold < 1.0:
            raise RolloutError("error threshold must be in [0, 1), got %r" % self.error_threshold)
        if self.device_timeout_s <= 0:
            raise RolloutError("device timeout must be positive, got %r" % self.device_timeout_s)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form."""
        return {
            "success_threshold": self.success_threshold,
            "error_threshold": self.error_threshold,
            "device_timeout_s": self.device_timeout_s,
        }


@dataclass
class DeviceEntry:
    """One target device of a rollout."""

    device_id: str
    wave: int
    state: str = D_PENDING
    prior: Optional[Dict[str, Any]] = None
    sent_at: Optional[float] = None
    updated: float = 0.0
    detail: str = ""
    rollback_attempts: int = 0
    #: After a controller restart: when to send the last command again if the device has not shown it
    #: got it (not persisted; set by `Rollout.restarted`).
    resend_at: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form."""
        return {
            "device_id": self.device_id,
            "wave": self.wave,
            "state": self.state,
            "prior": self.prior,
            "sent_at": self.sent_at,
            "updated": self.updated,
            "detail": self.detail,
            "rollback_attempts": self.rollback_attempts,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> DeviceEntry:
        """Inverse of `to_dict`."""
        return cls(
            device_id=d["device_id"],
            wave=int(d["wave"]),
            state=d["state"],
            prior=d.get("prior"),
            sent_at=d.get("sent_at"),
            updated=float(d.get("updated") or 0.0),
            detail=d.get("detail") or "",
            rollback_attempts=int(d.get("rollback_attempts") or 0),
        )


def resolve_waves(targets: Sequence[str], percents: Sequence[float]) -> List[List[str]]:
    """Split `targets` (in order) into cumulative percentage waves: 10,30,100 over 20 devices gives
    2, 4 and 14 devices. Every wave gets at least one device; waves that would be empty are dropped."""
    if not targets:
        raise RolloutError("no target devices")
    if not percents:
        raise RolloutError("no waves given")
    last = 0.0
    for p in percents:
        if not 0 < p <= 100:
            raise RolloutError("wave percentages must be in (0, 100], got %g" % p)
        if p <= last:
            raise RolloutError("wave percentages must increase (they are cumulative), got %g after %g" % (p, last))
        last = p
    if percents[-1] != 100:
        raise RolloutError("the last wave must be 100%% (got %g%%); devices would be left out" % percents[-1])
    n = len(targets)
    waves: List[List[str]] = []
    done = 0
    for p in percents:
        upto = min(n, max(done + 1, math.ceil(p * n / 100.0 - 1e-9)))
        if upto > done:
            waves.append(list(targets[done:upto]))
            done = upto
    return waves


def check_explicit_waves(waves: Sequence[Sequence[str]]) -> List[List[str]]:
    """Validate explicit device-list waves: non-empty, no device twice."""
    seen = set()
    out = []
    for i, w in enumerate(waves):
        if not w:
            raise RolloutError("wave %d is empty" % (i + 1))
        for d in w:
            if d in seen:
                raise RolloutError("device %s is in more than one wave" % d)
            seen.add(d)
        out.append(list(w))
    if not out:
        raise RolloutError("no waves given")
    return out


@dataclass
class Rollout:
    """One rollout: its bundle, waves, per-device entries and state. Methods return actions."""

    rollout_id: str
    bundle: Dict[str, Any]
    manifest_sha256: str
    manifest_size: int
    waves: List[List[str]]
    params: RolloutParams = field(default_factory=RolloutParams)
    mode: str = "normal"
    ab_split: Optional[float] = None
    state: str = RUNNING
    current_wave: int = -1
    created: float = 0.0
    updated: float = 0.0
    reason: str = ""
    rollback_on_stop: bool = True
    devices: Dict[str, DeviceEntry] = field(default_factory=dict)
    #: Device entries changed since the last `take_dirty()` (so a save writes only those).
    _dirty: Set[str] = field(default_factory=set, repr=False, compare=False)

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        *,
        rollout_id: str,
        bundle: Dict[str, Any],
        manifest_sha256: str,
        manifest_size: int,
        waves: List[List[str]],
        priors: Optional[Dict[str, Optional[Dict[str, Any]]]] = None,
        params: Optional[RolloutParams] = None,
        mode: str = "normal",
        ab_split: Optional[float] = None,
        now: float,
    ) -> Rollout:
        """A new rollout (not started). `priors` maps device id -> the bundle it runs now."""
        if mode not in ("normal", "shadow", "ab"):
            raise RolloutError("mode must be normal, shadow or ab, got %r" % mode)
        if mode == "ab" and (ab_split is None or not 0 < float(ab_split) < 100):
            raise RolloutError("an ab rollout needs ab_split between 0 and 100 (percent served by the candidate)")
        waves = check_explicit_waves(waves)
        priors = priors or {}
        r = cls(
            rollout_id=rollout_id,
            bundle={"name": bundle["name"], "version": int(bundle["version"])},
            manifest_sha256=manifest_sha256,
            manifest_size=int(manifest_size),
            waves=waves,
            params=params or RolloutParams(),
            mode=mode,
            ab_split=ab_split,
            created=now,
            updated=now,
        )
        for i, w in enumerate(waves):
            for d in w:
                r.devices[d] = DeviceEntry(device_id=d, wave=i, prior=priors.get(d), updated=now)
        r._dirty = set(r.devices)
        return r

    def start(self, now: float) -> List[Action]:
        """Begin with wave 1."""
        if self.current_wave >= 0:
            raise RolloutError("rollout %s has already started" % self.rollout_id)
        acts: List[Action] = [
            Note(
                "started",
                "rollout of %s v%d to %d devices in %d waves (%s)"
                % (
                    self.bundle["name"],
                    self.bundle["version"],
                    len(self.devices),
                    len(self.waves),
                    ", ".join(str(len(w)) for w in self.waves),
                ),
            )
        ]
        acts += self._start_wave(0, now)
        return acts

    # ------------------------------------------------------------------------------------- queries

    @property
    def final(self) -> bool:
        """True once the rollout succeeded, halted or was aborted."""
        return self.state in FINAL_STATES

    def wave_entries(self, i: int) -> List[DeviceEntry]:
        """The entries of wave `i` in wave order."""
        return [self.devices[d] for d in self.waves[i]]

    def wave_summary(self, i: int) -> Dict[str, Any]:
        """Counts per device state for wave `i`."""
        counts: Dict[str, int] = {}
        for e in self.wave_entries(i):
            counts[e.state] = counts.get(e.state, 0) + 1
        n = len(self.waves[i])
        return {
            "wave": i + 1,
            "devices": n,
            "counts": counts,
            "succeeded": counts.get(D_SUCCEEDED, 0),
            "needed": math.ceil(self.params.success_threshold * n - 1e-9),
            "started": i <= self.current_wave,
        }

    def summary(self) -> Dict[str, Any]:
        """JSON-ready overview (what `fleet rollout status` shows)."""
        return {
            "rollout_id": self.rollout_id,
            "bundle": dict(self.bundle),
            "mode": self.mode,
            "state": self.state,
            "reason": self.reason,
            "current_wave": self.current_wave + 1,
            "waves": len(self.waves),
            "created": self.created,
            "updated": self.updated,
            "params": self.params.to_dict(),
            "wave_progress": [self.wave_summary(i) for i in range(len(self.waves))],
        }

    def to_dict(self) -> Dict[str, Any]:
        """Everything needed to rebuild this rollout (the registry stores it)."""
        return {
            "rollout_id": self.rollout_id,
            "bundle": dict(self.bundle),
            "manifest_sha256": self.manifest_sha256,
            "manifest_size": self.manifest_size,
            "waves": [list(w) for w in self.waves],
            "params": self.params.to_dict(),
            "mode": self.mode,
            "ab_split": self.ab_split,
            "state": self.state,
            "current_wave": self.current_wave,
            "created": self.created,
            "updated": self.updated,
            "reason": self.reason,
            "rollback_on_stop": self.rollback_on_stop,
            "devices": [e.to_dict() for e in self.devices.values()],
        }

    def row_dict(self) -> Dict[str, Any]:
        """`to_dict()` without the device entries (what changes on every step)."""
        out = self.to_dict()
        del out["devices"]
        return out

    def take_dirty(self) -> List[Dict[str, Any]]:
        """The device entries changed since the last call, as dicts; clears the set."""
        out = [self.devices[d].to_dict() for d in sorted(self._dirty)]
        self._dirty = set()
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Rollout:
        """Rebuild a rollout saved with `to_dict` (after a controller restart)."""
        r = cls(
            rollout_id=d["rollout_id"],
            bundle=dict(d["bundle"]),
            manifest_sha256=d["manifest_sha256"],
            manifest_size=int(d["manifest_size"]),
            waves=[list(w) for w in d["waves"]],
            params=RolloutParams(**d.get("params", {})),
            mode=d.get("mode", "normal"),
            ab_split=d.get("ab_split"),
            state=d["state"],
            current_wave=int(d["current_wave"]),
            created=float(d.get("created") or 0.0),
            updated=float(d.get("updated") or 0.0),
            reason=d.get("reason") or "",
            rollback_on_stop=bool(d.get("rollback_on_stop", True)),
        )
        for e in d.get("devices", []):
            entry = DeviceEntry.from_dict(e)
            r.devices[entry.device_id] = entry
        return r

    # ---------------------------------------------------------------------------------- observations

    def observe(self, device_id: str, obs: str, detail: str, now: float) -> List[Action]:
        """Apply one observation about one device (see `classify_event` / `classify_status`)."""
        e = self.devices.get(device_id)
        if e is None:
            return []
        acts: List[Action] = []
        if obs == OBS_OFFLINE:
            if e.state in IN_FLIGHT:
                acts.append(Note("offline", "device went offline while deploying", device_id))
            return acts
        if e.state in (D_ROLLBACK_SENT, D_ROLLBACK_FAILED):
            if obs == OBS_ROLLED_BACK:
                self._set(e, D_ROLLED_BACK, detail, now)
                acts.append(Note("rolled-back", detail or "rolled back", device_id))
            elif obs == OBS_ROLLBACK_FAILED and e.state != D_ROLLBACK_FAILED:
                self._set(e, D_ROLLBACK_FAILED, detail, now)
                acts.append(Note("rollback-failed", detail or "rollback failed", device_id))
            elif obs == OBS_SUCCESS and e.rollback_attempts < MAX_ROLLBACK_ATTEMPTS:
                # Activated after our rollback was sent (the deploy was still running): roll back again.
                acts += self._rollback(e, "bundle activated after the rollout was stopped", now)
            return acts
        if e.state in (D_PENDING, D_SKIPPED, D_ROLLED_BACK):
            return acts
        if self.final:
            # Late news about a rollout that has stopped: a device that activates the bundle now must
            # not keep it (unless the operator aborted with --keep).
            if obs == OBS_SUCCESS and self.state in (HALTED, ABORTED) and self.rollback_on_stop:
                if e.rollback_attempts < MAX_ROLLBACK_ATTEMPTS:
                    acts += self._rollback(e, "bundle activated after the rollout was %s" % self.state, now)
            return acts
        e.resend_at = None  # any word from the device for this rollout: it has the command
        if obs == OBS_PROGRESS:
            if e.state == D_SENT:
                self._set(e, D_PROGRESS, detail, now)
            elif e.state == D_PROGRESS and detail:
                e.detail = detail
            return acts
        if obs == OBS_SUCCESS:
            if e.state == D_SUCCEEDED:
                return acts
            late = e.state == D_TIMED_OUT
            self._set(e, D_SUCCEEDED, "passed after its timeout" if late else (detail or "passed"), now)
            acts.append(Note("device-succeeded", e.detail, device_id))
            if self.state == STALLED:
                # The late device may be what the stalled wave was missing.
                self.state = RUNNING
                self.reason = ""
            acts += self._advance(now)
            return acts
        if obs in (OBS_FAILURE, OBS_ROLLED_BACK, OBS_ROLLBACK_FAILED):
            if e.state == D_FAILED:
                return acts
            self._set(e, D_FAILED, detail or obs, now)
            acts.append(Note("device-failed", e.detail, device_id))
            acts += self._check_errors(now)
            if not self.final:
                acts += self._advance(now)
            return acts
        return acts

    def restarted(self, now: float, grace_s: float) -> List[Action]:
        """The controller restarted: it may have died between persisting a command and publishing it.
        Devices that were sent a deploy (or rollback) get it again after `grace_s` unless their status
        or events show by then that they received it (commands are idempotent on the device)."""
        n = 0
        for e in self.devices.values():
            if e.state in (D_SENT, D_ROLLBACK_SENT):
                e.resend_at = now + grace_s
                n += 1
        return [
            Note(
                "resumed-after-restart", "controller restarted; rollout %s, %d command(s) to confirm" % (self.state, n)
            )
        ]

    def _resend(self, now: float) -> List[Action]:
        acts: List[Action] = []
        for e in self.devices.values():
            if e.resend_at is None or now < e.resend_at:
                continue
            e.resend_at = None
            if e.state == D_SENT and not self.final:
                acts.append(SendDeploy(e.device_id))
                acts.append(
                    Note(
                        "resent",
                        "no word from the device since the controller restarted; deploy sent again",
                        e.device_id,
                    )
                )
            elif e.state == D_ROLLBACK_SENT:
                acts.append(SendRollback(e.device_id, e.prior, e.detail or "rollout %s" % self.state))
                acts.append(Note("resent", "rollback sent again after the controller restarted", e.device_id))
        return acts

    def tick(self, now: float) -> List[Action]:
        """Time-based transitions: device timeouts (and the wave checks they trigger)."""
        acts: List[Action] = self._resend(now)
        if self.final:
            for e in self.devices.values():
                if e.state == D_ROLLBACK_SENT and now - e.updated > self.params.device_timeout_s:
                    self._set(
                        e, D_ROLLBACK_FAILED, "rollback not confirmed within %d s" % self.params.device_timeout_s, now
                    )
                    acts.append(Note("rollback-unconfirmed", e.detail, e.device_id))
            return acts
        timed_out = False
        for e in self.devices.values():
            if e.state in IN_FLIGHT and e.sent_at is not None and now - e.sent_at > self.params.device_timeout_s:
                self._set(
                    e, D_TIMED_OUT, "no result %d s after the deploy (offline?)" % self.params.device_timeout_s, now
                )
                acts.append(Note("device-timed-out", e.detail, e.device_id))
                timed_out = True
        if timed_out:
            acts += self._advance(now)
        return acts

    # ---------------------------------------------------------------------------------- operator

    def pause(self, now: float) -> List[Action]:
        """Stop starting new waves (in-flight devices are still tracked)."""
        if self.state != RUNNING:
            raise RolloutError("rollout %s is %s; only a running rollout can be paused" % (self.rollout_id, self.state))
        self.state = PAUSED
        self.updated = now
        return [Note("paused", "paused by the operator")]

    def resume(self, now: float) -> List[Action]:
        """Continue a paused rollout, or push a stalled one past the wave that stalled."""
        if self.state == PAUSED:
            self.state = RUNNING
            self.updated = now
            return [Note("resumed", "resumed by the operator"), *self._advance(now)]
        if self.state == STALLED:
            self.state = RUNNING
            self.updated = now
            s = self.wave_summary(self.current_wave)
            acts: List[Action] = [
                Note(
                    "resumed",
                    "operator resumed past wave %d with %d/%d devices succeeded"
                    % (self.current_wave + 1, s["succeeded"], s["devices"]),
                )
            ]
            return acts + self._advance(now, force=True)
        raise RolloutError(
            "rollout %s is %s; only a paused or stalled rollout can be resumed" % (self.rollout_id, self.state)
        )

    def abort(self, now: float, *, rollback: bool = True) -> List[Action]:
        """Stop for good; by default roll back every device that took the bundle."""
        if self.final:
            raise RolloutError("rollout %s has already ended (%s)" % (self.rollout_id, self.state))
        self.rollback_on_stop = rollback
        return self._stop(
            ABORTED,
            "aborted by the operator" + ("" if rollback else " (devices keep the bundle)"),
            now,
            rollback=rollback,
        )

    def promote(self, now: float, *, accept: bool = True) -> List[Action]:
        """Shadow / A-B rollouts: promote (or drop) the candidate on every device that runs it.

        Shadow: the devices still shadowing (in flight) are promoted now instead of waiting for their
        gates; their ``promoted`` events then advance the waves as usual. A/B: the devices serving the
        split (succeeded) are promoted. Dropping removes the candidate everywhere and aborts the rollout
        (nothing to roll back: a dropped candidate leaves the active bundle serving)."""
        if self.mode == "normal":
            raise RolloutError(
                "rollout %s is a normal rollout; only shadow and ab rollouts can be promoted" % self.rollout_id
            )
        holders = IN_FLIGHT if self.mode == "shadow" else (D_SUCCEEDED,)
        if not accept:
            holders = (*IN_FLIGHT, D_SUCCEEDED)
        acts: List[Action] = []
        for e in self.devices.values():
            if e.state in holders:
                acts.append(SendPromote(e.device_id, accept, "rollout %s" % self.rollout_id))
                e.detail = "promote sent" if accept else "candidate dropped"
                e.updated = now
                self._dirty.add(e.device_id)
        acts.append(
            Note(
                "promoted" if accept else "dropped",
                "%s sent to %d devices"
                % ("promote" if accept else "drop", sum(1 for a in acts if isinstance(a, SendPromote))),
            )
        )
        self.updated = now
        if not accept and not self.final:
            self.rollback_on_stop = False
            acts += self._stop(ABORTED, "candidate dropped by the operator", now, rollback=False)
        return acts

    # ---------------------------------------------------------------------------------- internals

    def _set(self, e: DeviceEntry, state: str, detail: str, now: float) -> None:
        e.state = state
        e.detail = detail
        e.updated = now
        self.updated = now
        self._dirty.add(e.device_id)

    def _start_wave(self, i: int, now: float) -> List[Action]:
        self.current_wave = i
        self.updated = now
        acts: List[Action] = [
            Note("wave-started", "wave %d of %d: %s" % (i + 1, len(self.waves), _devices(len(self.waves[i]))))
        ]
        for e in self.wave_entries(i):
            self._set(e, D_SENT, "deploy sent", now)
            e.sent_at = now
            acts.append(SendDeploy(e.device_id))
        return acts

    def _check_errors(self, now: float) -> List[Action]:
        if self.final:
            return []
        started = [e for i in range(self.current_wave + 1) for e in self.wave_entries(i)]
        failed = sum(1 for e in started if e.state == D_FAILED)
        if failed > self.params.error_threshold * len(started):
            return self._stop(
                HALTED,
                "%d of %s failed (error threshold %g%%)"
                % (failed, _devices(len(started)), self.params.error_threshold * 100),
                now,
                rollback=True,
            )
        return []

    def _advance(self, now: float, *, force: bool = False) -> List[Action]:
        """Start the next wave (or finish) when the current one is complete and passed."""
        if self.state not in (RUNNING, PAUSED) or self.current_wave < 0:
            return []
        entries = self.wave_entries(self.current_wave)
        if any(e.state not in WAVE_TERMINAL for e in entries):
            return []
        s = self.wave_summary(self.current_wave)
        if s["succeeded"] < s["needed"] and not force:
            timed_out = s["counts"].get(D_TIMED_OUT, 0)
            failed = s["counts"].get(D_FAILED, 0)
            if timed_out and s["succeeded"] + timed_out >= s["needed"]:
                self.state = STALLED
                self.reason = "wave %d: %d/%d succeeded, %d timed out (need %d); resume to continue or abort" % (
                    self.current_wave + 1,
                    s["succeeded"],
                    s["devices"],
                    timed_out,
                    s["needed"],
                )
                self.updated = now
                return [Note("stalled", self.reason)]
            return self._stop(
                HALTED,
                "wave %d: %d/%d succeeded, %d failed, %d timed out (need %d)"
                % (self.current_wave + 1, s["succeeded"], s["devices"], failed, timed_out, s["needed"]),
                now,
                rollback=True,
            )
        if self.state == PAUSED:
            return []
        acts: List[Action] = [
            Note(
                "wave-passed", "wave %d passed: %d/%d succeeded" % (self.current_wave + 1, s["succeeded"], s["devices"])
            )
        ]
        if self.current_wave + 1 < len(self.waves):
            return acts + self._start_wave(self.current_wave + 1, now)
        self.state = SUCCEEDED
        self.reason = "all %d waves passed" % len(self.waves)
        self.updated = now
        return [*acts, Note("succeeded", self.reason)]

    def _rollback(self, e: DeviceEntry, reason: str, now: float) -> List[Action]:
        e.rollback_attempts += 1
        self._set(e, D_ROLLBACK_SENT, reason, now)
        return [SendRollback(e.device_id, e.prior, reason)]

    def _stop(self, state: str, reason: str, now: float, *, rollback: bool) -> List[Action]:
        self.state = state
        self.reason = reason
        self.updated = now
        acts: List[Action] = [Note(state, reason)]
        for e in self.devices.values():
            if e.state == D_PENDING:
                self._set(e, D_SKIPPED, "never sent: rollout %s" % state, now)
            elif rollback and e.state in TOOK_IT:
                acts += self._rollback(e, "rollout %s %s: %s" % (self.rollout_id, state, reason), now)
        return acts


def _devices(n: int) -> str:
    return "1 device" if n == 1 else "%d devices" % n


# ------------------------------------------------------------------------------------- classification


def _same_bundle(a: Optional[Dict[str, Any]], b: Dict[str, Any]) -> bool:
    return a is not None and a.get("name") == b["name"] and int(a.get("version", -1)) == int(b["version"])


def classify_event(
    rollout: Rollout, *, kind: str, bundle: Optional[Dict[str, Any]], rollout_id: Optional[str]
) -> Optional[str]:
    """What a device event means for `rollout` (an OBS_* value), or None when it is unrelated."""
    if rollout_id is not None:
        if rollout_id != rollout.rollout_id:
            return None
    elif not _same_bundle(bundle, rollout.bundle):
        return None
    if kind in _SUCCESS_EVENTS.get(rollout.mode, ()):
        return OBS_SUCCESS
    if kind == "promoted" and rollout.mode != "normal":
        return OBS_SUCCESS
    if kind == "rolled-back":
        return OBS_ROLLED_BACK
    if kind == "rollback-failed":
        return OBS_ROLLBACK_FAILED
    if kind in _FAILURE_EVENTS:
        return OBS_FAILURE
    if kind in _PROGRESS_EVENTS:
        return OBS_PROGRESS
    return None


def classify_status(
    rollout: Rollout,
    *,
    online: bool,
    active: Optional[Dict[str, Any]],
    deploy_state: Optional[str],
    deploy_bundle: Optional[Dict[str, Any]],
    deploy_rollout_id: Optional[str],
) -> Optional[str]:
    """What a device's status means for `rollout` (an OBS_* value), or None."""
    if not online:
        return OBS_OFFLINE
    if deploy_state is None:
        return None
    if deploy_rollout_id is not None and deploy_rollout_id != rollout.rollout_id:
        # Another deployment is under way or done; if it replaced our bundle after a rollback, say so.
        if active is not None and not _same_bundle(active, rollout.bundle) and deploy_state == "rolled-back":
            return OBS_ROLLED_BACK
        return None
    ours = _same_bundle(deploy_bundle, rollout.bundle) or deploy_rollout_id == rollout.rollout_id
    if not ours:
        return None
    if deploy_state in _SUCCESS_STATES.get(rollout.mode, ()):
        if rollout.mode == "ab" or _same_bundle(active, rollout.bundle):
            return OBS_SUCCESS
        return None
    if deploy_state == "rolled-back":
        return OBS_ROLLED_BACK
    if deploy_state == "failed":
        return OBS_FAILURE
    if deploy_state in _PROGRESS_STATES:
        return OBS_PROGRESS
    return None
