"""The media engine interface: what the B2BUA asks of whatever relays the media.

The B2BUA anchors media: each leg of a call sends RTP/RTCP to ports of the proxy, and the
engine relays between them. The B2BUA only ever talks to these two protocols, so the
in-process asyncio relay (:mod:`proxy.media.relay`) can later be swapped for one that
runs in worker processes without touching the SIP side. That constrains the interface:
it deals in plain values (strings, ints, an :class:`SrtpContext`), never in sockets or
transports, and every call is synchronous, so the sans-IO B2BUA core can make it while
handling a message (an engine in other processes reserves ports locally and sends the
rest as fire-and-forget commands).

Vocabulary: a *session* is one call's media; it has ``streams`` streams (one per ``m=``
line, in order); each stream has two *sides*, the phone side (:attr:`Side.INSIDE`) and
the PBX/ITSP/remote-SPA side (:attr:`Side.OUTSIDE`), each with an RTP and an RTCP port
on the proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol, TypedDict

from proxy.media.ports import PortsExhausted
from proxy.media.srtp import SrtpContext
from proxy.media.tones import Tone

__all__ = [
    "DROP_REASONS",
    "MediaEngine",
    "MediaSession",
    "PortsExhausted",
    "Side",
    "SrtpCallback",
    "StreamStats",
]


class Side(StrEnum):
    INSIDE = "inside"
    """Toward the legacy phones."""
    OUTSIDE = "outside"
    """Toward the PBX / ITSP / remote SPA: the leg that becomes SRTP."""

    @property
    def other(self) -> Side:
        return Side.OUTSIDE if self is Side.INSIDE else Side.INSIDE


DROP_REASONS = (
    "wrong_source",
    "no_destination",
    "srtp_auth",
    "srtp_replay",
    "srtp_protect",
    "send_error",
)
"""Why the relay dropped a packet. A drop is counted on the side where it happened:
``wrong_source``, ``srtp_auth`` and ``srtp_replay`` on the side the packet arrived from;
``no_destination``, ``srtp_protect`` and ``send_error`` on the side it was going to."""

SrtpCallback = Callable[[], object]
"""What :meth:`MediaSession.on_srtp_authenticated` calls: no argument, result ignored."""


class StreamStats(TypedDict):
    """Counters of one side of one stream. RTP and RTCP together; ``rtcp_*`` is the RTCP
    share. In = accepted from that side's peer, out = sent toward it; bytes as on the wire
    (SRTP included)."""

    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    rtcp_packets_in: int
    rtcp_packets_out: int
    packets_encrypted: int
    """Packets (RTP and SRTCP) protected toward this side."""
    packets_decrypted: int
    """Packets from this side that authenticated, under the current or the previous key."""
    plain_accepted: int
    """Packets from an SRTP side taken as plain because they did not authenticate while
    plain was still allowed (accepting before switch-over, or the grace window)."""
    plain_after_grace: int
    """The part of ``drops["srtp_auth"]`` that was shaped like plain RTP (version 2, a
    header that fits) or exactly framed plain RTCP: the peer still sends in the clear
    after the grace window. (An SRTP header is in the clear too, so for RTP this is a
    hint, not proof; for RTCP the framing tells SRTCP's trailer apart.)"""
    tone_packets: int
    """Packets toward this side whose payload a tone was mixed into."""
    tone_skipped: int
    """Packets toward this side during a tone that could not carry it (not PT 0/8)."""
    drops: dict[str, int]


class MediaSession(Protocol):
    """One call's media, as allocated by :meth:`MediaEngine.allocate`."""

    @property
    def call_id(self) -> str: ...

    @property
    def streams(self) -> int: ...

    def local(self, side: Side, index: int) -> tuple[str, int]:
        """The proxy's (ip, rtp_port) for ``side`` of stream ``index``: what goes into the
        SDP sent to that side. RTCP is rtp_port + 1."""
        ...

    def set_remote(
        self,
        side: Side,
        index: int,
        ip: str,
        rtp_port: int,
        rtcp_port: int,
        rtcp_mux: bool = False,
    ) -> None:
        """The peer of ``side`` for stream ``index``, as its SDP says.

        Until a packet arrives the engine sends to this address; the first packet from
        ``ip`` (any port, for NAT) becomes the peer (symmetric RTP latching), and after
        that packets from anywhere else are dropped. Hold (``ip`` 0.0.0.0 / ``::`` or
        ``rtp_port`` 0) stops sending to that side until a new address is set; a changed
        address re-arms latching. ``rtcp_mux``: RTCP shares the RTP port on that side.
        """
        ...

    def set_srtp(self, side: Side, context: SrtpContext | None, srtcp: bool = True) -> None:
        """SRTP both ways on ``side`` now, no grace: packets sent toward it are protected
        with ``context``, packets from it must unprotect or are dropped and counted.
        ``srtcp`` (default on here, unlike the switch-over calls): RTCP as well. None is
        :meth:`clear_srtp`."""
        ...

    def accept_srtp(self, side: Side, context: SrtpContext, srtcp: bool = False) -> None:
        """Start accepting SRTP under ``context`` from ``side`` without sending it (the
        caller after sending Caller Final, profile §3). Packets from ``side`` are tried
        with ``context``; if that fails they are tried with the key being sent now, if
        any (a re-key), and otherwise relayed as plain RTP when the side sends plain now
        (no plain is accepted once the side's grace window has passed). Only an
        authenticated packet latches. ``srtcp``: RTCP from ``side`` is SRTCP too."""
        ...

    def switch_srtp(
        self,
        side: Side,
        context: SrtpContext,
        grace_s: float,
        now: float | None = None,
        srtcp: bool = False,
    ) -> None:
        """Switch-over (profile §3): from now on, packets sent toward ``side`` are
        protected with ``context``. Packets from ``side`` are tried with ``context``,
        then with the previous key (a re-key: it stays valid until ``now`` + ``grace_s``),
        then, if ``side`` was plain before this switch and the grace window is still
        open, relayed as plain RTP; otherwise dropped and counted (``srtp_auth`` or
        ``srtp_replay``, and ``plain_after_grace`` if the packet looked like plain). A
        re-key does not reopen plain, and a replayed SRTP packet is never relayed as
        plain (its ciphertext would reach the phone as noise). Only an authenticated
        packet latches. The grace window is a deadline computed here, read against the
        clock only when a packet fails to authenticate.

        ``now`` is on the engine's clock (``time.monotonic``, which asyncio's
        ``loop.time()`` is on too); None reads that clock. ``srtcp``: protect and
        unprotect RTCP with ``context`` as well; otherwise RTCP stays in the clear."""
        ...

    def on_srtp_authenticated(self, side: Side, callback: SrtpCallback) -> None:
        """Call ``callback()`` once, the first time a packet from ``side`` authenticates
        under the key given last to :meth:`accept_srtp` / :meth:`switch_srtp` (the
        handshakes' ``srtp_authenticated``). Called from the packet handler; if that key
        already authenticated, it is called on the next loop iteration instead. Giving
        the side another key (or clearing it) forgets a callback that has not fired."""
        ...

    def clear_srtp(self, side: Side) -> None:
        """Back to plain RTP and RTCP both ways on ``side`` (a handshake fell back)."""
        ...

    def set_tx_ssrc(self, side: Side, ssrc: int | None) -> None:
        """Write ``ssrc`` into RTP sent toward ``side`` while it is SRTP (None: the
        sender's own). x-sipura announces the SSRC it will encrypt with."""
        ...

    def play_tone(self, side: Side, index: int, tone: Tone | None) -> None:
        """Mix ``tone`` into the audio of stream ``index`` sent toward ``side`` (G.711
        PT 0/8; other payload types are counted as ``tone_skipped``), starting with the
        next packet; a tone already playing there is replaced. None stops it."""
        ...

    def stats(self) -> dict[Side, list[StreamStats]]:
        """Counters per side, one :class:`StreamStats` per stream (a snapshot)."""
        ...

    def release(self) -> None:
        """End the session: its sockets are closed and their ports given back, or kept
        open in the engine's pool for a later call (the in-process relay pools them to
        spare call set-up; a pooled pair relays nothing until reallocated). Idempotent."""
        ...


class MediaEngine(Protocol):
    def allocate(self, call_id: str, streams: int) -> MediaSession:
        """Bind an RTP/RTCP port pair per side for each of ``streams`` streams; the ports
        are known (:meth:`MediaSession.local`) when it returns.

        ``call_id`` labels the session in logs and stats; it need not be unique (a call
        may spiral through the proxy twice with one Call-ID). Raises
        :class:`PortsExhausted` when the range has no pairs left (ports that another
        process holds are skipped) and gives back what it had bound.
        """
        ...

    def close_now(self) -> None:
        """Release every session (sockets close on the next loop iterations)."""
        ...

    async def close(self) -> None:
        """Release every session and wait until their sockets are closed."""
        ...
