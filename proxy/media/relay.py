"""The in-process media engine: an RTP/RTCP relay on asyncio datagram endpoints.

Each side of each stream owns an RTP and an RTCP socket on the proxy. A packet arriving
on one side's socket is checked against that side's peer, unprotected if that side is
SRTP, protected if the other side is, and sent from the other side's matching socket to
the other side's peer. Everything happens inside ``datagram_received``: no task, no
future, no log line per packet; state lives in slotted :class:`_Leg` objects whose plain
int counters the hot path bumps directly. The protocol object of a socket holds both of
its legs, so a packet costs attribute reads and one ``sendto``, no dict lookup. With
uvloop the relay costs little more than a bare forward loop (see ``bench/relay.py``).

Symmetric RTP (RFC 4961) with latching: until a packet arrives from a side, the relay
sends to the address that side's SDP gave; the first packet from the SDP's IP address,
from any port (NAT rewrites ports, not the LAN address of a phone or the public
address of a PBX), latches that exact ip:port as the peer, and from then on packets from
anywhere else are dropped as ``wrong_source``: nobody else can inject media into the
call. On an SRTP side a packet latches only once it has authenticated, so a forged
first packet cannot steal the stream either. A new address from SDP re-arms latching.

SRTP (profile §3) is per side, for all of its streams, in four fields per leg: ``tx``
(the key packets toward the side are protected with), ``rx`` (the key packets from it
are tried with first), ``rx_alt`` (the previous key after a re-key, until
``alt_until``) and ``plain_until`` (until when a packet that does not authenticate is
still relayed as plain RTP: forever while only accepting, then the grace window after
the switch-over from clear). A plain side costs one attribute check per direction; an
SRTP packet one protect/unprotect call in a ``try``. Everything else (previous key,
grace window, the clock read that decides it, the counters that explain a drop) is on
the failure path, which a call in steady state never takes. RTCP follows the same rules
when SRTCP is switched on and stays in the clear otherwise.

A tone (:mod:`proxy.media.tones`) being played toward a side is one more attribute
check per packet to that side, and a table mix of the payload while the tone sounds.

Allocation is synchronous, so the sans-IO B2BUA core can call it while handling an
INVITE: the sockets are bound (and the ports known) at once, and a per-session task
wraps them in datagram transports on the next loop iterations; a packet that arrives
meanwhile waits in the socket's kernel buffer. Ports return to the allocator only when
both sockets of a pair are really closed (the transports' ``connection_lost``, on the
loop iteration after :meth:`RelaySession.release`), so a port is never handed out while
an old socket still holds it.

Creating, binding, attaching and closing four sockets is most of what a call's media
costs to set up, so a released pair whose transports are attached is kept open in a
bounded FIFO pool (``pool_pairs`` per side) and handed out again by a later
:meth:`RelayEngine.allocate`, the pair released longest ago first. The pair gets a new
:class:`_Leg`, built exactly as for a fresh pair (the released session keeps the old
one, with its counters), so no peer, latch, key, tone or counter carries over. In the
pool a pair relays nothing (no expected IP: every packet is ``wrong_source``); once
reused, a packet from where the previous call's peer was (its latched and SDP
addresses) cannot latch for ``quarantine_s`` after the release, even from the new
peer's IP, unless the new SDP names that very address. Pooled ports stay out of the
allocator until :meth:`RelayEngine.close_now` / :meth:`RelayEngine.close` (which pool
nothing) close them, or until the allocator runs dry and pairs pooled for the other
side's address are closed to make room.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import operator
import socket
import time
from collections import deque
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any, Protocol, cast

from proxy.media.engine import DROP_REASONS, MediaEngine, Side, SrtpCallback, StreamStats
from proxy.media.ports import PortAllocator, PortsExhausted
from proxy.media.srtp import SrtpContext, SrtpError, SrtpReplayError
from proxy.media.tones import Tone, ToneMixer

__all__ = ["COUNTERS", "PortsExhausted", "RelayEngine", "RelaySession", "bind_pair", "stats_from"]

log = logging.getLogger("sipura.media")

Address = tuple[Any, ...]
"""A socket address as the loop reports it: (host, port) or (host, port, flow, scope)."""

SendTo = Callable[[bytes, Address], object]
"""A transport's or a bare socket's ``sendto``."""

Clock = Callable[[], float]
"""Seconds on a monotonic scale; read only on a switch-over and when a packet fails to
authenticate."""

_SEND_FAILURES = (OSError, ValueError, RuntimeError)
"""What a transport's ``sendto`` may raise (closed transport, family mismatch, ...)."""

_BIND_TAKEN = frozenset({errno.EADDRINUSE, errno.EACCES})
"""Bind errors that mean "this port is not ours to take": try another one."""

_REORDER_WINDOW = 100
"""A sequence number at most this far behind the last one protected is a late packet of
the same stream (libsrtp's replay window is 128); further behind: a new stream."""
_MAX_SEQ_JUMP = 1000
"""A jump ahead larger than this (20 s of 20 ms packets lost in a row) is a new stream."""


class _Owner(Protocol):
    """Whom a socket reports to: the session using its pair, or the pool keeping it."""

    def _authenticated(self, side: Side) -> None: ...

    def _pair_closed(self, leg: _Leg) -> None: ...


def _refuse(data: bytes, addr: Address) -> None:
    """Stand-in ``sendto`` while a transport's buffer is over its high-water mark, so a
    stalled socket drops (and counts) packets instead of queueing them without bound."""
    raise BlockingIOError(errno.EAGAIN, "send buffer full")


class _Leg:
    """One side of one stream: its sockets, its peer and its counters."""

    __slots__ = (
        "alive",
        "alt_until",
        "bytes_in",
        "bytes_out",
        "clock",
        "expected_ip",
        "family",
        "hold",
        "index",
        "ip",
        "mux",
        "no_destination",
        "packets_decrypted",
        "packets_encrypted",
        "packets_in",
        "packets_out",
        "plain_accepted",
        "plain_after_grace",
        "plain_until",
        "port",
        "rtcp_dest",
        "rtcp_packets_in",
        "rtcp_packets_out",
        "rtcp_peer",
        "rtcp_rx",
        "rtcp_send",
        "rtcp_tx",
        "rtp_dest",
        "rtp_peer",
        "rtp_send",
        "rx",
        "rx_alt",
        "rx_first",
        "sdp_rtcp",
        "sdp_rtp",
        "send_error",
        "seq_last",
        "seq_offset",
        "seq_source",
        "side",
        "sockets",
        "srtp_auth",
        "srtp_protect",
        "srtp_replay",
        "stale",
        "stale_until",
        "tone",
        "tone_packets",
        "tone_skipped",
        "tx",
        "tx_ssrc",
        "wrong_source",
    )

    def __init__(
        self, side: Side, index: int, ip: str, family: socket.AddressFamily, clock: Clock
    ) -> None:
        self.side = side
        self.index = index
        self.ip = ip
        self.family = family
        self.port = 0
        self.sockets: tuple[_Socket, ...] = ()
        """The RTP and the RTCP socket, once bound."""
        self.alive = 0
        """Sockets of the pair still open: the port goes back to the pool at 0."""
        self.rtp_send: SendTo = _refuse
        self.rtcp_send: SendTo = _refuse
        self.stale: tuple[tuple[Any, Any], ...] = ()
        """(ip, port) where the previous call on this pair had its peer: no source to
        latch before ``stale_until`` (a reused pair)."""
        self.stale_until = -math.inf
        self.expected_ip: str | None = None
        """The SDP's IP: the only source allowed to latch. None: accept nothing yet."""
        self.rtp_peer: Address | None = None
        """Latched RTP source; None until latched."""
        self.rtcp_peer: Address | None = None
        self.rtp_dest: Address | None = None
        """Where packets toward this side go; None: nowhere (hold, unknown)."""
        self.rtcp_dest: Address | None = None
        self.sdp_rtp: Address | None = None
        self.sdp_rtcp: Address | None = None
        self.hold = False
        self.mux = False
        self.clock = clock
        self.tx: SrtpContext | None = None
        self.tx_ssrc: bytes | None = None
        """SSRC written into RTP sent toward this side while it is SRTP (x-sipura
        announces the SSRC it encrypts with; the phone's own may change mid-call)."""
        self.seq_source = b""
        """The SSRC of the stream whose packets are numbered on with ``seq_offset``."""
        self.seq_offset = 0
        """Added to the sequence number of RTP protected toward this side (mod 2^16)."""
        self.seq_last = -1
        """Highest sequence number protected toward this side; -1: none yet."""
        """Protects RTP sent toward this side; None: plain."""
        self.rtcp_tx: SrtpContext | None = None
        """Protects RTCP sent toward this side (SRTCP on); None: plain."""
        self.rx: SrtpContext | None = None
        """Tried first on RTP from this side; None: the side sends plain, take it as is."""
        self.rtcp_rx: SrtpContext | None = None
        self.rx_alt: SrtpContext | None = None
        """The previous key, tried second until ``alt_until`` (a re-key)."""
        self.alt_until = -math.inf
        self.plain_until = -math.inf
        """Until then a packet that authenticates under no key is relayed as plain."""
        self.rx_first = False
        """No packet has authenticated under ``rx`` yet (the session is told once)."""
        self.tone: ToneMixer | None = None
        self.packets_in = 0
        self.bytes_in = 0
        self.packets_out = 0
        self.bytes_out = 0
        self.rtcp_packets_in = 0
        self.rtcp_packets_out = 0
        self.wrong_source = 0
        self.no_destination = 0
        self.srtp_auth = 0
        self.srtp_replay = 0
        self.srtp_protect = 0
        self.send_error = 0
        self.packets_encrypted = 0
        self.packets_decrypted = 0
        self.plain_accepted = 0
        self.plain_after_grace = 0
        self.tone_packets = 0
        self.tone_skipped = 0

    def adopt(self, old: _Leg) -> None:
        """Take over ``old``'s bound pair (sockets, port, transports, stale sources).
        ``old`` keeps its call state and counters, and no longer sends or receives."""
        self.port = old.port
        self.sockets = old.sockets
        self.alive = old.alive
        self.rtp_send = old.rtp_send
        self.rtcp_send = old.rtcp_send
        self.stale = old.stale
        self.stale_until = old.stale_until
        old.sockets = ()
        old.alive = 0
        old.rtp_send = old.rtcp_send = _refuse
        for sock in self.sockets:
            sock.a = self

    def take_pair(
        self, session: RelaySession, port: int, rtp: socket.socket, rtcp: socket.socket
    ) -> None:
        """Own a freshly bound RTP/RTCP pair for ``session``. Until the transports are
        attached, packets are sent through the bare sockets."""
        self.port = port
        self.sockets = (
            _RtpSocket(session, self, self, rtp),
            _RtcpSocket(session, self, self, rtcp),
        )
        self.alive = 2
        self.rtp_send = rtp.sendto
        self.rtcp_send = rtcp.sendto

    def stale_source(self, addr: Address) -> bool:
        """``addr`` is where the previous call on this pair had its peer, and that call
        ended too recently: its late packets must not latch into this one."""
        if (addr[0], addr[1]) not in self.stale:
            return False
        if self.clock() < self.stale_until:
            return True
        self.stale = ()
        return False

    def latch_rtp(self, addr: Address) -> None:
        self.rtp_peer = addr
        if not self.hold:
            self.rtp_dest = addr

    def latch_rtcp(self, addr: Address) -> None:
        self.rtcp_peer = addr
        if not self.hold and self.sdp_rtcp is not None:
            self.rtcp_dest = addr

    def number_on(self, data: bytes) -> bytes:
        """RTP about to be protected toward this side: the announced SSRC, and sequence
        numbers that carry on across the phone's streams.

        One SRTP stream (one SSRC, one libsrtp index) toward the peer is fed by whatever
        the phone sends, and a phone starts a new RTP stream when it likes (on resume
        after hold, after a re-INVITE), with a new SSRC and a random sequence number
        (RFC 3550). Passed on unchanged, a number behind the last one protected is
        refused by libsrtp (index too old), and by the peer's replay window, until the
        phone's numbers catch up, possibly minutes later: the call would go silent one
        way. So a new stream from the phone (another SSRC, or a jump outside what loss or
        reordering explains) continues at the last number + 1; within a stream the
        numbers keep their gaps and their order."""
        seq = (data[2] << 8) | data[3]
        source = data[8:12]
        last = self.seq_last
        if last < 0:
            self.seq_source = source
        else:
            delta = ((seq + self.seq_offset - last + 0x8000) & 0xFFFF) - 0x8000
            if source != self.seq_source or not -_REORDER_WINDOW <= delta <= _MAX_SEQ_JUMP:
                self.seq_offset = (last + 1 - seq) & 0xFFFF
                self.seq_source = source
        out = (seq + self.seq_offset) & 0xFFFF
        if last < 0 or 0 < ((out - last) & 0xFFFF) < 0x8000:
            self.seq_last = out
        ssrc = self.tx_ssrc or source
        if out == seq and ssrc == source:
            return data
        return data[:2] + out.to_bytes(2, "big") + data[4:8] + ssrc + data[12:]

    def stats(self) -> StreamStats:
        return StreamStats(
            packets_in=self.packets_in,
            bytes_in=self.bytes_in,
            packets_out=self.packets_out,
            bytes_out=self.bytes_out,
            rtcp_packets_in=self.rtcp_packets_in,
            rtcp_packets_out=self.rtcp_packets_out,
            packets_encrypted=self.packets_encrypted,
            packets_decrypted=self.packets_decrypted,
            plain_accepted=self.plain_accepted,
            plain_after_grace=self.plain_after_grace,
            tone_packets=self.tone_packets,
            tone_skipped=self.tone_skipped,
            drops={reason: getattr(self, reason) for reason in DROP_REASONS},
        )

    def unauthenticated(
        self, data: bytes, error: SrtpError, rtcp: bool
    ) -> tuple[bytes, bool] | None:
        """The failure path of a packet from this side that did not unprotect under
        ``rx`` (``error``): (packet to relay, authenticated?) or None to drop it.

        Tries the previous key while it is valid, then takes the packet as plain while
        that is allowed. A replayed packet is dropped even then: it is a duplicate of
        SRTP already relayed, and its ciphertext must not reach the phone as audio."""
        replay = isinstance(error, SrtpReplayError)
        now = self.clock()
        alt = self.rx_alt
        if alt is not None:
            if now < self.alt_until:
                try:
                    data = alt.unprotect_rtcp(data) if rtcp else alt.unprotect(data)
                except SrtpReplayError:
                    replay = True
                except SrtpError:
                    pass
                else:
                    self.packets_decrypted += 1
                    return data, True
            else:
                self.rx_alt = None  # the previous key's time is over
        if replay:
            self.srtp_replay += 1
            return None
        if now < self.plain_until:
            self.plain_accepted += 1
            return data, False
        self.srtp_auth += 1
        if _plain_rtcp(data) if rtcp else _plain_rtp(data):
            self.plain_after_grace += 1
        return None


COUNTERS: tuple[str, ...] = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "rtcp_packets_in",
    "rtcp_packets_out",
    "packets_encrypted",
    "packets_decrypted",
    "plain_accepted",
    "plain_after_grace",
    "tone_packets",
    "tone_skipped",
    *DROP_REASONS,
)
"""A leg's counters as a flat tuple: :meth:`RelaySession.counters` per leg, in this order."""

_PLAIN = len(COUNTERS) - len(DROP_REASONS)
_counters_of = operator.attrgetter(*COUNTERS)
"""A leg's counters as a tuple, in one C call (a worker reports them every 100 ms)."""


def stats_from(counters: tuple[int, ...], streams: int) -> dict[Side, list[StreamStats]]:
    """:meth:`RelaySession.stats` rebuilt from :meth:`RelaySession.counters` (a worker's
    report): ``streams`` inside legs, then as many outside legs."""
    width = len(COUNTERS)
    result: dict[Side, list[StreamStats]] = {}
    pos = 0
    for side in (Side.INSIDE, Side.OUTSIDE):
        legs: list[StreamStats] = []
        for _ in range(streams):
            row = counters[pos : pos + width]
            pos += width
            if len(row) < width:
                row = (0,) * width
            stats = dict(zip(COUNTERS[:_PLAIN], row[:_PLAIN], strict=True))
            stats["drops"] = dict(zip(DROP_REASONS, row[_PLAIN:], strict=True))  # type: ignore[assignment]
            legs.append(cast(StreamStats, stats))
        result[side] = legs
    return result


def _plain_rtp(data: bytes) -> bool:
    """Shaped like RTP: version 2 and a header (CSRCs, extension) that fits."""
    size = len(data)
    if size < 12 or data[0] >> 6 != 2:
        return False
    end = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10:
        if size < end + 4:
            return False
        end += 4 + 4 * int.from_bytes(data[end + 2 : end + 4], "big")
    return end <= size


def _plain_rtcp(data: bytes) -> bool:
    """A compound RTCP packet whose length fields add up to exactly ``len(data)``: SRTCP
    has 14 bytes more (E flag and index, authentication tag)."""
    size, pos = len(data), 0
    while pos + 4 <= size:
        if data[pos] >> 6 != 2 or not 192 <= data[pos + 1] <= 223:
            return False
        pos += 4 + 4 * int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos == size > 0


def _mix_tone(b: _Leg, data: bytes) -> bytes:
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


def _relay_rtcp(a: _Leg, b: _Leg, session: _Owner, data: bytes) -> bool:
    """Relay one RTCP packet from side ``a`` to side ``b``. True if it came from a's peer
    for sure (it passed SRTCP authentication, or ``a`` sends plain): it may latch."""
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
                session._authenticated(a.side)
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
    try:
        send(data, dest)
    except _SEND_FAILURES:
        b.send_error += 1
        return authentic
    b.packets_out += 1
    b.bytes_out += len(data)
    b.rtcp_packets_out += 1
    return authentic


class _Socket(asyncio.DatagramProtocol):
    """One bound socket of leg ``a`` (``b`` is the other side of the same stream) and,
    once attached, its transport's protocol.

    Lifecycle: bound (``sock`` set) -> handed to the loop (``handed``) -> attached
    (``transport`` set) -> closed. :meth:`gone` runs exactly once per socket, whichever
    path closes it, and gives the port back when the pair's last socket is gone.
    """

    __slots__ = ("a", "b", "handed", "is_open", "session", "sock", "transport")

    def __init__(self, session: _Owner, a: _Leg, b: _Leg, sock: socket.socket) -> None:
        self.session = session
        self.a = a
        self.b = b
        self.sock: socket.socket | None = sock
        self.handed = False
        self.is_open = True
        self.transport: asyncio.DatagramTransport | None = None

    def itself(self) -> _Socket:
        """Protocol factory for ``create_datagram_endpoint``: this very object."""
        return self

    def set_send(self, send: SendTo) -> None:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.set_send(self.transport.sendto)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.set_send(_refuse)
        self.gone()

    def pause_writing(self) -> None:
        self.set_send(_refuse)

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
        self.set_send(_refuse)
        leg = self.a
        leg.alive -= 1
        if leg.alive == 0:
            self.session._pair_closed(leg)


class _RtpSocket(_Socket):
    __slots__ = ()

    def set_send(self, send: SendTo) -> None:
        self.a.rtp_send = send

    def datagram_received(self, data: bytes, addr: Address) -> None:
        a = self.a
        latch = addr != a.rtp_peer
        if latch and (
            a.rtp_peer is not None or addr[0] != a.expected_ip or (a.stale and a.stale_source(addr))
        ):
            a.wrong_source += 1
            return
        if a.mux and len(data) > 1 and 199 < data[1] < 205:  # RTCP PT 200..204 (RFC 5761)
            if _relay_rtcp(a, self.b, self.session, data) and latch:
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
                    self.session._authenticated(a.side)
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
            data = _mix_tone(b, data)
        tx = b.tx
        if tx is not None:
            if len(data) >= 12:
                data = b.number_on(data)
            try:
                data = tx.protect(data)
            except SrtpError:
                b.srtp_protect += 1
                return
            b.packets_encrypted += 1
        try:
            b.rtp_send(data, dest)
        except _SEND_FAILURES:
            b.send_error += 1
            return
        b.packets_out += 1
        b.bytes_out += len(data)


class _RtcpSocket(_Socket):
    __slots__ = ()

    def set_send(self, send: SendTo) -> None:
        self.a.rtcp_send = send

    def datagram_received(self, data: bytes, addr: Address) -> None:
        a = self.a
        latch = addr != a.rtcp_peer
        if latch and (
            a.rtcp_peer is not None
            or addr[0] != a.expected_ip
            or (a.stale and a.stale_source(addr))
        ):
            a.wrong_source += 1
            return
        if _relay_rtcp(a, self.b, self.session, data) and latch:
            a.latch_rtcp(addr)


def check_remote(
    local_ip: str, ip: str, rtp_port: int, rtcp_port: int
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A peer's media address as SDP gave it, checked against the local address it is to
    be reached from: ports in range, same address family. Raises ``ValueError``."""
    for port, what in ((rtp_port, "rtp_port"), (rtcp_port, "rtcp_port")):
        if not 0 <= port <= 65535:
            raise ValueError(f"{what} out of range: {port}")
    address = ipaddress.ip_address(ip)
    if address.version != ipaddress.ip_address(local_ip).version:
        raise ValueError(f"{ip} is not of the address family of {local_ip}")
    return address


class RelaySession:
    """One call's media on the in-process relay (implements ``MediaSession``)."""

    __slots__ = (
        "_attach",
        "_authentic",
        "_call_id",
        "_callbacks",
        "_closed",
        "_engine",
        "_legs",
        "_loop",
        "_pairs",
        "_released",
    )

    def __init__(self, call_id: str, engine: RelayEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._call_id = call_id
        self._engine = engine
        self._loop = loop
        self._callbacks: dict[Side, SrtpCallback] = {}
        """Armed by on_srtp_authenticated, for the side's current ``rx`` key."""
        self._authentic: set[Side] = set()
        """Sides on which a packet authenticated under the current ``rx`` key."""
        self._legs: dict[Side, list[_Leg]] = {Side.INSIDE: [], Side.OUTSIDE: []}
        self._pairs = 0
        """Port pairs bound and not yet closed."""
        self._released = False
        self._closed = asyncio.Event()
        self._attach: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "released" if self._released else "live"
        return f"RelaySession({self._call_id!r}, streams={self.streams}, {state})"

    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def streams(self) -> int:
        return len(self._legs[Side.INSIDE])

    def _leg(self, side: Side, index: int) -> _Leg:
        if index < 0:
            raise IndexError(f"no stream {index}")
        return self._legs[Side(side)][index]

    def local(self, side: Side, index: int) -> tuple[str, int]:
        leg = self._leg(side, index)
        return leg.ip, leg.port

    def set_remote(
        self,
        side: Side,
        index: int,
        ip: str,
        rtp_port: int,
        rtcp_port: int,
        rtcp_mux: bool = False,
    ) -> None:
        leg = self._leg(side, index)
        address = check_remote(leg.ip, ip, rtp_port, rtcp_port)
        ip = str(address)
        leg.mux = rtcp_mux
        if address.is_unspecified or rtp_port == 0:
            # Hold: send nothing. The peer keeps its latch (a sendonly phone still sends
            # music on hold from where it was) unless it announced a new address.
            leg.hold = True
            leg.rtp_dest = leg.rtcp_dest = None
            if not address.is_unspecified and ip != leg.expected_ip:
                leg.expected_ip = ip
                leg.rtp_peer = leg.rtcp_peer = leg.sdp_rtp = leg.sdp_rtcp = None
            return
        sdp_rtp = (ip, rtp_port)
        sdp_rtcp = (ip, rtcp_port) if rtcp_port else None
        if leg.stale:  # the new peer's own announced address is no stale source
            leg.stale = tuple(a for a in leg.stale if a != sdp_rtp and a != sdp_rtcp)
        if ip != leg.expected_ip or sdp_rtp != leg.sdp_rtp or sdp_rtcp != leg.sdp_rtcp:
            leg.rtp_peer = leg.rtcp_peer = None  # re-arm latching
        leg.expected_ip = ip
        leg.sdp_rtp = sdp_rtp
        leg.sdp_rtcp = sdp_rtcp
        leg.hold = False
        leg.rtp_dest = leg.rtp_peer or sdp_rtp
        leg.rtcp_dest = None if sdp_rtcp is None else (leg.rtcp_peer or sdp_rtcp)

    def set_srtp(self, side: Side, context: SrtpContext | None, srtcp: bool = True) -> None:
        if context is None:
            self.clear_srtp(side)
            return
        side = Side(side)
        self._new_key(side, context)
        for leg in self._legs[side]:
            leg.tx = leg.rx = context
            leg.rtcp_tx = leg.rtcp_rx = context if srtcp else None
            leg.rx_alt = None
            leg.alt_until = leg.plain_until = -math.inf

    def accept_srtp(self, side: Side, context: SrtpContext, srtcp: bool = False) -> None:
        side = Side(side)
        self._new_key(side, context)
        for leg in self._legs[side]:
            current = leg.tx
            leg.rx = context
            leg.rtcp_rx = context if srtcp else None
            if current is None:  # still plain: so is the peer, until it switches
                leg.rx_alt = None
                leg.plain_until = math.inf
            elif current is not context:  # a re-key: the key in use stays valid
                leg.rx_alt, leg.alt_until = current, math.inf

    def switch_srtp(
        self,
        side: Side,
        context: SrtpContext,
        grace_s: float,
        now: float | None = None,
        srtcp: bool = False,
    ) -> None:
        if not 0 <= grace_s < math.inf:
            raise ValueError(f"grace_s must be a finite number >= 0, not {grace_s}")
        deadline = (self._engine.clock() if now is None else now) + grace_s
        side = Side(side)
        self._new_key(side, context)
        for leg in self._legs[side]:
            previous = leg.tx
            leg.tx = leg.rx = context
            leg.rtcp_tx = leg.rtcp_rx = context if srtcp else None
            if previous is None:  # from clear: the peer's plain RTP for the grace window
                leg.rx_alt = None
                leg.plain_until = deadline
            elif previous is not context:  # re-key: the old key for the grace window
                leg.rx_alt, leg.alt_until = previous, deadline

    def on_srtp_authenticated(self, side: Side, callback: SrtpCallback) -> None:
        side = Side(side)
        legs = self._legs[side]
        if not legs or legs[0].rx is None:
            raise ValueError(f"no SRTP key to authenticate on the {side} side")
        if side in self._authentic:
            self._callbacks.pop(side, None)
            self._loop.call_soon(self._call, side, callback)
        else:
            self._callbacks[side] = callback

    def clear_srtp(self, side: Side) -> None:
        side = Side(side)
        self._new_key(side, None)
        for leg in self._legs[side]:
            leg.tx = leg.rx = leg.rtcp_tx = leg.rtcp_rx = leg.rx_alt = None
            leg.alt_until = leg.plain_until = -math.inf

    def set_tx_ssrc(self, side: Side, ssrc: int | None) -> None:
        """Rewrite the SSRC of RTP sent toward ``side`` while it is SRTP (None: keep the
        sender's). Stream 0 only: x-sipura secures the call's audio stream."""
        self._leg(side, 0).tx_ssrc = None if ssrc is None else ssrc.to_bytes(4, "big")

    def play_tone(self, side: Side, index: int, tone: Tone | None) -> None:
        leg = self._leg(side, index)
        mixer = None if tone is None else ToneMixer(tone)
        leg.tone = None if mixer is None or mixer.done else mixer

    def _new_key(self, side: Side, rx: SrtpContext | None) -> None:
        """``rx`` becomes the side's first receive key: if it is another key than now,
        the one-shot authentication callback starts over."""
        legs = self._legs[side]
        if legs and legs[0].rx is rx:
            return
        self._callbacks.pop(side, None)
        self._authentic.discard(side)
        for leg in legs:
            leg.rx_first = rx is not None

    def _authenticated(self, side: Side) -> None:
        """A packet from ``side`` authenticated under its ``rx`` key for the first time."""
        for leg in self._legs[side]:
            leg.rx_first = False
        self._authentic.add(side)
        callback = self._callbacks.pop(side, None)
        if callback is not None:
            self._call(side, callback)

    def _call(self, side: Side, callback: SrtpCallback) -> None:
        try:
            callback()
        except Exception:  # once per key at most: a log line is affordable
            log.exception("%s: SRTP-authenticated callback for the %s side failed", self, side)

    def stats(self) -> dict[Side, list[StreamStats]]:
        return {side: [leg.stats() for leg in legs] for side, legs in self._legs.items()}

    def counters(self) -> tuple[int, ...]:
        """Every leg's counters flat: inside legs then outside legs, each in
        :data:`COUNTERS` order (:func:`stats_from` turns it back into :meth:`stats`)."""
        legs = self._legs
        return tuple(chain.from_iterable(map(_counters_of, legs[Side.INSIDE] + legs[Side.OUTSIDE])))

    def inbound(self) -> tuple[int, int]:
        """Packets accepted from the inside and from the outside peer of stream 0."""
        legs = self._legs
        return legs[Side.INSIDE][0].packets_in, legs[Side.OUTSIDE][0].packets_in

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        engine = self._engine
        engine._released(self)
        for legs in self._legs.values():
            for leg in legs:
                leg.rtp_dest = leg.rtcp_dest = None
                if engine._pool.keep(leg):
                    self._pairs -= 1
                    continue
                for sock in leg.sockets:
                    sock.close()
        if self._pairs == 0:
            self._set_closed()

    async def wait_closed(self) -> None:
        """After :meth:`release`: wait until every socket is closed and its port is free,
        or its pair is in the engine's pool."""
        await self._closed.wait()

    async def _attach_all(self) -> None:
        """Wrap the bound sockets in transports (the loop only offers that as a coroutine)."""
        loop = asyncio.get_running_loop()
        for legs in self._legs.values():
            for leg in legs:
                for proto in leg.sockets:
                    if self._released or proto.handed or proto.sock is None:
                        continue
                    proto.handed = True
                    try:
                        await loop.create_datagram_endpoint(proto.itself, sock=proto.sock)
                    except BaseException as exc:
                        if proto.sock is not None:
                            proto.sock.close()
                        proto.gone()  # a transport made before the error: no-op on its close
                        if not isinstance(exc, Exception):
                            raise
                        log.error("%s: cannot attach %s:%d: %s", self, leg.ip, leg.port, exc)
                        continue
                    if self._released and proto.session is self:  # (else: pooled)
                        proto.close()

    def _pair_closed(self, leg: _Leg) -> None:
        self._engine.ports.release(leg.port)
        self._pairs -= 1
        if self._pairs == 0 and self._released:
            self._set_closed()

    def _set_closed(self) -> None:
        self._closed.set()
        engine = self._engine
        engine._closing.discard(self)
        if engine.on_closed is not None:
            engine.on_closed(self)


class _Pool:
    """Released pairs kept open with their transports attached, for the next allocate: a
    FIFO per local address (one for both sides when they share it), at most ``pairs``
    per side. Owns the sockets of the pairs in it: each pair has a fresh leg that expects
    no IP, so every packet is dropped (``wrong_source``) and nothing is relayed."""

    __slots__ = ("_drained", "_engine", "closing", "free", "limits", "open")

    def __init__(self, engine: RelayEngine, pairs: int, ips: list[str]) -> None:
        self._engine = engine
        self.free: dict[str, deque[_Leg]] = {}
        self.limits: dict[str, int] = {}
        for ip in ips:
            self.free.setdefault(ip, deque())
            self.limits[ip] = self.limits.get(ip, 0) + pairs
        self.open = True
        """False while :meth:`RelayEngine.close_now` releases sessions: pool nothing."""
        self.closing = 0
        """Pairs closed out of the pool whose sockets are not all gone yet."""
        self._drained = asyncio.Event()
        self._drained.set()

    def __len__(self) -> int:
        return sum(len(free) for free in self.free.values())

    def keep(self, leg: _Leg) -> bool:
        """Pool the pair of ``leg`` (its session is releasing it) if there is room and both
        its transports are attached and open; False: the caller closes it."""
        free = self.free[leg.ip]
        if not self.open or leg.alive != 2 or len(free) >= self.limits[leg.ip]:
            return False
        for sock in leg.sockets:
            transport = sock.transport
            if transport is None or transport.is_closing():
                return False
        pooled = _Leg(leg.side, leg.index, leg.ip, leg.family, leg.clock)
        pooled.adopt(leg)
        peers = (leg.rtp_peer, leg.rtcp_peer, leg.sdp_rtp, leg.sdp_rtcp)
        pooled.stale = tuple(dict.fromkeys((a[0], a[1]) for a in peers if a is not None))
        if pooled.stale:
            pooled.stale_until = self._engine.clock() + self._engine.quarantine_s
        for sock in pooled.sockets:
            sock.session = self
            sock.b = pooled
        free.append(pooled)
        return True

    def take(self, session: RelaySession, side: Side, index: int, ip: str) -> _Leg | None:
        """A new leg for ``session`` on the pair pooled longest ago, None if none is."""
        free = self.free[ip]
        while free:
            pooled = free.popleft()
            if pooled.alive == 2 and all(
                sock.transport is not None and not sock.transport.is_closing()
                for sock in pooled.sockets
            ):
                leg = _Leg(side, index, ip, pooled.family, pooled.clock)
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

    def _close(self, leg: _Leg) -> None:
        if self.closing == 0:
            self._drained.clear()
        self.closing += 1
        for sock in leg.sockets:
            sock.close()

    async def wait(self) -> None:
        """Until every pair closed out of the pool is gone and its port free."""
        while self.closing:
            await self._drained.wait()

    def _authenticated(self, side: Side) -> None:
        """Never called: a pooled leg has no key."""

    def _pair_closed(self, leg: _Leg) -> None:
        self._engine.ports.release(leg.port)
        free = self.free[leg.ip]
        if leg in free:  # both sockets failed while pooled
            free.remove(leg)
            return
        self.closing -= 1
        if self.closing == 0:
            self._drained.set()


class RelayEngine:
    """The in-process engine (implements ``MediaEngine``): sockets on ``inside_ip`` for
    the phones, on ``outside_ip`` for the PBX/ITSP side, ports from ``port_min`` to
    ``port_max``.

    Inside and outside share one allocator (:attr:`ports`): a stream takes two RTP/RTCP
    pairs. ``clock`` times the SRTP grace windows (tests pass a fake one). Up to
    ``pool_pairs`` released pairs per side are kept open for reuse (0: none), and a
    reused pair refuses the previous call's peer addresses for ``quarantine_s`` after
    its release (see the module docstring). Must be used from within a running event
    loop."""

    def __init__(
        self,
        inside_ip: str,
        outside_ip: str,
        port_min: int,
        port_max: int,
        clock: Clock = time.monotonic,
        *,
        pool_pairs: int = 256,
        quarantine_s: float = 4.0,
    ) -> None:
        if pool_pairs < 0:
            raise ValueError(f"pool_pairs must be >= 0, not {pool_pairs}")
        if not 0 <= quarantine_s < math.inf:
            raise ValueError(f"quarantine_s must be a finite number >= 0, not {quarantine_s}")
        self.clock = clock
        """The scale of ``switch_srtp``'s ``now``; read on switch-overs and failed packets."""
        self.quarantine_s = quarantine_s
        self._ips: dict[Side, tuple[str, socket.AddressFamily]] = {}
        for side, ip in ((Side.INSIDE, inside_ip), (Side.OUTSIDE, outside_ip)):
            address = ipaddress.ip_address(ip)
            if address.is_unspecified:
                raise ValueError(f"{side} media address must be a real address, not {ip}")
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            self._ips[side] = (str(address), family)
        self.ports = PortAllocator(port_min, port_max)
        self._live: set[RelaySession] = set()
        self._closing: set[RelaySession] = set()
        """Released sessions whose sockets are not all closed yet."""
        self._pool = _Pool(self, pool_pairs, [ip for ip, _ in self._ips.values()])
        self.on_closed: Callable[[RelaySession], object] | None = None
        """Called when a released session's sockets are all closed (or pooled)."""

    def __repr__(self) -> str:
        return f"RelayEngine({len(self._live)} sessions, {self.pooled} pooled, {self.ports!r})"

    @property
    def sessions(self) -> int:
        """Sessions allocated and not released."""
        return len(self._live)

    @property
    def pooled(self) -> int:
        """Released pairs kept open for reuse (their ports are not in :attr:`ports`)."""
        return len(self._pool)

    def pooled_ports(self) -> list[int]:
        """The RTP ports of the pooled pairs (RTCP is each + 1): bound, but no call's."""
        return sorted(leg.port for free in self._pool.free.values() for leg in free)

    def allocate(
        self,
        call_id: str,
        streams: int,
        sockets: list[tuple[socket.socket, socket.socket]] | None = None,
    ) -> RelaySession:
        """See :meth:`MediaEngine.allocate`. ``sockets``: the session's RTP/RTCP pairs,
        already bound by someone else (a media worker gets them from the signalling
        process, which owns the port allocation): per stream the inside pair, then the
        outside pair. The engine takes them over (they are closed on release or on
        failure), and neither its allocator nor its pool is involved."""
        if streams < 1:
            raise ValueError(f"a session needs at least one stream, not {streams}")
        if sockets is not None:
            return self._adopt(call_id, streams, sockets)
        loop = asyncio.get_running_loop()
        session = RelaySession(call_id, self, loop)
        self._live.add(session)
        pool = self._pool
        bound = False
        try:
            for index in range(streams):
                legs: dict[Side, _Leg] = {}
                for side, (ip, family) in self._ips.items():
                    leg = pool.take(session, side, index, ip)
                    if leg is None:
                        leg = _Leg(side, index, ip, family, self.clock)
                    session._legs[side].append(leg)
                    legs[side] = leg
                    if leg.alive:  # pooled: bound and attached
                        session._pairs += 1
                        continue
                    try:
                        port, rtp, rtcp = self._bind_pair(ip, family)
                    except PortsExhausted:
                        pool.drain()  # pairs pooled for the other address: free them
                        raise
                    leg.take_pair(session, port, rtp, rtcp)
                    session._pairs += 1
                    bound = True
                for side, leg in legs.items():
                    other = legs[side.other]
                    for sock in leg.sockets:
                        sock.b = other
        except BaseException:
            session.release()
            raise
        if bound:
            session._attach = loop.create_task(session._attach_all())
        return session

    def _adopt(
        self, call_id: str, streams: int, pairs: list[tuple[socket.socket, socket.socket]]
    ) -> RelaySession:
        if len(pairs) != 2 * streams:
            for pair in pairs:
                for sock in pair:
                    sock.close()
            raise ValueError(f"{len(pairs)} socket pairs for {streams} streams")
        loop = asyncio.get_running_loop()
        session = RelaySession(call_id, self, loop)
        self._live.add(session)
        remaining = iter(pairs)
        for _ in range(streams):
            legs: dict[Side, _Leg] = {}
            for side, (ip, family) in self._ips.items():
                rtp, rtcp = next(remaining)
                rtp.setblocking(False)
                rtcp.setblocking(False)
                leg = _Leg(side, len(session._legs[side]), ip, family, self.clock)
                leg.take_pair(session, int(rtp.getsockname()[1]), rtp, rtcp)
                session._legs[side].append(leg)
                session._pairs += 1
                legs[side] = leg
            for side, leg in legs.items():
                for proto in leg.sockets:
                    proto.b = legs[side.other]
        session._attach = loop.create_task(session._attach_all())
        return session

    def close_now(self) -> None:
        """Release every session and close the pooled pairs; the sockets close on the
        next loop iterations."""
        pool = self._pool
        pool.open = False
        try:
            for session in list(self._live):
                session.release()
        finally:
            pool.open = True
        pool.drain()

    async def close(self) -> None:
        self.close_now()
        for session in list(self._closing):
            await session.wait_closed()
        await self._pool.wait()

    def _released(self, session: RelaySession) -> None:
        self._live.discard(session)
        self._closing.add(session)

    def _bind_pair(
        self, ip: str, family: socket.AddressFamily
    ) -> tuple[int, socket.socket, socket.socket]:
        return bind_pair(self.ports, ip, family)


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


if TYPE_CHECKING:  # the relay implements the interface the B2BUA programs against

    def _conforms(engine: RelayEngine) -> MediaEngine:
        return engine
