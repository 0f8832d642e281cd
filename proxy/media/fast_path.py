"""The compiled per-packet path: the relay's packets handled by ``proxy.media._fastrelay``.

At real pacing (50 packets per second per call and direction) the Python path spends
most of a packet's cost around the packet rather than on it: a wake-up of the event loop
per datagram or two, a read that finds the socket empty after each datagram, the
interpreter, the cffi layer, and libsrtp re-initialising its crypto per packet
(docs/decisions.md has the profile). This module keeps everything that *decides* in
Python and hands the packets to C:

* the legs are :class:`FastLeg`: the C type ``_fastrelay.Leg`` with the attribute names of
  :class:`~proxy.media.relay_leg.RelayLeg`, so the command handlers of
  :mod:`proxy.media.relay_session` (the command table), the pool and the counters are the
  same code on both paths;
* each bound socket is a :class:`FastSocket` in one epoll set per engine
  (``_fastrelay.Relay``); the engine's event loop watches that set's descriptor and calls
  its ``drain()``, which reads one datagram from each ready socket and relays it: latch
  check, SRTP/SRTCP (libsrtp2 from the system, with contexts that stay initialised),
  renumbering, tone mixing, send, counters, exactly as :mod:`proxy.media.relay_packets`
  does;
* SRTP contexts are ``_fastrelay.Srtp`` (made from :class:`~proxy.media.commands.SrtpKeys`
  by the same ``RelaySession._context``), tones ``_fastrelay.ToneMix`` fed with the G.711
  renderings and mix tables of :mod:`proxy.media.tones`;
* what a packet must tell Python is a call, as on the Python path: the session's
  ``authenticated(side)``, the leg's log hooks (rate-limited here), the leg's clock on the
  failure path.

Importing this module fails (``ImportError``) where the extension was not built (no
compiler or no libsrtp2 at install time): :mod:`proxy.media.packet_path` then picks the
Python path.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxy.media import _fastrelay
from proxy.media.commands import SrtpKeys
from proxy.media.counters import COUNTERS
from proxy.media.engine import Side, StreamStats
from proxy.media.relay_leg import (
    Clock,
    RelayLeg,
    SockAddr,
    leg_stats,
    log_refused,
    log_wrong_source,
)
from proxy.media.relay_packets import Owner
from proxy.media.tones import Tone, ToneMixer, mix_table

if TYPE_CHECKING:
    from proxy.media.srtp import SrtpContext

__all__ = ["FastLeg", "FastPath", "FastSocket", "describe"]

if _fastrelay.COUNTERS != COUNTERS:  # a leg's report must mean the same on both paths
    raise ImportError("proxy.media._fastrelay was built for other counters: rebuild it")


def describe() -> str:
    """What the compiled path runs on, for ``/status`` and the logs."""
    return f"{_fastrelay.libsrtp_version()}, crypto {_fastrelay.crypto()}"


class FastLeg(_fastrelay.Leg):
    """One side of one stream for the compiled path (see :class:`RelayLeg` for what each
    attribute means): the C leg plus what Python does with it."""

    __slots__ = ()

    def adopt(self, old: FastLeg) -> None:
        """Take over ``old``'s bound pair (sockets, port, stale sources); ``old`` keeps its
        call state and counters, and no longer sends or receives (the pool)."""
        self.port = old.port
        self.sockets = old.sockets
        self.alive = old.alive
        self.stale = old.stale
        self.stale_until = old.stale_until
        old.sockets = ()
        old.alive = 0
        for sock in self.sockets:
            sock.a = self

    def open_plain(self, until: float) -> None:
        """See :meth:`RelayLeg.open_plain`: the reference is the last plain packet's."""
        if self.rx is None:
            self.grace_ssrc, self.grace_seq = self.plain_ref
        self.plain_until = until

    def stats(self) -> StreamStats:
        return leg_stats(cast(RelayLeg, self))

    def log_wrong_source(self, addr: SockAddr, what: str) -> None:
        """Called by the packet path after counting a wrong-source drop."""
        log_wrong_source(cast(RelayLeg, self), addr, what)

    def log_refused(self, reason: str) -> None:
        """Called by the packet path after counting a refused packet."""
        log_refused(cast(RelayLeg, self), reason)


class FastSocket(_fastrelay.Socket):
    """One bound socket of leg ``a`` on the compiled path, with the lifecycle of
    :class:`~proxy.media.relay_packets.RelaySocket`: bound -> attached (in the epoll set:
    :meth:`attach`) -> closed; :meth:`gone` runs once and gives the port back when the
    pair's last socket is gone. A close takes effect for packets at once and closes the
    descriptor on the next loop iteration, as a transport's close does."""

    __slots__ = ("_path", "handed", "is_open", "sock")

    def __init__(
        self,
        path: FastPath,
        sock: socket.socket,
        rtcp: bool,
        session: Owner,
        a: FastLeg,
        b: FastLeg,
    ) -> None:
        super().__init__(path.relay, sock.fileno(), rtcp, session, a, b)
        self._path = path
        self.sock: socket.socket | None = sock
        self.handed = False
        self.is_open = True

    async def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start relaying what arrives (the engine's loop watches the epoll set)."""
        self.handed = True
        self._path.watch(loop)
        self.register()

    def usable(self) -> bool:
        """Attached and not closing: the pool may keep it."""
        return self.is_open and self.registered

    def close(self) -> None:
        if not self.is_open:
            return
        self.unregister()
        if self.handed and self._path.loop is not None:
            self._path.loop.call_soon(self._closed)
        else:
            self._closed()

    def _closed(self) -> None:
        self.forget_fd()
        if self.sock is not None:
            self.sock.close()
        self.gone()

    def gone(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self.sock = None
        leg = self.a
        leg.alive -= 1
        if leg.alive == 0:
            self.session.pair_closed(cast(RelayLeg, leg))


class FastPath:
    """The compiled packet path of one engine: its epoll set and the factories the relay
    uses for legs, sockets, SRTP contexts and tones (see
    :class:`~proxy.media.packet_path.PacketPath`)."""

    name = "fast"

    def __init__(self) -> None:
        self.relay = _fastrelay.Relay()
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def before_packets(self) -> Callable[[], object] | None:
        """Called by each drain after it learnt which sockets are ready and before it
        reads any (a media worker reads its channel here).

        The event loop sees the whole epoll set as one descriptor, readable whenever any
        of its sockets is: on a busy worker it is readable before the channel is, so the
        loop runs the drain first, and without this hook the drain would relay a packet
        that arrived *after* a command concerning it (measured with ``bench/soak.py``:
        the phone's first packet after a switch-over left in the clear, 1.2 ms after the
        ``SwitchSrtp`` had reached the worker, in 1-3 of 60 secured calls). Every
        datagram a drain reads arrived before its ``epoll_wait``; reading the channel
        right after that call applies every command that arrived before them first, the
        order :meth:`~proxy.media.worker_pool.WorkerPool.flush` promises. It costs one
        ``recvmsg`` (usually empty) per wake-up, not per packet."""
        return self.relay.before

    @before_packets.setter
    def before_packets(self, hook: Callable[[], object] | None) -> None:
        self.relay.before = hook

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop calls ``drain()`` whenever a socket of the set is readable."""
        if self.loop is None:
            loop.add_reader(self.relay.fileno(), self.relay.drain)
            self.loop = loop

    def close(self) -> None:
        """Stop watching (sockets still registered go on being watched by nobody)."""
        self.relay.before = None  # the hook's owner refers to this path: no cycle left
        if self.loop is not None:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.relay.fileno())
            self.loop = None

    def new_leg(
        self, side: Side, index: int, ip: str, family: socket.AddressFamily, clock: Clock
    ) -> RelayLeg:
        return cast(RelayLeg, FastLeg(side, index, ip, family, clock))

    def take_pair(
        self, leg: RelayLeg, owner: Owner, port: int, rtp: socket.socket, rtcp: socket.socket
    ) -> None:
        """``leg`` owns a freshly bound RTP/RTCP pair for ``owner``; it relays once
        attached. (The sockets' ``b`` is ``leg`` itself until the other side's leg exists.)"""
        fast = cast(FastLeg, leg)
        leg.port = port
        fast.sockets = (
            FastSocket(self, rtp, False, owner, fast, fast),
            FastSocket(self, rtcp, True, owner, fast, fast),
        )
        leg.alive = 2

    def context(self, keys: SrtpKeys) -> SrtpContext:
        return cast("SrtpContext", _fastrelay.Srtp(keys))

    def mixer(self, tone: Tone) -> ToneMixer:
        bursts = tuple((start, end) for start, end, _ in tone.bursts())
        return cast(ToneMixer, _fastrelay.ToneMix(tone, bursts, _tables(tone)))

    def counters_of(self, leg: RelayLeg) -> tuple[int, ...]:
        return cast(FastLeg, leg).counters()

    def packed_counters(self, leg: RelayLeg) -> bytes:
        return cast(FastLeg, leg).packed_counters()

    def stats(self) -> dict[str, int]:
        """Wake-ups and datagrams so far (``/status``: datagrams per wake-up)."""
        relay = self.relay
        return {"wakeups": relay.wakeups, "packets": relay.packets}


def _tables(tone: Tone) -> Callable[[int], tuple[bytes, bytes]]:
    """What a ``ToneMix`` asks for the first time a packet of a law needs the tone."""

    def tables(payload_type: int) -> tuple[bytes, bytes]:
        return tone.encoded(payload_type), mix_table(payload_type)

    return tables
