"""The per-packet path of the relay: one asyncio datagram protocol per bound socket.

A packet arriving on one side's socket is checked against that side's peer, unprotected
if that side is SRTP, protected if the other side is, and sent from the other side's
matching socket to the other side's peer. Everything happens inside
``datagram_received``: no task, no future, no log line per packet. The protocol object
of a socket holds both of its legs (``a``: its own side, ``b``: the other side of the
same stream) and the owner it reports to, so a packet costs attribute reads and one
``sendto``, no dict lookup.

The receive handlers (:meth:`RtpSocket.datagram_received`, :meth:`RtcpSocket.
datagram_received`, :func:`relay_rtcp`) are deliberately written inline, one function
per packet with every check in it, and are exempt from the project's cyclomatic
complexity limit: splitting them into helpers would add Python calls per packet to a
path whose whole cost is a few microseconds (``bench/relay.py``). Everything off the
success path
(latching, the failure path of a packet that did not authenticate, tone mixing,
renumbering) is a method of :class:`~proxy.media.relay_leg.RelayLeg` or a function here.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol, cast

from proxy.media.engine import Side
from proxy.media.relay_leg import RelayLeg, SendTo, SockAddr, refuse
from proxy.media.rtcp import clear_compound, valid_compound
from proxy.media.srtp import SrtpError, SrtpProtectReplayError

__all__ = ["Owner", "RelaySocket", "RtcpSocket", "RtpSocket", "relay_rtcp", "take_pair"]

SEND_FAILURES = (OSError, ValueError, RuntimeError)
"""What a transport's ``sendto`` may raise (closed transport, family mismatch, ...)."""


class Owner(Protocol):
    """Whom a socket reports to: the session using its pair, or the pool keeping it."""

    def authenticated(self, side: Side) -> None:
        """A packet from ``side`` authenticated under its ``rx`` key for the first time."""

    def pair_closed(self, leg: RelayLeg) -> None:
        """Both sockets of ``leg`` are closed: its port is free."""


def take_pair(
    leg: RelayLeg, owner: Owner, port: int, rtp: socket.socket, rtcp: socket.socket
) -> None:
    """``leg`` owns a freshly bound RTP/RTCP pair for ``owner``. Until the transports are
    attached, packets are sent through the bare sockets. (The sockets' ``b`` is ``leg``
    itself until the other side's leg exists.)"""
    leg.port = port
    leg.sockets = (RtpSocket(owner, leg, leg, rtp), RtcpSocket(owner, leg, leg, rtcp))
    leg.alive = 2
    leg.rtp_send = rtp.sendto
    leg.rtcp_send = rtcp.sendto


def mix_tone(b: RelayLeg, data: bytes) -> bytes:
    """Mix the tone being played toward ``b`` into ``data`` (RTP) and count it."""
    mixer = b.tone
    if mixer is None:
        return data
    mixed = mixer.mix(data)
    if mixed is None:
        b.tone_skipped += 1
        mixed = data
    elif mixed is not data:
        b.tone_packets += 1
    if mixer.done:
        b.tone = None
    return mixed


def relay_rtcp(a: RelayLeg, b: RelayLeg, session: Owner, data: bytes) -> bool:
    """Relay one RTCP packet from side ``a`` to side ``b``. True if it came from a's peer
    for sure (it passed SRTCP authentication, or ``a`` sends plain): it may latch.

    Only a valid compound packet is relayed (rule C1 of :mod:`proxy.media.rtcp`, checked
    on the plain text: after SRTCP unprotect), and toward a side whose RTP is SRTP while
    its RTCP is in the clear, only its SR/RR/SDES/BYE part (rule C2). Per-packet path
    (RTCP only: a few packets per call and second), inlined on purpose (see the module
    docstring)."""
    size = len(data)
    authentic = a.rx is None
    rx = a.rtcp_rx
    if rx is not None:
        try:
            data = rx.unprotect_rtcp(data)
        except SrtpError as exc:
            result = a.unauthenticated(data, exc, True)
            if result is None:
                return False
            data, authentic = result
        else:
            a.packets_decrypted += 1
            authentic = True
            if a.rx_first:
                session.authenticated(a.side)
    if not valid_compound(data):
        a.refused("rtcp_invalid")
        return False
    a.packets_in += 1
    a.bytes_in += size
    a.rtcp_packets_in += 1
    if b.mux:
        dest, send = b.rtp_dest, b.rtp_send
    else:
        dest, send = b.rtcp_dest, b.rtcp_send
    if dest is None:
        b.no_destination += 1
        return authentic
    tx = b.rtcp_tx
    if tx is not None:
        try:
            data = tx.protect_rtcp(data)
        except SrtpError:
            b.srtp_protect += 1
            return authentic
        b.packets_encrypted += 1
    elif b.tx is not None:  # SRTP, with RTCP in the clear: SR/RR/SDES/BYE only
        data, stripped = clear_compound(data)
        b.rtcp_stripped += stripped
        if not data:
            return authentic
    try:
        send(data, dest)
    except SEND_FAILURES:
        b.send_error += 1
        return authentic
    b.packets_out += 1
    b.bytes_out += len(data)
    b.rtcp_packets_out += 1
    return authentic


class RelaySocket(asyncio.DatagramProtocol):
    """One bound socket of leg ``a`` (``b`` is the other side of the same stream) and,
    once attached, its transport's protocol.

    Lifecycle: bound (``sock`` set) -> handed to the loop (``handed``) -> attached
    (``transport`` set) -> closed. :meth:`gone` runs exactly once per socket, whichever
    path closes it, and gives the port back when the pair's last socket is gone.
    """

    __slots__ = ("a", "b", "handed", "is_open", "session", "sock", "transport")

    def __init__(self, session: Owner, a: RelayLeg, b: RelayLeg, sock: socket.socket) -> None:
        self.session = session
        self.a = a
        self.b = b
        self.sock: socket.socket | None = sock
        self.handed = False
        self.is_open = True
        self.transport: asyncio.DatagramTransport | None = None

    def itself(self) -> RelaySocket:
        """Protocol factory for ``create_datagram_endpoint``: this very object."""
        return self

    async def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wrap the socket in a datagram transport (the loop only offers a coroutine)."""
        self.handed = True
        await loop.create_datagram_endpoint(self.itself, sock=self.sock)

    def usable(self) -> bool:
        """Attached and not closing: the pool may keep it."""
        transport = self.transport
        return transport is not None and not transport.is_closing()

    def set_send(self, send: SendTo) -> None:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.set_send(self.transport.sendto)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.set_send(refuse)
        self.gone()

    def pause_writing(self) -> None:
        self.set_send(refuse)

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.set_send(self.transport.sendto)

    def error_received(self, exc: Exception) -> None:
        # The stdlib loop reports a failed sendto here instead of raising.
        self.a.send_error += 1

    def close(self) -> None:
        """Close whatever this socket is now; an in-flight attach finishes the job."""
        if self.transport is not None:
            self.transport.close()  # -> connection_lost -> gone()
        elif not self.handed and self.sock is not None:
            self.sock.close()
            self.gone()

    def gone(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self.sock = None
        self.set_send(refuse)
        leg = self.a
        leg.alive -= 1
        if leg.alive == 0:
            self.session.pair_closed(leg)


class RtpSocket(RelaySocket):
    __slots__ = ()

    def set_send(self, send: SendTo) -> None:
        self.a.rtp_send = send

    def datagram_received(self, data: bytes, addr: SockAddr) -> None:
        # The per-packet hot path, inlined on purpose (see the module docstring): exempt
        # from the cyclomatic complexity limit.
        a = self.a
        latch = addr != a.rtp_peer
        if latch and (
            (a.rtp_peer is not None and (addr[0], addr[1]) != a.sdp_rtp)
            or (addr[0] != a.expected_ip and not a.latch_any)
            or (a.stale and a.stale_source(addr))
        ):
            a.dropped_wrong_source(addr, "RTP")
            return
        if a.mux and len(data) > 1 and 199 < data[1] < 205:  # RTCP PT 200..204 (RFC 5761)
            if relay_rtcp(a, self.b, self.session, data) and latch:
                a.latch_rtp(addr)
            return
        size = len(data)
        rx = a.rx
        if rx is not None:
            try:
                data = rx.unprotect(data)
            except SrtpError as exc:
                result = a.unauthenticated(data, exc, False)
                if result is None:
                    return
                data, authentic = result
                latch = latch and authentic
            else:
                a.packets_decrypted += 1
                if a.rx_first:
                    self.session.authenticated(a.side)
        else:
            a.plain_last = data  # the reference of a plain window (proxy.media.grace)
        if latch:
            a.latch_rtp(addr)
        a.packets_in += 1
        a.bytes_in += size
        b = self.b
        dest = b.rtp_dest
        if dest is None:
            b.no_destination += 1
            return
        if b.tone is not None:
            data = mix_tone(b, data)
        tx = b.tx
        if tx is not None:
            if len(data) >= 12:
                data = b.number_on(data)
            try:
                data = tx.protect(data)
            except SrtpProtectReplayError:  # an index sent before: see RelayLeg.renumber
                if len(data) < 12:
                    b.srtp_protect += 1
                    return
                try:
                    data = tx.protect(b.renumber(data))
                except SrtpError:
                    b.srtp_protect += 1
                    return
            except SrtpError:
                b.srtp_protect += 1
                return
            b.packets_encrypted += 1
        try:
            b.rtp_send(data, dest)
        except SEND_FAILURES:
            b.send_error += 1
            return
        b.packets_out += 1
        b.bytes_out += len(data)


class RtcpSocket(RelaySocket):
    __slots__ = ()

    def set_send(self, send: SendTo) -> None:
        self.a.rtcp_send = send

    def datagram_received(self, data: bytes, addr: SockAddr) -> None:
        a = self.a
        latch = addr != a.rtcp_peer
        if latch and (
            (a.rtcp_peer is not None and (addr[0], addr[1]) != a.sdp_rtcp)
            or (addr[0] != a.expected_ip and not a.latch_any)
            or (a.stale and a.stale_source(addr))
        ):
            a.dropped_wrong_source(addr, "RTCP")
            return
        if relay_rtcp(a, self.b, self.session, data) and latch:
            a.latch_rtcp(addr)
