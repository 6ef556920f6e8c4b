"""What the rollout planner asks the runner to do: send a deploy, a rollback or a promote; note history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union


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
