"""Free ports on 127.0.0.1 for tests and benches.

Every port is bind-tested on loopback, none is one of the proxy's defaults
(``proxy.demo.loopback.DEFAULT_PORTS``: 5060/5070/5080/5090/5099), and none is handed out
twice in one process: two harnesses of one test session that each ask for a port before
binding it cannot get the same one. Blocks (media ranges, a phone's RTP pair) are taken
below the Linux ephemeral range, so no outgoing socket takes one of their ports between
the check and the bind; a port that must stay ours until a process uses it is held
bound (:func:`reserve_udp`).
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from dataclasses import dataclass

from proxy.demo.loopback import LOOPBACK, free_port_block, port_free
from proxy.demo.loopback import free_port as _kernel_free_port

__all__ = [
    "HOST",
    "PortBlock",
    "free_port",
    "free_port_range",
    "media_range",
    "port_free",
    "reserve_udp",
    "udp_bound",
    "wait_bound",
]

HOST = LOOPBACK

_handed_out: set[int] = set()
"""Ports given out in this process: never given twice."""


def free_port() -> int:
    """A port free for both UDP and TCP (a SIP listener takes both)."""
    port = _kernel_free_port(avoid=_handed_out)
    _handed_out.add(port)
    return port


def free_port_range(count: int, *, tcp: bool = False) -> tuple[int, int]:
    """``count`` consecutive ports from an even base, free for UDP (and TCP if ``tcp``):
    (first, last), inclusive, as ``[media] port_min`` / ``port_max`` take them."""
    base = free_port_block(count, tcp=tcp, avoid=_handed_out)
    _handed_out.update(range(base, base + count))
    return base, base + count - 1


def media_range(pairs: int) -> tuple[int, int]:
    """A media port range for ``pairs`` RTP/RTCP pairs."""
    return free_port_range(2 * pairs)


def reserve_udp(count: int = 1) -> socket.socket:
    """A UDP socket bound to the first of ``count`` free ports (the rest stay handed out
    to the caller), held so that no other process can take the port meanwhile."""
    for _ in range(20):
        first, _last = free_port_range(count, tcp=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((HOST, first))
        except OSError:
            sock.close()
            continue
        return sock
    raise RuntimeError("cannot reserve a UDP port")


def udp_bound(port: int) -> bool:
    """Does some socket hold ``port`` for UDP on loopback?"""
    return not port_free(port, tcp=False)


def wait_bound(
    port: int, transport: str = "udp", timeout: float = 5.0,
    process: subprocess.Popen[bytes] | None = None,
) -> bool:  # fmt: skip
    """Wait until some process holds ``port`` (our bind fails with EADDRINUSE); False
    after ``timeout`` or once ``process`` has exited."""
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
        time.sleep(0.02)
    return False


@dataclass
class PortBlock:
    """Consecutive ports, free for UDP and TCP, handed out in order (a test that lays out
    several phones' SIP and RTP ports side by side)."""

    next: int
    end: int

    @classmethod
    def take_block(cls, size: int = 64) -> PortBlock:
        first, last = free_port_range(size, tcp=True)
        return cls(first, last + 1)

    def take(self, count: int = 1) -> int:
        """``count`` consecutive ports starting at an even one; returns the first."""
        self.next += self.next & 1
        first = self.next
        self.next += count
        if self.next > self.end:
            raise RuntimeError("port block exhausted")
        return first
