"""systemd watchdog fed by the work that must stay alive, readiness, and a current STATUS= line.

The worker thread (commands, deployments, the start-up restore) beats a `Heartbeat` on every turn of
its loop and at every step of a deployment (fetch loop turns, engine and deploy events, probation
polls). The main thread calls `ServiceNotifier.tick()` about once a second; it sends ``WATCHDOG=1``
only while the last beat is younger than the allowed age, so a worker blocked in a lock, a hung
driver call or an endless loop stops the pings and systemd restarts the service after
``WatchdogSec=``.

The allowed age is half the watchdog timeout that systemd passes (``WATCHDOG_USEC``): a hung worker
stops the pings at most that long after its last beat, well inside ``WatchdogSec``. A step that may
legitimately block longer without a beat and has its own bound (a TensorRT engine build with
``engine.build_timeout_s``) runs inside ``Heartbeat.allow(seconds, what)``, which raises the allowed
age for its duration only.

Serving is watched too: an engine call (a batch on the small or large model, of the active bundle or a
candidate) that has run longer than ``runtime.engine_hang_s`` counts as a hung engine, and the pings
stop the same way. A hung driver call cannot be interrupted from Python, and each request behind it
would only get a 504 at ``request_timeout_s``: a restart is the one recovery.

``READY=1`` is sent at the first tick at which the agent is connected to the broker or serving a model
(whichever comes first: a device with a complete active bundle serves while the broker is away).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)


class Heartbeat:
    """When the watched thread last made progress, and how old a beat may get before it counts as hung."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()
        self._allowance: Optional[float] = None  # a bounded blocking step's allowed age, while it runs
        self._step = ""

    def beat(self) -> None:
        """The watched thread made progress."""
        self._last = self._clock()

    @contextlib.contextmanager
    def allow(self, seconds: float, what: str) -> Iterator[None]:
        """Run a step that may block up to `seconds` without a beat (it enforces that bound itself)."""
        with self._lock:
            saved = (self._allowance, self._step)
            self._allowance, self._step = max(seconds, self.max_age_s), what
        self.beat()
        try:
            yield
        finally:
            with self._lock:
                self._allowance, self._step = saved
            self.beat()

    def age_s(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def limit_s(self) -> float:
        """The age beyond which the thread counts as hung (raised inside `allow`)."""
        allowance = self._allowance
        return self.max_age_s if allowance is None else allowance

    def fresh(self) -> bool:
        """True while the last beat is recent enough."""
        return self.age_s() <= self.limit_s()

    def pacing(self, event: threading.Event) -> PacedEvent:
        """`event` for a loop that polls it (``wait(timeout)``): each poll counts as a beat."""
        return PacedEvent(event, self)


class PacedEvent:
    """A threading.Event stand-in whose `wait` beats a heartbeat first (probation polls the stop event)."""

    def __init__(self, event: threading.Event, heartbeat: Heartbeat) -> None:
        self._event = event
        self._heartbeat = heartbeat

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Beat, then wait on the event."""
        self._heartbeat.beat()
        return self._event.wait(timeout)

    def is_set(self) -> bool:
        """Whether the event is set."""
        return self._event.is_set()

    def set(self) -> None:
        """Set the event."""
        self._event.set()


def status_line(*, connected: bool, serving: Optional[str], deploy_state: str, deploy_bundle: Optional[str],
                percent: Optional[float]) -> str:
    """The one-line STATUS= text: broker link, what serves, and a deployment with its progress."""
    parts = ["connected" if connected else "connecting to the broker"]
    parts.append("serving %s" % serving if serving else "no model serving")
    if deploy_bundle and deploy_state not in ("idle", "active", "failed", "rolled-back"):
        if deploy_state == "fetching" and percent is not None:
            parts.append("deploying %s %.0f%%" % (deploy_bundle, percent))
        else:
            parts.append("deploying %s (%s)" % (deploy_bundle, deploy_state))
    return "; ".join(parts)


class ServiceNotifier:
    """Readiness, watchdog and status for systemd, driven by `tick()` from the main loop."""

    def __init__(self, notifier: Any, heartbeat: Heartbeat, *, is_up: Callable[[], bool],
                 describe: Callable[[], str], engine_call_age: Callable[[], float] = lambda: 0.0,
                 engine_hang_s: float = float("inf")) -> None:
        self.notifier = notifier
        self.heartbeat = heartbeat
        self._engine_call_age = engine_call_age
        self.engine_hang_s = engine_hang_s
        self._is_up = is_up
        self._describe = describe
        self.ready_sent = False
        self._last_status: Optional[str] = None
        self._stalled = False

    @property
    def watchdog_enabled(self) -> bool:
        """True when systemd expects WATCHDOG=1 from this process."""
        return bool(getattr(self.notifier, "watchdog_interval_s", None))

    def tick(self) -> None:
        """READY=1 once up, STATUS= when it changed, WATCHDOG=1 while the worker's heartbeat is fresh."""
        status = self._describe()
        if not self.ready_sent and self._is_up():
            self.notifier.ready(status)
            self.ready_sent = True
            self._last_status = status
        elif status != self._last_status:
            self.notifier.status(status)
            self._last_status = status
        if not self.watchdog_enabled:
            return
        problem = self._problem()
        if problem is None:
            if self._stalled:
                logger.warning("agent progressing again; watchdog pings resumed")
                self._stalled = False
            self.notifier.watchdog()
        elif not self._stalled:
            self._stalled = True
            logger.error("%s: watchdog pings stopped, systemd will restart the agent", problem)

    def _problem(self) -> Optional[str]:
        """Why the agent counts as hung now, or None."""
        if not self.heartbeat.fresh():
            return "worker thread made no progress for %.0f s (limit %.0f s)" % (
                self.heartbeat.age_s(), self.heartbeat.limit_s())
        try:
            age = self._engine_call_age()
        except Exception:  # a service being swapped out: judge again at the next tick
            logger.debug("engine call age unavailable", exc_info=True)
            return None
        if age > self.engine_hang_s:
            return "an engine call has been running for %.0f s (runtime.engine_hang_s %.0f s)" % (
                age, self.engine_hang_s)
        return None
