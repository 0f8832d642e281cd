"""TCP framing (proxy.sip.framing): message boundaries, size cap, linear time."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sip import framing
from proxy.sip.framing import Oversized, StreamFramer
from proxy.sip.message import (
    MAX_MESSAGE,
    MessageTooLarge,
    SipParseError,
    blank_line,
    parse_message,
)

CORPUS = Path(__file__).resolve().parent.parent / "data" / "rfc4475"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@example.org>;tag=1928301774\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.org\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"hello"
)


def with_body(body: bytes) -> bytes:
    return BASE.replace(b"Content-Length: 5", b"Content-Length: %d" % len(body)).replace(
        b"hello", body
    )


def feed_all(framer: StreamFramer, *chunks: bytes) -> list[framing.Frame]:
    frames: list[framing.Frame] = []
    for chunk in chunks:
        frames += framer.feed(chunk)
    return frames


def test_partial_then_complete_byte_by_byte() -> None:
    framer = StreamFramer()
    for index in range(len(BASE) - 1):
        assert framer.feed(BASE[index : index + 1]) == []
        assert framer.pending == index + 1
    assert framer.feed(BASE[-1:]) == [BASE]
    assert framer.pending == 0
    assert framer.feed(b"") == []


def test_two_messages_and_keepalives() -> None:
    second = with_body(b"")
    framer = StreamFramer()
    frames = framer.feed(b"\r\n\r\n" + BASE + b"\r\n" + second + b"\r\n\r\nINVITE")
    assert frames == [BASE, second]
    assert framer.pending == len(b"INVITE")
    keepalive = StreamFramer()
    assert keepalive.feed(b"\r\n\r\n") == []
    assert keepalive.pending == 0  # keep-alives are not the start of a message


def test_content_length_anywhere_compact_or_folded() -> None:
    data = BASE.replace(b"Content-Length: 5\r\n", b"", 1)
    data = data.replace(b"Via:", b"l  :  5\r\nVia:", 1)  # compact, not last, odd spacing
    assert StreamFramer().feed(data + b"OPTIONS") == [data]
    assert parse_message(data, stream=True).body == b"hello"
    folded = BASE.replace(b"Content-Length: 5", b"Content-Length:\r\n 5", 1)
    assert StreamFramer().feed(folded) == [folded]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (BASE.replace(b"Content-Length: 5\r\n", b"", 1), "mandatory"),
        (BASE.replace(b"Content-Length: 5", b"Content-Length: -1"), "Content-Length"),
        (BASE.replace(b"Content-Length: 5", b"Content-Length: abc"), "Content-Length"),
        (BASE.replace(b"Content-Length: 5", b"Content-Length: 5, 6"), "Content-Length"),
        (BASE.replace(b"Content-Length: 5", "Content-Length: ²".encode()), "not a number"),
        (BASE.replace(b"Content-Length: 5", b"Content-Length: " + b"9" * 5000), "Content-Length"),
        (BASE.replace(b"Via:", b"l: 5\r\nVia:", 1), "more than one"),
    ],
)
def test_unframeable_heads_raise(data: bytes, error: str) -> None:
    with pytest.raises(SipParseError, match=error):
        StreamFramer().feed(data)


def test_header_section_past_the_cap_raises_too_large() -> None:
    framer = StreamFramer(max_message=2000)
    assert framer.feed(b"OPTIONS sip:x SIP/2.0\r\nX-Pad: " + b"x" * 1900) == []
    with pytest.raises(MessageTooLarge):
        framer.feed(b"x" * 200)
    assert StreamFramer().feed(b"OPTIONS " + b"x" * 1000) == []
    with pytest.raises(MessageTooLarge):
        StreamFramer().feed(b"OPTIONS " + b"x" * MAX_MESSAGE)


def test_oversized_body_is_skipped_and_framing_survives() -> None:
    """413 territory: the head comes back as Oversized, the body never is buffered, and
    the next message on the connection is framed normally."""
    big = with_body(b"b" * 5000)
    framer = StreamFramer(max_message=1000)
    head = big[: big.index(b"\r\n\r\n")]
    frames = framer.feed(big[:600])
    assert frames == [Oversized(head, len(big))]
    assert framer.pending == len(big) - 600  # still to skip: not buffered
    assert feed_all(framer, big[600:3000], big[3000:-1]) == []
    assert framer.pending == 1
    assert framer.feed(big[-1:] + BASE) == [BASE]
    assert framer.pending == 0


def test_oversized_then_next_message_in_one_read() -> None:
    big = with_body(b"b" * 5000)
    frames = StreamFramer(max_message=1000).feed(big + BASE + BASE[:10])
    assert [type(f) for f in frames] == [Oversized, bytes]
    assert frames[1] == BASE


def test_agrees_with_parse_message_on_head_end() -> None:
    # a bare-LF blank line ends the head for both
    data = b"OPTIONS sip:a@b SIP/2.0\nContent-Length: 0\n\nX-Next: 1"
    framer = StreamFramer()
    assert framer.feed(data) == [b"OPTIONS sip:a@b SIP/2.0\nContent-Length: 0\n\n"]
    assert framer.pending == len(b"X-Next: 1")


def test_blank_line_split_across_reads_is_found() -> None:
    for cut in range(len(BASE) - 12, len(BASE) - 4):
        framer = StreamFramer()
        assert framer.feed(BASE[:cut]) == []
        assert framer.feed(BASE[cut:]) == [BASE]


class CountingSearch:
    """Wraps the search for the end of a header section; counts the bytes it may read."""

    def __init__(self) -> None:
        self.scanned = 0

    def __call__(self, buffer: bytearray, pos: int = 0) -> tuple[int, int] | None:
        self.scanned += len(buffer) - pos
        return blank_line(buffer, pos)


def test_one_byte_segments_cost_constant_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: every segment rescanned the whole buffer (~0.55 ms of CPU per one-byte
    segment after 60 KB of unfinished header). Work is now linear in the bytes received:
    60 KB then 5,000 one-byte segments look at ~65 KB, not 5,000 x 60 KB."""
    counter = CountingSearch()
    monkeypatch.setattr(framing, "blank_line", counter)
    framer = StreamFramer()
    assert framer.feed(b"OPTIONS sip:x SIP/2.0\r\nX-Slow: " + b"a" * 60000) == []
    for _ in range(5000):
        assert framer.feed(b"a") == []
    assert counter.scanned < 60100 + 4 * 5000
    assert framer.pending == len(b"OPTIONS sip:x SIP/2.0\r\nX-Slow: ") + 60000 + 5000


def test_many_pipelined_messages_are_consumed_in_linear_time() -> None:
    stream = BASE * 2000
    framer = StreamFramer(max_message=len(stream))
    assert framer.feed(stream) == [BASE] * 2000
    assert framer.pending == 0


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), max_size=8))
def test_arbitrary_bytes_terminate(data: bytes, chunks: list[int]) -> None:
    framer = StreamFramer(max_message=300)
    rest = data
    taken = 0
    for size in [*chunks, len(data)]:
        chunk, rest = rest[:size], rest[size:]
        try:
            frames = framer.feed(chunk)
        except SipParseError:
            return
        taken += len(chunk)
        for frame in frames:
            if isinstance(frame, bytes):
                assert 2 <= len(frame) <= 300
                with contextlib.suppress(SipParseError):
                    parse_message(frame, stream=True)
            else:
                assert frame.size > 300
        assert framer.pending <= taken


@FAST
@given(st.sampled_from([BASE, *(CORPUS / f"{n}.dat" for n in ("wsinv", "mpart01", "esc01"))]),
       st.lists(st.integers(1, 300), min_size=1, max_size=10))  # fmt: skip
def test_reassembles_chunked_messages(message: bytes | Path, chunks: list[int]) -> None:
    data = message.read_bytes() if isinstance(message, Path) else message
    stream = b"\r\n".join([data, data, b""])
    framer = StreamFramer()
    frames: list[framing.Frame] = []
    position = 0
    sizes = iter([*chunks, len(stream)])
    while position < len(stream):
        size = next(sizes, len(stream))
        frames += framer.feed(stream[position : position + size])
        position += size
    assert frames == [data, data]
    assert framer.pending == 0


@FAST
@given(st.binary(max_size=60).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r")),
       st.integers(0, 10))  # fmt: skip
def test_blank_line_is_the_regular_expression(data: bytes, pos: int) -> None:
    match = re.compile(rb"\r?\n\r?\n").search(data, pos)
    assert blank_line(data, pos) == (None if match is None else match.span())


def test_keepalive_pings_are_counted_and_half_a_ping_waits() -> None:
    """RFC 5626 §4.4.1: CRLF CRLF between messages is a ping owed one pong; a lone CRLF
    may be the first half of one, so it waits (and does not start the message timer)."""
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == [] and framer.take_pings() == 2
    assert framer.feed(b"\r\n") == [] and framer.take_pings() == 0
    assert framer.pending == 0
    assert framer.feed(b"\r\n" + BASE + b"\r\n\r\n") == [BASE]
    assert framer.take_pings() == 2 and framer.take_pings() == 0
    assert framer.feed(b"\r\n" + BASE) == [BASE]  # a stray CRLF before a message
    assert framer.take_pings() == 0 and framer.pending == 0
