"""What a rollout's actions become on the wire: the arguments of the signed command each one sends."""

from __future__ import annotations

from edge_agent.protocol.messages import BundleRef, CommandArgs, DeployArgs, PromoteArgs, RollbackArgs
from fleet.rollouts.actions import Action, SendDeploy, SendPromote, SendRollback
from fleet.rollouts.record import RolloutRecord


def _decimal(v: float) -> str:
    """A percentage as the decimal string a signed command carries."""
    return ("%.4f" % float(v)).rstrip("0").rstrip(".")


def command_for(r: RolloutRecord, a: Action) -> CommandArgs:
    """The signed-command arguments for a deploy, rollback or promote action of rollout `r`."""
    if isinstance(a, SendDeploy):
        return DeployArgs(
            bundle=BundleRef(**r.bundle),
            manifest_sha256=r.manifest_sha256,
            manifest_size=r.manifest_size,
            mode=r.mode,
            ab_split=None if r.ab_split is None else _decimal(r.ab_split),
            rollout_id=r.rollout_id,
        )
    if isinstance(a, SendRollback):
        return RollbackArgs(to=BundleRef(**a.to) if a.to else None, reason=a.reason[:200], rollout_id=r.rollout_id)
    if isinstance(a, SendPromote):
        return PromoteArgs(accept=a.accept, reason=a.reason[:200], rollout_id=r.rollout_id)
    raise TypeError("not a command action: %r" % (a,))
