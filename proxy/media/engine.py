"""The media engine interface: what the B2BUA asks of whatever relays the media.

The B2BUA anchors media: each leg of a call sends RTP/RTCP to ports of the proxy, and the
engine relays between them. The B2BUA only ever talks to these two protocols, which two
engines implement: the in-process asyncio relay (:class:`proxy.media.relay.RelayEngine`)
and the pool of media worker processes (:class:`proxy.media.worker_pool.WorkerPool`),
each running that relay. That constrains the interface: allocation is synchronous (the
SDP must name bound ports, so the sans-IO core allocates while handling an INVITE),
and everything else is a command value (:mod:`proxy.media.commands`) given to
:meth:`MediaEngine.apply`, never a socket, a transport or a libsrtp context, so a
worker pool can send it to another process as-is. What the engine has to say comes back
as event values through :attr:`MediaEngine.on_event`.

Vocabulary: a *session* is one call's media; it has ``streams`` streams (one per ``m=``
line, in order); each stream has two *sides*, the phone side (:attr:`Side.INSIDE`) and
the PBX/ITSP/remote-SPA side (:attr:`Side.OUTSIDE`), each with an RTP and an RTCP port
on the proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from proxy.media.ports import PortsExhausted

if TYPE_CHECKING:  # commands.py imports Side from here
    from proxy.media.commands import MediaCommand, MediaEvent

__all__ = [
    "DROP_REASONS",
    "FAST_PATH_MODES",
    "MediaEngine",
    "MediaSession",
    "PortsExhausted",
    "Side",
    "StreamStats",
    "check_remote",
]


class Side(StrEnum):
    INSIDE = "inside"
    """Toward the legacy phones."""
    OUTSIDE = "outside"
    """Toward the PBX / ITSP / remote SPA: the leg that becomes SRTP."""

    @property
    def other(self) -> Side:
        return Side.OUTSIDE if self is Side.INSIDE else Side.INSIDE


FAST_PATH_MODES = ("auto", "on", "off")
"""``[media] fast_path``: the compiled packet path where it was built, always (or an
error), never (:mod:`proxy.media.packet_path`)."""

DROP_REASONS = (
    "wrong_source",
    "no_destination",
    "srtp_auth",
    "srtp_replay",
    "srtp_protect",
    "send_error",
    "grace_not_rtp",
    "grace_wrong_ssrc",
    "grace_bad_sequence",
    "rtcp_invalid",
    "rtcp_stripped",
)
"""Why the relay dropped a packet. A drop is counted on the side where it happened:
``wrong_source``, ``srtp_auth``, ``srtp_replay``, the ``grace_*`` reasons and
``rtcp_invalid`` on the side the packet arrived from; ``no_destination``,
``srtp_protect``, ``send_error`` and ``rtcp_stripped`` on the side it was going to.

* ``grace_not_rtp``, ``grace_wrong_ssrc``, ``grace_bad_sequence``: a packet from an SRTP
  side that authenticated under no key while plain was still allowed (accepting before
  the switch-over, or the grace window after it), and that is not the peer's plain
  stream going on: not shaped like RTP (or, for RTCP, not a valid compound packet),
  another SSRC than the peer's last plain packet before the window opened, or a
  sequence number that does not continue the peer's (see :mod:`proxy.media.grace`);
* ``rtcp_invalid``: a datagram on an RTCP port (or RTCP on a muxed RTP port) that is not
  a valid compound RTCP packet (RFC 3550 §6.1, appendix A.2; :mod:`proxy.media.rtcp`);
* ``rtcp_stripped``: per RTCP packet of a compound (or the profile extension or padding
  of one) left out toward a side whose RTP is SRTP while its RTCP is in the clear: only
  SR, RR, SDES and BYE go there."""


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
    relatched: int
    """Times the exact address and port of this side's SDP took the latch over from
    another source (another port of the same IP, or any address with ``latch="any"``)."""
    grace_ssrc: int
    """The SSRC plain RTP from this side must carry while plain is allowed on an SRTP
    side (the peer's last plain packet before the window opened); -1: none known yet
    (the first plain packet in the window will set it)."""
    grace_seq: int
    """The sequence number of the last plain packet from this side in that window (or
    before it opened): the next one must follow it closely; -1: none."""
    drops: dict[str, int]


class MediaSession(Protocol):
    """One call's media, as allocated by :meth:`MediaEngine.allocate`. Everything it does
    is asked of its engine with a command naming :attr:`id`."""

    @property
    def id(self) -> int:
        """Assigned by the engine, unique among its sessions: what commands name."""
        ...

    @property
    def call_id(self) -> str: ...

    @property
    def streams(self) -> int: ...

    def local(self, side: Side, index: int) -> tuple[str, int]:
        """The proxy's (ip, rtp_port) for ``side`` of stream ``index``: what goes into the
        SDP sent to that side. RTCP is rtp_port + 1."""
        ...

    def stats(self) -> dict[Side, list[StreamStats]]:
        """Counters per side, one :class:`StreamStats` per stream (a snapshot)."""
        ...


class MediaEngine(Protocol):
    reports_flowing: bool
    """True when the engine reports each session's first packet per side as a
    :class:`~proxy.media.commands.MediaFlowing` event; otherwise whoever waits for
    media reads :meth:`MediaSession.stats` again from time to time."""
    reports_final: bool
    """True when a released session's final counters come later, as one
    :class:`~proxy.media.commands.MediaReleased` event per released session (counters
    kept in another process); otherwise :meth:`MediaSession.stats` read just before the
    ``Release`` is final."""

    on_event: Callable[[MediaEvent], None] | None
    """Set by the I/O edge: called with every event the engine reports, from the event
    loop (a packet handler, a channel reader or a callback), never from inside
    :meth:`apply`; the edge hands the event to the core on a later loop iteration."""

    def allocate(self, call_id: str, streams: int) -> MediaSession:
        """Bind an RTP/RTCP port pair per side for each of ``streams`` streams; the ports
        are known (:meth:`MediaSession.local`) when it returns.

        ``call_id`` labels the session in logs and stats; it need not be unique (a call
        may spiral through the proxy twice with one Call-ID). Raises
        :class:`PortsExhausted` when the range has no pairs left (ports that another
        process holds are skipped) and gives back what it had bound.
        """
        ...

    def apply(self, command: MediaCommand) -> None:
        """Carry out ``command`` (see :mod:`proxy.media.commands` for what each does):
        one handler per command type, looked up in a table. A command for a session that
        was released (or lost) is ignored. Raises ``ValueError`` / ``IndexError`` for a
        command the session cannot take (the commands say which)."""
        ...

    def close_now(self) -> None:
        """Release every session (sockets close on the next loop iterations)."""
        ...

    async def close(self) -> None:
        """Release every session and wait until their sockets are closed."""
        ...

    @property
    def sessions(self) -> int:
        """Sessions allocated and not released (``/status``)."""
        ...

    @property
    def pooled(self) -> int:
        """Released port pairs kept open for reuse (``/status``)."""
        ...

    def pooled_ports(self) -> list[int]:
        """The RTP ports of the pooled pairs (``/status``)."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """Per media worker process: index, pid, alive, sessions, ports, restarts,
        packet path (``/status``); empty when the relay runs in this process."""
        ...

    @property
    def packet_path(self) -> str:
        """Who relays the packets: ``"fast"`` (the compiled path) or ``"python"``
        (``/status``; :mod:`proxy.media.packet_path`)."""
        ...


def check_remote(
    local_ip: str, ip: str, rtp_port: int, rtcp_port: int
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A peer's media address as a :class:`~proxy.media.commands.SetRemote` gives it,
    checked against the local address it is to be reached from: ports in range, same
    address family. Raises ``ValueError``. Both engines check it when the command is
    applied, so the core learns of a bad address at once, wherever the relay runs."""
    for port, what in ((rtp_port, "rtp_port"), (rtcp_port, "rtcp_port")):
        if not 0 <= port <= 65535:
            raise ValueError(f"{what} out of range: {port}")
    address = ipaddress.ip_address(ip)
    if address.version != ipaddress.ip_address(local_ip).version:
        raise ValueError(f"{ip} is not of the address family of {local_ip}")
    return address
