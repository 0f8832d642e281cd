"""Released RTP/RTCP socket pairs kept open for the next call, and binding new pairs.

Creating, binding, attaching and closing four sockets is most of what a call's media
costs to set up, so a released pair whose transports are attached is kept open in a
bounded FIFO pool (``pool_pairs`` per side) and handed out again by a later
:meth:`RelayEngine.allocate <proxy.media.relay.RelayEngine.allocate>`, the pair
released longest ago first. The pair gets a new :class:`RelayLeg`, built exactly as for
a fresh pair (the released session keeps the old one, with its counters), so no peer,
latch, key, tone or counter carries over. In the pool a pair relays nothing (no
expected IP: every packet is ``wrong_source``); once reused, a packet from where the
previous call's peer was (its latched and SDP addresses) cannot latch for
``quarantine_s`` after the release, even from the new peer's IP, unless the new SDP
names that very address. Pooled ports stay out of the allocator until the engine closes
(which pools nothing), or until the allocator runs dry and pairs pooled for the other
side's address are closed to make room.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections import deque

from proxy.media.engine import Side
from proxy.media.ports import PortAllocator
from proxy.media.relay_leg import Clock, RelayLeg
from proxy.media.relay_packets import Owner

__all__ = ["PairPool", "bind_pair", "media_addresses"]

_BIND_TAKEN = frozenset({errno.EADDRINUSE, errno.EACCES})
"""Bind errors that mean "this port is not ours to take": try another one."""


class PairPool:
    """Released pairs kept open with their transports attached, for the next allocate: a
    FIFO per local address (one for both sides when they share it), at most ``pairs``
    per side. Owns the sockets of the pairs in it: each pair has a fresh leg that expects
    no IP, so every packet is dropped (``wrong_source``) and nothing is relayed."""

    __slots__ = (
        "_clock",
        "_drained",
        "_ports",
        "_quarantine_s",
        "closing",
        "free",
        "limits",
        "open",
    )

    def __init__(
        self, ports: PortAllocator, clock: Clock, quarantine_s: float, pairs: int, ips: list[str]
    ) -> None:
        self._ports = ports
        """Where a closed pair's port goes back."""
        self._clock = clock
        self._quarantine_s = quarantine_s
        self.free: dict[str, deque[RelayLeg]] = {}
        self.limits: dict[str, int] = {}
        for ip in ips:
            self.free.setdefault(ip, deque())
            self.limits[ip] = self.limits.get(ip, 0) + pairs
        self.open = True
        """False while the engine releases every session to close: pool nothing."""
        self.closing = 0
        """Pairs closed out of the pool whose sockets are not all gone yet."""
        self._drained = asyncio.Event()
        self._drained.set()

    def __len__(self) -> int:
        return sum(len(free) for free in self.free.values())

    def keep(self, leg: RelayLeg) -> bool:
        """Pool the pair of ``leg`` (its session is releasing it) if there is room and both
        its transports are attached and open; False: the caller closes it."""
        free = self.free[leg.ip]
        if not self.open or leg.alive != 2 or len(free) >= self.limits[leg.ip]:
            return False
        for sock in leg.sockets:
            transport = sock.transport
            if transport is None or transport.is_closing():
                return False
        pooled = RelayLeg(leg.side, leg.index, leg.ip, leg.family, leg.clock)
        pooled.adopt(leg)
        peers = (leg.rtp_peer, leg.rtcp_peer, leg.sdp_rtp, leg.sdp_rtcp)
        pooled.stale = tuple(dict.fromkeys((a[0], a[1]) for a in peers if a is not None))
        if pooled.stale:
            pooled.stale_until = self._clock() + self._quarantine_s
        for sock in pooled.sockets:
            sock.session = self
            sock.b = pooled
        free.append(pooled)
        return True

    def take(self, session: Owner, side: Side, index: int, ip: str) -> RelayLeg | None:
        """A new leg for ``session`` on the pair pooled longest ago, None if none is."""
        free = self.free[ip]
        while free:
            pooled = free.popleft()
            if pooled.alive == 2 and all(
                sock.transport is not None and not sock.transport.is_closing()
                for sock in pooled.sockets
            ):
                leg = RelayLeg(side, index, ip, pooled.family, pooled.clock)
                leg.adopt(pooled)
                for sock in leg.sockets:
                    sock.session = session
                    sock.b = leg  # until the other side's leg is there
                return leg
            self._close(pooled)  # a socket of it failed while pooled
        return None

    def drain(self) -> None:
        """Close every pooled pair (the ports are free on the next loop iterations)."""
        for free in self.free.values():
            while free:
                self._close(free.popleft())

    def _close(self, leg: RelayLeg) -> None:
        if self.closing == 0:
            self._drained.clear()
        self.closing += 1
        for sock in leg.sockets:
            sock.close()

    async def wait(self) -> None:
        """Until every pair closed out of the pool is gone and its port free."""
        while self.closing:
            await self._drained.wait()

    def authenticated(self, side: Side) -> None:
        """Never called: a pooled leg has no key."""

    def pair_closed(self, leg: RelayLeg) -> None:
        self._ports.release(leg.port)
        free = self.free[leg.ip]
        if leg in free:  # both sockets failed while pooled
            free.remove(leg)
            return
        self.closing -= 1
        if self.closing == 0:
            self._drained.set()


def bind_pair(
    ports: PortAllocator, ip: str, family: socket.AddressFamily
) -> tuple[int, socket.socket, socket.socket]:
    """Bind RTP and RTCP sockets on the next free pair of ``ports``, skipping pairs that
    another process holds. Those go back to the allocator afterwards, at the back of the
    queue. Raises :class:`PortsExhausted` (or the OSError of a failed bind)."""
    taken: list[int] = []
    try:
        while True:
            port = ports.allocate()
            sockets: list[socket.socket] = []
            try:
                for p in (port, port + 1):
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    sockets.append(sock)
                    sock.setblocking(False)
                    sock.bind((ip, p))
            except OSError as exc:
                for sock in sockets:
                    sock.close()
                if exc.errno not in _BIND_TAKEN:
                    ports.release(port)
                    raise
                taken.append(port)
                continue
            return port, sockets[0], sockets[1]
    finally:
        for port in taken:
            ports.release(port)


def media_addresses(
    inside_ip: str, outside_ip: str
) -> dict[Side, tuple[str, socket.AddressFamily]]:
    """Each side's media address (normalised) and its address family, checked: a wildcard
    address is refused, since it would be written into SDP. Raises ``ValueError``."""
    addresses: dict[Side, tuple[str, socket.AddressFamily]] = {}
    for side, ip in ((Side.INSIDE, inside_ip), (Side.OUTSIDE, outside_ip)):
        address = ipaddress.ip_address(ip)
        if address.is_unspecified:
            raise ValueError(f"{side} media address must be a real address, not {ip}")
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        addresses[side] = (str(address), family)
    return addresses
