"""Compound RTCP: what the relay takes on an RTCP port, and what it sends in the clear
toward a side whose RTP is SRTP.

Why a relay checks RTCP at all: an RTCP port relays whatever arrives on it, and with
SRTCP off (x-sipura's default, profile §3) it relays it in the clear. Anything sent to
the inside RTCP port of a secured call (a phone's misdirected RTP, an attacker's data)
would leave the proxy unencrypted on the leg that is supposed to be protected. So:

Rule C1, validity (RFC 3550 §6.1 and the checks of its appendix A.2), on every datagram
taken as RTCP (on an RTCP port, or RTCP on a muxed RTP port), after SRTCP unprotect when
SRTCP is on: :func:`valid_compound`. Anything else is dropped (``rtcp_invalid``).

* every packet of the compound has version 2 and a payload type in the RTCP range
  192-223 (RFC 5761 §4);
* the first packet, with its padding bit clear, is an SR (200) or an RR (201), as
  RFC 3550 wants, or another of the types 202-207 (SDES, BYE, APP, RTPFB, PSFB, XR):
  reduced-size RTCP (RFC 5506) starts with whatever it carries, and real stacks send
  an APP keep-alive alone or a BYE first (baresip does both);
* only the last packet may be padded, and its padding count (the last octet) is a
  non-zero multiple of 4 (RFC 3550 §6.4.1) that fits in the packet;
* each packet's length field fits in the datagram, and the lengths add up to exactly
  the datagram's size;
* the five known types are at least as long as their counts say: SR 6 + 6·RC words
  after the header, RR 1 + 6·RC, SDES 2·SC (a chunk is at least its SSRC and one
  terminating word), BYE SC, APP 2 (SSRC and name).

The first-packet rule and the exact framing are what tell RTP apart: an RTP packet's
second byte is its payload type (200-207 only with the marker bit and a type 72-79,
from the range 64-95 that RFC 5761 §4 tells RTP to avoid), and its sequence number
would have to be the length of a packet whose framing ends exactly at the datagram's
end.

Rule C2, toward a side whose RTP is SRTP while its RTCP is in the clear (SRTCP off):
:func:`clear_compound`. Only SR, RR, SDES and BYE leave: APP and every other type
(feedback, XR, unknown) are left out, SR and RR lose their profile-specific extensions,
and padding is removed; each removal is counted (``rtcp_stripped``), and a datagram with
nothing left is not sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = [
    "APP",
    "BYE",
    "CLEAR_TYPES",
    "FIRST_TYPES",
    "RR",
    "SDES",
    "SR",
    "clear_compound",
    "valid_compound",
]

SR: Final = 200
RR: Final = 201
SDES: Final = 202
BYE: Final = 203
APP: Final = 204

CLEAR_TYPES: Final = frozenset((SR, RR, SDES, BYE))
"""What goes in the clear toward a side whose RTP is SRTP (rule C2)."""
FIRST_TYPES: Final = frozenset(range(SR, 208))
"""What the first packet of a datagram may be (rule C1): SR, RR, SDES, BYE, APP, RTPFB,
PSFB, XR."""

_MIN_WORDS: Final[dict[int, Callable[[int], int]]] = {
    SR: lambda count: 6 + 6 * count,
    RR: lambda count: 1 + 6 * count,
    SDES: lambda count: 2 * count,
    BYE: lambda count: count,
    APP: lambda count: 2,
}
"""The smallest length field (32-bit words after the header word) of each known type,
from its count field (RC / SC / subtype)."""


def valid_compound(data: bytes) -> bool:
    """Rule C1 (see the module docstring): a valid compound RTCP packet."""
    size = len(data)
    if size < 4 or data[0] & 0xE0 != 0x80 or data[1] not in FIRST_TYPES:
        return False
    pos = 0
    while pos < size:
        if size - pos < 4:
            return False
        first, kind = data[pos], data[pos + 1]
        words = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 4 + 4 * words
        if first >> 6 != 2 or not 192 <= kind <= 223 or end > size:
            return False
        minimal = _MIN_WORDS.get(kind)
        used = 0 if minimal is None else 4 * minimal(first & 0x1F)
        if first & 0x20:
            pad = data[end - 1] if end > pos + 4 else 0
            if end != size or pad == 0 or pad % 4 or used + pad > 4 * words:
                return False
        elif used > 4 * words:
            return False
        pos = end
    return True


def clear_compound(data: bytes) -> tuple[bytes, int]:
    """Rule C2 on a valid compound (rule C1 already passed): (what may leave in the
    clear, how many packets or parts of packets were left out). The packet itself when
    nothing is left out; empty when nothing is left."""
    parts: list[bytes] = []
    stripped = 0
    pos, size = 0, len(data)
    while pos < size:
        first, kind = data[pos], data[pos + 1]
        words = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 4 + 4 * words
        if kind not in CLEAR_TYPES:
            stripped += 1
        else:
            if kind in (SR, RR):  # the report blocks, not the profile extension
                body = 4 * _MIN_WORDS[kind](first & 0x1F)
            else:
                body = 4 * words - (data[end - 1] if first & 0x20 else 0)
            if body == 4 * words and not first & 0x20:
                parts.append(data[pos:end])
            else:
                stripped += 1
                header = bytes((first & 0xDF, kind)) + (body // 4).to_bytes(2, "big")
                parts.append(header + data[pos + 4 : pos + 4 + body])
        pos = end
    if not stripped:
        return data, 0
    return b"".join(parts), stripped
