"""The `set-router` command: a policy the active bundle cannot honour is refused with an event that says
why (before, the RouterPolicyError only reached the agent's log and the operator saw `command-accepted`
and nothing else), and the running router keeps its policy."""

from __future__ import annotations

import threading
import time

from agent_helpers import write_key

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.protocol.commands import sign_command
from edge_agent.protocol.messages import SetRouterArgs
from edge_agent.runtime.router import TauController
from edge_agent.runtime.service import InferenceService


class _RouterOnlyService:
    """The part of InferenceService that `set-router` uses: its own `set_router` (number parsing, linear
    head check) over the real τ controller, without engines."""

    def __init__(self) -> None:
        self.head = None
        self.router = TauController(gate="confidence", tau=0.5, tau_min=0.3, tau_max=0.9)
        self._router_lock = threading.Lock()

    def set_router(self, **kw):
        return InferenceService.set_router(self, **kw)  # type: ignore[arg-type]

    def router_state(self):
        return self.router.state()


def _agent(tmp_path):
    write_key(tmp_path / "bundle-keys", "release")
    controller = write_key(tmp_path / "command-keys", "controller")
    cfg = AgentConfig.model_validate({
        "device_id": "dev1", "state_dir": str(tmp_path / "state"),
        "trust": {"bundle_keys_dir": str(tmp_path / "bundle-keys"),
                  "command_keys": [str(tmp_path / "command-keys" / "controller.pub")]},
        "engine": {"backend": "onnxruntime"}, "api": {"enabled": False},
    })
    return Agent(cfg).build(with_mqtt=False), controller


def test_set_router_outside_the_bundles_tau_bounds_is_refused_with_the_reason(tmp_path):
    agent, controller = _agent(tmp_path)
    events = []
    agent.emit = lambda kind, message, **kw: events.append((kind, message))
    svc = _RouterOnlyService()
    agent._service = svc
    try:
        now = int(time.time())
        agent.handle_command(sign_command(SetRouterArgs(tau="0.95"), device_id="dev1", seq=1, keys=[controller],
                                          now=now))
        assert [k for k, _ in events] == ["command-accepted", "command-refused"]
        assert "router unchanged" in events[1][1] and "outside the bundle's bounds" in events[1][1]
        assert svc.router.base_tau == 0.5  # the policy in force did not change
        events.clear()
        agent.handle_command(sign_command(SetRouterArgs(tau="0.7"), device_id="dev1", seq=2, keys=[controller],
                                          now=now))
        assert [k for k, _ in events] == ["command-accepted", "router-changed"]
        assert svc.router.base_tau == 0.7
        events.clear()
        agent.handle_command(sign_command(SetRouterArgs(gate="large-only"), device_id="dev1", seq=3,
                                          keys=[controller], now=now))
        assert [k for k, _ in events] == ["command-accepted", "router-changed"]
        assert svc.router.gate == "large-only" and svc.router.decide(0.99) is True
    finally:
        agent._service = None
        agent.shutdown(timeout_s=1)
