"""Send one signed command to a list of devices and follow their answers (`fleet push`,
`fleet reset-time-floor`): the broker's acknowledgement of every command within `--timeout`, then with
`--wait S` each device's final event within S seconds."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

from edge_agent.clikit import CliError
from edge_agent.protocol import boundedjson

#: An event's final outcome for one device ("activated: ...") or None when it is not final.
FinalFn = Callable[[Dict[str, Any]], Optional[str]]


class EventFollower:
    """Collects the first final event of each device in `devices` (events of other devices are ignored)."""

    def __init__(self, devices: List[str], *, max_bytes: int, final: FinalFn,
                 progress: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> None:
        self.devices = devices
        self.outcome: Dict[str, str] = {}
        self.done = threading.Event()
        self._max_bytes = max_bytes
        self._final = final
        self._progress = progress

    def on_event(self, msg) -> None:
        """MQTT handler of `{p}/devices/+/events`."""
        try:
            ev = boundedjson.loads(msg.payload, max_bytes=self._max_bytes, what="event")
        except boundedjson.JSONInputError:
            return
        dev = ev.get("device_id") if isinstance(ev, dict) else None
        if dev not in self.devices:
            return
        label = self._final(ev) if dev not in self.outcome else None
        if label is not None:
            self.outcome[dev] = label
            print("  %-20s %s" % (dev, label), flush=True)
            if len(self.outcome) == len(self.devices):
                self.done.set()
        elif self._progress is not None:
            self._progress(dev, ev)


def send_and_follow(ctl: Any, follower: EventFollower, make_args: Callable[[str], Any], *, what: str,
                    timeout_s: float, wait_s: float, events_topic: str) -> Dict[str, str]:
    """Send `make_args(device)` to every device, check the broker took each, then (`wait_s` > 0) wait for
    every device's final event. Returns the outcomes by device (empty without `wait_s`). CliError when the
    broker is unreachable, did not acknowledge a command, or a device did not answer in time."""
    from edge_agent.mqtt.session import require_connected

    devices = follower.devices
    if wait_s:
        ctl.session.subscribe(events_topic, follower.on_event)
    ctl.session.start()
    try:
        try:
            require_connected(ctl.session, timeout_s)
        except Exception as e:
            raise CliError(str(e))
        sent = [(dev, ctl.send_command(dev, make_args(dev))) for dev in devices]
        failed = [dev for dev, d in sent if not d.wait(timeout_s)]
        if failed:
            raise CliError("the broker did not acknowledge the %s for: %s" % (what, ", ".join(failed)))
        print("%s sent to %d device(s): %s" % (what, len(devices), ", ".join(devices)))
        if wait_s and not follower.done.wait(wait_s):
            missing = [d for d in devices if d not in follower.outcome]
            raise CliError("no final answer within %.0f s from: %s" % (wait_s, ", ".join(missing)))
        return dict(follower.outcome)
    finally:
        ctl.session.stop()
