"""What a console request may do on the controller: RPC methods through the controller's own
dispatcher (the code the CLI's requests run), and bundle uploads through `Controller.add_bundle`
(the code `fleet push` runs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict

from edge_agent.errors import EdgeAgentError
from fleet.console.routes import ApiError
from fleet.console.tokens import Principal

log = logging.getLogger(__name__)

#: Words of an RPC error that mean "no such thing" (HTTP 404).
_NOT_FOUND = ("no device ", "no rollout ", "does not store bundle", "no rollouts yet")


class Backend:
    """One request's view of the controller (`principal` is who asked)."""

    def __init__(self, controller: Any, principal: Principal, *, max_page_size: int) -> None:
        self.controller = controller
        self.principal = principal
        self.max_page_size = max_page_size

    @staticmethod
    def now() -> float:
        """Wall-clock time (telemetry windows)."""
        return time.time()

    def call(self, method: str, params: Dict[str, Any]) -> Any:
        """Run RPC `method`; its error answer becomes a 404, 409 or 500 ApiError."""
        resp = self.controller.control.rpc.dispatch(method, params)
        if resp.ok:
            return resp.result
        msg = resp.error or "refused"
        if msg.startswith("internal error"):
            raise ApiError(500, msg)
        if any(w in msg for w in _NOT_FOUND):
            raise ApiError(404, msg)
        if msg.startswith("bad parameters") or method.endswith((".list", ".show", ".history", ".events")):
            raise ApiError(400, msg)
        raise ApiError(409, msg)

    def upload(self, path: Path) -> Dict[str, Any]:
        """Check and store an uploaded bundle file as `fleet push` does."""
        try:
            body, sha, size = self.controller.add_bundle(Path(path))
        except EdgeAgentError as e:
            raise ApiError(422, "bundle refused (%s): %s" % (type(e).__name__, e))
        log.info("bundle %s v%d uploaded by %s", body.name, body.version, self.principal.name)
        return {"name": body.name, "version": body.version, "manifest_sha256": sha, "manifest_size": size,
                "files": len(body.files), "total_size": body.total_size()}
