"""The controller process (`fleet serve`): one MQTT session, the bundle store, the chunk server and
signed commands to devices.

The registry, ingest, rollouts and RPC plug into it through `ControlPlane` (``fleet/control_plane.py``),
which uses `Controller.session` to subscribe to more topics and `Controller.send_command` to command
devices. The pieces it owns live beside it: ``fleet/bundle_store.py``, ``fleet/chunk_server.py``,
``fleet/command_seq.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from edge_agent.bundle.manifest import ManifestBody
from edge_agent.errors import ResourceError
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.commands import sign_command
from edge_agent.protocol.messages import BundleRef, CommandArgs, DeployArgs
from edge_agent.signing import PrivateKey, load_public_keys
from fleet.bundle_store import ControllerStore
from fleet.chunk_server import ChunkServer
from fleet.command_seq import SeqCounter
from fleet.config import FleetConfig
from fleet.entitlements import Entitlements, RegistryEntitlements


def max_inbound_bytes(cfg: FleetConfig) -> int:
    """The largest message the controller takes: a report, a fetch request or a CLI request."""
    from fleet.rpc import MAX_RPC_BYTES

    return max(cfg.ingest.max_report_bytes, cfg.chunks.max_request_bytes, MAX_RPC_BYTES)


class Controller:
    """The controller process: one MQTT session, the store, the chunk server, signed commands."""

    def __init__(self, cfg: FleetConfig, *, key: Optional[PrivateKey] = None, client_id: Optional[str] = None,
                 serve_chunks: bool = True, manage_fleet: Optional[bool] = None) -> None:
        self.cfg = cfg
        self.prefix = cfg.mqtt.prefix
        state = cfg.controller.state_dir
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResourceError("controller state dir %s cannot be created: %s" % (state, e.strerror))
        self.registry = None
        if cfg.registry.url:
            # Shared by several controllers: opened here, because `fleet push` needs it as well.
            self.registry = self._open_registry(cfg)
            from fleet.bundle_store_db import SharedBundleStore
            from fleet.command_seq import RegistrySeqCounter

            self.store: ControllerStore = SharedBundleStore(state / "store", self.registry,
                                                            cache_bytes=cfg.registry.store_cache_bytes)
            self.seq: Any = RegistrySeqCounter(self.registry)
        else:
            self.store = ControllerStore(state / "store")
            self.seq = SeqCounter(state / "command-seq.json")
        self.key = key
        # A device refuses a command numbered below one it already took: commands are numbered and queued
        # for the broker under one lock, so they leave this controller in the order of their numbers.
        self._send_lock = threading.Lock()
        # Nothing a device or an operator sends the controller is large (reports, fetch and CLI requests):
        # anything bigger is dropped before a handler sees it.
        self.client_id = client_id or cfg.controller.client_id
        self.session = MqttSession(cfg.mqtt, client_id=self.client_id, outgoing_queue=8192,
                                   name="controller", max_inbound_bytes=max_inbound_bytes(cfg))
        self.ingest_session: Any = None
        # Who may fetch what: in the shared registry when there is one, else next to the store.
        self.entitlements: Any = (RegistryEntitlements(self.registry) if self.registry is not None
                                  else Entitlements(state / "entitlements.sqlite"))
        # Fetch requests and chunks on a connection of their own: a flood of CLI requests on the main
        # connection (or of fetch requests on this one) does not queue in front of the other's messages.
        self.fetch_session: Optional[MqttSession] = None
        if serve_chunks:
            self.fetch_session = MqttSession(cfg.mqtt, client_id=self.client_id[:57] + "-fetch", outgoing_queue=8192,
                                             name="controller-fetch")
        self.chunks = ChunkServer(self.fetch_session or self.session, self.store, prefix=self.prefix, cfg=cfg.chunks,
                                  entitled=self.entitlements.allows)
        self.serve_chunks = serve_chunks
        if self.fetch_session is not None:
            fetch = topics.all_devices(self.prefix, "fetch")
            if cfg.controller.shared_group:
                fetch = "$share/%s/%s" % (cfg.controller.shared_group, fetch)
            self.fetch_session.subscribe(fetch, self.chunks.on_request, qos=1)
        # Registry, ingest, rollouts and the operator RPC (fleet/control_plane.py): only in the serving
        # controller, not in a one-shot `fleet push` (it would join the shared subscriptions).
        self.control = None
        if serve_chunks if manage_fleet is None else manage_fleet:
            self._init_control(cfg)

    def _init_control(self, cfg: FleetConfig) -> None:
        from fleet.control_plane import ControlPlane
        from fleet.registry import Registry
        from fleet.rollouts.record import RolloutParams
        from fleet.telemetry_view import HealthPolicy

        r = cfg.rollouts
        # Device reports on a connection of their own (see ControlPlane).
        # (Ingest drops reports over ingest.max_report_bytes itself, and counts them.)
        ingest_id = self.client_id[:56] + "-ingest"
        if cfg.ingest.receiver == "native":
            from fleet.ingest_link import IngestLink

            self.ingest_session: Any = IngestLink(cfg.mqtt, client_id=ingest_id,
                                                  max_packet_bytes=cfg.ingest.max_report_bytes + 1024)
        else:
            self.ingest_session = MqttSession(cfg.mqtt, client_id=ingest_id, name="controller-ingest")
        if self.registry is None:
            self.registry = Registry(r.registry_file or cfg.controller.state_dir / "registry.sqlite")
        self.control = ControlPlane(
            self.session, prefix=self.prefix, registry=self.registry, send_command=self.send_command,
            resolve_bundle=self.resolve_bundle, share_group=cfg.controller.shared_group, default_waves=r.waves,
            defaults=RolloutParams(r.success_threshold, r.error_threshold, r.device_timeout_s),
            health=HealthPolicy(max_error_rate=r.unhealthy_error_rate), tick_interval_s=r.tick_interval_s,
            resend_grace_s=r.resend_grace_s, telemetry_flush_s=r.telemetry_flush_s, ingest_backlog=r.ingest_backlog,
            leases=self._leases(cfg),
            history_interval_s=cfg.registry.history_interval_s, history_retention_s=cfg.registry.history_retention_s,
            ingest_limits=cfg.ingest, rpc_limits=cfg.rpc, ingest_session=self.ingest_session,
            inbox_poll_s=cfg.registry.inbox_poll_s, forward_timeout_s=cfg.registry.forward_timeout_s,
        )
        self.control.max_page_size = cfg.console.max_page_size
        self._register_bundle_methods()

    def _register_bundle_methods(self) -> None:
        """`bundles.list` and `bundles.show`: what this controller's store holds (CLI and console)."""
        from fleet.bundle_catalog import list_bundles, show_bundle

        rpc = self.control.rpc
        rpc.register("bundles.list", lambda p: list_bundles(self.store, limit=int(p.get("limit", 200))))
        rpc.register("bundles.show", lambda p: show_bundle(
            self.store, str(p["name"]), int(p["version"]), max_manifest_bytes=self.cfg.trust.max_manifest_bytes))

    def _leases(self, cfg: FleetConfig):
        """Rollout leases when the registry is shared with other controllers (None: we own them all)."""
        if not self.registry.shared:
            return None
        from fleet.leases import RolloutLeases, new_owner_id

        return RolloutLeases(self.registry, new_owner_id(cfg.controller.client_id), lease_s=cfg.registry.lease_s)

    @staticmethod
    def _open_registry(cfg: FleetConfig):
        from fleet.registry import Registry

        g = cfg.registry
        return Registry(str(g.url), pool_max=g.pool_max, reconnect_s=g.reconnect_s)

    def resolve_bundle(self, name: str, version: int) -> Tuple[str, int]:
        """(manifest sha256, manifest size) of a stored bundle (BundleRecordError when unknown)."""
        rec = self.store.record(name, version)
        return str(rec["manifest_sha256"]), int(rec["manifest_size"])

    @classmethod
    def load_key(cls, cfg: FleetConfig) -> PrivateKey:
        """The controller's command-signing key (`fleet keygen`), from controller.key_file."""
        from edge_agent.errors import SignatureError

        try:
            return PrivateKey.load(cfg.controller.key_file)
        except SignatureError as e:
            raise ResourceError("controller key: %s (create one with `fleet keygen --name controller`)" % e)

    def bundle_trust(self):
        """Trusted bundle keys for `add_bundle` (empty = only hashes are checked)."""
        d = self.cfg.trust.bundle_keys_dir
        return load_public_keys([d]) if d is not None else {}

    def add_bundle(self, path: Path) -> Tuple[ManifestBody, str, int]:
        """Store a bundle file so devices can fetch it."""
        t = self.cfg.trust
        return self.store.add_bundle(
            path, max_manifest_bytes=t.max_manifest_bytes, max_bundle_bytes=t.max_bundle_bytes,
            trusted=self.bundle_trust(), threshold=t.signature_threshold,
        )

    def sign(self, device_id: str, args: CommandArgs) -> bytes:
        """A signed command for one device with its next sequence number."""
        if self.key is None:
            raise ResourceError("no controller key loaded (controller.key_file)")
        return sign_command(
            args, device_id=device_id, seq=self.seq.next(device_id), keys=[self.key], now=int(time.time()),
            ttl_s=self.cfg.controller.command_ttl_s,
        )

    def send_command(self, device_id: str, args: CommandArgs):
        """Sign and publish a command to one device (QoS 1); returns the `Delivery`. A deploy entitles
        the device to fetch that bundle from the chunk server (before the device can ask)."""
        if isinstance(args, DeployArgs):
            self.entitlements.grant(device_id, args.bundle.name, args.bundle.version)
        with self._send_lock:
            return self.session.publish(
                topics.commands(self.prefix, device_id), self.sign(device_id, args), qos=1, block_s=5.0
            )

    def deploy_args(self, name: str, version: int, rollout_id: Optional[str] = None):
        """DeployArgs for a stored bundle."""
        rec = self.store.record(name, version)
        return DeployArgs(
            bundle=BundleRef(name=name, version=version), manifest_sha256=str(rec["manifest_sha256"]),
            manifest_size=int(rec["manifest_size"]), rollout_id=rollout_id,
        )

    def start(self) -> None:
        """Connect and start serving."""
        if self.serve_chunks:
            self.chunks.start()
        if self.control is not None:
            self.control.start()
        for s in self.sessions():
            s.start()

    def sessions(self) -> List[Any]:
        """Every MQTT connection of this controller (main, then fetch and reports when it has them: an
        `MqttSession`, or the report receiver `fleet.ingest_link.IngestLink`)."""
        return [s for s in (self.session, self.fetch_session, self.ingest_session) if s is not None]

    def wait_connected(self, timeout_s: float) -> bool:
        """True once every connection is up (within `timeout_s` in all)."""
        deadline = time.monotonic() + timeout_s
        return all(s.wait_connected(max(0.0, deadline - time.monotonic())) for s in self.sessions())

    def stop(self) -> None:
        """Stop serving and disconnect."""
        if self.control is not None:
            self.control.stop()
        self.chunks.stop()
        for s in self.sessions():
            s.stop()
        self.entitlements.close()
        if self.registry is not None:
            self.registry.close()
