"""Rollouts when several controllers share one PostgreSQL registry: ownership through `RolloutLeases`
(fleet/leases.py), taking over rollouts whose owner died, and forwarding device events and operator
requests to the owner's inbox.

`SharedRollouts` is a mixin of `fleet.rollouts.runner.RolloutRunner` (it uses the runner's registry,
leases, lock and active rollouts); with one controller (`leases` None) every method here is a no-op
or answers for this controller alone.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set

from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.messages import Event
from fleet.leases import SETTLED_OWNER, LeaseLost
from fleet.rollouts.plan import Rollout
from fleet.rollouts.states import ABORTED, ACTIVE_STATES, D_ROLLBACK_SENT, HALTED, IN_FLIGHT, RolloutError

log = logging.getLogger(__name__)

#: Rollout states that may still need an owner (halted/aborted ones while rollbacks are outstanding).
OWNED_STATES = (*ACTIVE_STATES, HALTED, ABORTED)


class SharedRollouts:
    """Leases, takeovers and forwarding of a rollout runner (mixin of `RolloutRunner`)."""

    def _replay_statuses(self, r: Rollout) -> None:
        """After a takeover: what the registry knows of each in-flight device (every controller records
        every status), so the new owner does not wait for statuses it was not listening to."""
        waiting = {d for d, e in r.devices.items() if e.state in (*IN_FLIGHT, D_ROLLBACK_SENT)}
        for row in self.registry.list_devices():
            if row["device_id"] in waiting and r.rollout_id in self._active:
                deploy = row.get("deploy") or {}
                self._observe_status(r, row["device_id"], online=row["online"], active=row["active"],
                                     deploy_state=deploy.get("state"), deploy_bundle=deploy.get("bundle"),
                                     deploy_rollout_id=deploy.get("rollout_id"), detail=deploy.get("detail"))

    def _forward_event(self, event: Event, mine: Set[str]) -> None:
        """Shared subscriptions gave us an event of a device in a rollout another controller owns:
        leave it in that rollout's inbox."""
        assert self.leases is not None
        marks = ",".join("?" * len(OWNED_STATES))
        rows = self.registry.read(
            "SELECT d.rollout_id FROM rollout_devices d JOIN rollouts r ON r.rollout_id = d.rollout_id "
            "LEFT JOIN rollout_leases l ON l.rollout_id = d.rollout_id WHERE d.device_id = ? AND r.state IN (%s) "
            "AND (l.owner IS NULL OR l.owner <> ?)" % marks,
            (event.device_id, *OWNED_STATES, SETTLED_OWNER),
        )
        for row in rows:
            if row["rollout_id"] not in mine:
                self.leases.post(row["rollout_id"], "event", event.model_dump(mode="json"))
                self.forwarded += 1

    def _forward_op(self, rollout_id: str, op: str, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """With leases, an operator request for a rollout another live controller owns goes to its inbox
        and this waits for the owner's answer; None: do it here (ours, orphaned — taken now — or ended)."""
        if self.leases is None:
            return None
        with self._lock:
            if rollout_id in self._active:
                return None
        holder = self.leases.holder(rollout_id)
        if holder is None or holder == self.leases.owner:
            with self._lock:
                if rollout_id not in self._active and self._adopt(rollout_id):
                    self.takeovers += 1
            return None
        item = self.leases.post(rollout_id, "op", {"op": op, "args": args})
        answer = self.leases.wait_result(item, self.forward_timeout_s)
        if answer is None:
            raise RolloutError("rollout %s is driven by controller %s, which did not answer within %.0f s; "
                               "try again" % (rollout_id, holder, self.forward_timeout_s))
        if answer.get("error"):
            raise RolloutError(str(answer["error"]))
        return answer.get("result")

    def poll_inbox(self) -> int:
        """Handle what other controllers left for our rollouts (events, operator requests); returns how
        many. Call often (the control plane does, every quarter second)."""
        if self.leases is None:
            return 0
        with self._lock:
            ids = list(self._active)
        items = self.leases.take(ids)
        for item in items:
            result: Optional[Dict[str, Any]] = None
            try:
                if item["kind"] == "event":
                    self.on_event(Event.model_validate(item["body"]), forward=False)
                else:
                    result = {"result": self._run_op(item["rollout_id"], item["body"])}
            except (EdgeAgentError, ValueError) as e:
                result = {"error": str(e)} if item["kind"] != "event" else None
                if item["kind"] == "event":
                    log.warning("forwarded event for %s not handled: %s", item["rollout_id"], e)
            self.leases.done(item["id"], result)
        return len(items)

    def _run_op(self, rollout_id: str, body: Dict[str, Any]) -> Dict[str, Any]:
        op, args = body.get("op"), body.get("args") or {}
        if op == "pause":
            return self.pause(rollout_id)
        if op == "resume":
            return self.resume(rollout_id)
        if op == "abort":
            return self.abort(rollout_id, rollback=bool(args.get("rollback", True)))
        if op == "promote":
            return self.promote(rollout_id, accept=bool(args.get("accept", True)))
        raise RolloutError("unknown forwarded operation %r" % op)

    def _keep_leases(self) -> None:
        """Renew the leases of our rollouts (dropping any another controller took), then take over the
        rollouts whose owner's lease expired."""
        assert self.leases is not None
        with self._lock:
            ids = list(self._active)
        held = self.leases.renew(ids)
        for rid in ids:
            if rid not in held:
                self._lost(rid, LeaseLost("lease not renewed in time"))
        for rid in self.leases.orphans(OWNED_STATES):
            with self._lock:
                if rid in self._active:
                    continue
                if self._adopt(rid):
                    self.takeovers += 1
                    log.warning("took over rollout %s (its owner's lease expired)", rid)

    def _lost(self, rollout_id: str, why: Exception) -> None:
        with self._lock:
            if self._active.pop(rollout_id, None) is not None:
                log.warning("rollout %s: no longer driven here: %s", rollout_id, why)

    def _owner(self) -> Optional[str]:
        return self.leases.owner if self.leases is not None else None

    def fleet_active_ids(self) -> List[str]:
        """Ids of the running, paused or stalled rollouts of every controller sharing the registry."""
        if self.leases is None:
            return self.active_ids()
        return sorted(r["rollout_id"] for r in self.registry.list_rollouts(states=ACTIVE_STATES, limit=1000))
