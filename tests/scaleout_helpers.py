"""Several `fleet serve` processes on one PostgreSQL registry and one broker, with simulated devices:
for the scale-out tests and bench/fleet.py's failover figure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from agent_helpers import REPO, write_key
from fleet_helpers import mqtt_cfg
from sim_devices import Behaviour, SimFleet, always

from edge_agent.protocol.messages import BundleRef


def shared_fleet_toml(path: Path, *, port: int, key_file: Path, state_dir: Path, client_id: str, pg_url: str,
                      lease_s: float = 2.0, tick_s: float = 0.2, extra: str = "") -> Path:
    """A fleet.toml for one of several controllers sharing `pg_url`."""
    path.write_text("\n".join([
        "[mqtt]", 'host = "127.0.0.1"', "port = %d" % port, "reconnect_min_s = 0.2", "reconnect_max_s = 1.0",
        "[controller]", 'client_id = "%s"' % client_id, 'key_file = "%s"' % key_file, 'state_dir = "%s"' % state_dir,
        "[rollouts]", "tick_interval_s = %s" % tick_s, "telemetry_flush_s = 0.5", "device_timeout_s = 60",
        "[registry]", 'url = "%s"' % pg_url, "lease_s = %s" % lease_s, "reconnect_s = 20",
        extra,
    ]) + "\n", encoding="utf-8")
    return path


def insert_bundle_record(pg_url: str, name: str, version: int) -> None:
    """What `fleet push` leaves in the shared store, for devices that never fetch bytes (simulated)."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO bundle_records (name, version, manifest_sha256, manifest_size, created) "
            "VALUES (%s, %s, %s, %s, 0) ON CONFLICT DO NOTHING",
            (name, version, ("%02x" % version) * 32, 1000 + version),
        )


class SharedRig:
    """N controllers (real processes) + a simulated fleet, one broker, one PostgreSQL database."""

    def __init__(self, broker, tmp: Path, pg_url: str, *, controllers: int = 2, devices: int = 12,
                 behaviour: Optional[Behaviour] = None, step_s: float = 0.1, lease_s: float = 2.0,
                 extra_toml: str = "") -> None:
        self.broker = broker
        self.tmp = Path(tmp)
        self.pg_url = pg_url
        self.key = write_key(self.tmp / "keys", "controller")
        self.names = ["ctl-%s" % chr(ord("a") + i) for i in range(controllers)]
        self.tomls = {
            n: shared_fleet_toml(self.tmp / ("%s.toml" % n), port=broker.port, key_file=self.tmp / "keys" /
                                 "controller.key", state_dir=self.tmp / n, client_id=n, pg_url=pg_url,
                                 lease_s=lease_s, extra=extra_toml)
            for n in self.names
        }
        self.procs: Dict[str, subprocess.Popen] = {}
        self.device_ids = ["dev-%03d" % i for i in range(devices)]
        self.fleet = SimFleet(mqtt_cfg(broker), self.device_ids, trusted={self.key.keyid: self.key.public},
                              behaviour=behaviour or always("pass"), initial=BundleRef(name="digits", version=1),
                              step_s=step_s)

    def start_controller(self, name: str) -> subprocess.Popen:
        """`fleet serve` for one controller."""
        p = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "serve", "--config", str(self.tomls[name])],
            stdout=open(self.tmp / ("%s.log" % name), "ab"), stderr=subprocess.STDOUT, cwd=str(REPO),
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        self.procs[name] = p
        return p

    def start(self) -> SharedRig:
        """Every controller, then the devices; waits until the shared registry knows every device."""
        for n in self.names:
            self.start_controller(n)
        self.fleet.start()
        self.wait(lambda: self.registry_count("devices") == len(self.device_ids), 30, "devices registered")
        return self

    def kill(self, name: str) -> None:
        """kill -9 one controller."""
        p = self.procs[name]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def stop(self) -> None:
        """Stop the devices and every controller still running."""
        self.fleet.stop()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def query(self, sql: str, params=()) -> List[tuple]:
        """Rows of a query on the shared database."""
        import psycopg

        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return list(conn.execute(sql, params).fetchall())

    def registry_count(self, table: str) -> int:
        """Rows in a registry table."""
        try:
            return int(self.query("SELECT COUNT(*) FROM %s" % table)[0][0])
        except Exception:
            return -1

    def lease_owner(self, rollout_id: str) -> Optional[str]:
        """The controller name (client id) holding the rollout's lease."""
        rows = self.query("SELECT owner FROM rollout_leases WHERE rollout_id = %s", (rollout_id,))
        return rows[0][0].split("@", 1)[0] if rows else None

    def rollout_state(self, rollout_id: str) -> Optional[str]:
        """The rollout's state in the registry."""
        rows = self.query("SELECT state FROM rollouts WHERE rollout_id = %s", (rollout_id,))
        return rows[0][0] if rows else None

    def log(self, name: str) -> str:
        """A controller's output."""
        try:
            return (self.tmp / ("%s.log" % name)).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @staticmethod
    def wait(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `cond` until true (returns the seconds it took) or fail with `what`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if cond():
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError("timed out waiting for %s" % what)
