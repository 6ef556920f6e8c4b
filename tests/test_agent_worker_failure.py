"""A bug in one unit of work (a command, a decision handed over by another thread) is logged and counted
and the worker goes on with the next; a worker that dies on an unexpected error outside any unit (the
start-up restore) stops the agent with a non-zero exit status, so the service's `Restart=on-failure`
brings it back; a requested stop still exits 0."""

from __future__ import annotations

import threading

from agent_helpers import inprocess_agent

from edge_agent.agent import Agent


def _agent(tmp_path) -> Agent:
    return inprocess_agent(tmp_path, "dev1")


def test_worker_dying_on_a_bug_makes_run_exit_non_zero(tmp_path, monkeypatch):
    agent = _agent(tmp_path)

    def broken_restore():
        raise ZeroDivisionError("a bug during start-up")

    monkeypatch.setattr(agent, "restore", broken_restore)
    timer = threading.Timer(30.0, agent.stop_event.set)  # never hang the test run
    timer.start()
    try:
        assert agent.run() == 1
    finally:
        timer.cancel()
    assert agent.worker_failed and agent.stop_event.is_set()


def test_bug_in_one_work_item_is_counted_and_the_worker_goes_on(tmp_path):
    agent = _agent(tmp_path)
    done = threading.Event()
    # A decision handed to the worker by another thread that hits a bug, then a good one.
    agent._work.put(("call", lambda: 1 // 0))
    agent._work.put(("call", done.set))
    agent._work.put(("call", lambda: done.wait(5) and agent.stop_event.set()))
    timer = threading.Timer(30.0, agent.stop_event.set)  # never hang the test run
    timer.start()
    try:
        assert agent.run() == 0
    finally:
        timer.cancel()
    assert done.is_set() and agent.worker_errors == 1 and not agent.worker_failed


def test_requested_stop_exits_zero(tmp_path):
    agent = _agent(tmp_path)
    timer = threading.Timer(0.5, agent.stop_event.set)
    timer.start()
    try:
        assert agent.run() == 0
    finally:
        timer.cancel()
    assert not agent.worker_failed
