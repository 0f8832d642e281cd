"""The relay's packet rules as pure functions: RTCP validity and what may leave in the
clear toward a secured side (proxy.media.rtcp), what plain RTP is taken while an SRTP
side's plain window is open (proxy.media.grace).

These are the rules a compiled per-packet path must reproduce exactly; the relay tests
(test_relay.py) check that the relay applies them, with real sockets.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.media.grace import (
    SEQ_AHEAD,
    plain_reference,
    refuse_plain_rtcp,
    refuse_plain_rtp,
    rtp_shaped,
)
from proxy.media.rtcp import APP, BYE, RR, SDES, SR, clear_compound, valid_compound

SSRC = 0x11223344


def packet(kind: int, body: bytes, count: int = 0, pad: int = 0) -> bytes:
    """One RTCP packet: header (version 2, ``count``, padding bit if ``pad``), ``body``,
    then ``pad`` bytes of padding whose last octet is the count."""
    padding = b"" if not pad else bytes(pad - 1) + bytes((pad,))
    size = len(body) + len(padding)
    assert size % 4 == 0
    first = 0x80 | (0x20 if pad else 0) | count
    return struct.pack("!BBH", first, kind, size // 4) + body + padding


def sr(reports: int = 0, extension: bytes = b"", pad: int = 0) -> bytes:
    info = struct.pack("!IIIII", 1, 2, 3, 4, 5)
    blocks = bytes(range(24)) * reports
    return packet(SR, struct.pack("!I", SSRC) + info + blocks + extension, reports, pad)


def rr(reports: int = 0, extension: bytes = b"", pad: int = 0) -> bytes:
    return packet(RR, struct.pack("!I", SSRC) + bytes(24) * reports + extension, reports, pad)


def sdes(pad: int = 0) -> bytes:
    chunk = struct.pack("!I", SSRC) + b"\x01\x05phone" + b"\x00"  # CNAME, end: 12 bytes
    return packet(SDES, chunk, 1, pad)


def bye(reason: bytes = b"") -> bytes:
    text = bytes((len(reason),)) + reason if reason else b""
    text += bytes(-len(text) % 4)
    return packet(BYE, struct.pack("!I", SSRC) + text, 1)


def app(data: bytes = b"LEAK" * 10) -> bytes:
    return packet(APP, struct.pack("!I", SSRC) + b"name" + data, 0)


def rtp(seq: int, ssrc: int = SSRC, payload: bytes = b"\xd5" * 160, first: int = 0x80,
        pt: int = 0) -> bytes:  # fmt: skip
    return struct.pack("!BBHII", first, pt, seq & 0xFFFF, seq * 160, ssrc) + payload


# --------------------------------------------------------------------------- RTCP rule C1

VALID = {
    "SR": sr(),
    "RR": rr(),
    "SR with 2 reports": sr(2),
    "SR + SDES": sr() + sdes(),
    "RR + SDES + BYE": rr(1) + sdes() + bye(b"bye"),
    "SR + APP": sr() + app(),
    "SR + feedback (205)": sr() + packet(205, bytes(8), 1),
    "SR + SDES padded (last)": sr() + sdes(pad=4),
    "SR with a profile extension": sr(1, extension=bytes(8)),
    "RR, no reports": struct.pack("!BBHI", 0x80, RR, 1, SSRC),
    # Reduced-size RTCP (RFC 5506) and what real stacks send (baresip, verbatim):
    "APP keep-alive alone": bytes.fromhex("80cc00031882941b50494e47504f4e47"),
    "BYE first, then SDES": bytes.fromhex(
        "81cb00031882941b0441646a6f00000081ca00071882941b01127369703a31303031403132372e"
        "302e302e3100000000"
    ),
    "PLI alone (PSFB)": packet(206, struct.pack("!II", SSRC, 7), 1),
    "BYE, no sources": packet(BYE, b""),
}

INVALID = {
    "empty": b"",
    "too short": sr()[:6],
    "RTP": rtp(1),
    "RTP with marker, PT 72 (looks like SR)": rtp(1, pt=0xC8)[:28],
    "FIR (192) first": packet(192, bytes(4)) + sr(),
    "PT 208 first": packet(208, bytes(4)),
    "version 1": bytes((0x40,)) + sr()[1:],
    "second packet version 0": sr() + bytes((0x01,)) + sdes()[1:],
    "padding on the first packet": sr(pad=4),
    "padding not on the last": sr() + sdes(pad=4) + bye(),
    "length beyond the datagram": sr()[:2] + struct.pack("!H", 7) + sr()[4:],
    "length short of the datagram": sr() + b"\x00\x00\x00\x00",
    "trailing bytes": sr() + b"\x80",
    "SRTCP trailer": sr() + b"\x80\x00\x00\x01" + bytes(10),
    "PT outside 192-223": sr() + packet(100, bytes(4)),
    "SR shorter than its reports": packet(SR, struct.pack("!I", SSRC) + bytes(20), 2),
    "RR shorter than its reports": packet(RR, struct.pack("!I", SSRC), 1),
    "BYE shorter than its sources": sr() + packet(BYE, struct.pack("!I", SSRC), 3),
    "SDES shorter than its chunks": sr() + packet(SDES, bytes(8), 2),
    "APP without a name": sr() + packet(APP, struct.pack("!I", SSRC), 0),
    "padding larger than the packet": sr() + struct.pack("!BBH", 0xA0, BYE, 1) + b"\0\0\0\x08",
    "padding into the fixed part": sr() + struct.pack("!BBH", 0xA1, BYE, 1) + b"\0\0\0\x04",
}


@pytest.mark.parametrize("name", VALID)
def test_valid_compound_packets(name: str) -> None:
    assert valid_compound(VALID[name])


@pytest.mark.parametrize("name", INVALID)
def test_invalid_compound_packets(name: str) -> None:
    assert not valid_compound(INVALID[name])


def test_padding_count_must_be_a_multiple_of_four() -> None:
    good = sr() + sdes(pad=8)
    assert valid_compound(good)
    bad = good[:-1] + b"\x06"  # 6 padding octets: not a multiple of 4
    assert not valid_compound(bad)
    zero = good[:-1] + b"\x00"
    assert not valid_compound(zero)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_and_rtp_never_passes(data: bytes) -> None:
    valid = valid_compound(data)
    if valid:  # whatever passes is RTCP-framed: version 2, 32-bit sized, known first type
        assert 200 <= data[1] <= 207 and data[0] >> 6 == 2 and len(data) % 4 == 0
        kept, _ = clear_compound(data)
        assert kept == b"" or valid_compound(kept)
        assert kept == b"" or {kept[1]} <= {SR, RR, SDES, BYE}


# --------------------------------------------------------------------------- RTCP rule C2


def test_clear_compound_keeps_sr_rr_sdes_bye_as_they_are() -> None:
    for data in (sr(), rr(2) + sdes(), sr(1) + sdes() + bye(b"hung up")):
        assert clear_compound(data) == (data, 0)
        assert clear_compound(data)[0] is data


def test_clear_compound_strips_app_feedback_and_unknown_types() -> None:
    data = sr() + app() + sdes() + packet(206, bytes(8), 1) + packet(210, bytes(4)) + bye()
    kept, stripped = clear_compound(data)
    assert (kept, stripped) == (sr() + sdes() + bye(), 3)
    assert valid_compound(kept)


def test_clear_compound_leaves_nothing_of_an_app_keep_alive() -> None:
    assert clear_compound(app()) == (b"", 1)
    assert clear_compound(bye(b"bye") + sdes() + app()) == (bye(b"bye") + sdes(), 1)


def test_clear_compound_cuts_profile_extensions_and_padding() -> None:
    kept, stripped = clear_compound(sr(1, extension=b"SECRET!!") + rr(extension=b"more"))
    assert (kept, stripped) == (sr(1) + rr(), 2)
    kept, stripped = clear_compound(sr() + sdes(pad=8))
    assert (kept, stripped) == (sr() + sdes(), 1)
    kept, stripped = clear_compound(sr() + rr(1, pad=12))
    assert (kept, stripped) == (sr() + rr(1), 1)
    assert valid_compound(kept)


# --------------------------------------------------------------------------- grace P1-P3


def test_rtp_shape() -> None:
    assert rtp_shaped(rtp(1))
    assert rtp_shaped(rtp(1, payload=b""))  # a header alone fits
    assert rtp_shaped(rtp(1, first=0x8F, payload=bytes(60)))  # 15 CSRCs that fit
    ext = struct.pack("!HH", 0xBEDE, 2) + bytes(8)
    assert rtp_shaped(rtp(1, first=0x90, payload=ext + bytes(20)))
    assert rtp_shaped(rtp(1, first=0xA0, payload=bytes(19) + b"\x14"))  # 20 bytes of padding
    assert not rtp_shaped(rtp(1)[:11])  # shorter than a header
    assert not rtp_shaped(rtp(1, first=0x40))  # version 1
    assert not rtp_shaped(rtp(1, first=0xC0))  # version 3
    assert not rtp_shaped(rtp(1, first=0x8F, payload=bytes(59)))  # CSRCs beyond the end
    assert not rtp_shaped(rtp(1, first=0x90, payload=b"\xbe\xde"))  # extension header cut
    huge = struct.pack("!HH", 0xBEDE, 0xFFFF)
    assert not rtp_shaped(rtp(1, first=0x90, payload=huge + bytes(100)))  # extension length
    assert not rtp_shaped(rtp(1, first=0xA0, payload=bytes(19) + b"\x00"))  # padding 0
    assert not rtp_shaped(rtp(1, first=0xA0, payload=bytes(19) + b"\x15"))  # padding > body
    for pt in (72, 76, 72 | 0x80):  # RTCP's range (RFC 5761): SR..APP with the marker bit
        assert not rtp_shaped(rtp(1, pt=pt))
    assert rtp_shaped(rtp(1, pt=71)) and rtp_shaped(rtp(1, pt=77))


def test_plain_reference() -> None:
    assert plain_reference(rtp(100)) == (SSRC, 100)
    assert plain_reference(None) == (-1, -1)
    assert plain_reference(b"\x00" * 40) == (-1, -1)


def test_plain_rtp_must_continue_the_peers_stream() -> None:
    assert refuse_plain_rtp(rtp(101), SSRC, 100) is None
    assert refuse_plain_rtp(rtp(100 + SEQ_AHEAD), SSRC, 100) is None
    assert refuse_plain_rtp(rtp(100 + SEQ_AHEAD + 1), SSRC, 100) == "grace_bad_sequence"
    assert refuse_plain_rtp(rtp(100), SSRC, 100) == "grace_bad_sequence"  # duplicate
    assert refuse_plain_rtp(rtp(99), SSRC, 100) == "grace_bad_sequence"  # late
    assert refuse_plain_rtp(rtp(3), SSRC, 0xFFFE) is None  # across the wrap
    assert refuse_plain_rtp(rtp(101, ssrc=SSRC + 1), SSRC, 100) == "grace_wrong_ssrc"
    # No reference (no plain packet taken before the window opened): P1 alone.
    assert refuse_plain_rtp(rtp(7, ssrc=9), -1, -1) is None
    assert refuse_plain_rtp(b"\x00" * 40, -1, -1) == "grace_not_rtp"
    assert refuse_plain_rtp(b"\x00" * 40, SSRC, 100) == "grace_not_rtp"
    # Shape first, then SSRC, then sequence: the first rule broken names the drop.
    assert refuse_plain_rtp(rtp(500, ssrc=7, first=0x40), SSRC, 100) == "grace_not_rtp"
    assert refuse_plain_rtp(rtp(500, ssrc=7), SSRC, 100) == "grace_wrong_ssrc"


def test_plain_rtcp_must_be_valid_and_the_peers() -> None:
    assert refuse_plain_rtcp(sr() + sdes(), SSRC) is None
    assert refuse_plain_rtcp(sr(), SSRC + 1) == "grace_wrong_ssrc"
    assert refuse_plain_rtcp(sr(), -1) is None  # no reference: P1 alone
    assert refuse_plain_rtcp(rtp(1), -1) == "grace_not_rtp"
    assert refuse_plain_rtcp(rtp(1), SSRC) == "grace_not_rtp"
    assert refuse_plain_rtcp(sr() + b"\x80\x00\x00\x01" + bytes(10), SSRC) == "grace_not_rtp"


@given(st.binary(max_size=200), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF))
def test_what_passes_the_grace_rules_is_the_stream_going_on(data: bytes, ssrc: int, seq: int
                                                              ) -> None:  # fmt: skip
    if refuse_plain_rtp(data, ssrc, seq) is None:  # (with a reference)
        assert rtp_shaped(data)
        assert int.from_bytes(data[8:12], "big") == ssrc
        assert 1 <= (int.from_bytes(data[2:4], "big") - seq) % 65536 <= SEQ_AHEAD
