"""Tones mixed into G.711 audio: the SPA's "secure call indication tone" (profile §4).

An SPA plays a short tone to its user when a call switches to secure mode. The proxy
reproduces it for the legacy phones behind it by *mixing* the tone into the audio it
relays toward the phone, so the phone needs no feature and the far party is still heard.

Tones are written the way SPA devices are configured, as a ToneScript
(``F1@L1[,F2@L2...];D(on/off/freqs[,on/off/freqs...])[;D(...)]``: frequencies in Hz at
levels in dBm0, then sections of ``D`` seconds in which the on/off segments repeat;
``freqs`` are 1-based component numbers joined by ``+``, ``0`` for none).
:data:`SECURE_CALL_TONE` is the SPA's factory default, ``397@-19,507@-19;15(0/2/0,.2/.1/1,
.1/2.1/2)`` (Sipura SPA-841 and Linksys SPA9000 administration guides, "Secure Call
Indication Tone"): 2 s of nothing, 200 ms of 397 Hz, 100 ms gap, 100 ms of 507 Hz, 2.1 s
gap, repeated until 15 s have passed (three beep pairs, at 2 s, 6.5 s and 11 s), each at
-19 dBm0, which the guides give as the ceiling for a tone that must not disturb the call.

G.711 without ``audioop`` (deprecated since 3.11, gone in 3.13) and without per-sample
Python code in the packet path: decoding is a 256-entry table, encoding a 16K-entry table
indexed by the 14-bit linear value (both built with the ITU-T/Sun reference algorithm),
and mixing one table of 64K entries per law, ``MIX[tone_code << 8 | audio_code]`` =
encode(clip(decode(tone) + decode(audio))). The tone is rendered once in G.711, so a
packet's mix is: interleave its payload with the tone's bytes (two slice assignments),
view the result as 16-bit indices, and look them all up in C (``itemgetter``):
about 5.5 µs per 20 ms packet on the CI box (``bench/relay.py``), only while the tone
sounds. The tables are built on first use (about 20 ms per law).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from functools import cache, lru_cache
from operator import itemgetter

__all__ = [
    "PCMA",
    "PCMU",
    "SAMPLE_RATE",
    "SECURE_CALL_TONE",
    "SECURE_CALL_TONE_SCRIPT",
    "Section",
    "Segment",
    "Tone",
    "ToneMixer",
    "alaw_to_linear",
    "decode",
    "encode",
    "encode_table",
    "linear_to_alaw",
    "linear_to_ulaw",
    "mix",
    "mix_table",
    "ulaw_to_linear",
]

PCMU = 0
"""RTP payload type of G.711 u-law."""
PCMA = 8
"""RTP payload type of G.711 A-law."""
SAMPLE_RATE = 8000
MAX_TONE_S = 30.0
"""The guides: a secure-call tone "should be played only for a short while (< 30 s)"."""
DBM0_PEAK = 32768 / 10 ** (3.17 / 20)
"""Peak of a 0 dBm0 sine in 16-bit linear: G.711's full-scale sine is +3.17 dBm0."""
RAMP_SAMPLES = 16
"""2 ms raised-cosine attack and decay on every burst, so bursts do not click."""

# --------------------------------------------------------------------------- G.711


def ulaw_to_linear(code: int) -> int:
    """G.711 u-law code -> 16-bit linear (ITU-T G.711 / Sun ``ulaw2linear``)."""
    code = ~code & 0xFF
    t = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
    return 0x84 - t if code & 0x80 else t - 0x84


def alaw_to_linear(code: int) -> int:
    """G.711 A-law code -> 16-bit linear (Sun ``alaw2linear``)."""
    code ^= 0x55
    t = (code & 0x0F) << 4
    segment = (code & 0x70) >> 4
    if segment == 0:
        t += 8
    elif segment == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (segment - 1)
    return t if code & 0x80 else -t


_ULAW_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_ALAW_SEGMENT_ENDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _segment(value: int, ends: tuple[int, ...]) -> int:
    for segment, end in enumerate(ends):
        if value <= end:
            return segment
    return len(ends)


def linear_to_ulaw(sample: int) -> int:
    """16-bit linear -> G.711 u-law code (Sun ``linear2ulaw``: 14-bit, bias 33, clip)."""
    value = sample >> 2
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, 8159) + 0x21
    segment = _segment(value, _ULAW_SEGMENT_ENDS)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def linear_to_alaw(sample: int) -> int:
    """16-bit linear -> G.711 A-law code (Sun ``linear2alaw``: 13-bit)."""
    value = sample >> 3
    if value >= 0:
        mask = 0xD5
    else:
        mask, value = 0x55, -value - 1
    segment = _segment(value, _ALAW_SEGMENT_ENDS)
    if segment >= 8:
        return 0x7F ^ mask
    shift = 1 if segment < 2 else segment
    return ((segment << 4) | ((value >> shift) & 0x0F)) ^ mask


ULAW_DECODE = tuple(ulaw_to_linear(code) for code in range(256))
ALAW_DECODE = tuple(alaw_to_linear(code) for code in range(256))
_DECODE = {PCMU: ULAW_DECODE, PCMA: ALAW_DECODE}
_ENCODE_ONE = {PCMU: linear_to_ulaw, PCMA: linear_to_alaw}
_SILENCE = {PCMU: 0xFF, PCMA: 0xD5}
"""The code of (nearly) zero: u-law +0, A-law +8."""


def _law(payload_type: int) -> int:
    if payload_type not in _DECODE:
        raise ValueError(f"payload type {payload_type} is not G.711 (0 or 8)")
    return payload_type


@cache
def encode_table(payload_type: int) -> bytes:
    """16384 codes: entry ``(sample >> 2) + 8192`` is the code of 16-bit ``sample``
    (14 bits are all u-law looks at; A-law looks at 13)."""
    encode_one = _ENCODE_ONE[_law(payload_type)]
    return bytes(encode_one(value << 2) for value in range(-8192, 8192))


@cache
def mix_table(payload_type: int) -> bytes:
    """65536 codes: entry ``tone << 8 | audio`` is the code of the clipped sum of both
    codes' linear values. A tone code of (near) zero leaves the audio code as it is, so
    mixing the silent parts of a tone changes nothing, bit for bit."""
    law = _law(payload_type)
    decoded, enc = _DECODE[law], encode_table(law)
    table = bytearray(65536)
    for tone in range(256):
        row = tone << 8
        level = decoded[tone]
        if abs(level) <= 8:  # u-law +-0, A-law +-8
            table[row : row + 256] = range(256)
            continue
        for audio in range(256):
            total = max(-32768, min(32767, level + decoded[audio]))
            table[row | audio] = enc[(total >> 2) + 8192]
    return bytes(table)


def encode(payload_type: int, samples: list[int] | tuple[int, ...]) -> bytes:
    """16-bit linear samples -> G.711 codes (clipped)."""
    enc = encode_table(payload_type)
    return bytes(enc[(max(-32768, min(32767, s)) >> 2) + 8192] for s in samples)


def decode(payload_type: int, data: bytes) -> list[int]:
    """G.711 codes -> 16-bit linear samples."""
    return list(map(_DECODE[_law(payload_type)].__getitem__, data))


_LITTLE = sys.byteorder == "little"


def mix(payload_type: int, audio: bytes, tone: bytes) -> bytes:
    """``audio`` + ``tone``, both G.711 of ``payload_type`` and of the same length."""
    size = len(audio)
    if len(tone) != size:
        raise ValueError("audio and tone must have the same length")
    if size < 2:  # itemgetter of one index returns a scalar
        return bytes(mix_table(payload_type)[tone[i] << 8 | audio[i]] for i in range(size))
    pairs = bytearray(2 * size)
    # Native 16-bit view of (audio, tone) pairs = tone << 8 | audio: the table index.
    if _LITTLE:
        pairs[0::2], pairs[1::2] = audio, tone
    else:
        pairs[0::2], pairs[1::2] = tone, audio
    mixed: tuple[int, ...] = itemgetter(*memoryview(pairs).cast("H"))(mix_table(payload_type))
    return bytes(mixed)


# --------------------------------------------------------------------------- tones


@dataclass(frozen=True, slots=True)
class Segment:
    """``on_s`` seconds of the ``components`` (0-based indices into the tone's
    frequencies; none: silence), then ``off_s`` seconds of silence. ``math.inf`` lasts
    until the end of the section."""

    on_s: float
    off_s: float
    components: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Section:
    """``segments`` repeated in order until ``duration_s`` has passed (cut there)."""

    duration_s: float
    segments: tuple[Segment, ...]


_FREQ = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*@\s*([-+]?\d+(?:\.\d*)?)\s*$")
_SECTION = re.compile(r"^\s*(\*|\d*\.?\d+)\s*\((.*)\)\s*$")


def _seconds(text: str, what: str) -> float:
    text = text.strip()
    if text == "*":
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad {what} {text!r}") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"bad {what} {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Tone:
    """A tone: ``frequencies`` as (Hz, dBm0) components, played per ``sections``.

    :meth:`parse` reads the SPA's ToneScript; ``str()`` writes it back. Total length at
    most :data:`MAX_TONE_S`. Components sound together (summed, clipped at full scale);
    each burst has a 2 ms attack and decay."""

    frequencies: tuple[tuple[float, float], ...]
    sections: tuple[Section, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.frequencies) <= 6:
            raise ValueError("a tone has 1 to 6 frequency components")
        for hz, level in self.frequencies:
            if not 0 < hz < SAMPLE_RATE / 2:
                raise ValueError(f"frequency {hz} Hz outside (0, {SAMPLE_RATE // 2}) Hz")
            if not -90 <= level <= 3.17:
                raise ValueError(f"level {level} dBm0 outside [-90, +3.17]")
        if not self.sections:
            raise ValueError("a tone has at least one section")
        for section in self.sections:
            if not section.segments:
                raise ValueError("a section has at least one segment")
            for segment in section.segments:
                if any(not 0 <= c < len(self.frequencies) for c in segment.components):
                    raise ValueError(f"segment {segment} names a missing frequency")
                if segment.on_s < 0 or segment.off_s < 0:
                    raise ValueError("segment times must not be negative")
                if _samples(segment.on_s, 1) + _samples(segment.off_s, 1) == 0:
                    raise ValueError("a segment shorter than a sample would repeat forever")
        if not 0 < self.duration_s <= MAX_TONE_S:
            raise ValueError(f"a tone lasts more than 0 and at most {MAX_TONE_S:g} s")

    @classmethod
    def parse(cls, script: str) -> Tone:
        """A ToneScript, e.g. ``"397@-19,507@-19;15(0/2/0,.2/.1/1,.1/2.1/2)"``."""
        freq_part, *section_parts = script.split(";")
        frequencies = []
        for item in freq_part.split(","):
            match = _FREQ.match(item)
            if match is None:
                raise ValueError(f"bad frequency component {item!r} (want HZ@DBM)")
            frequencies.append((float(match[1]), float(match[2])))
        sections = []
        for part in section_parts:
            match = _SECTION.match(part)
            if match is None:
                raise ValueError(f"bad section {part!r} (want DURATION(on/off/freqs,...))")
            segments = []
            for item in match[2].split(","):
                fields = item.split("/")
                if len(fields) != 3:
                    raise ValueError(f"bad segment {item!r} (want on/off/freqs)")
                names = fields[2].strip()
                try:
                    numbers = [int(n) for n in names.split("+")]
                except ValueError:
                    raise ValueError(f"bad frequency list {names!r}") from None
                if numbers != [0] and any(n < 1 for n in numbers):
                    raise ValueError(f"bad frequency list {names!r}")
                components = () if numbers == [0] else tuple(n - 1 for n in numbers)
                segments.append(
                    Segment(
                        _seconds(fields[0], "on time"), _seconds(fields[1], "off time"), components
                    )
                )
            sections.append(Section(_seconds(match[1], "section duration"), tuple(segments)))
        return cls(tuple(frequencies), tuple(sections))

    def __str__(self) -> str:
        def num(value: float) -> str:
            return "*" if value == math.inf else f"{value:g}"

        def names(components: tuple[int, ...]) -> str:
            return "+".join(str(c + 1) for c in components) or "0"

        freqs = ",".join(f"{num(hz)}@{num(level)}" for hz, level in self.frequencies)
        sections = [
            num(section.duration_s)
            + "("
            + ",".join(
                f"{num(s.on_s)}/{num(s.off_s)}/{names(s.components)}" for s in section.segments
            )
            + ")"
            for section in self.sections
        ]
        return ";".join([freqs, *sections])

    @property
    def duration_s(self) -> float:
        return sum(section.duration_s for section in self.sections)

    def bursts(self) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """(start, end, components) of every sounding burst, in samples from the start."""
        out = []
        start = 0
        for section in self.sections:
            end = start + round(section.duration_s * SAMPLE_RATE)
            t = start
            while t < end:
                for segment in section.segments:
                    on_end = min(end, t + _samples(segment.on_s, end - t))
                    if segment.components and on_end > t:
                        out.append((t, on_end, segment.components))
                    t = min(end, on_end + _samples(segment.off_s, end - on_end))
                    if t >= end:
                        break
            start = end
        return tuple(out)

    def samples(self) -> list[int]:
        """The whole tone in 16-bit linear at 8 kHz (zeros where it is silent)."""
        length = round(self.duration_s * SAMPLE_RATE)
        out = [0] * length
        amplitudes = [DBM0_PEAK * 10 ** (level / 20) for _, level in self.frequencies]
        steps = [2 * math.pi * hz / SAMPLE_RATE for hz, _ in self.frequencies]
        for start, end, components in self.bursts():
            ramp = min(RAMP_SAMPLES, (end - start) // 2)
            for n in range(start, end):
                # Phase runs on from the start of the tone, so repeated bursts match.
                value = sum(amplitudes[c] * math.sin(steps[c] * n) for c in components)
                edge = min(n - start, end - 1 - n)
                if edge < ramp:
                    value *= 0.5 - 0.5 * math.cos(math.pi * (edge + 0.5) / ramp)
                out[n] = max(-32768, min(32767, round(value)))
        return out

    def encoded(self, payload_type: int) -> bytes:
        """The whole tone in G.711 (``PCMU`` or ``PCMA``)."""
        return _render(self, _law(payload_type))

    def frames(self, payload_type: int, samples_per_frame: int = 160) -> list[bytes]:
        """:meth:`encoded` cut into RTP payloads of ``samples_per_frame`` (the last one
        padded with silence)."""
        if samples_per_frame < 1:
            raise ValueError("a frame holds at least one sample")
        data = self.encoded(payload_type)
        pad = -len(data) % samples_per_frame
        data += bytes([_SILENCE[payload_type]]) * pad
        return [data[i : i + samples_per_frame] for i in range(0, len(data), samples_per_frame)]


def _samples(seconds: float, rest: int) -> int:
    return rest if seconds == math.inf else round(seconds * SAMPLE_RATE)


@lru_cache(maxsize=16)
def _render(tone: Tone, payload_type: int) -> bytes:
    samples = tone.samples()
    out = bytearray([_SILENCE[payload_type]]) * len(samples)  # = encode(0)
    for start, end, _ in tone.bursts():
        out[start:end] = encode(payload_type, samples[start:end])
    return bytes(out)


SECURE_CALL_TONE_SCRIPT = "397@-19,507@-19;15(0/2/0,.2/.1/1,.1/2.1/2)"
"""The SPA factory default for the Secure Call Indication Tone."""
SECURE_CALL_TONE = Tone.parse(SECURE_CALL_TONE_SCRIPT)

# --------------------------------------------------------------------------- mixing


class ToneMixer:
    """One tone being mixed into one RTP stream, packet by packet.

    The tone advances with the stream: by the payload length (samples) of a G.711
    packet, and by the RTP timestamp step for a packet it cannot be mixed into (another
    codec, comfort noise), so it ends on time whatever the stream carries. Packets that
    fall in the tone's silent parts are returned as they are. After the last burst
    :attr:`done` is true."""

    __slots__ = ("_bursts", "_encoded", "_end", "_next", "_pos", "_ts", "done", "tone")

    def __init__(self, tone: Tone) -> None:
        self.tone = tone
        self._bursts = tuple((start, end) for start, end, _ in tone.bursts())
        self._end = self._bursts[-1][1] if self._bursts else 0
        self._encoded: dict[int, bytes] = {}
        self._pos = 0
        self._next = 0
        """Index of the first burst that does not end before ``_pos``."""
        self._ts: int | None = None
        self.done = self._end == 0

    def mix(self, packet: bytes) -> bytes | None:
        """``packet`` with the tone mixed into its payload (the same object if the tone
        is silent there); None if it cannot carry the tone (not G.711 or not RTP)."""
        size = len(packet)
        if size < 12 or packet[0] >> 6 != 2:
            return None
        first = packet[0]
        payload_type = packet[1] & 0x7F
        ts = int.from_bytes(packet[4:8], "big")
        last, self._ts = self._ts, ts
        if payload_type != PCMU and payload_type != PCMA:
            if last is not None:
                step = (ts - last) & 0xFFFFFFFF
                if step <= SAMPLE_RATE:  # not a jump, not a reordered packet
                    self._advance(step)
            return None
        start = 12 + 4 * (first & 0x0F)
        if first & 0x10:  # header extension
            if size < start + 4:
                return None
            start += 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
        end = size - packet[-1] if first & 0x20 else size  # padding
        if end < start:
            return None
        count = end - start
        pos = self._pos
        self._advance(count)
        bursts, index = self._bursts, self._next
        if index >= len(bursts) or bursts[index][0] >= pos + count:
            return packet  # silence here: untouched
        tone = self._encoded.get(payload_type)
        if tone is None:
            tone = self._encoded[payload_type] = self.tone.encoded(payload_type)
        piece = tone[pos : pos + count]
        if len(piece) < count:
            piece += bytes([_SILENCE[payload_type]]) * (count - len(piece))
        return packet[:start] + mix(payload_type, packet[start:end], piece) + packet[end:]

    def _advance(self, samples: int) -> None:
        pos = self._pos
        # Bursts that ended before this packet starts are behind us.
        bursts, index = self._bursts, self._next
        while index < len(bursts) and bursts[index][1] <= pos:
            index += 1
        self._next = index
        self._pos = pos + samples
        self.done = self._pos >= self._end
