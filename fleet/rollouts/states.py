"""The states of a rollout and of each of its devices, the observations the planner takes, and its error."""

from __future__ import annotations

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


class RolloutError(EdgeAgentError):
    """A rollout request that cannot be carried out (bad waves, unknown devices, wrong state)."""
