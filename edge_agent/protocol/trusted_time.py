"""What the device believes the time is, and what may move its trusted time floor.

The floor is the newest signed time the device has accepted (a manifest's ``created``, a command's
``issued_at``), persisted in ``state.json``; expiry is checked against ``max(clock, floor)`` so that a
board without a real-time clock that boots at 1970 does not accept what expired before a time it has
already seen signed. Left unbounded, one validly signed document dated 2100 (a build host or controller
whose clock runs ahead) would push the floor to 2100 and make everything "expired" until then.

The rule, with ``skew`` = ``trust.max_clock_skew_s``:

1. The device clock is *plausible* when it is at or after ``EARLIEST_PLAUSIBLE_TIME`` (before this
   release existed, so a clock behind it is certainly wrong) and not more than ``skew`` behind the floor
   (it agrees with what the device has already seen signed).
2. With a plausible clock, a signed time more than ``skew`` ahead of the clock is refused (the signer's
   clock runs ahead), and an accepted one raises the floor to itself — so the floor never passes
   ``clock + skew``.
3. With an implausible clock (an RTC-less board before NTP, or a clock behind a time already proven),
   the device has nothing of its own to compare a signed time with, so a document is not refused for its
   date; instead the floor rises only to a time that *two independent signers* have both vouched for:
   the newest bundle ``created`` (the release key's build host) and the newest command ``issued_at``
   (the controller key's host), i.e. ``min`` of the two. One signer whose clock runs ahead — a bundle
   dated 2100, a controller a day fast — cannot move it past what the other one says; the floor only lags.
4. The one way down is a signed ``reset-time-floor`` command (controller key, own device id, sequence
   above the last): its expiry is checked against the device clock, not the floor it repairs, and it
   sets the floor to the command's ``issued_at``.

Pure functions: times in, a decision out.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

#: The independent signers whose times are remembered: the bundle signer and the controller.
SOURCES = ("bundle", "command")

#: 2026-01-01T00:00:00Z. A clock before this is certainly wrong (this release did not exist yet).
EARLIEST_PLAUSIBLE_TIME = 1767225600


def trusted_now(system_time: float, time_floor: int) -> int:
    """The clock used for expiry: the later of the system clock and the persisted trusted floor."""
    return max(int(system_time), int(time_floor))


def clock_is_plausible(clock: float, floor: int, skew_s: int) -> bool:
    """True when the device clock is after the earliest plausible time and not behind the floor by more
    than `skew_s` (rule 1)."""
    return int(clock) >= EARLIEST_PLAUSIBLE_TIME and int(clock) + skew_s >= int(floor)


def future_reason(stamp: int, *, clock: float, floor: int, skew_s: int) -> Optional[str]:
    """Why a signed time `stamp` is refused as dated in the future (rule 2), or None when it is acceptable."""
    if clock_is_plausible(clock, floor, skew_s) and stamp > int(clock) + skew_s:
        return ("it is dated %d, %d s ahead of the device clock %d (more than trust.max_clock_skew_s %d): "
                "check the signer's clock" % (stamp, stamp - int(clock), int(clock), skew_s))
    return None


def raised_floor(floor: int, stamp: int, *, source: str, seen: Mapping[str, int], clock: float,
                 skew_s: int) -> Tuple[int, Dict[str, int]]:
    """The floor, and the newest time seen per signer, after accepting a document signed by `source`
    ("bundle" or "command") at `stamp` (rules 2 and 3)."""
    if source not in SOURCES:
        raise ValueError("unknown signed-time source %r" % source)
    new_seen = {s: int(seen.get(s, 0)) for s in SOURCES}
    new_seen[source] = max(new_seen[source], int(stamp))
    if clock_is_plausible(clock, floor, skew_s):
        return max(int(floor), min(int(stamp), int(clock) + skew_s)), new_seen
    return max(int(floor), min(new_seen.values())), new_seen
