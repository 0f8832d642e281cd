"""What the peer of an SRTP side may still send in the clear, and be relayed.

Profile §3: after its own switch-over a side still accepts the peer's plain RTP for a
grace window (the peer may switch a little later), and a side that accepts SRTP before
it sends it (the caller after its Caller Final) takes the peer's plain RTP meanwhile.
Taken literally, that relays *every* packet that fails authentication as audio: forged
SRTP and fuzz from anyone who can put packets on the latched address reach the phone.
The peer's genuine plain packets in that window are its plain stream going on, so a
packet that authenticated under no key is relayed as plain only if (checked in this
order, the first rule broken names the drop):

* P1 ``grace_not_rtp``: it is shaped like RTP (:func:`rtp_shaped`); for RTCP (SRTCP on),
  it is a valid compound packet (:func:`proxy.media.rtcp.valid_compound`);
* P2 ``grace_wrong_ssrc``: it carries the SSRC of the peer's last plain RTP packet
  relayed before the window opened (RTCP: as its first packet's sender SSRC);
* P3 ``grace_bad_sequence`` (RTP only): its sequence number is 1 to
  :data:`SEQ_AHEAD` ahead of the last plain packet taken from the peer (mod 2^16);
  each packet taken moves that mark on. Duplicates and late packets are dropped.

When the relay had taken no plain RTP from the peer before the window opened (the peer
started sending late, or its first packets were still queued behind the switch-over
command in a busy worker), there is nothing to continue: P2 and P3 are skipped for the
first RTP packet in the window that passes P1, and it becomes the reference (RTCP then
passes on P1 alone). An attacker gains nothing more from that than from the limit below:
it would have to send before the peer does.

The window itself closes at its deadline, or as soon as a packet from that side
authenticates under its current key: the peer has switched, so nothing it sends in the
clear from then on is genuine (:meth:`RelaySession.authenticated
<proxy.media.relay_session.RelaySession.authenticated>`). These rules run only for a
packet that failed to authenticate while the window is open: never on the success path.

What they cannot do: someone who sees the peer's plain stream (it was in the clear) can
forge its SSRC and next sequence numbers until the peer's first SRTP packet arrives;
that window is the time the peer takes to switch, not the 2 s of the grace.
"""

from __future__ import annotations

from typing import Final

from proxy.media.rtcp import valid_compound

__all__ = ["SEQ_AHEAD", "plain_reference", "refuse_plain_rtcp", "refuse_plain_rtp", "rtp_shaped"]

SEQ_AHEAD: Final = 32
"""How far ahead of the last plain packet taken the next may be (rule P3): 32 packets
lost in a row (0.64 s of 20 ms packets) and the stream is still the peer's."""


def rtp_shaped(data: bytes) -> bool:
    """Rule P1: version 2; a payload type outside 72-76 (those collide with RTCP, RFC
    5761 §4); the header with its CSRCs and extension fits in the packet; and, if the
    padding bit is set, a padding count from 1 up to what follows the header."""
    size = len(data)
    if size < 12:
        return False
    first = data[0]
    if first >> 6 != 2 or 72 <= data[1] & 0x7F <= 76:
        return False
    end = 12 + 4 * (first & 0x0F)
    if first & 0x10:
        if size < end + 4:
            return False
        end += 4 + 4 * ((data[end + 2] << 8) | data[end + 3])
    if end > size:
        return False
    return not first & 0x20 or 0 < data[-1] <= size - end


def plain_reference(packet: bytes | None) -> tuple[int, int]:
    """(SSRC, sequence number) of the peer's last plain RTP packet, the reference of
    rules P2 and P3; (-1, -1) when there is none or it is not shaped like RTP."""
    if packet is None or not rtp_shaped(packet):
        return -1, -1
    return int.from_bytes(packet[8:12], "big"), (packet[2] << 8) | packet[3]


def refuse_plain_rtp(data: bytes, ssrc: int, seq: int) -> str | None:
    """Rules P1-P3 for RTP against the reference (``ssrc``, ``seq``; -1: none, only P1
    applies): the drop reason, or None when the packet is the peer's plain stream going
    on (then it is the new reference: :func:`plain_reference`)."""
    if not rtp_shaped(data):
        return "grace_not_rtp"
    if ssrc < 0:
        return None
    if int.from_bytes(data[8:12], "big") != ssrc:
        return "grace_wrong_ssrc"
    if not 1 <= (((data[2] << 8) | data[3]) - seq) & 0xFFFF <= SEQ_AHEAD:
        return "grace_bad_sequence"
    return None


def refuse_plain_rtcp(data: bytes, ssrc: int) -> str | None:
    """Rules P1-P2 for RTCP (SRTCP on; ``ssrc`` -1: only P1): the drop reason, or None."""
    if not valid_compound(data):
        return "grace_not_rtp"
    if ssrc >= 0 and int.from_bytes(data[4:8], "big") != ssrc:
        return "grace_wrong_ssrc"
    return None
