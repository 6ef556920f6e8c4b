"""A real mosquitto on a free loopback port, for tests and benchmarks.

`Broker()` writes a config from ``tests/mosquitto-test.conf`` plus a listener on a free port, starts
mosquitto and waits until it accepts connections. ``stop()`` / ``start()`` restart it on the same port
(a broker outage), ``kill()`` ends it with SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

CONF_TEMPLATE = Path(__file__).with_name("mosquitto-test.conf")


class MosquittoMissing(RuntimeError):
    """No mosquitto binary on this machine."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (/usr/sbin/mosquitto or on PATH)."""
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which("mosquitto")
    if not found:
        raise MosquittoMissing("mosquitto is not installed (apt install mosquitto); set EDGE_AGENT_SKIP_MQTT=1 to skip")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One mosquitto process on 127.0.0.1:<free port>."""

    def __init__(self, workdir: Optional[Path] = None, *, port: Optional[int] = None, extra_conf: str = "") -> None:
        self.binary = find_mosquitto()
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mosq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        if os.geteuid() == 0:
            # mosquitto started as root drops to the `mosquitto` user: let it write its log here, so a
            # failing test can show what the broker said.
            self.log_path.touch()
            os.chmod(str(self.log_path), 0o666)
            os.chmod(str(self.workdir), 0o755)
        self.conf_path.write_text(
            CONF_TEMPLATE.read_text(encoding="utf-8")
            + "\nlistener %d 127.0.0.1\nlog_dest file %s\n%s\n" % (self.port, self.log_path, extra_conf),
            encoding="utf-8",
        )
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart on the same port) and wait until it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return
                except OSError:
                    time.sleep(0.02)
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read() or b""
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError("mosquitto did not start on port %d: %s" % (self.port, err.decode(errors="replace")))
            # The port can still be in TIME_WAIT right after a stop: retry until the deadline.
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM), waits for the process to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL, no goodbye to the clients."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The broker's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop and remove the working directory if this object created it."""
        self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
