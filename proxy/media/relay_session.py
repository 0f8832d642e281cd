"""One call's media on the in-process relay, and the handler of every media command.

A :class:`RelaySession` owns the :class:`~proxy.media.relay_leg.RelayLeg` of each side of
each stream and changes them as the commands of :mod:`proxy.media.commands` say;
:data:`HANDLERS` maps every command type to its handler, which is how
:meth:`RelayEngine.apply <proxy.media.relay.RelayEngine.apply>` dispatches (in this
process, or in a media worker process that received the command over its channel).

SRTP (profile §3) is per side, for all of its streams, in four fields per leg: ``tx``
(the key packets toward the side are protected with), ``rx`` (the key packets from it
are tried with first), ``rx_alt`` (the previous key after a re-key, until
``alt_until``) and ``plain_until`` (until when a packet that does not authenticate may
still be relayed as plain RTP: forever while only accepting, then the grace window after
the switch-over from clear, and never again once a packet from the side authenticated;
only the peer's plain stream going on is taken, :mod:`proxy.media.grace`). This is the
only place that turns :class:`SrtpKeys` into libsrtp contexts, and keys equal to those
of a context the side already uses get that context back
(:meth:`RelaySession._context`), so its replay window and rollover counter carry on: a
``SwitchSrtp`` after an ``AcceptSrtp`` of the same keys continues the stream that
accepting already authenticated.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any, Final

from proxy.media.commands import (
    AcceptSrtp,
    ClearSrtp,
    MediaCommand,
    PlayTone,
    Release,
    SetRemote,
    SetSrtp,
    SetTxSsrc,
    SrtpAuthenticated,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.engine import Side, StreamStats, check_remote
from proxy.media.relay_leg import RelayLeg
from proxy.media.srtp import SrtpContext

if TYPE_CHECKING:
    from proxy.media.relay import RelayEngine

__all__ = ["HANDLERS", "RelaySession"]

log = logging.getLogger("sipura.media")


class RelaySession:
    """One call's media on the in-process relay (implements ``MediaSession``)."""

    __slots__ = (
        "_attach",
        "_authentic",
        "_call_id",
        "_closed",
        "_engine",
        "_legs",
        "_loop",
        "_pairs",
        "_released",
        "_watched",
        "id",
    )

    def __init__(
        self, session_id: int, call_id: str, engine: RelayEngine, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = session_id
        self._call_id = call_id
        self._engine = engine
        self._loop = loop
        self._watched: set[Side] = set()
        """Sides with a :class:`WatchSrtp` not reported yet, for the side's current key."""
        self._authentic: set[Side] = set()
        """Sides on which a packet authenticated under the current ``rx`` key."""
        self._legs: dict[Side, list[RelayLeg]] = {Side.INSIDE: [], Side.OUTSIDE: []}
        self._pairs = 0
        """Port pairs bound and not yet closed (or pooled)."""
        self._released = False
        self._closed = asyncio.Event()
        self._attach: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "released" if self._released else "live"
        return f"RelaySession({self.id}, {self._call_id!r}, streams={self.streams}, {state})"

    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def streams(self) -> int:
        return len(self._legs[Side.INSIDE])

    def legs(self, side: Side) -> list[RelayLeg]:
        """The legs of ``side``, one per stream (the engine builds them)."""
        return self._legs[side]

    def _leg(self, side: Side, index: int) -> RelayLeg:
        if index < 0:
            raise IndexError(f"no stream {index}")
        return self._legs[Side(side)][index]

    def local(self, side: Side, index: int) -> tuple[str, int]:
        leg = self._leg(side, index)
        return leg.ip, leg.port

    # --- command handlers (see HANDLERS) ----------------------------------------------

    def set_remote(self, command: SetRemote) -> None:
        leg = self._leg(command.side, command.index)
        rtp_port, rtcp_port = command.rtp_port, command.rtcp_port
        address = check_remote(leg.ip, command.ip, rtp_port, rtcp_port)
        ip = str(address)
        leg.mux = command.rtcp_mux
        leg.latch_any = command.latch == "any"
        leg.rtp = command.kind == "rtp"
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

    def set_srtp(self, command: SetSrtp) -> None:
        side = Side(command.side)
        if command.keys is None:
            self._clear(side)
            return
        legs = self._rtp_legs(side)
        if command.index is not None:
            legs = [leg for leg in (self._leg(side, command.index),) if leg.rtp]
        context = self._context(side, command.keys, legs)
        remote_keys = command.remote_keys
        remote = context if remote_keys is None else self._context(side, remote_keys, legs)
        if command.index in (None, 0):
            self._new_key(side, remote)
        for leg in legs:
            leg.tx, leg.rx = context, remote
            leg.rtcp_tx = context if command.srtcp else None
            leg.rtcp_rx = remote if command.srtcp else None
            leg.rx_alt = None
            leg.alt_until = leg.plain_until = -math.inf

    def accept_srtp(self, command: AcceptSrtp) -> None:
        side = Side(command.side)
        context = self._context(side, command.keys)
        self._new_key(side, context)
        # Plain stays closed if the peer already sends under this key (it switched).
        plain_until = -math.inf if side in self._authentic else math.inf
        for leg in self._rtp_legs(side):
            current = leg.tx
            if current is None:  # still plain: so is the peer, until it switches
                leg.open_plain(plain_until)  # (before rx is set: see open_plain)
                leg.rx_alt = None
            elif current is not context:  # a re-key: the key in use stays valid
                leg.rx_alt, leg.alt_until = current, math.inf
            leg.rx = context
            leg.rtcp_rx = context if command.srtcp else None

    def switch_srtp(self, command: SwitchSrtp) -> None:
        grace_s = command.grace_s
        if not 0 <= grace_s < math.inf:
            raise ValueError(f"grace_s must be a finite number >= 0, not {grace_s}")
        deadline = self._engine.clock() + grace_s
        side = Side(command.side)
        context = self._context(side, command.keys)
        self._new_key(side, context)
        # No grace for plain if the peer already sends under this key (it switched).
        plain_until = -math.inf if side in self._authentic else deadline
        for leg in self._rtp_legs(side):
            previous = leg.tx
            if previous is None:  # from clear: the peer's plain RTP for the grace window
                leg.open_plain(plain_until)  # (before rx is set: see open_plain)
                leg.rx_alt = None
            elif previous is not context:  # re-key: the old key for the grace window
                leg.rx_alt, leg.alt_until = previous, deadline
            leg.tx = leg.rx = context
            leg.rtcp_tx = leg.rtcp_rx = context if command.srtcp else None

    def clear_srtp(self, command: ClearSrtp) -> None:
        self._clear(Side(command.side))

    def set_tx_ssrc(self, command: SetTxSsrc) -> None:
        """Stream 0 only: x-sipura secures the call's audio stream."""
        ssrc = command.ssrc
        self._leg(command.side, 0).tx_ssrc = None if ssrc is None else ssrc.to_bytes(4, "big")

    def play_tone(self, command: PlayTone) -> None:
        leg = self._leg(command.side, command.index)
        if not leg.rtp:
            return  # UDPTL or other non-RTP data: never mixed into
        mixer = None if command.tone is None else self._engine.path.mixer(command.tone)
        leg.tone = None if mixer is None or mixer.done else mixer

    def watch_srtp(self, command: WatchSrtp) -> None:
        side = Side(command.side)
        legs = self._legs[side]
        if not legs or legs[0].rx is None:
            raise ValueError(f"no SRTP key to authenticate on the {side} side")
        if side in self._authentic:  # already: report it, but not from inside apply()
            self._watched.discard(side)
            self._loop.call_soon(self._report, side)
        else:
            self._watched.add(side)

    def release(self, command: Release | None = None) -> None:
        """Close the sockets (or pool the pairs): see :class:`Release`. Idempotent."""
        if self._released:
            return
        self._released = True
        engine = self._engine
        engine.session_released(self)
        pool = engine.pool
        for legs in self._legs.values():
            for leg in legs:
                leg.rtp_dest = leg.rtcp_dest = None
                if pool.keep(leg):
                    self._pairs -= 1
                    continue
                for sock in leg.sockets:
                    sock.close()
        if self._pairs == 0:
            self._set_closed()

    # --- keys -------------------------------------------------------------------------

    def _rtp_legs(self, side: Side) -> list[RelayLeg]:
        """The side's RTP streams: SRTP never touches a non-RTP one (T.38 UDPTL)."""
        return [leg for leg in self._legs[side] if leg.rtp]

    def _context(
        self, side: Side, keys: SrtpKeys, legs: list[RelayLeg] | None = None
    ) -> SrtpContext:
        """The libsrtp context for ``keys`` on ``side``: the one the legs being keyed
        (default: the side's first stream, which x-sipura keys for all) already use if it
        was made from equal keys (its replay window and ROC carry on), else a new one.
        Reusing a key with fresh libsrtp state would repeat the key stream, so equal keys
        must never get a second context; SDES keys each stream on its own (``legs`` is
        that stream), so its contexts are looked for there, not on stream 0."""
        for leg in legs if legs is not None else self._legs[side][:1]:
            for context in (leg.rx, leg.tx, leg.rx_alt):
                if context is not None and context.keys == keys:
                    return context
        return self._engine.path.context(keys)

    def _clear(self, side: Side) -> None:
        self._new_key(side, None)
        for leg in self._legs[side]:
            leg.tx = leg.rx = leg.rtcp_tx = leg.rtcp_rx = leg.rx_alt = None
            leg.alt_until = leg.plain_until = -math.inf
            leg.grace_ssrc = leg.grace_seq = -1

    def _new_key(self, side: Side, rx: SrtpContext | None) -> None:
        """``rx`` becomes the side's first receive key: if it is another key than now,
        the one-shot authentication watch starts over."""
        legs = self._legs[side]
        if legs and legs[0].rx is rx:
            return
        self._watched.discard(side)
        self._authentic.discard(side)
        for leg in legs:
            leg.rx_first = rx is not None

    def authenticated(self, side: Side) -> None:
        """A packet from ``side`` authenticated under its ``rx`` key for the first time
        (called by the packet handler). The peer has switched: the window for its plain
        packets closes now, on every stream of the side (:mod:`proxy.media.grace`)."""
        for leg in self._legs[side]:
            leg.rx_first = False
            leg.plain_until = -math.inf
        self._authentic.add(side)
        if side in self._watched:
            self._watched.discard(side)
            self._report(side)

    def _report(self, side: Side) -> None:
        self._engine.report(SrtpAuthenticated(self.id, side))

    # --- counters ---------------------------------------------------------------------

    def stats(self) -> dict[Side, list[StreamStats]]:
        return {side: [leg.stats() for leg in legs] for side, legs in self._legs.items()}

    def counters(self) -> tuple[int, ...]:
        """Every leg's counters flat: inside legs then outside legs, each in
        :data:`~proxy.media.counters.COUNTERS` order
        (:func:`~proxy.media.counters.stats_from` turns it back into :meth:`stats`)."""
        legs = self._legs
        counters = self._engine.path.counters_of
        return tuple(chain.from_iterable(map(counters, legs[Side.INSIDE] + legs[Side.OUTSIDE])))

    def packed_counters(self) -> bytes:
        """:meth:`counters` packed as a worker reports them (:class:`proxy.media.channel.
        Stats`)."""
        legs = self._legs
        packed = self._engine.path.packed_counters
        return b"".join(map(packed, legs[Side.INSIDE] + legs[Side.OUTSIDE]))

    def inbound(self) -> tuple[int, int]:
        """Packets accepted from the inside and from the outside peer of stream 0."""
        legs = self._legs
        return legs[Side.INSIDE][0].packets_in, legs[Side.OUTSIDE][0].packets_in

    # --- sockets ----------------------------------------------------------------------

    def pair_bound(self, leg: RelayLeg) -> None:
        """``leg`` holds an open pair (freshly bound, handed over or taken from the pool)."""
        self._legs[leg.side].append(leg)
        self._pairs += 1

    def attach_soon(self) -> None:
        """Wrap the freshly bound sockets in transports on the next loop iterations."""
        self._attach = self._loop.create_task(self._attach_all())

    async def wait_closed(self) -> None:
        """After release: wait until every socket is closed and its port is free, or its
        pair is in the engine's pool."""
        await self._closed.wait()

    async def _attach_all(self) -> None:
        """Wrap the bound sockets in transports (the loop only offers that as a coroutine)."""
        loop = asyncio.get_running_loop()
        for legs in self._legs.values():
            for leg in legs:
                for proto in leg.sockets:
                    if self._released or proto.handed or proto.sock is None:
                        continue
                    try:
                        await proto.attach(loop)
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

    def pair_closed(self, leg: RelayLeg) -> None:
        """Both sockets of ``leg`` are closed (called by the sockets): the port is free."""
        self._engine.ports.release(leg.port)
        self._pairs -= 1
        if self._pairs == 0 and self._released:
            self._set_closed()

    def _set_closed(self) -> None:
        self._closed.set()
        self._engine.session_closed(self)


HANDLERS: Final[dict[type[MediaCommand], Callable[[RelaySession, Any], None]]] = {
    SetRemote: RelaySession.set_remote,
    SetSrtp: RelaySession.set_srtp,
    AcceptSrtp: RelaySession.accept_srtp,
    SwitchSrtp: RelaySession.switch_srtp,
    ClearSrtp: RelaySession.clear_srtp,
    SetTxSsrc: RelaySession.set_tx_ssrc,
    PlayTone: RelaySession.play_tone,
    WatchSrtp: RelaySession.watch_srtp,
    Release: RelaySession.release,
}
"""The relay's handler of each command type: :meth:`RelayEngine.apply
<proxy.media.relay.RelayEngine.apply>` looks the command's type up here."""
