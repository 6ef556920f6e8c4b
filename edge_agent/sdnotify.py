"""sd_notify over the socket systemd passes in ``NOTIFY_SOCKET``, without a systemd library.

systemd (``Type=notify``) waits for ``READY=1`` before it considers the unit started, kills and restarts
the service when ``WATCHDOG=1`` does not arrive within ``WatchdogSec=``, and shows the last ``STATUS=``
line in ``systemctl status``. The protocol is one AF_UNIX datagram per message, ``KEY=value`` lines.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, and socket errors are logged, never
raised: a missing notification must not take the agent down.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping, Optional

logger = logging.getLogger(__name__)

#: Longest STATUS= text sent; systemd shows one line, and a datagram must stay small.
MAX_STATUS_CHARS = 512


def _parse_address(raw: Optional[str]) -> Optional[str]:
    """The socket address from ``NOTIFY_SOCKET``: a filesystem path, or ``@name`` for an abstract socket."""
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd also allows vsock: addresses (for VMs); we do not run there.
    logger.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; notifications disabled", raw)
    return None


def _parse_watchdog_interval(env: Mapping[str, str]) -> Optional[float]:
    """Half of ``WATCHDOG_USEC`` in seconds, or None when no watchdog applies to this process."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("ignoring WATCHDOG_PID %r: not a number", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC %r: not a number", usec)
        return None
    if value <= 0:
        return None
    # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
    return value / 2e6


class Notifier:
    """Sends sd_notify messages; every method is a no-op when there is no notify socket."""

    def __init__(self, address: Optional[str] = None, watchdog_interval_s: Optional[float] = None) -> None:
        self._address = address
        self._sock: Optional[socket.socket] = None
        self.watchdog_interval_s = watchdog_interval_s

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Notifier:
        """A notifier configured from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        env = os.environ if env is None else env
        address = _parse_address(env.get("NOTIFY_SOCKET"))
        interval = _parse_watchdog_interval(env) if address else None
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one raw message (``KEY=value`` lines); True when it was sent."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8", "replace"), self._address)
            return True
        except OSError as e:
            logger.warning("sd_notify to %r failed: %s", self._address.replace("\0", "@"), e)
            self._close_socket()
            return False

    def ready(self, status: Optional[str] = None) -> bool:
        """Tell systemd the service is up (connected or serving)."""
        msg = "READY=1"
        if status:
            msg += "\nSTATUS=" + _one_line(status)
        return self.notify(msg)

    def watchdog(self) -> bool:
        """Keep-alive ping; call at least every `watchdog_interval_s` seconds from the main loop."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self.notify("STATUS=" + _one_line(text))

    def stopping(self) -> bool:
        """Tell systemd the service is shutting down."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        """Release the socket (notifications reopen it when needed)."""
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:MAX_STATUS_CHARS]
