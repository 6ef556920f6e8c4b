"""The rollout planner: `Rollout`, a pure state machine for staged, health-gated rollouts.

A `Rollout` holds the waves (device lists), one `DeviceEntry` per target device and the rollout's own
state (its data, queries and stored form are `fleet.rollouts.record.RolloutRecord`). Its methods take
observations and the current time and return `Action`s (send a deploy, a rollback, a promote; write a
history note). Nothing here does I/O or reads the clock: the runner
(`fleet.rollouts.runner`) persists the rollout and carries the actions out.

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

from typing import List

from fleet.rollouts.actions import Action, Note, SendDeploy, SendPromote, SendRollback
from fleet.rollouts.record import DeviceEntry, RolloutRecord
from fleet.rollouts.states import (
    ABORTED,
    D_FAILED,
    D_PENDING,
    D_PROGRESS,
    D_ROLLBACK_FAILED,
    D_ROLLBACK_SENT,
    D_ROLLED_BACK,
    D_SENT,
    D_SKIPPED,
    D_SUCCEEDED,
    D_TIMED_OUT,
    HALTED,
    IN_FLIGHT,
    MAX_ROLLBACK_ATTEMPTS,
    OBS_FAILURE,
    OBS_OFFLINE,
    OBS_PROGRESS,
    OBS_ROLLBACK_FAILED,
    OBS_ROLLED_BACK,
    OBS_SUCCESS,
    PAUSED,
    RUNNING,
    STALLED,
    SUCCEEDED,
    TOOK_IT,
    WAVE_TERMINAL,
    RolloutError,
)


class Rollout(RolloutRecord):
    """One rollout with its transitions: methods take observations and the time and return actions."""

    # ---------------------------------------------------------------------------------- start

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
