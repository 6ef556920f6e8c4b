"""A rollout's data: parameters, per-device entries, the record with its queries and its stored form.

Pure values: no I/O, no clock. The registry stores `to_dict()`; `from_dict` rebuilds after a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Type, TypeVar

from fleet.rollouts.states import D_PENDING, D_SUCCEEDED, FINAL_STATES, RUNNING, RolloutError
from fleet.rollouts.waves import check_explicit_waves

R = TypeVar("R", bound="RolloutRecord")


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


@dataclass
class RolloutRecord:
    """What a rollout is: its bundle, waves, per-device entries and state; built, queried and stored here.

    `fleet.rollouts.plan.Rollout` adds the transitions; `create` and `from_dict` build whichever class
    they are called on."""

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
        cls: Type[R],
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
    ) -> R:
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

    def to_dict(self, *, devices: bool = True) -> Dict[str, Any]:
        """Everything needed to rebuild this rollout (the registry stores it); without the device
        entries when `devices` is False."""
        out = {
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
        }
        if devices:
            out["devices"] = [e.to_dict() for e in self.devices.values()]
        return out

    def row_dict(self) -> Dict[str, Any]:
        """`to_dict()` without the device entries (what changes on every step; building those for a
        10,000-device rollout on every step would cost more than the step)."""
        return self.to_dict(devices=False)

    def take_dirty(self) -> List[Dict[str, Any]]:
        """The device entries changed since the last call, as dicts; clears the set."""
        out = [self.devices[d].to_dict() for d in sorted(self._dirty)]
        self._dirty = set()
        return out

    @classmethod
    def from_dict(cls: Type[R], d: Dict[str, Any]) -> R:
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
