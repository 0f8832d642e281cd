"""proxy.media.tones: G.711 tables, ToneScripts, and mixing a tone into RTP payloads."""

from __future__ import annotations

import importlib.util
import itertools
import math
import struct
import warnings

import pytest

from proxy.media import tones
from proxy.media.tones import (
    PCMA,
    PCMU,
    SECURE_CALL_TONE,
    SECURE_CALL_TONE_SCRIPT,
    Tone,
    ToneMixer,
)

ALL_16BIT = list(range(-32768, 32768))


def zero_crossings(samples: list[int]) -> int:
    signs = [s > 0 for s in samples if s != 0]
    return sum(1 for a, b in itertools.pairwise(signs) if a != b)


def rms_dbm0(samples: list[int]) -> float:
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    return 20 * math.log10(rms * math.sqrt(2) / tones.DBM0_PEAK)


def rtp(seq: int, pt: int, payload: bytes, first: int = 0x80, extra: bytes = b"") -> bytes:
    return struct.pack("!BBHII", first, pt, seq, seq * 160, 0x1234) + extra + payload


# --------------------------------------------------------------------------- G.711


def test_decode_tables_known_values() -> None:
    assert tones.ULAW_DECODE[0x00] == -32124 and tones.ULAW_DECODE[0x80] == 32124
    assert tones.ULAW_DECODE[0xFF] == 0 == tones.ULAW_DECODE[0x7F]
    assert tones.ALAW_DECODE[0xD5] == 8 and tones.ALAW_DECODE[0x55] == -8
    assert tones.ALAW_DECODE[0xAA] == 32256 and tones.ALAW_DECODE[0x2A] == -32256


@pytest.mark.parametrize("pt", [PCMU, PCMA])
def test_round_trip_through_the_tables(pt: int) -> None:
    codes = bytes(range(256))
    back = tones.encode(pt, tones.decode(pt, codes))
    if pt == PCMU:  # -0 (0x7f) comes back as +0 (0xff); every other code is exact
        assert back == codes.replace(b"\x7f", b"\xff")
    else:
        assert back == codes
    # The 16K encoding table agrees with the reference encoder on every 16-bit value.
    reference = tones.linear_to_ulaw if pt == PCMU else tones.linear_to_alaw
    assert tones.encode(pt, ALL_16BIT) == bytes(map(reference, ALL_16BIT))
    assert len(tones.encode_table(pt)) == 16384


@pytest.mark.parametrize("pt", [PCMU, PCMA])
def test_encoding_is_monotonic_and_nearest(pt: int) -> None:
    decoded = tones.decode(pt, tones.encode(pt, ALL_16BIT))
    assert decoded == sorted(decoded)  # quantization never reverses order
    levels = sorted(set(decoded))
    gaps = {b - a for a, b in itertools.pairwise(levels)}
    worst = max(abs(d - x) for d, x in zip(decoded, ALL_16BIT, strict=True))
    assert worst <= max(gaps)  # within one step (G.711 truncates toward a level)


@pytest.mark.skipif(importlib.util.find_spec("audioop") is None, reason="no audioop")
def test_tables_match_audioop() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    linear = struct.pack(f"<{len(ALL_16BIT)}h", *ALL_16BIT)
    assert audioop.lin2ulaw(linear, 2) == tones.encode(PCMU, ALL_16BIT)
    assert audioop.lin2alaw(linear, 2) == tones.encode(PCMA, ALL_16BIT)
    codes = bytes(range(256))
    assert struct.unpack("<256h", audioop.ulaw2lin(codes, 2)) == tones.ULAW_DECODE
    assert struct.unpack("<256h", audioop.alaw2lin(codes, 2)) == tones.ALAW_DECODE


@pytest.mark.parametrize("pt", [PCMU, PCMA])
def test_mix_table(pt: int) -> None:
    table = tones.mix_table(pt)
    assert len(table) == 65536
    codes = bytes(range(256))
    silence = bytes([0xFF if pt == PCMU else 0xD5]) * 256
    assert tones.mix(pt, codes, silence) == codes  # a silent tone changes nothing
    assert tones.mix(pt, codes[:1], silence[:1]) == codes[:1]  # one-sample payload
    for a in range(0, 256, 7):
        for b in range(0, 256, 11):
            total = tones.decode(pt, bytes([a]))[0] + tones.decode(pt, bytes([b]))[0]
            if abs(tones.decode(pt, bytes([a]))[0]) > 8:
                assert table[a << 8 | b] == tones.encode(pt, [total])[0]
    loud = tones.encode(pt, [30000])
    assert tones.decode(pt, tones.mix(pt, loud * 2, loud * 2)) == tones.decode(
        pt, tones.encode(pt, [32767] * 2)
    )  # clipped, not wrapped
    with pytest.raises(ValueError):
        tones.mix(pt, b"\xff", b"")
    with pytest.raises(ValueError):
        tones.mix_table(18)


# --------------------------------------------------------------------------- tones


def test_the_spa_default_tone() -> None:
    assert Tone.parse(str(SECURE_CALL_TONE)) == SECURE_CALL_TONE
    assert SECURE_CALL_TONE.frequencies == ((397.0, -19.0), (507.0, -19.0))
    assert SECURE_CALL_TONE.duration_s == 15
    ms = [(start // 8, end // 8, c) for start, end, c in SECURE_CALL_TONE.bursts()]
    assert ms == [
        (2000, 2200, (0,)),
        (2300, 2400, (1,)),
        (6500, 6700, (0,)),
        (6800, 6900, (1,)),
        (11000, 11200, (0,)),
        (11300, 11400, (1,)),
    ]
    assert SECURE_CALL_TONE_SCRIPT == "397@-19,507@-19;15(0/2/0,.2/.1/1,.1/2.1/2)"


def test_parse_sections_and_errors() -> None:
    tone = Tone.parse("480@-19,620@-19;.4(.1/.1/1+2);1(*/0/2)")
    assert tone.duration_s == pytest.approx(1.4)
    assert tone.bursts() == ((0, 800, (0, 1)), (1600, 2400, (0, 1)), (3200, 11200, (1,)))
    assert Tone.parse(str(tone)) == tone
    for bad in (
        "",
        "400",
        "400@-19",  # no section
        "400@-19;1(.1/.1)",
        "400@-19;1(.1/.1/2)",  # no frequency 2
        "400@-19;1(0/0/1)",  # repeats forever
        "400@-19;1(.00001/0/1)",  # shorter than a sample: the same
        "400@-19;*(.1/.1/1)",  # endless
        "400@-19;31(.1/.1/1)",  # longer than 30 s
        "4000@-19;1(.1/.1/1)",  # Nyquist
        "400@+6;1(.1/.1/1)",  # above full scale
        "400@-19;1(.1/x/1)",
        "400@-19;1(.1/.1/a)",
        "400@-19;1 .1/.1/1",
    ):
        with pytest.raises(ValueError):
            Tone.parse(bad)


def test_tone_frequency_and_level() -> None:
    tone = Tone.parse("1000@-10;1(1/0/1)")
    for pt in (PCMU, PCMA):
        samples = tones.decode(pt, tone.encoded(pt))
        assert len(samples) == 8000
        assert abs(zero_crossings(samples) - 2000) <= 2
        assert rms_dbm0(samples) == pytest.approx(-10, abs=0.3)
    frames = tone.frames(PCMU, 240)
    assert [len(f) for f in frames] == [240] * 34  # the last one padded with silence
    assert b"".join(frames)[:8000] == tone.encoded(PCMU) and frames[-1][80:] == b"\xff" * 160
    assert Tone.parse("1000@-10;.015(.015/0/1)").frames(PCMA, 160)[0][120:] == b"\xd5" * 40


@pytest.mark.parametrize("pt", [PCMU, PCMA])
def test_mixing_into_silence_yields_the_tone(pt: int) -> None:
    tone = Tone.parse("600@-12;.5(.5/0/1)")
    mixer = ToneMixer(tone)
    silence = bytes([0xFF if pt == PCMU else 0xD5]) * 160
    payloads = []
    for seq in range(30):
        packet = mixer.mix(rtp(seq, pt, silence))
        assert packet is not None
        payloads.append(packet[12:])
        if mixer.done:
            break
    assert len(payloads) == 25 and mixer.done  # 0.5 s of 20 ms packets
    samples = tones.decode(pt, b"".join(payloads))
    assert abs(zero_crossings(samples) - 600) <= 2  # 600 Hz for 0.5 s
    assert rms_dbm0(samples[100:-100]) == pytest.approx(-12, abs=0.5)


def test_mixer_keeps_headers_padding_and_skips_other_codecs() -> None:
    tone = Tone.parse("1000@-10;.1(.1/0/1)")  # 800 samples
    mixer = ToneMixer(tone)
    silence = b"\xff" * 160
    # CSRC count 1, a header extension of one word, 3 bytes of padding.
    extra = b"\x00\x00\x00\x07" + b"\xbe\xde\x00\x01" + b"\x11\x22\x33\x44"
    packet = rtp(1, PCMU, silence + b"\x00\x00\x03", first=0x80 | 0x20 | 0x10 | 1, extra=extra)
    out = mixer.mix(packet)
    assert out is not None and len(out) == len(packet)
    assert out[:24] == packet[:24] and out[-3:] == b"\x00\x00\x03" and out[24:-3] != silence
    # Another codec: not mixed, but the tone moves on with the RTP clock.
    assert mixer.mix(rtp(2, 18, b"\x00" * 20)) is None  # timestamp +160
    assert mixer.mix(rtp(2, 101, b"\x00" * 4)) is None  # same timestamp: no step
    assert mixer.mix(b"\x00" * 20) is None  # not RTP
    assert mixer.mix(rtp(3, PCMU, b"")) == rtp(3, PCMU, b"")
    out = mixer.mix(rtp(4, PCMU, silence))
    assert out is not None and out[12:] != silence and not mixer.done
    assert mixer.mix(rtp(5, PCMU, silence * 2)) is not None and mixer.done  # 640..960
    assert ToneMixer(Tone.parse("1000@-10;1(0/1/0)")).done  # never sounds
