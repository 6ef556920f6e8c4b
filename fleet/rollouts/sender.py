"""Publishing a rollout's commands: inline, or from a sender thread so a wave of a thousand deploys never
holds up whoever reported the event that started it (the ingest worker).

What is not published: a deploy still queued when its rollout has stopped (its devices may already be
claimed by another rollout, possibly on another controller), and, with several controllers, any
command once this controller's lease may have expired since it last renewed it (a stall longer than
the lease): that one is sent again at the next tick if the lease is still ours, or by the new owner.

`RolloutSender` is a mixin of `fleet.rollouts.runner.RolloutRunner` (it uses the runner's lock, active
rollouts, registry, leases and `send_command`).
"""

from __future__ import annotations

import logging
import threading

from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.messages import CommandArgs
from fleet.leases import LeaseLost
from fleet.rollouts.states import D_ROLLBACK_SENT, D_SENT

log = logging.getLogger(__name__)


class RolloutSender:
    """The runner's command publishing (mixin of `RolloutRunner`)."""

    def start_sender(self) -> None:
        """Send commands from a background thread from now on (otherwise they are sent inline)."""
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="rollout-sender", daemon=True)
            self._sender.start()

    def stop_sender(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (up to `timeout_s`), then stop the sender thread."""
        if self._sender is not None:
            self._outbox.put(None)
            self._sender.join(timeout_s)
            self._sender = None

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            self._send(*item)

    def _send(self, rollout_id: str, device_id: str, args: CommandArgs) -> None:
        # Checked and published under the lock: once a step that stops the rollout (and may free its
        # devices for another rollout) has run, none of its deploys still queued here goes out.
        with self._lock:
            r = self._active.get(rollout_id)
            if args.kind == "deploy" and (r is None or r.final):
                self.stale_dropped += 1
                log.info("rollout %s: queued deploy to %s dropped: the rollout has stopped", rollout_id, device_id)
                return
            if self.leases is not None and not self.leases.fresh(rollout_id):
                self._hold_back(rollout_id, device_id, args)
                return
            self._publish(rollout_id, device_id, args)

    def _publish(self, rollout_id: str, device_id: str, args: CommandArgs) -> None:
        try:
            self.send_command(device_id, args)
        except EdgeAgentError as e:
            self.send_failures += 1
            log.warning("rollout %s: %s command to %s not sent: %s", rollout_id, args.kind, device_id, e)
            with self._lock:
                r = self._active.get(rollout_id)
                body = r.row_dict() if r is not None else self.registry.load_rollout(rollout_id)
                if body is not None:
                    body.pop("devices", None)
                    try:
                        self.registry.save_rollout(
                            body,
                            [(self.clock(), "send-failed", device_id, "%s not sent: %s" % (args.kind, e))],
                            devices=[], owner=self._owner(),
                        )
                    except LeaseLost as lost:
                        self._lost(rollout_id, lost)

    def _hold_back(self, rollout_id: str, device_id: str, args: CommandArgs) -> None:
        """A command whose rollout's lease may have expired since it was saved (this process stalled):
        not published; sent again at the next tick once the lease is renewed (or by the new owner)."""
        self.held_back += 1
        log.warning("rollout %s: %s to %s held back: the lease may have expired", rollout_id, args.kind, device_id)
        with self._lock:
            r = self._active.get(rollout_id)
            e = r.devices.get(device_id) if r is not None else None
            if e is not None and e.state in (D_SENT, D_ROLLBACK_SENT):
                e.resend_at = self.clock()

