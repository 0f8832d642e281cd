"""One side of one relayed stream: its sockets, its peer, its SRTP keys, its counters.

A :class:`RelayLeg` is the state the per-packet handlers (:mod:`proxy.media.relay_packets`)
read and bump: plain slotted attributes, no dict, no property, so a packet costs
attribute reads. What is not on the success path of a packet lives here as methods:
latching, the renumbering of RTP protected toward an SRTP side, and the failure path of
a packet that did not authenticate (previous key, grace window, counters that explain a
drop).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.media.engine import DROP_REASONS, Side, StreamStats
from proxy.media.grace import plain_reference, refuse_plain_rtcp, refuse_plain_rtp
from proxy.media.srtp import SrtpContext, SrtpError, SrtpReplayError
from proxy.media.tones import ToneMixer
from proxy.ratelimit import LogLimiter

if TYPE_CHECKING:
    from proxy.media.relay_packets import RelaySocket

__all__ = [
    "Clock",
    "RelayLeg",
    "SendTo",
    "SockAddr",
    "flush_noise",
    "leg_stats",
    "log_refused",
    "log_wrong_source",
    "plain_rtcp",
    "plain_rtp",
    "refuse",
]

log = logging.getLogger("sipura.media")

_noise = LogLimiter(log)
"""Wrong-source drops, one line per source address per 10 s with the count held back:
a spoofing flood costs a few lines (bounded keys, :mod:`proxy.ratelimit`)."""


_WHY: dict[str, str] = {
    "grace_not_rtp": "not shaped like RTP/RTCP, in the window for the peer's plain packets",
    "grace_wrong_ssrc": "not the peer's SSRC, in the window for its plain packets",
    "grace_bad_sequence": "not the peer's next sequence numbers, in the window for its "
    "plain packets",
    "rtcp_invalid": "not a valid compound RTCP packet",
}
"""The log text of each refusal :meth:`RelayLeg.refused` counts."""


def flush_noise(now: float) -> None:
    """Log the counts of wrong-source windows that closed with nothing after them (the
    worker process calls it from its flush timer)."""
    _noise.flush(now)


SockAddr = tuple[Any, ...]
"""A socket address as the event loop reports it: (host, port) or (host, port, flow,
scope). Not :class:`proxy.sip.transaction.Address`, which is a SIP flow."""

SendTo = Callable[[bytes, SockAddr], object]
"""A transport's or a bare socket's ``sendto``."""

Clock = Callable[[], float]
"""Seconds on a monotonic scale; read only on a switch-over and when a packet fails to
authenticate."""

_REORDER_WINDOW = 100
"""A sequence number at most this far behind the last one protected is a late packet of
the same stream (libsrtp's replay window is 128); further behind: a new stream."""
_MAX_SEQ_JUMP = 1000
"""A jump ahead larger than this (20 s of 20 ms packets lost in a row) is a new stream."""


def refuse(data: bytes, addr: SockAddr) -> None:
    """Stand-in ``sendto`` while a transport's buffer is over its high-water mark (or the
    socket is gone), so a stalled socket drops (and counts) packets instead of queueing
    them without bound."""
    raise BlockingIOError(errno.EAGAIN, "send buffer full")


class RelayLeg:
    """One side of one stream: its sockets, its peer, its keys and its counters.

    Every leg of a side shares that side's keys (one :class:`SrtpContext` per key: the
    streams' SSRCs differ, so libsrtp keeps them apart)."""

    __slots__ = (
        "alive",
        "alt_until",
        "bytes_in",
        "bytes_out",
        "clock",
        "expected_ip",
        "family",
        "grace_bad_sequence",
        "grace_not_rtp",
        "grace_seq",
        "grace_ssrc",
        "grace_wrong_ssrc",
        "hold",
        "index",
        "ip",
        "latch_any",
        "mux",
        "no_destination",
        "packets_decrypted",
        "packets_encrypted",
        "packets_in",
        "packets_out",
        "plain_accepted",
        "plain_after_grace",
        "plain_last",
        "plain_until",
        "port",
        "relatched",
        "rtcp_dest",
        "rtcp_invalid",
        "rtcp_packets_in",
        "rtcp_packets_out",
        "rtcp_peer",
        "rtcp_rx",
        "rtcp_send",
        "rtcp_stripped",
        "rtcp_tx",
        "rtp",
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
        self.sockets: tuple[RelaySocket, ...] = ()
        """The RTP and the RTCP socket, once bound."""
        self.alive = 0
        """Sockets of the pair still open: the port goes back to the pool at 0."""
        self.rtp_send: SendTo = refuse
        self.rtcp_send: SendTo = refuse
        self.stale: tuple[tuple[Any, Any], ...] = ()
        """(ip, port) where the previous call on this pair had its peer: no source to
        latch before ``stale_until`` (a reused pair)."""
        self.stale_until = -math.inf
        self.expected_ip: str | None = None
        """The SDP's IP: the only source allowed to latch. None: accept nothing yet."""
        self.latch_any = False
        """NAT (``SetRemote.latch == "any"``): the first source from anywhere latches."""
        self.rtp = True
        """An RTP stream; False: UDPTL or another datagram protocol, relayed as it is
        (never SRTP-processed, renumbered or mixed with a tone)."""
        self.rtp_peer: SockAddr | None = None
        """Latched RTP source; None until latched."""
        self.rtcp_peer: SockAddr | None = None
        self.rtp_dest: SockAddr | None = None
        """Where packets toward this side go; None: nowhere (hold, unknown)."""
        self.rtcp_dest: SockAddr | None = None
        self.sdp_rtp: SockAddr | None = None
        self.sdp_rtcp: SockAddr | None = None
        self.hold = False
        self.mux = False
        self.clock = clock
        self.tx: SrtpContext | None = None
        """Protects RTP sent toward this side; None: plain."""
        self.tx_ssrc: bytes | None = None
        """SSRC written into RTP sent toward this side while it is SRTP (x-sipura
        announces the SSRC it encrypts with; the phone's own may change mid-call)."""
        self.seq_source = b""
        """The SSRC of the stream whose packets are numbered on with ``seq_offset``."""
        self.seq_offset = 0
        """Added to the sequence number of RTP protected toward this side (mod 2^16)."""
        self.seq_last = -1
        """Highest sequence number protected toward this side; -1: none yet."""
        self.rtcp_tx: SrtpContext | None = None
        """Protects RTCP sent toward this side (SRTCP on); None: plain."""
        self.rx: SrtpContext | None = None
        """Tried first on RTP from this side; None: the side sends plain, take it as is."""
        self.rtcp_rx: SrtpContext | None = None
        self.rx_alt: SrtpContext | None = None
        """The previous key, tried second until ``alt_until`` (a re-key)."""
        self.alt_until = -math.inf
        self.plain_until = -math.inf
        """Until then a packet that authenticates under no key may be relayed as plain,
        if it is the peer's plain stream going on (:mod:`proxy.media.grace`)."""
        self.plain_last: bytes | None = None
        """The last RTP packet relayed from this side while it had no receive key: where
        the reference of the plain window comes from when it opens."""
        self.grace_ssrc = -1
        """The SSRC plain RTP must carry while the plain window is open; -1: none."""
        self.grace_seq = -1
        """Sequence number of the last plain packet taken (or of the reference)."""
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
        self.relatched = 0
        self.grace_not_rtp = 0
        self.grace_wrong_ssrc = 0
        self.grace_bad_sequence = 0
        self.rtcp_invalid = 0
        self.rtcp_stripped = 0

    def adopt(self, old: RelayLeg) -> None:
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
        old.rtp_send = old.rtcp_send = refuse
        for sock in self.sockets:
            sock.a = self

    def open_plain(self, until: float) -> None:
        """Plain packets from this side may be relayed until ``until`` (if they pass the
        rules of :mod:`proxy.media.grace`). The reference is taken from the last plain
        packet when the side had no receive key yet; otherwise the window already open
        (accepting before the switch-over) keeps the reference it has."""
        if self.rx is None:
            self.grace_ssrc, self.grace_seq = plain_reference(self.plain_last)
        self.plain_until = until

    def dropped_wrong_source(self, addr: SockAddr, what: str) -> None:
        """A packet from an address that is not this leg's peer was dropped: counted,
        and logged (rate-limited) once the leg knows its peer's IP. Before that (the SDP
        not seen yet, or a pooled pair) a packet is the ordinary race with signalling,
        only counted."""
        self.wrong_source += 1
        log_wrong_source(self, addr, what)

    def refused(self, reason: str) -> None:
        """A packet from this side was dropped for ``reason`` (a plain-window rule,
        invalid RTCP): counted, and logged, rate-limited per reason and peer IP."""
        setattr(self, reason, getattr(self, reason) + 1)
        log_refused(self, reason)

    def stale_source(self, addr: SockAddr) -> bool:
        """``addr`` is where the previous call on this pair had its peer, and that call
        ended too recently: its late packets must not latch into this one."""
        if (addr[0], addr[1]) not in self.stale:
            return False
        if self.clock() < self.stale_until:
            return True
        self.stale = ()
        return False

    def latch_rtp(self, addr: SockAddr) -> None:
        """``addr`` becomes the peer: the first source to latch, or the SDP's exact
        address taking over from another source (counted)."""
        if self.rtp_peer is not None:
            self.relatched += 1
        self.rtp_peer = addr
        if not self.hold:
            self.rtp_dest = addr

    def latch_rtcp(self, addr: SockAddr) -> None:
        if self.rtcp_peer is not None:
            self.relatched += 1
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

    def renumber(self, data: bytes) -> bytes:
        """``data``, numbered on by :meth:`number_on`, was refused by libsrtp as an index
        already sent: the phone restarted its stream a little behind its last number
        under the same SSRC (some phones do on resume, and a test phone that stops and
        starts its sender does), which :meth:`number_on` took for reordering; passed on,
        every packet would be refused until the phone's numbers caught up (up to
        ``_REORDER_WINDOW`` packets: two seconds of silence one way). This packet and the
        ones after it continue at the last number + 1. A true duplicate is then sent once
        more under a new number, which the far end's jitter buffer drops by timestamp."""
        out = (data[2] << 8) | data[3]
        seq = (out - self.seq_offset) & 0xFFFF
        fresh = (self.seq_last + 1) & 0xFFFF
        self.seq_offset = (fresh - seq) & 0xFFFF
        self.seq_last = fresh
        return data[:2] + fresh.to_bytes(2, "big") + data[4:]

    def stats(self) -> StreamStats:
        return leg_stats(self)

    def unauthenticated(
        self, data: bytes, error: SrtpError, rtcp: bool
    ) -> tuple[bytes, bool] | None:
        """The failure path of a packet from this side that did not unprotect under
        ``rx`` (``error``): (packet to relay, authenticated?) or None to drop it.

        Tries the previous key while it is valid, then takes the packet as plain while
        that is allowed and it is the peer's plain stream going on (rules P1-P3 of
        :mod:`proxy.media.grace`, each refusal counted by its reason). A replayed packet
        is dropped even then: it is a duplicate of SRTP already relayed, and its
        ciphertext must not reach the phone as audio."""
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
            if rtcp:
                refusal = refuse_plain_rtcp(data, self.grace_ssrc)
            else:
                refusal = refuse_plain_rtp(data, self.grace_ssrc, self.grace_seq)
            if refusal is not None:
                self.refused(refusal)
                return None
            if not rtcp:  # the reference moves on (or is set, if there was none)
                self.grace_ssrc, self.grace_seq = plain_reference(data)
            self.plain_accepted += 1
            return data, False
        self.srtp_auth += 1
        if plain_rtcp(data) if rtcp else plain_rtp(data):
            self.plain_after_grace += 1
        return None


def log_wrong_source(leg: RelayLeg, addr: SockAddr, what: str) -> None:
    """Log (rate-limited) a packet from ``addr`` that ``leg`` dropped as not from its peer,
    once the leg knows its peer's IP. Shared by both packet paths (the compiled one calls it
    through its leg's ``log_wrong_source``)."""
    expected = leg.expected_ip
    if expected is None:
        return
    peer = leg.rtp_peer if what == "RTP" else leg.rtcp_peer
    _noise.log(logging.INFO, "wrong-source media", str(addr[0]), leg.clock(),
               "media: %s from %s:%s dropped on the %s port %d: not the peer (%s)", what,
               addr[0], addr[1], leg.side, leg.port,
               f"latched {peer[0]}:{peer[1]}" if peer else f"expected {expected}")  # fmt: skip


def log_refused(leg: RelayLeg, reason: str) -> None:
    """Log (rate-limited per reason and peer IP) a packet ``leg`` refused for ``reason``."""
    peer = str(leg.expected_ip)
    _noise.log(logging.INFO, reason, peer, leg.clock(),
               "media: packet from the %s peer %s dropped on port %d: %s (%s)",
               leg.side, peer, leg.port, _WHY[reason], reason)  # fmt: skip


def leg_stats(leg: RelayLeg) -> StreamStats:
    """A leg's counters as :class:`StreamStats` (either packet path's leg)."""
    return StreamStats(
        packets_in=leg.packets_in,
        bytes_in=leg.bytes_in,
        packets_out=leg.packets_out,
        bytes_out=leg.bytes_out,
        rtcp_packets_in=leg.rtcp_packets_in,
        rtcp_packets_out=leg.rtcp_packets_out,
        packets_encrypted=leg.packets_encrypted,
        packets_decrypted=leg.packets_decrypted,
        plain_accepted=leg.plain_accepted,
        plain_after_grace=leg.plain_after_grace,
        tone_packets=leg.tone_packets,
        tone_skipped=leg.tone_skipped,
        relatched=leg.relatched,
        grace_ssrc=leg.grace_ssrc,
        grace_seq=leg.grace_seq,
        drops={reason: getattr(leg, reason) for reason in DROP_REASONS},
    )


def plain_rtp(data: bytes) -> bool:
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


def plain_rtcp(data: bytes) -> bool:
    """A compound RTCP packet whose length fields add up to exactly ``len(data)``: SRTCP
    has 14 bytes more (E flag and index, authentication tag)."""
    size, pos = len(data), 0
    while pos + 4 <= size:
        if data[pos] >> 6 != 2 or not 192 <= data[pos + 1] <= 223:
            return False
        pos += 4 + 4 * int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos == size > 0
