"""The systemd watchdog follows the worker thread: a real agent against a real broker, a real
NOTIFY_SOCKET listener. READY=1 comes after the broker connection, STATUS= follows the agent's state,
and WATCHDOG=1 stops within WatchdogSec when the worker hangs (and resumes when it moves again)."""

from __future__ import annotations

import socket
import threading
import time
from typing import List, Tuple

import pytest
from agent_helpers import inprocess_agent

from edge_agent.agent import Agent
from edge_agent.engines.base import Engine, TensorSpec
from edge_agent.sdnotify import Notifier
from edge_agent.watchdog import Heartbeat, ServiceNotifier, status_line

#: WatchdogSec of the test service: systemd passes WATCHDOG_USEC = 2 s.
WATCHDOG_SEC = 2.0


class Listener:
    """The notify socket systemd would own: every datagram with its arrival time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.got: List[Tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            now = time.monotonic()
            self.got.extend((now, line) for line in data.split("\n"))

    def wait_for(self, pred, timeout_s: float) -> Tuple[float, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, m in list(self.got):
                if pred(m):
                    return t, m
            time.sleep(0.02)
        raise AssertionError("no matching notification in %.0f s: %s" % (timeout_s, [m for _, m in self.got]))

    def pings(self, after: float) -> List[float]:
        return [t for t, m in list(self.got) if m == "WATCHDOG=1" and t > after]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path):
    lst = Listener(str(tmp_path / "notify"))
    yield lst
    lst.close()


def _agent(tmp_path, broker, notify_path: str) -> Agent:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6))})
    return inprocess_agent(tmp_path, "wd1", broker=broker, notifier=notifier)


@pytest.mark.mqtt
def test_hung_worker_stops_watchdog_pings_within_watchdog_sec(tmp_path, broker, listener):
    agent = _agent(tmp_path, broker, listener.sock.getsockname())
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    release = threading.Event()
    hung_at: List[float] = []
    try:
        listener.wait_for(lambda m: m == "READY=1", 30)
        assert agent.session.connected.is_set()  # READY=1 only after the broker connection
        listener.wait_for(lambda m: m.startswith("STATUS=connected"), 5)
        listener.wait_for(lambda m: m == "WATCHDOG=1", 5)

        def hang():  # the worker blocks on something that never returns (until the test releases it)
            hung_at.append(time.monotonic())
            release.wait(30)

        agent._work.put(("call", hang))
        deadline = time.monotonic() + 5
        while not hung_at and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hung_at, "the worker never picked up the blocking call"
        # Watch for two full WatchdogSec: the main loop is alive and ticking, but no ping may come
        # later than WatchdogSec after the worker's hang began, so systemd would restart the service.
        watch_until = hung_at[0] + 2 * WATCHDOG_SEC + 1.0
        while time.monotonic() < watch_until:
            time.sleep(0.05)
        late = [round(t - hung_at[0], 2) for t in listener.pings(hung_at[0] + WATCHDOG_SEC)]
        assert late == [], "WATCHDOG=1 kept coming after the worker hung: %s s after" % late
        assert runner.is_alive()

        release.set()  # the worker moves again: pings resume
        released = time.monotonic()
        listener.wait_for(lambda m: m == "WATCHDOG=1" and listener.pings(released), 5)
    finally:
        release.set()
        agent.stop_event.set()
        runner.join(30)
    assert not runner.is_alive()


@pytest.mark.mqtt
def test_idle_worker_keeps_the_watchdog_fed(tmp_path, broker, listener):
    """The control for the test above: with a healthy idle worker, pings keep coming every interval."""
    agent = _agent(tmp_path, broker, listener.sock.getsockname())
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        listener.wait_for(lambda m: m == "READY=1", 30)
        start = time.monotonic()
        while time.monotonic() < start + 2 * WATCHDOG_SEC:
            time.sleep(0.05)
        pings = listener.pings(start)
        gaps = [b - a for a, b in zip([start, *pings], pings)]
        assert len(pings) >= 4 and max(gaps) < WATCHDOG_SEC / 2 + 0.3, gaps
    finally:
        agent.stop_event.set()
        runner.join(30)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    watchdog_interval_s = 1.0

    def __init__(self) -> None:
        self.sent: List[str] = []

    def ready(self, status=None):
        self.sent.append("READY=1 " + (status or ""))

    def status(self, text):
        self.sent.append("STATUS=" + text)

    def watchdog(self):
        self.sent.append("WATCHDOG=1")


def test_allow_raises_the_limit_for_a_bounded_step_only():
    clock = FakeClock()
    hb = Heartbeat(1.0, clock=clock)
    with hb.allow(60.0, "engine build"):
        clock.now += 30
        assert hb.fresh() and hb.limit_s() == 60.0
    assert hb.fresh()  # leaving the step is progress
    clock.now += 1.5
    assert not hb.fresh() and hb.limit_s() == 1.0


def test_ready_waits_for_up_and_status_is_sent_only_on_change():
    clock = FakeClock()
    up = [False]
    text = ["connecting to the broker; no model serving"]
    rec = Recorder()
    sn = ServiceNotifier(rec, Heartbeat(1.0, clock=clock), is_up=lambda: up[0], describe=lambda: text[0])
    sn.tick()
    sn.tick()
    assert rec.sent == ["STATUS=connecting to the broker; no model serving", "WATCHDOG=1", "WATCHDOG=1"]
    up[0] = True
    text[0] = "connected; no model serving"
    sn.tick()
    assert rec.sent[-2:] == ["READY=1 connected; no model serving", "WATCHDOG=1"]
    clock.now += 5  # the worker stopped beating
    before = len(rec.sent)
    sn.tick()
    assert rec.sent[before:] == []


def test_status_line_names_connection_bundle_and_progress():
    assert status_line(connected=True, serving="digits v3", deploy_state="fetching", deploy_bundle="digits v4",
                       percent=42.4) == "connected; serving digits v3; deploying digits v4 42%"
    assert status_line(connected=False, serving=None, deploy_state="preparing", deploy_bundle="digits v4",
                       percent=None) == "connecting to the broker; no model serving; deploying digits v4 (preparing)"
    assert status_line(connected=True, serving="digits v4", deploy_state="active", deploy_bundle="digits v4",
                       percent=None) == "connected; serving digits v4"


class _HangingEngine(Engine):
    """An engine whose call blocks until released (a hung driver call, as the watchdog sees it)."""

    backend = "hang"

    def __init__(self) -> None:
        super().__init__(inputs=[TensorSpec("x", "float32", (-1, 2))], outputs=[TensorSpec("y", "float32", (-1, 2))],
                         max_batch=4)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _infer_impl(self, feed):
        self.entered.set()
        self.release.wait(30)
        return {"y": feed["x"]}


def test_engine_call_past_engine_hang_s_stops_the_pings_and_they_resume_when_it_returns():
    """A real DynamicBatcher over an engine that never returns: the main loop's ticks stop WATCHDOG=1 once
    the call is older than runtime.engine_hang_s (the worker itself is fine), and ping again after it."""
    import numpy as np

    from edge_agent.runtime.batcher import DynamicBatcher

    clock = FakeClock()
    engine = _HangingEngine()
    batcher = DynamicBatcher(engine, name="large", max_batch=4, max_queue_delay_ms=0, max_queue=8, clock=clock)
    rec = Recorder()
    sn = ServiceNotifier(rec, Heartbeat(1.0, clock=clock), is_up=lambda: True, describe=lambda: "serving",
                         engine_call_age=batcher.engine_call_age_s, engine_hang_s=60.0)
    try:
        assert batcher.engine_call_age_s() == 0.0
        ticket = batcher.submit({"x": np.zeros(2, np.float32)})
        assert engine.entered.wait(10)
        sn.heartbeat.beat()
        clock.now += 59.0
        sn.heartbeat.beat()
        sn.tick()
        assert rec.sent[-1] == "WATCHDOG=1" and batcher.engine_call_age_s() == 59.0
        clock.now += 2.0
        sn.heartbeat.beat()  # the worker thread is healthy: only the engine call is hung
        before = len(rec.sent)
        sn.tick()
        sn.tick()
        assert rec.sent[before:] == []
        engine.release.set()
        assert ticket.result(10).outputs["y"].shape == (2,)
        assert batcher.engine_call_age_s() == 0.0
        sn.tick()
        assert rec.sent[-1] == "WATCHDOG=1"
    finally:
        engine.release.set()
        batcher.close()


def test_candidate_engine_counts_for_the_watchdog_too():
    """With a shadow / A-B candidate serving, the age is the longest over the active service and the candidate."""
    from edge_agent.runtime.mirror import _Delegating

    class Svc:
        def __init__(self, age):
            self.age = age

        def engine_call_age_s(self):
            return self.age

    wrapped = _Delegating()
    wrapped.active, wrapped.candidate = Svc(0.0), Svc(75.0)
    assert wrapped.engine_call_age_s() == 75.0


@pytest.mark.mqtt
def test_agent_main_loop_watches_the_serving_engines(tmp_path, broker, listener):
    """The agent wires its serving service into the watchdog: a service reporting an engine call older than
    runtime.engine_hang_s (120 s by default) stops the pings while the worker thread stays healthy."""
    agent = _agent(tmp_path, broker, listener.sock.getsockname())

    class StuckService:
        def engine_call_age_s(self):
            return 500.0

    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        listener.wait_for(lambda m: m == "READY=1", 30)
        listener.wait_for(lambda m: m == "WATCHDOG=1", 5)
        agent._service = StuckService()
        stuck_at = time.monotonic()
        while time.monotonic() < stuck_at + 2 * WATCHDOG_SEC:
            time.sleep(0.05)
        late = listener.pings(stuck_at + 1.5)  # a tick in flight when the service changed may still ping
        assert late == [], "WATCHDOG=1 kept coming with a hung engine call"
        assert agent.heartbeat.fresh()
    finally:
        agent._service = None
        agent.stop_event.set()
        runner.join(30)
