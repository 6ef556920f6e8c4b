"""What a device's events and retained status mean for a rollout: an observation (`states.OBS_*`) or None."""

from __future__ import annotations

from typing import Any, Dict, Optional

from fleet.rollouts.record import RolloutRecord
from fleet.rollouts.states import (
    OBS_FAILURE,
    OBS_OFFLINE,
    OBS_PROGRESS,
    OBS_ROLLBACK_FAILED,
    OBS_ROLLED_BACK,
    OBS_SUCCESS,
)

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
    "deploy-failed",
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


def _same_bundle(a: Optional[Dict[str, Any]], b: Dict[str, Any]) -> bool:
    return a is not None and a.get("name") == b["name"] and int(a.get("version", -1)) == int(b["version"])


def classify_event(
    rollout: RolloutRecord, *, kind: str, bundle: Optional[Dict[str, Any]], rollout_id: Optional[str]
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
    rollout: RolloutRecord,
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
