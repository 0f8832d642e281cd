"""The systemd notify protocol against a datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from proxy.sdnotify import Notifier


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    return sock


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_stopping_watchdog_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with _listener(path) as systemd:
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert notifier.enabled and notifier.watchdog_interval() == 2.0
        assert notifier.ready("listening")
        assert _fields(systemd.recv(4096)) == {
            "READY": "1",
            "STATUS": "listening",
            "MAINPID": str(os.getpid()),
        }
        assert notifier.watchdog()
        assert systemd.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping("draining 3 calls")
        assert _fields(systemd.recv(4096)) == {"STOPPING": "1", "STATUS": "draining 3 calls"}
        notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"sipura-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + name)
        systemd.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert systemd.recv(4096).startswith(b"READY=1\n")
        notifier.close()


def test_not_under_systemd_or_socket_gone(tmp_path: Path) -> None:
    off = Notifier({})
    assert not off.enabled and not off.ready("x") and off.watchdog_interval() is None
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert gone.enabled and not gone.ready("x")  # logged, never raised
    other_pid = Notifier(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert other_pid.watchdog_interval() is None  # the watchdog is meant for another process
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "junk"}).watchdog_interval() is None
