"""A simulated fleet for controller tests and the fleet benchmark: many lightweight devices that speak the
real wire protocol over one MQTT session.

Each simulated device publishes a retained `Status`, verifies every command addressed to it with the
real `verify_command` (Ed25519 signature, expiry, per-device sequence number), and answers a deploy with
the events and statuses a real agent publishes (command-accepted → fetch-done → selftest → activated →
probation → probation-passed / active), after `step_s` per step. What it does NOT do is fetch bundle
bytes or run models: the controller's rollout logic is under test here, not the agent (the agent's own
tests cover that with real processes).

Behaviour per device and bundle version: ``pass``, ``fail-selftest``, ``fail-probation`` (the device
rolls itself back), ``offline`` (publishes offline status, ignores commands), ``silent`` (accepts the
command, then never reports).
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from edge_agent.config import MqttConfig
from edge_agent.errors import CommandError
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession, require_connected
from edge_agent.protocol import topics
from edge_agent.protocol.commands import verify_command
from edge_agent.protocol.messages import BundleRef, DeployState, Event, PlatformInfo, Status, Telemetry

Behaviour = Callable[[str, BundleRef], str]


def always(kind: str) -> Behaviour:
    """Every device behaves the same for every bundle."""
    return lambda device_id, bundle: kind


class SimDevice:
    """The state one simulated device keeps."""

    def __init__(self, device_id: str, active: Optional[BundleRef]) -> None:
        self.device_id = device_id
        self.active = active
        self.previous: Optional[BundleRef] = None
        self.deploy = DeployState(state="active" if active else "idle", bundle=active)
        self.last_seq = 0
        self.event_seq = 0
        self.online = True
        self.commands: List[str] = []
        self.command_args: List = []  # the verified args of every accepted command, in order
        self.deploys: List = []
        #: Bumped by every deploy and rollback: a step of an older deploy finds it changed and stops
        #: (a rollback cancels a deploy in flight, as the agent's state machine does).
        self.gen = 0
        self.refused: List[str] = []


class SimFleet:
    """N simulated devices multiplexed over one MQTT session."""

    def __init__(
        self,
        cfg: MqttConfig,
        device_ids: List[str],
        *,
        trusted: Dict,
        behaviour: Optional[Behaviour] = None,
        initial: Optional[BundleRef] = None,
        step_s: float = 0.05,
        client_id: str = "simfleet",
    ) -> None:
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.trusted = trusted
        self.behaviour = behaviour or always("pass")
        self.step_s = step_s
        self.devices: Dict[str, SimDevice] = {d: SimDevice(d, initial) for d in device_ids}
        self.session = MqttSession(cfg, client_id=client_id, outgoing_queue=200000, name=client_id)
        self.session.subscribe(topics.all_devices(self.prefix, "commands"), self._on_command, qos=1)
        self._heap: List[Tuple[float, int, Callable[[], None]]] = []
        self._n = 0
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simfleet", daemon=True)
        self.lock = threading.RLock()

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect, publish every device's status, start answering commands."""
        self.session.start()
        require_connected(self.session, timeout_s)
        self._thread.start()
        for d in self.devices.values():
            if self.behaviour(d.device_id, d.active or BundleRef(name="none", version=1)) == "offline":
                d.online = False
            self.publish_status(d)

    def stop(self) -> None:
        """Stop answering and disconnect."""
        self._stop.set()
        with self._cv:
            self._cv.notify()
        self._thread.join(5)
        self.session.stop(timeout_s=5)

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run `fn` on the simulator thread after `delay_s`."""
        with self._cv:
            self._n += 1
            heapq.heappush(self._heap, (time.monotonic() + delay_s, self._n, fn))
            self._cv.notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                if not self._heap:
                    self._cv.wait(0.2)
                    continue
                at, _, fn = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cv.wait(min(wait, 0.2))
                    continue
                heapq.heappop(self._heap)
            with self.lock:
                fn()

    # ------------------------------------------------------------------------------------ publishing

    def publish_status(self, d: SimDevice) -> None:
        """The retained status of one device."""
        s = Status(
            device_id=d.device_id,
            online=d.online,
            ts=time.time(),
            agent_version="0.1.0-sim",
            platform=PlatformInfo(machine="x86_64", python="3.11", backend="sim"),
            active=d.active,
            previous=d.previous,
            deploy=d.deploy,
            ready=d.active is not None,
            last_command_seq=d.last_seq,
        )
        self.session.publish(topics.status(self.prefix, d.device_id), s.to_json(), qos=1, retain=True, block_s=5)

    def publish_event(
        self,
        d: SimDevice,
        kind: str,
        message: str,
        bundle: Optional[BundleRef],
        rollout_id: Optional[str],
        *,
        level: str = "info",
    ) -> None:
        """One event of one device."""
        d.event_seq += 1
        ev = Event(
            device_id=d.device_id,
            ts=time.time(),
            seq=d.event_seq,
            kind=kind,
            level=level,
            message=message,
            bundle=bundle,
            rollout_id=rollout_id,
        )
        self.session.publish(topics.events(self.prefix, d.device_id), ev.to_json(), qos=1, block_s=5)

    def telemetry_payload(self, device_id: str, seq: int, *, error_rate: float = 0.0) -> bytes:
        """A realistic telemetry message for one device."""
        d = self.devices[device_id]
        return Telemetry(
            device_id=device_id,
            ts=time.time(),
            seq=seq,
            period_s=1.0,
            uptime_s=100.0 + seq,
            qps=42.0,
            requests=42,
            errors=int(42 * error_rate),
            error_rate=error_rate,
            latency_ms={"p50": 3.1, "p95": 5.2, "p99": 7.9},
            queue_depth=1,
            mean_batch=3.5,
            large_fraction=0.2,
            tau=0.8,
            cpu_percent=35.0,
            mem_used_mb=2100.0,
            mem_available_mb=5900.0,
            temperatures_c={"cpu": 48.5, "gpu": 47.0},
            throttled=False,
            bundle=d.active,
        ).to_json()

    # ------------------------------------------------------------------------------------ commands

    def _on_command(self, msg: Inbound) -> None:
        parsed = topics.parse_device_topic(self.prefix, msg.topic)
        if parsed is None:
            return
        with self.lock:
            d = self.devices.get(parsed[0])
            if d is None or not d.online:
                return
            try:
                body = verify_command(
                    msg.payload,
                    device_id=d.device_id,
                    trusted=self.trusted,
                    last_seq=d.last_seq,
                    now=int(time.time()),
                    max_age_s=600,
                )
            except CommandError as e:
                d.refused.append(str(e))
                self.publish_event(d, "command-refused", str(e), None, None, level="warning")
                return
            d.last_seq = body.seq
            args = body.args
            d.commands.append(args.kind)
            d.command_args.append(args)
            if args.kind == "deploy":
                d.deploys.append(args)
                self._deploy(d, args.bundle, args.rollout_id)
            elif args.kind == "rollback":
                self._rollback(d, args.to, args.rollout_id, args.reason)
            elif args.kind == "ping":
                self.publish_event(d, "command-accepted", "pong %s" % args.nonce, None, None)

    def _deploy(self, d: SimDevice, bundle: BundleRef, rollout_id: Optional[str]) -> None:
        kind = self.behaviour(d.device_id, bundle)
        d.gen += 1
        gen = d.gen
        self.publish_event(d, "command-accepted", "deploy %s v%d" % (bundle.name, bundle.version), bundle, rollout_id)
        if kind == "silent":
            return
        step = self.step_s

        def state(name: str, detail: Optional[str] = None) -> None:
            d.deploy = DeployState(state=name, bundle=bundle, rollout_id=rollout_id, detail=detail, since=time.time())
            self.publish_status(d)

        def fetched() -> None:
            if d.gen != gen:
                return
            state("self-testing")
            self.publish_event(d, "fetch-done", "fetched", bundle, rollout_id)
            self.later(step, selftest)

        def selftest() -> None:
            if d.gen != gen:
                return
            if kind == "fail-selftest":
                self.publish_event(
                    d, "selftest-failed", "golden top-1 mismatch on 3 of 32 inputs", bundle, rollout_id, level="error"
                )
                state("failed", "self-test failed")
                return
            self.publish_event(d, "selftest-passed", "golden set passed", bundle, rollout_id)
            d.previous, d.active = d.active, bundle
            self.publish_event(d, "activated", "activated", bundle, rollout_id)
            state("probation")
            self.later(step, probation)

        def probation() -> None:
            if d.gen != gen:
                return
            if kind == "fail-probation":
                self.publish_event(
                    d, "probation-failed", "error rate 0.31 over 0.05", bundle, rollout_id, level="error"
                )
                d.active, d.previous = d.previous, None
                self.publish_event(d, "rolled-back", "back to the previous bundle", bundle, rollout_id, level="warning")
                state("rolled-back", "probation failed")
                return
            self.publish_event(d, "probation-passed", "healthy for the probation window", bundle, rollout_id)
            state("active")

        state("fetching")
        self.later(step, fetched)

    def _rollback(self, d: SimDevice, to: Optional[BundleRef], rollout_id: Optional[str], reason: str) -> None:
        d.gen += 1
        target = to or d.previous
        if target is None:
            self.publish_event(d, "rollback-failed", "no previous bundle", None, rollout_id, level="error")
            return
        old = d.active
        d.active, d.previous = target, old
        d.deploy = DeployState(state="rolled-back", bundle=old, rollout_id=rollout_id, detail=reason, since=time.time())
        self.publish_event(
            d,
            "rolled-back",
            "rolled back to %s v%d: %s" % (target.name, target.version, reason),
            old,
            rollout_id,
            level="warning",
        )
        self.publish_status(d)
