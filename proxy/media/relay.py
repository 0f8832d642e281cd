"""The in-process media engine: an RTP/RTCP relay on asyncio datagram endpoints.

Each side of each stream owns an RTP and an RTCP socket on the proxy; a packet arriving
on one side's socket goes out of the other side's matching socket to that side's peer.
The relay is spread over a few modules, one responsibility each:

* here, :class:`RelayEngine`: allocation, the command table dispatch
  (:meth:`RelayEngine.apply`), events, closing, ``/status`` figures;
* :mod:`proxy.media.relay_session`: one call's media and the handler of every command;
* :mod:`proxy.media.relay_leg`: one side of one stream (peer, keys, counters);
* :mod:`proxy.media.relay_packets`: the per-packet receive handlers, inlined for speed;
* :mod:`proxy.media.relay_pool`: binding port pairs, and the pool of released pairs.

With uvloop the relay costs little more than a bare forward loop (``bench/relay.py``).

Symmetric RTP (RFC 4961) with latching: until a packet arrives from a side, the relay
sends to the address that side's SDP gave; the first packet from the SDP's IP address,
from any port (NAT rewrites ports, not the LAN address of a phone or the public
address of a PBX), latches that exact ip:port as the peer, and from then on packets from
anywhere else are dropped as ``wrong_source``: nobody else can inject media into the
call. On an SRTP side a packet latches only once it has authenticated, so a forged
first packet cannot steal the stream either. A new address from SDP re-arms latching.

SRTP (profile §3) is per side, for all of its streams (see
:mod:`proxy.media.relay_session`). A plain side costs one attribute check per direction;
an SRTP packet one protect/unprotect call in a ``try``. Everything else (previous key,
grace window, the clock read that decides it, the counters that explain a drop) is on
the failure path, which a call in steady state never takes. RTCP follows the same rules
when SRTCP is switched on and stays in the clear otherwise. A tone
(:mod:`proxy.media.tones`) being played toward a side is one more attribute check per
packet to that side, and a table mix of the payload while the tone sounds.

Allocation is synchronous, so the sans-IO B2BUA core can call it while handling an
INVITE: the sockets are bound (and the ports known) at once, and a per-session task
wraps them in datagram transports on the next loop iterations; a packet that arrives
meanwhile waits in the socket's kernel buffer. Ports return to the allocator only when
both sockets of a pair are really closed (the transports' ``connection_lost``, on the
loop iteration after the release), so a port is never handed out while an old socket
still holds it. Released pairs may be kept open for the next call
(:mod:`proxy.media.relay_pool`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.media import packet_path
from proxy.media.commands import MediaCommand, MediaEvent
from proxy.media.engine import MediaEngine, Side
from proxy.media.packet_path import PacketPath, make_path, resolve
from proxy.media.ports import PortAllocator, PortsExhausted
from proxy.media.relay_leg import Clock, RelayLeg
from proxy.media.relay_pool import PairPool, bind_pair, media_addresses
from proxy.media.relay_session import HANDLERS, RelaySession

__all__ = ["PortsExhausted", "RelayEngine", "RelaySession"]

log = logging.getLogger("sipura.media")


class RelayEngine:
    """The in-process engine (implements ``MediaEngine``): sockets on ``inside_ip`` for
    the phones, on ``outside_ip`` for the PBX/ITSP side, ports from ``port_min`` to
    ``port_max``.

    Inside and outside share one allocator (:attr:`ports`): a stream takes two RTP/RTCP
    pairs. ``clock`` times the SRTP grace windows (tests pass a fake one). Up to
    ``pool_pairs`` released pairs per side are kept open for reuse (0: none), and a
    reused pair refuses the previous call's peer addresses for ``quarantine_s`` after
    its release (see :mod:`proxy.media.relay_pool`). Must be used from within a running
    event loop."""

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
        fast_path: str | None = None,
    ) -> None:
        if pool_pairs < 0:
            raise ValueError(f"pool_pairs must be >= 0, not {pool_pairs}")
        if not 0 <= quarantine_s < math.inf:
            raise ValueError(f"quarantine_s must be a finite number >= 0, not {quarantine_s}")
        self.clock = clock
        """The clock of the SRTP grace windows: read on switch-overs and failed packets."""
        self.path: PacketPath = make_path(resolve(fast_path or packet_path.default_mode))
        """Who handles the packets (:mod:`proxy.media.packet_path`)."""
        self._ips = media_addresses(inside_ip, outside_ip)
        self.ports = PortAllocator(port_min, port_max)
        self._live: dict[int, RelaySession] = {}
        self._closing: set[RelaySession] = set()
        """Released sessions whose sockets are not all closed yet."""
        self._ids = itertools.count(1)
        self.pool = PairPool(
            self.ports, clock, quarantine_s, pool_pairs, [ip for ip, _ in self._ips.values()]
        )
        self.on_event: Callable[[MediaEvent], None] | None = None
        """See :attr:`MediaEngine.on_event`: called from a packet handler or a callback."""
        self.reports_flowing = False
        """No ``MediaFlowing`` from here: the per-packet path stays as it is, and the
        core reads ``stats()`` (in-process, a dictionary) while it waits for media."""
        self.reports_final = False
        """``stats()`` read before a ``Release`` is final: the packets are counted here."""
        self.on_closed: Callable[[RelaySession], object] | None = None
        """Called when a released session's sockets are all closed (or pooled)."""

    def __repr__(self) -> str:
        return f"RelayEngine({len(self._live)} sessions, {self.pooled} pooled, {self.ports!r})"

    # --- status -----------------------------------------------------------------------

    @property
    def sessions(self) -> int:
        """Sessions allocated and not released."""
        return len(self._live)

    @property
    def pooled(self) -> int:
        """Released pairs kept open for reuse (their ports are not in :attr:`ports`)."""
        return len(self.pool)

    def pooled_ports(self) -> list[int]:
        """The RTP ports of the pooled pairs (RTCP is each + 1): bound, but no call's."""
        return sorted(leg.port for free in self.pool.free.values() for leg in free)

    def workers(self) -> list[dict[str, Any]]:
        """No worker processes: the relay runs here."""
        return []

    @property
    def packet_path(self) -> str:
        """``"fast"`` (compiled) or ``"python"``: who relays the packets here."""
        return self.path.name

    # --- commands and events ----------------------------------------------------------

    def apply(self, command: MediaCommand) -> None:
        """See :meth:`MediaEngine.apply`: the handler of the command's type
        (:data:`proxy.media.relay_session.HANDLERS`) runs on its session."""
        session = self._live.get(command.session)
        if session is not None:
            HANDLERS[type(command)](session, command)

    def report(self, event: MediaEvent) -> None:
        """Hand ``event`` to :attr:`on_event`. Called from a packet handler: a failing
        handler is logged (once per key at most: affordable) and the packet still
        relayed."""
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("media event handler failed on %s", event)

    # --- sessions ---------------------------------------------------------------------

    def allocate(
        self,
        call_id: str,
        streams: int,
        sockets: list[tuple[socket.socket, socket.socket]] | None = None,
        *,
        session_id: int | None = None,
    ) -> RelaySession:
        """See :meth:`MediaEngine.allocate`. ``sockets``: the session's RTP/RTCP pairs,
        already bound by someone else (a media worker gets them from the signalling
        process, which owns the port allocation): per stream the inside pair, then the
        outside pair. The engine takes them over (they are closed on release or on
        failure), and neither its allocator nor its pool is involved. ``session_id``:
        the id the session's commands will name (a worker is told it with the
        sockets); by default the engine picks one."""
        if streams < 1:
            raise ValueError(f"a session needs at least one stream, not {streams}")
        if session_id is None:
            session_id = next(self._ids)
        elif session_id in self._live:
            raise ValueError(f"session {session_id} exists already")
        loop = asyncio.get_running_loop()
        session = RelaySession(session_id, call_id, self, loop)
        if sockets is not None:
            return self._adopt(session, streams, sockets)
        self._live[session_id] = session
        try:
            bound = self._bind_streams(session, streams)
        except BaseException:
            session.release()
            raise
        if bound:
            session.attach_soon()
        return session

    def _bind_streams(self, session: RelaySession, streams: int) -> bool:
        """A pooled or a freshly bound pair per side for each stream; True if any pair
        is fresh (its sockets still need transports)."""
        pool = self.pool
        bound = False
        for index in range(streams):
            legs: dict[Side, RelayLeg] = {}
            for side, (ip, family) in self._ips.items():
                leg = pool.take(session, side, index, ip)
                if leg is None:
                    leg = self.path.new_leg(side, index, ip, family, self.clock)
                    try:
                        port, rtp, rtcp = self._bind_pair(ip, family)
                    except PortsExhausted:
                        pool.drain()  # pairs pooled for the other address: free them
                        raise
                    self.path.take_pair(leg, session, port, rtp, rtcp)
                    bound = True
                session.pair_bound(leg)
                legs[side] = leg
            _cross(legs)
        return bound

    def _bind_pair(
        self, ip: str, family: socket.AddressFamily
    ) -> tuple[int, socket.socket, socket.socket]:
        return bind_pair(self.ports, ip, family)

    def _adopt(
        self, session: RelaySession, streams: int, pairs: list[tuple[socket.socket, socket.socket]]
    ) -> RelaySession:
        if len(pairs) != 2 * streams:
            for pair in pairs:
                for sock in pair:
                    sock.close()
            raise ValueError(f"{len(pairs)} socket pairs for {streams} streams")
        self._live[session.id] = session
        remaining = iter(pairs)
        for index in range(streams):
            legs: dict[Side, RelayLeg] = {}
            for side, (ip, family) in self._ips.items():
                rtp, rtcp = next(remaining)
                rtp.setblocking(False)
                rtcp.setblocking(False)
                leg = self.path.new_leg(side, index, ip, family, self.clock)
                self.path.take_pair(leg, session, int(rtp.getsockname()[1]), rtp, rtcp)
                session.pair_bound(leg)
                legs[side] = leg
            _cross(legs)
        session.attach_soon()
        return session

    def close_now(self) -> None:
        """Release every session and close the pooled pairs; the sockets close on the
        next loop iterations."""
        pool = self.pool
        pool.open = False
        try:
            for session in list(self._live.values()):
                session.release()
        finally:
            pool.open = True
        pool.drain()

    async def close(self) -> None:
        self.close_now()
        for session in list(self._closing):
            await session.wait_closed()
        await self.pool.wait()
        self.path.close()

    def session_released(self, session: RelaySession) -> None:
        """``session`` is releasing: no more commands; its sockets are closing."""
        self._live.pop(session.id, None)
        self._closing.add(session)

    def session_closed(self, session: RelaySession) -> None:
        """Every socket of a released ``session`` is closed or pooled."""
        self._closing.discard(session)
        if self.on_closed is not None:
            self.on_closed(session)


def _cross(legs: dict[Side, RelayLeg]) -> None:
    """The sockets of each side's leg of one stream relay to the other side's leg."""
    for side, leg in legs.items():
        other = legs[side.other]
        for sock in leg.sockets:
            sock.b = other


if TYPE_CHECKING:  # the relay implements the interface the B2BUA programs against

    def _conforms(engine: RelayEngine) -> MediaEngine:
        return engine
