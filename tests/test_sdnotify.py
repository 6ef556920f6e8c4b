"""sd_notify: messages reach a real AF_UNIX datagram socket; no socket means no-op; errors never raise."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from edge_agent.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    """A datagram socket bound at a filesystem path, like systemd's notify socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_ready_watchdog_status_stopping_reach_path_socket(listener):
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert _recv(sock) == "READY=1"
    assert n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
    assert n.status("serving bundle digits v3")
    assert _recv(sock) == "STATUS=serving bundle digits v3"
    assert n.stopping()
    assert _recv(sock) == "STOPPING=1"
    n.close()


def test_ready_with_status_sends_both_in_one_datagram(listener):
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.ready("connected to broker")
    assert _recv(sock) == "READY=1\nSTATUS=connected to broker"


def test_status_newlines_are_flattened_so_they_cannot_inject_keys(listener):
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.status("bad\nREADY=1")
    msg = _recv(sock)
    assert msg == "STATUS=bad READY=1"
    assert "\n" not in msg


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="abstract sockets are Linux-only")
def test_abstract_socket_address_with_at_sign():
    name = "edge-agent-test-%s" % uuid.uuid4().hex
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _recv(sock) == "READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_noop():
    n = Notifier.from_env({"WATCHDOG_USEC": "10000000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("x") is False
    assert n.stopping() is False


def test_missing_socket_file_logs_and_does_not_raise(tmp_path, caplog):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert "sd_notify" in caplog.text


def test_notifications_resume_when_the_socket_appears_later(tmp_path):
    path = str(tmp_path / "late")
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.watchdog() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        assert n.watchdog() is True
        assert _recv(sock) == "WATCHDOG=1"
    finally:
        sock.close()


def test_unsupported_address_disables_notifications(caplog):
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False
    assert "neither a path" in caplog.text


def test_watchdog_interval_is_half_of_watchdog_usec(listener):
    path, _ = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval_s == pytest.approx(15.0)


def test_watchdog_for_our_pid_applies(listener):
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval_s == pytest.approx(2.0)


def test_watchdog_for_another_pid_is_ignored(listener):
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(env).watchdog_interval_s is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_bad_or_zero_watchdog_usec_means_no_watchdog(listener, usec):
    path, _ = listener
    assert Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec}).watchdog_interval_s is None


def test_from_env_reads_process_environment(listener, monkeypatch):
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier.from_env()
    assert n.watchdog_interval_s == pytest.approx(1.0)
    n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
