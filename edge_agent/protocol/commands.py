"""Signed controller commands: build and sign (controller side), verify (device side).

A command is a `CommandEnvelope`: the signed `CommandBody` (device id, strictly increasing sequence
number, issued-at and expiry as integer Unix seconds, the arguments) plus Ed25519 signatures by the
controller key. `verify_command` is pure: bytes and the device's trusted state in, a `CommandBody` or a
`CommandError` out. The caller persists the new sequence number only after acting on the command.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

from edge_agent.errors import CommandError
from edge_agent.protocol.messages import (
    CommandArgs,
    CommandBody,
    CommandEnvelope,
    MessageError,
    ResetTimeFloorArgs,
)
from edge_agent.protocol.trusted_time import future_reason
from edge_agent.signing import PrivateKey, PublicKey, SignatureError, sign_document, verify_signatures

#: Largest command payload accepted (a command is a few hundred bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: A command issued this far in the device's future is still accepted (clocks drift; seq stops replays).
DEFAULT_TTL_S = 300


def sign_command(
    args: CommandArgs, *, device_id: str, seq: int, keys: Iterable[PrivateKey], now: int, ttl_s: int = DEFAULT_TTL_S
) -> bytes:
    """The wire bytes of a command for one device, signed by `keys`."""
    body = CommandBody(device_id=device_id, seq=seq, issued_at=int(now), expires_at=int(now) + int(ttl_s), args=args)
    doc = sign_document(body.model_dump(mode="json", by_alias=True, exclude_none=True), keys)
    return CommandEnvelope.model_validate(doc).to_json()


def verify_command(
    raw: bytes,
    *,
    device_id: str,
    trusted: Mapping[str, PublicKey],
    last_seq: int,
    now: int,
    max_age_s: int,
    threshold: int = 1,
    clock: Optional[float] = None,
    floor: int = 0,
    max_skew_s: Optional[int] = None,
) -> CommandBody:
    """Check a command envelope against the device's trust and replay state.

    Refuses (CommandError): malformed JSON, missing/untrusted/bad signatures, another device's id,
    expiry passed, issued longer than `max_age_s` ago, or a sequence number not above `last_seq`.
    `now` is the trusted time (max of the system clock and the persisted time floor). With `clock` (the
    device clock), `floor` and `max_skew_s`, a command issued further ahead of a plausible clock than
    `max_skew_s` is refused (protocol/trusted_time.py), and a `reset-time-floor` command has its expiry
    and age checked against the clock instead of the trusted time (the floor is what it repairs).
    """
    if len(raw) > MAX_COMMAND_BYTES:
        raise CommandError("command of %d bytes is over the %d byte limit" % (len(raw), MAX_COMMAND_BYTES))
    try:
        env = CommandEnvelope.from_json(raw, max_bytes=MAX_COMMAND_BYTES)
    except MessageError as e:
        raise CommandError("malformed command: %s" % e)
    body = env.signed
    signed_dict = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    sigs = [s.model_dump() for s in env.signatures]
    if not trusted:
        raise CommandError("no controller key is trusted (trust.command_keys); refusing every command")
    try:
        verify_signatures(signed_dict, sigs, trusted, threshold)
    except SignatureError as e:
        raise CommandError("command signature refused: %s" % e)
    if body.device_id != device_id:
        raise CommandError("command is addressed to device %r, not %r" % (body.device_id, device_id))
    if clock is not None and max_skew_s is not None:
        future = future_reason(body.issued_at, clock=clock, floor=floor, skew_s=max_skew_s)
        if future is not None:
            raise CommandError("command seq %d refused: %s" % (body.seq, future))
        if isinstance(body.args, ResetTimeFloorArgs):
            now = int(clock)
    if body.expires_at <= now:
        raise CommandError("command seq %d expired at %d (trusted time %d)" % (body.seq, body.expires_at, now))
    if now - body.issued_at > max_age_s:
        raise CommandError(
            "command seq %d was issued %d s ago, more than trust.max_command_age_s %d"
            % (body.seq, now - body.issued_at, max_age_s)
        )
    if body.seq <= last_seq:
        raise CommandError("command seq %d replayed (last accepted seq is %d)" % (body.seq, last_seq))
    return body


def peek_command_meta(raw: bytes) -> Dict[str, object]:
    """Best-effort seq/kind of a refused command, for the refusal event (never raises)."""
    try:
        env = CommandEnvelope.from_json(raw, max_bytes=MAX_COMMAND_BYTES)
    except (MessageError, CommandError):
        return {}
    return {"seq": env.signed.seq, "kind": env.signed.args.kind}
