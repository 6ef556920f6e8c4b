"""The remote commands an agent takes: verified, recorded, then carried out on the worker thread.

`AgentCommands` is a mixin of `edge_agent.agent.Agent` (it uses the agent's store, deployer, candidate
manager and serving model). A command is checked (signature by a trusted controller key that is not
also a bundle key, device id, sequence number, age, trusted time floor) before anything changes; its
sequence number is persisted before it runs, so a replay is refused even after a crash; a refusal
changes nothing but the `command-refused` event. `check_key_separation` refuses, at start-up, a
configuration where a controller key could also sign bundles.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from typing import Any

from edge_agent.config import TrustConfig
from edge_agent.errors import CommandError, ConfigError, EdgeAgentError
from edge_agent.protocol.commands import peek_command_meta, verify_command
from edge_agent.protocol.messages import (
    DeployArgs,
    PingArgs,
    PromoteArgs,
    ResetTimeFloorArgs,
    RetuneArgs,
    RollbackArgs,
    SetRouterArgs,
)
from edge_agent.signing import load_public_keys
from edge_agent.transfer.fetcher import TransferCancelled

log = logging.getLogger(__name__)

#: Inbound commands waiting for the worker (more than this while busy are refused with an event).
COMMAND_QUEUE = 64


def check_key_separation(trust: TrustConfig) -> None:
    """Refuse a configuration where a controller command key could also sign bundles.

    Every `*.pub` in `bundle_keys_dir` is a bundle key, so a command key file placed there (or a key
    listed in both sets) would let whoever holds the controller's key publish models. Raises
    ConfigError; checks the paths even when the key files are not installed yet. A command-key folder
    without any key is refused too (every command would be refused).
    """
    bdir = trust.bundle_keys_dir
    for p in trust.command_keys:
        rp, rb = p.resolve(), bdir.resolve()
        if rp == rb or (rp.parent == rb and rp.suffix == ".pub"):
            raise ConfigError(
                "trust.command_keys entry %s is inside trust.bundle_keys_dir %s, so the controller key would "
                "also be trusted to sign bundles; move it to a separate folder such as "
                "/etc/edge-agent/command-keys/" % (p, bdir))
    for p in trust.command_keys:
        if p.is_dir() and not any(p.glob("*.pub")):
            raise ConfigError(
                "trust.command_keys entry %s is a folder without any *.pub key, so every controller command "
                "would be refused; install the controller's public key there (controller.pub) or remove the entry"
                % p)
    try:
        command = load_public_keys([p for p in trust.command_keys if p.exists()])
        bundle = load_public_keys([bdir]) if bdir.exists() else {}
    except EdgeAgentError as e:
        raise ConfigError("cannot load trusted keys: %s" % e)
    if trust.command_keys and not command:
        log.warning("no controller key is installed (trust.command_keys: %s); every command will be refused "
                    "until one is", ", ".join(str(p) for p in trust.command_keys))
    both = sorted(set(command) & set(bundle))
    if both:
        raise ConfigError(
            "key %s (%s) is trusted both for controller commands and for bundles; a command key must not "
            "be a bundle key (remove it from trust.bundle_keys_dir %s)"
            % (both[0][:16], command[both[0]].name or "unnamed", bdir))


class AgentCommands:
    """Command handling of the agent (mixin of `edge_agent.agent.Agent`)."""

    def _command_keys(self):
        try:
            keys = load_public_keys([p for p in self.cfg.trust.command_keys if p.exists()])
            overlap = set(keys) & set(self._bundle_keys())
        except EdgeAgentError as e:
            raise CommandError("cannot load trusted keys: %s" % e)
        if overlap:
            # A bundle key added after start-up: refuse commands rather than trust a key for both.
            raise CommandError("a command key is also a trusted bundle key (%s); commands refused until the key "
                               "sets are separated" % sorted(overlap)[0][:16])
        return keys

    def _bundle_keys(self):
        d = self.cfg.trust.bundle_keys_dir
        return load_public_keys([d]) if d.exists() else {}

    def _on_command(self, msg) -> None:
        """Network thread: queue the raw command for the worker (never blocks)."""
        try:
            self._work.put_nowait(("command", msg.payload))
        except queue.Full:
            meta = peek_command_meta(msg.payload)
            self.emit("command-refused", "agent busy: %d commands already queued" % COMMAND_QUEUE, level="warning",
                      command_seq=meta.get("seq"), data={"reason": "busy"})

    def _floor_after(self, body) -> dict:
        """State changes for the trusted time floor once command `body` is accepted: bounded by the device
        clock (protocol/trusted_time.py); a `reset-time-floor` command sets it to its own `issued_at`."""
        if isinstance(body.args, ResetTimeFloorArgs):
            return {"time_floor": body.issued_at, "signed_time_seen": {"bundle": body.issued_at,
                                                                      "command": body.issued_at}}
        return self.deployer.floor_update(body.issued_at, "command")

    def handle_command(self, raw: bytes) -> None:
        """Verify and run one command (worker thread). Refusals change nothing but the event."""
        st = self.store.state
        digest = hashlib.sha256(raw).hexdigest()
        if digest == st.last_command_sha256:
            # The same bytes as the command just accepted: a QoS 1 redelivery, not an attack. Commands
            # are idempotent, so it is dropped quietly (a refusal event would read as a failed deploy).
            log.info("duplicate delivery of command seq %d ignored", st.last_command_seq)
            return
        try:
            body = verify_command(
                raw, device_id=self.device_id, trusted=self._command_keys(), last_seq=st.last_command_seq,
                now=self.deployer.now(), max_age_s=self.cfg.trust.max_command_age_s,
                clock=self.deployer.clock(), floor=st.time_floor, max_skew_s=self.cfg.trust.max_clock_skew_s,
            )
        except CommandError as e:
            meta = peek_command_meta(raw)
            if not meta:
                self.malformed += 1  # not even a command envelope (telemetry `malformed_messages`)
            self.emit("command-refused", str(e), level="warning", command_seq=meta.get("seq"),
                      data={"reason": str(e), "kind": meta.get("kind")})
            return
        args = body.args
        # Persist the sequence number first: a replay of this command is refused even after a crash.
        try:
            self.store.update_state(last_command_seq=body.seq, last_command_sha256=digest,
                                    **self._floor_after(body))
        except OSError as e:
            # Without a durable sequence number a replay could not be refused: refuse the command itself.
            self.emit("command-refused", "cannot record command seq %d in state.json (%s); refused"
                      % (body.seq, e.strerror or e), level="error", command_seq=body.seq,
                      data={"reason": "state not writable"})
            return
        self.emit("command-accepted", "%s command seq %d accepted" % (args.kind, body.seq), command_seq=body.seq,
                  rollout_id=getattr(args, "rollout_id", None), data={"kind": args.kind})
        try:
            self._run_command(body, st.time_floor)
        except TransferCancelled:
            raise
        except CommandError as e:
            self.emit("command-refused", str(e), level="warning", command_seq=body.seq, data={"reason": str(e)})
        except EdgeAgentError as e:
            log.warning("command seq %d failed: %s", body.seq, e)
        except OSError as e:  # e.g. the disk filled up: report it, keep the agent (and its model) running
            log.error("command seq %d failed: %s", body.seq, e)
            self.emit("error", "command seq %d failed: %s" % (body.seq, e), level="error", command_seq=body.seq)
        self.publish_status()

    def _run_command(self, body: Any, floor_before: int) -> None:
        """Carry out an accepted command (its seq is already recorded). Raises CommandError for a command
        this agent cannot honour now, and whatever the deployer or the service raises."""
        args = body.args
        if isinstance(args, DeployArgs):
            if args.mode != "normal":
                self.candidates.deploy(args, command_seq=body.seq)
            else:
                self.deployer.deploy(args, command_seq=body.seq)
        elif isinstance(args, PromoteArgs):
            self.candidates.promote(args, command_seq=body.seq)
        elif isinstance(args, RollbackArgs):
            self.candidates.drop("dropped: rollback requested")
            self.deployer.rollback(args, command_seq=body.seq)
        elif isinstance(args, PingArgs):
            self.publish_status()
        elif isinstance(args, ResetTimeFloorArgs):
            self.emit("time-floor-reset", "trusted time floor set to %d (was %d)%s"
                      % (body.issued_at, floor_before, (": " + args.reason) if args.reason else ""),
                      level="warning", command_seq=body.seq,
                      data={"from": floor_before, "to": body.issued_at, "reason": args.reason})
        elif isinstance(args, RetuneArgs):
            self.retune(command_seq=body.seq)
        elif isinstance(args, SetRouterArgs):
            svc = self._service
            if svc is None:
                raise CommandError("no model is serving; router unchanged")
            try:
                svc.set_router(gate=args.gate, tau=args.tau, target_large_fraction=args.target_large_fraction,
                               adaptive=args.adaptive)
            except ConfigError as e:  # RouterPolicyError: the operator must see why nothing changed
                raise CommandError("router unchanged: %s" % e)
            self.emit("router-changed", "router policy changed", command_seq=body.seq,
                      data=svc.router_state() if hasattr(svc, "router_state") else {})
        else:
            raise CommandError("command kind %r is not supported by this agent" % args.kind)
