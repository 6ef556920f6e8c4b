"""The controller's fleet-management half: registry, ingest, rollouts and the operator RPC, attached to
the controller's MQTT session.

`ControlPlane` subscribes to every device's telemetry and events through MQTT 5 shared subscriptions
(``$share/fleet/{p}/devices/+/telemetry`` …; several controllers on a clustered broker share the load)
and to their retained status, answers the CLI's RPC methods, checks rollout timeouts every tick and
writes telemetry summaries to the registry every `telemetry_flush_s`. The controller (`fleet serve`)
supplies two functions: `send_command(device_id, args)` that signs and publishes a command, and
`resolve_bundle(name, version)` that returns the manifest's sha256 and size from its bundle store
(deploy commands pin the manifest by hash).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol.messages import BundleRef
from fleet.config import IngestSection, RpcSection
from fleet.device_query import fleet_summary, page_devices
from fleet.ingest import Ingest
from fleet.ingest_link import IngestLink
from fleet.leases import RolloutLeases
from fleet.registry import Registry
from fleet.rollouts.record import RolloutParams
from fleet.rollouts.runner import RolloutRunner, SendCommand
from fleet.rollouts.states import RolloutError
from fleet.rpc import RpcServer
from fleet.telemetry_view import HealthPolicy

log = logging.getLogger(__name__)

ResolveBundle = Callable[[str, int], Tuple[str, int]]


class ControlPlane:
    """Registry + ingest + rollout runner + RPC of one controller."""

    def __init__(
        self,
        session: MqttSession,
        *,
        prefix: str,
        registry: Registry,
        send_command: SendCommand,
        resolve_bundle: ResolveBundle,
        defaults: Optional[RolloutParams] = None,
        default_waves: Optional[List[float]] = None,
        health: Optional[HealthPolicy] = None,
        tick_interval_s: float = 1.0,
        resend_grace_s: float = 15.0,
        telemetry_flush_s: float = 5.0,
        ingest_backlog: int = 20000,
        history_interval_s: float = 300.0,
        history_retention_s: float = 7 * 86400.0,
        share_group: Optional[str] = "fleet",
        leases: Optional[RolloutLeases] = None,
        inbox_poll_s: float = 0.25,
        forward_timeout_s: float = 5.0,
        ingest_limits: Optional[IngestSection] = None,
        rpc_limits: Optional[RpcSection] = None,
        ingest_session: Union[MqttSession, IngestLink, None] = None,
    ) -> None:
        il = ingest_limits or IngestSection()
        self.session = session
        # Device reports may arrive on their own connection: a device flooding its report topics then
        # congests only that one, not the CLI requests, fetch requests and commands on `session`.
        self.ingest_session = ingest_session or session
        self.prefix = prefix
        self.registry = registry
        self.resolve_bundle = resolve_bundle
        self.runner = RolloutRunner(registry, send_command, defaults=defaults, default_waves=default_waves,
                                    leases=leases, forward_timeout_s=forward_timeout_s,
                                    resend_grace_s=resend_grace_s)
        self.inbox_poll_s = inbox_poll_s
        self.ingest = Ingest(
            registry,
            prefix=prefix,
            on_status=self.runner.on_status,
            on_event=self.runner.on_event,
            health=health or HealthPolicy(),
            max_backlog=ingest_backlog,
            history_interval_s=history_interval_s,
            history_retention_s=history_retention_s,
            max_payload_bytes=il.max_report_bytes,
            max_backlog_bytes=il.backlog_bytes,
            device_rate_per_s=il.device_reports_per_s,
            device_burst=il.device_report_burst,
        )
        self.rpc = RpcServer(session, prefix=prefix, share=share_group is not None, limits=rpc_limits or RpcSection())
        self.tick_interval_s = tick_interval_s
        #: Largest page `devices.list` answers (the console's [console] max_page_size).
        self.max_page_size = 500
        self.telemetry_flush_s = telemetry_flush_s
        self.share_group = share_group
        self.started_at = time.time()
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._last_heartbeat = 0.0
        self._register_methods()

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Resume rollouts from the registry, subscribe, start RPC and the ticker."""
        self.runner.start_sender()
        self.runner.resume_from_registry()
        self.ingest.start()
        if isinstance(self.ingest_session, IngestLink):
            # The controller's own receiver: each read's reports handed over as one batch.
            self.ingest_session.on_batch = self.ingest.submit_batch
            self.ingest.link_stats = self.ingest_session.stats
            for f in self.ingest.subscriptions(self.share_group):
                self.ingest_session.subscribe(f, qos=1)
        else:
            for f in self.ingest.subscriptions(self.share_group):
                self.ingest_session.subscribe(f, self._on_device_message, qos=1)
        self.rpc.start()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="fleet-ticker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Stop RPC and the ticker, flush the last telemetry."""
        self._stop.set()
        self.rpc.stop()
        if self._ticker is not None:
            self._ticker.join(5.0)
            self._ticker = None
        self.ingest.stop()
        self.runner.stop_sender()
        self.ingest.flush()

    def _on_device_message(self, msg: Inbound) -> None:
        self.ingest.submit(msg.topic, msg.payload)

    def _tick_loop(self) -> None:
        now = time.monotonic()
        next_flush = now + self.telemetry_flush_s
        next_tick = now + self.tick_interval_s
        # With leases, the inbox (events and operator requests other controllers forward) is polled more
        # often than the tick, so a forwarded `fleet rollout pause` is answered well within a second.
        step = min(self.tick_interval_s, self.inbox_poll_s) if self.runner.leases is not None else self.tick_interval_s
        while not self._stop.wait(step):
            try:
                if self.runner.leases is not None:
                    self.runner.poll_inbox()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick_interval_s
                    self.runner.tick()
                    self._heartbeat()
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + self.telemetry_flush_s
                    self.ingest.flush()
            except Exception:  # the ticker must survive a registry hiccup
                log.exception("controller tick failed")

    def _heartbeat(self) -> None:
        """With a shared registry: tell the other controllers (and `controller.status`) we are alive."""
        leases = self.runner.leases
        if leases is None:
            return
        now = time.time()
        if now - self._last_heartbeat < 1.0:
            return
        self._last_heartbeat = now
        stats = {"ingest": self.ingest.stats(), "driven_here": self.runner.active_ids(),
                 "takeovers": self.runner.takeovers, "forwarded_events": self.runner.forwarded,
                 "rpc": dict(self.rpc.stats)}
        self.registry.controller_heartbeat(leases.owner, leases.owner.split("@", 1)[0], self.started_at, stats)

    # ------------------------------------------------------------------------------------ RPC methods

    def _register_methods(self) -> None:
        r = self.rpc.register
        r("controller.status", self._controller_status)
        r("devices.list", self._devices_list)
        r("devices.show", self._devices_show)
        r("rollout.start", self._rollout_start)
        r("rollout.status", self._rollout_status)
        r("rollout.list", lambda p: self.runner.list(limit=int(p.get("limit", 20))))
        r("rollout.pause", lambda p: self.runner.pause(_need(p, "rollout_id")))
        r("rollout.resume", lambda p: self.runner.resume(_need(p, "rollout_id")))
        r("rollout.abort", lambda p: self.runner.abort(_need(p, "rollout_id"), rollback=bool(p.get("rollback", True))))
        r("rollout.promote", lambda p: self.runner.promote(_need(p, "rollout_id"), accept=bool(p.get("accept", True))))
        r("rollback", self._rollback)
        r("router.set", self._router_set)
        r("telemetry.latest", self._telemetry_latest)
        r("telemetry.history", self._telemetry_history)
        r("devices.events", self._devices_events)
        r("fleet.summary", lambda p: fleet_summary(self.registry))

    def _controller_status(self, params: Dict[str, Any]) -> Dict[str, Any]:
        out = self._own_status()
        if self.runner.leases is not None:
            # Every live controller of the fleet (heartbeat within three lease periods), whichever answered.
            out["controllers"] = self.registry.list_controllers(within_s=3 * self.runner.leases.lease_s)
            out["answered_by"] = self.runner.leases.owner
        return out

    def _own_status(self) -> Dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "devices": self.registry.device_count(),
            "active_rollouts": self.runner.fleet_active_ids(),
            "driven_here": self.runner.active_ids(),
            "registry": self.registry.engine,
            "takeovers": self.runner.takeovers,
            "ingest": self.ingest.stats(),
            # Telemetry that reached no controller (gaps in the devices' sequence numbers, all controllers).
            "telemetry_upstream": self.registry.telemetry_loss(),
            "rpc": dict(self.rpc.stats),
            "command_send_failures": self.runner.send_failures,
            # Commands not published because the lease may have expired meanwhile (sent again later).
            "commands_held_back": self.runner.held_back,
            # Deploys still queued when their rollout stopped, not published.
            "deploys_dropped_stopped": self.runner.stale_dropped,
            "registry_schema": self.registry.schema_version(),
        }

    def _devices_list(self, params: Dict[str, Any]) -> Any:
        page = params.get("page")
        if page is not None:
            # One sorted, filtered page (the console); without `page` every device (the CLI).
            if not isinstance(page, dict):
                raise RolloutError("page must be an object")
            return page_devices(self.registry, page, max_limit=self.max_page_size)
        online = params.get("online")
        rows = self.registry.list_devices(online=None if online is None else bool(online))
        wanted = params.get("devices")
        if wanted:
            keep = set(wanted)
            rows = [r for r in rows if r["device_id"] in keep]
        return rows

    def _devices_show(self, params: Dict[str, Any]) -> Dict[str, Any]:
        device_id = _need(params, "device_id")
        d = self.registry.get_device(device_id)
        if d is None:
            raise RolloutError("no device %s in the registry" % device_id)
        d["rollouts"] = self.registry.device_rollouts(device_id)
        return d

    def _rollout_start(self, params: Dict[str, Any]) -> Dict[str, Any]:
        bundle = params.get("bundle")
        if not isinstance(bundle, dict):
            raise RolloutError("rollout.start needs bundle {name, version}")
        ref = BundleRef(name=bundle.get("name"), version=bundle.get("version"))
        sha, size = self.resolve_bundle(ref.name, ref.version)
        want = params.get("manifest_sha256")
        if want and want != sha:
            raise RolloutError(
                "the controller's %s v%d has manifest sha256 %s…, not the %s… of your file; push it again"
                % (ref.name, ref.version, sha[:12], str(want)[:12])
            )
        return self.runner.start(
            bundle=ref.model_dump(),
            manifest_sha256=sha,
            manifest_size=size,
            percents=params.get("waves"),
            wave_devices=params.get("wave_devices"),
            devices=params.get("devices"),
            mode=params.get("mode", "normal"),
            ab_split=params.get("ab_split"),
            params={
                "success_threshold": params.get("success_threshold"),
                "error_threshold": params.get("error_threshold"),
                "device_timeout_s": params.get("device_timeout_s"),
            },
        )

    def _rollout_status(self, params: Dict[str, Any]) -> Dict[str, Any]:
        out = self.runner.get(params.get("rollout_id"), history=int(params.get("history", 50)),
                              devices=params.get("devices", True))
        if out.get("mode") in ("shadow", "ab") and "devices" in out:
            # Candidate vs active per device, from each device's latest telemetry about this candidate.
            rows = {d["device_id"]: d for d in self.registry.list_devices()}
            for e in out.get("devices", []):
                tel = (rows.get(e["device_id"]) or {}).get("telemetry") or {}
                sh = tel.get("shadow")
                ok = sh and (sh.get("candidate") or {}).get("version") == out["bundle"]["version"] and (
                    sh.get("candidate") or {}).get("name") == out["bundle"]["name"]
                e["shadow"] = sh if ok else None
                ev = (rows.get(e["device_id"]) or {}).get("last_event") or {}
                if not ok and ev.get("kind") in ("shadow-report", "promoted", "candidate-refused") and (
                        ev.get("bundle") or {}) == {"name": out["bundle"]["name"], "version": out["bundle"]["version"]}:
                    # Decided (or reported): the figures the device decided on, from its last event.
                    d = ev.get("data") or {}
                    e["shadow"] = {"mode": d.get("mode"), "outcome": ev["kind"], "agreement": d.get("agreement"),
                                   "candidate_p99_ms": d.get("candidate_p99_ms"),
                                   "active_p99_ms": d.get("active_p99_ms"),
                                   "candidate_errors": d.get("candidate_errors"), "compared": d.get("compared")}
        return out

    def _rollback(self, params: Dict[str, Any]) -> Dict[str, Any]:
        devices = params.get("devices") or []
        if not isinstance(devices, list):
            raise RolloutError("rollback needs a list of devices")
        return self.runner.rollback_devices(
            devices, to=params.get("to"), reason=str(params.get("reason") or "operator rollback")
        )

    def _router_set(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Sign and send a `set-router` command (gate / τ / target / adaptive) to each named device."""
        from pydantic import ValidationError

        from edge_agent.errors import EdgeAgentError
        from edge_agent.protocol.messages import SetRouterArgs

        devices = params.get("devices") or []
        if not isinstance(devices, list) or not devices:
            raise RolloutError("router.set needs a list of devices")
        fields = {k: params[k] for k in ("gate", "tau", "target_large_fraction", "adaptive")
                  if params.get(k) is not None}
        if not fields:
            raise RolloutError("router.set needs at least one of gate, tau, target_large_fraction, adaptive")
        try:
            args = SetRouterArgs(**fields)
        except ValidationError as e:
            raise RolloutError("router.set: %s" % e.errors()[0]["msg"])
        known = {d["device_id"] for d in self.registry.list_devices()}
        unknown = sorted(d for d in devices if d not in known)
        if unknown:
            raise RolloutError("unknown device(s): %s" % ", ".join(unknown[:10]))
        sent: List[str] = []
        failed: Dict[str, str] = {}
        for d in dict.fromkeys(devices):
            try:
                self.runner.send_command(d, args)
                sent.append(d)
            except EdgeAgentError as e:
                failed[d] = str(e)
        return {"sent": sent, "failed": failed}

    def _telemetry_history(self, params: Dict[str, Any]) -> List[Dict[str, Any]]:
        device_id = str(_need(params, "device_id"))
        limit = int(min(max(_float(params, "limit", 1000), 1), 10000))
        return self.registry.telemetry_history(device_id, since=_float(params, "since", 0.0), limit=limit)

    def _devices_events(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """A device's event timeline: its last event and its lines in rollout histories, newest first."""
        device_id = str(_need(params, "device_id"))
        limit = int(min(max(_float(params, "limit", 200), 1), 1000))
        d = self.registry.get_device(device_id)
        if d is None:
            raise RolloutError("no device %s in the registry" % device_id)
        rows = self.registry.read(
            "SELECT rollout_id, ts, kind, message FROM rollout_history WHERE device_id = ? ORDER BY id DESC LIMIT ?",
            (device_id, limit))
        return {"device_id": device_id, "last_event": d.get("last_event"), "history": [dict(r) for r in rows]}

    def _telemetry_latest(self, params: Dict[str, Any]) -> List[Dict[str, Any]]:
        rows = self.registry.list_devices()
        dev = params.get("device_id")
        return [
            {"device_id": r["device_id"], "online": r["online"], "health": r["health"], "telemetry": r["telemetry"]}
            for r in rows
            if dev is None or r["device_id"] == dev
        ]


def _float(params: Dict[str, Any], key: str, default: float) -> float:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RolloutError("parameter %r must be a number" % key)
    return float(v)


def _need(params: Dict[str, Any], key: str) -> Any:
    if key not in params or params[key] in (None, ""):
        raise RolloutError("missing parameter %r" % key)
    return params[key]
