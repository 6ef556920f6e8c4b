"""The console against a real controller: HTTP calls with tokens, and a controller + console + simulated
fleet on a test broker (tests/fleet_helpers.py), for the console API, metrics and browser tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fleet.config import ConsoleSection
from fleet.console.server import ConsoleServer
from fleet.console.tokens import add_token


class Client:
    """HTTP calls to one console: (status, parsed JSON or text, headers)."""

    def __init__(self, base: str, token: Optional[str] = None) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: Any = None, *, raw: Optional[bytes] = None,
                ctype: str = "application/json", headers: Optional[Dict[str, str]] = None,
                timeout: float = 30.0) -> Tuple[int, Any, Dict[str, str]]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text, hdrs = r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, text, hdrs = e.code, e.read(), dict(e.headers)
        ct = hdrs.get("Content-Type", "")
        return status, (json.loads(text) if ct.startswith("application/json") else text.decode()), hdrs

    def get(self, path: str) -> Tuple[int, Any, Dict[str, str]]:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Tuple[int, Any, Dict[str, str]]:
        return self.request("POST", path, body if body is not None else {})


def start_console(controller, tmp: Path, **cfg: Any) -> Tuple[ConsoleServer, Dict[str, str]]:
    """A console on a free loopback port for `controller`, with a viewer and an operator token."""
    tokens = tmp / "console-tokens"
    made = {"viewer": add_token(tokens, role="viewer", name="alice"),
            "operator": add_token(tokens, role="operator", name="olga")}
    console = ConsoleServer(ConsoleSection(enabled=True, port=0, **cfg), controller, tokens_file=tokens)
    console.start()
    return console, made


def send_telemetry(rig, seq: int = 1) -> None:
    """One telemetry report from every simulated device of a `fleet_helpers.FleetRig`."""
    from edge_agent.protocol import topics

    for d in rig.device_ids:
        rig.fleet.session.publish(topics.telemetry("edge/v1", d), rig.fleet.telemetry_payload(d, seq), qos=1)
