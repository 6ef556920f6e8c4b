"""A controller (the real `fleet.controller.Controller` with its registry, rollouts and RPC) and a
simulated fleet on a test broker, for the fleet CLI and controller tests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, List, Optional

from sim_devices import Behaviour, SimFleet, always

from edge_agent.config import MqttConfig
from edge_agent.protocol.messages import BundleRef
from edge_agent.signing import PrivateKey
from fleet.config import ControllerSection, FleetConfig, RolloutSection
from fleet.controller import Controller

PREFIX = "edge/v1"


def mqtt_cfg(broker) -> MqttConfig:
    """Broker settings for a test client."""
    return MqttConfig(
        host=broker.host, port=broker.port, prefix=PREFIX, keepalive_s=5, reconnect_min_s=0.1, reconnect_max_s=0.5
    )


class FleetRig:
    """Controller + simulated devices on one broker; `cli(...)` runs the real `fleet` command in-process."""

    def __init__(
        self,
        broker,
        tmp: Path,
        *,
        devices: int = 20,
        behaviour: Optional[Behaviour] = None,
        step_s: float = 0.03,
        device_timeout_s: float = 30.0,
        initial: Optional[BundleRef] = None,
        bundles=((2,), (3,), (4,)),
    ) -> None:
        self.broker = broker
        self.tmp = tmp
        self.key = PrivateKey.generate("controller")
        self.device_ids = ["dev-%02d" % i for i in range(devices)]
        self.state_dir = tmp / "controller"
        self.cfg = FleetConfig(
            mqtt=mqtt_cfg(broker),
            controller=ControllerSection(state_dir=self.state_dir, key_file=tmp / "controller.key"),
            rollouts=RolloutSection(device_timeout_s=device_timeout_s, tick_interval_s=0.1, telemetry_flush_s=0.2),
        )
        self.controller: Optional[Controller] = None
        self.fleet = SimFleet(
            mqtt_cfg(broker),
            self.device_ids,
            trusted={self.key.keyid: self.key.public},
            behaviour=behaviour or always("pass"),
            initial=initial or BundleRef(name="digits", version=1),
            step_s=step_s,
        )
        self._bundles = [b[0] for b in bundles]

    def start_controller(self) -> Controller:
        """Start (or restart) the controller on the same state dir."""
        ctl = Controller(self.cfg, key=self.key)
        # The store's record is all a rollout needs from a bundle (devices here never fetch bytes).
        for v in self._bundles:
            rdir = ctl.store.bundles / "digits"
            rdir.mkdir(parents=True, exist_ok=True)
            (rdir / ("%d.json" % v)).write_text(
                json.dumps(
                    {"name": "digits", "version": v, "manifest_sha256": ("%02x" % v) * 32, "manifest_size": 1000 + v}
                )
            )
        ctl.start()
        assert ctl.wait_connected(10), ctl.session.last_error
        self.controller = ctl
        return ctl

    def stop_controller(self) -> None:
        """Stop the controller (clean shutdown)."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def start(self) -> FleetRig:
        """Controller first, then the devices, then wait until the registry knows every device."""
        self.start_controller()
        self.fleet.start()
        self.wait(lambda: self.controller.registry.device_count() == len(self.device_ids), 10, "devices registered")
        return self

    def stop(self) -> None:
        """Stop everything."""
        self.fleet.stop()
        self.stop_controller()

    @staticmethod
    def wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `cond` until true or fail with `what`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        raise AssertionError("timed out waiting for %s" % what)

    def cli_args(self, *args: str) -> List[str]:
        """`fleet` argv with this broker."""
        return [*args, "--broker", "%s:%d" % (self.broker.host, self.broker.port)]

    def cli(self, capsys, *args: str):
        """Run `fleet ARGS --broker ...` in-process; (exit code, stdout, stderr)."""
        from fleet.cli import main

        capsys.readouterr()
        rc = main(self.cli_args(*args))
        out, err = capsys.readouterr()
        return rc, out, err

    def commands_of(self, device_id: str) -> List[str]:
        """Command kinds a simulated device accepted."""
        return list(self.fleet.devices[device_id].commands)
