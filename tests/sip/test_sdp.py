"""SDP parsing and the media-anchoring rewrite (proxy.sip.sdp)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.sip.sdp import (
    Connection,
    Direction,
    Endpoint,
    Rtcp,
    SdpError,
    connection_endpoint,
    parse_sdp,
    rewrite_sdp,
)


def sdp(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


SPA_OFFER = sdp(
    "v=0",
    "o=- 9521 9521 IN IP4 192.168.1.20",
    "s=-",
    "c=IN IP4 192.168.1.20",
    "t=0 0",
    "m=audio 16434 RTP/AVP 0 2 4 8 18 96 97 98 100 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:18 G729a/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=ptime:30",
    "a=sendrecv",
)


# --------------------------------------------------------------------------- parsing


def test_parse_spa_offer() -> None:
    parsed = parse_sdp(SPA_OFFER)
    assert parsed.connection == Connection("IN", "IP4", "192.168.1.20")
    assert parsed.direction is Direction.SENDRECV
    (audio,) = parsed.media
    assert audio.media == "audio"
    assert audio.port == 16434
    assert audio.port_count is None
    assert audio.protocol == "RTP/AVP"
    assert audio.formats == ("0", "2", "4", "8", "18", "96", "97", "98", "100", "101")
    assert audio.connection is None
    assert audio.rtcp is None
    assert audio.rtcp_mux is False
    assert audio.direction is Direction.SENDRECV
    assert audio.lines[0] == "m=audio 16434 RTP/AVP 0 2 4 8 18 96 97 98 100 101"
    assert connection_endpoint(parsed, 0) == Endpoint("192.168.1.20", 16434, 16435, False)


def test_hold_sendonly_null_address() -> None:
    body = sdp(
        "v=0",
        "o=- 9521 9522 IN IP4 192.168.1.20",
        "s=-",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
        "m=audio 16434 RTP/AVP 0 101",
        "a=sendonly",
    )
    parsed = parse_sdp(body)
    assert parsed.connection is not None and parsed.connection.is_null
    assert parsed.media[0].direction is Direction.SENDONLY
    ip, rtp, rtcp, mux = connection_endpoint(parsed, 0)
    assert (ip, rtp, rtcp, mux) == ("0.0.0.0", 16434, 16435, False)


def test_session_direction_is_the_default_for_media() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "a=recvonly",
        "m=audio 4000 RTP/AVP 0",
        "m=video 4002 RTP/AVP 96",
        "a=inactive",
    )
    parsed = parse_sdp(body)
    assert parsed.direction is Direction.RECVONLY
    assert [m.direction for m in parsed.media] == [Direction.RECVONLY, Direction.INACTIVE]


def test_multiple_media_with_media_level_connections() -> None:
    body = sdp(
        "v=0",
        "o=alice 2890844526 2890844526 IN IP4 host.atlanta.example.com",
        "s=",
        "t=0 0",
        "m=audio 49170 RTP/AVP 0 8 97",
        "c=IN IP4 192.0.2.10",
        "a=rtpmap:97 iLBC/8000",
        "m=video 51372/2 RTP/SAVP 31 32",
        "c=IN IP6 2001:DB8::0:1",
        "m=audio 0 RTP/AVP 0",
    )
    parsed = parse_sdp(body)
    assert parsed.connection is None
    audio, video, rejected = parsed.media
    assert audio.connection == Connection("IN", "IP4", "192.0.2.10")
    assert video.protocol == "RTP/SAVP"
    assert video.port_count == 2
    assert video.formats == ("31", "32")
    assert rejected.port == 0 and rejected.connection is None
    assert connection_endpoint(parsed, 1) == Endpoint("2001:db8::1", 51372, 51373, False)
    assert connection_endpoint(parsed, 2) == Endpoint("0.0.0.0", 0, 0, False)
    with pytest.raises(IndexError):
        connection_endpoint(parsed, 3)


def test_rtcp_attribute_and_mux() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "a=rtcp:4005 IN IP4 10.0.0.9",
        "a=rtcp-fb:* nack",
        "m=audio 5000 RTP/AVP 0",
        "a=rtcp:5000",
        "a=rtcp-mux",
    )
    parsed = parse_sdp(body)
    first, second = parsed.media
    assert first.rtcp == Rtcp(4005, Connection("IN", "IP4", "10.0.0.9"))
    assert first.rtcp_mux is False
    assert second.rtcp == Rtcp(5000)
    assert second.rtcp_mux is True
    assert connection_endpoint(parsed, 0) == Endpoint("10.0.0.1", 4000, 4005, False)
    assert connection_endpoint(parsed, 1) == Endpoint("10.0.0.1", 5000, 5000, True)


def test_lf_only_input_is_accepted_and_crlf_emitted() -> None:
    lf = SPA_OFFER.replace(b"\r\n", b"\n")
    parsed = parse_sdp(lf)
    assert parsed.encode() == SPA_OFFER
    assert rewrite_sdp(lf, "192.168.1.20", [None]) == SPA_OFFER


def test_round_trip_is_byte_identical() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=Caf\xe9 (x-sipura)",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "a=x-unknown-session:value with  two spaces ",
        "m=audio 4000 RTP/AVP 0",
        "b=AS:64",
        "a=x-sipura-something",
    )
    assert parse_sdp(body).encode() == body
    latin1 = body.replace("Caf\xe9".encode(), b"Caf\xe9")  # not UTF-8: kept as is
    assert parse_sdp(latin1).encode() == latin1


def test_blank_and_trailing_lines_are_dropped() -> None:
    assert parse_sdp(SPA_OFFER + b"\r\n\r\n").encode() == SPA_OFFER


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        b"o=- 1 1 IN IP4 10.0.0.1\r\nv=0\r\n",
        b"v=1\r\n",
        b"v=0\r\nv=0\r\n",
        b"v=0\r\nthis is not sdp\r\n",
        b"v=0\r\n=x\r\n",
        b"v=0\r\nc=IN IP4\r\n",
        b"v=0\r\nc=IN IP4 /127\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.5\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio port RTP/AVP 0\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio -4 RTP/AVP 0\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 65536 RTP/AVP 0\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000/0 RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio ٤٠٠٠ RTP/AVP 0\r\n".encode(),
        b"v=0\r\nm=audio 4000 RTP/AVP 0\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:x\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:4001 IN\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:1\r\na=rtcp:2\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=x\rb\r\n",
        b"v=0\r\ns=\x00\r\n",
    ],
)
def test_malformed_raises_sdp_error(body: bytes) -> None:
    with pytest.raises(SdpError):
        parse_sdp(body)
    with pytest.raises(SdpError):
        rewrite_sdp(body, "10.9.9.9", [])


def test_fqdn_connection_parses_but_has_no_endpoint() -> None:
    parsed = parse_sdp(sdp("v=0", "c=IN IP4 pbx.example.com", "m=audio 4000 RTP/AVP 0"))
    assert parsed.connection == Connection("IN", "IP4", "pbx.example.com")
    with pytest.raises(SdpError):
        connection_endpoint(parsed, 0)


def test_multicast_ttl_is_not_part_of_the_address() -> None:
    parsed = parse_sdp(sdp("v=0", "c=IN IP4 224.2.1.1/127/3", "m=audio 4000 RTP/AVP 0"))
    assert parsed.connection == Connection("IN", "IP4", "224.2.1.1")


# --------------------------------------------------------------------------- rewriting


def test_rewrite_spa_offer_changes_only_address_and_port() -> None:
    out = rewrite_sdp(SPA_OFFER, "203.0.113.5", [30000])
    assert out == SPA_OFFER.replace(b"c=IN IP4 192.168.1.20", b"c=IN IP4 203.0.113.5").replace(
        b"m=audio 16434 ", b"m=audio 30000 "
    )
    assert b"o=- 9521 9521 IN IP4 192.168.1.20" in out  # o= is an identifier: untouched
    assert connection_endpoint(parse_sdp(out), 0) == Endpoint("203.0.113.5", 30000, 30001, False)


def test_rewrite_every_connection_and_rtcp() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0 101",
        "c=IN IP4 10.0.0.2",
        "a=rtcp:4005 IN IP4 10.0.0.9",
        "a=rtpmap:101 telephone-event/8000",
        "m=video 0 RTP/AVP 96",
        "c=IN IP4 10.0.0.3",
        "m=audio 5000 RTP/AVP 8",
        "a=rtcp:5003",
        "a=sendonly",
    )
    out = rewrite_sdp(body, "198.51.100.7", [20000, None, 20002])
    assert out == sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 198.51.100.7",
        "t=0 0",
        "m=audio 20000 RTP/AVP 0 101",
        "c=IN IP4 198.51.100.7",
        "a=rtcp:20001 IN IP4 198.51.100.7",
        "a=rtpmap:101 telephone-event/8000",
        "m=video 0 RTP/AVP 96",
        "c=IN IP4 198.51.100.7",
        "m=audio 20002 RTP/AVP 8",
        "a=rtcp:20003",
        "a=sendonly",
    )


def test_rewrite_ipv6_media_address() -> None:
    out = rewrite_sdp(SPA_OFFER, "2001:db8::7", [40000])
    assert b"c=IN IP6 2001:db8::7\r\n" in out
    assert connection_endpoint(parse_sdp(out), 0).ip == "2001:db8::7"


def test_rewrite_keeps_hold_address() -> None:
    """c=0.0.0.0 is a hold: anchoring it on a live address would resume the call."""
    body = sdp(
        "v=0",
        "o=- 1 2 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "a=sendonly",
    )
    out = rewrite_sdp(body, "198.51.100.7", [20000])
    assert out == body.replace(b"m=audio 4000", b"m=audio 20000")
    assert connection_endpoint(parse_sdp(out), 0) == Endpoint("0.0.0.0", 20000, 20001, False)


def test_rewrite_rtcp_mux_on_rtp_port_stays_on_rtp_port() -> None:
    body = sdp(
        "v=0",
        "c=IN IP4 10.0.0.1",
        "m=audio 4000 RTP/AVP 0",
        "a=rtcp:4000",
        "a=rtcp-mux",
        "m=audio 5000 RTP/AVP 0",
        "a=rtcp:5001",
        "a=rtcp-mux",
    )
    out = parse_sdp(rewrite_sdp(body, "10.9.9.9", [20000, 20002]))
    assert [m.rtcp for m in out.media] == [Rtcp(20000), Rtcp(20003)]
    assert all(m.rtcp_mux for m in out.media)


def test_rewrite_keeps_odd_spacing_of_m_line() -> None:
    body = sdp("v=0", "c=IN IP4 10.0.0.1", "m=audio  4000/2 RTP/AVP 0 ")
    out = rewrite_sdp(body, "10.9.9.9", [20000])
    assert out.splitlines()[2] == b"m=audio  20000/2 RTP/AVP 0 "


@pytest.mark.parametrize(
    ("media_ip", "ports"),
    [("not-an-ip", [1000]), ("0.0.0.0", [1000]), ("10.0.0.1", []), ("10.0.0.1", [65535])],
)
def test_rewrite_bad_arguments(media_ip: str, ports: list[int | None]) -> None:
    with pytest.raises(ValueError):
        rewrite_sdp(SPA_OFFER, media_ip, ports)


def test_rewrite_without_changes_is_identity() -> None:
    assert rewrite_sdp(SPA_OFFER, "192.168.1.20", [None]) == SPA_OFFER


# --------------------------------------------------------------------------- fuzzing

_SDP_ALPHABET = st.sampled_from(
    [*list("vocmat=:/ .-0123456789INP46abcdefxyz\r\n\t\x00é"), "٣", "²", "\u2028", "\x1c"]
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_raise_only_sdp_error(body: bytes) -> None:
    try:
        parsed = parse_sdp(body)
    except SdpError:
        return
    parsed.encode()


@settings(max_examples=600, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("vcmaots"), st.text(_SDP_ALPHABET, max_size=30)),
        max_size=12,
    ),
    st.lists(st.one_of(st.none(), st.integers(0, 65534)), max_size=4),
)
def test_fuzz_sdp_shaped_lines(lines: list[tuple[str, str]], ports: list[int | None]) -> None:
    body = ("v=0\r\n" + "".join(f"{k}={v}\r\n" for k, v in lines)).encode("utf-8", "surrogatepass")
    try:
        parsed = parse_sdp(body)
    except SdpError:
        return
    for index in range(len(parsed.media)):
        with contextlib.suppress(SdpError):
            connection_endpoint(parsed, index)
    ports = (ports + [None] * len(parsed.media))[: len(parsed.media)]
    out = rewrite_sdp(body, "10.1.2.3", ports)
    again = parse_sdp(out)  # the rewrite is valid SDP with the same shape
    assert len(again.media) == len(parsed.media)
    assert [m.formats for m in again.media] == [m.formats for m in parsed.media]
    assert [m.direction for m in again.media] == [m.direction for m in parsed.media]


_ATTRIBUTES = st.sampled_from(
    [
        "a=sendrecv",
        "a=sendonly",
        "a=recvonly",
        "a=inactive",
        "a=rtcp-mux",
        "a=rtcp:9",
        "a=rtcp:4001 IN IP4 10.0.0.9",
        "a=rtcp:4001 IN IP6 ::1",
        "a=rtcp:x",
        "a=rtpmap:101 telephone-event/8000",
        "a=ptime:20",
        "b=AS:80",
        "c=IN IP4 10.0.0.1",
        "c=IN IP4 0.0.0.0",
        "c=IN IP6 2001:db8::1",
        "c=IN IP4 host.example",
        "c=IN IP4",
        "x=unknown",
    ]
)
_M_LINES = st.builds(
    lambda kind, port, proto, fmts: f"m={kind} {port} {proto}{fmts}",
    st.sampled_from(["audio", "video", "image"]),
    st.one_of(st.integers(0, 65535).map(str), st.sampled_from(["4000/2", "-1", "x", "70000"])),
    st.sampled_from(["RTP/AVP", "RTP/SAVP", "udptl"]),
    st.sampled_from(["", " 0", " 0 8 101", " t38"]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_ATTRIBUTES, max_size=4),
    st.lists(st.tuples(_M_LINES, st.lists(_ATTRIBUTES, max_size=4)), max_size=3),
    st.booleans(),
    st.data(),
)
def test_fuzz_structured(
    session: list[str],
    media: list[tuple[str, list[str]]],
    lf_only: bool,
    data: st.DataObject,
) -> None:
    lines = ["v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", *session]
    for m_line, attributes in media:
        lines += [m_line, *attributes]
    body = sdp(*lines)
    if lf_only:
        body = body.replace(b"\r\n", b"\n")
    try:
        parsed = parse_sdp(body)
    except SdpError:
        return
    assert parsed.encode() == sdp(*lines)
    ports = data.draw(
        st.lists(
            st.one_of(st.none(), st.integers(0, 65534)),
            min_size=len(parsed.media),
            max_size=len(parsed.media),
        )
    )
    out = rewrite_sdp(body, "10.1.2.3", ports)
    again = parse_sdp(out)
    assert len(again.session_lines) == len(parsed.session_lines)
    for before, after, port in zip(parsed.media, again.media, ports, strict=True):
        # a stream given a port where it had none and no c= gains the anchored address
        added = 1 if port and before.connection is None and parsed.connection is None else 0
        assert len(after.lines) == len(before.lines) + added
        assert after.port == (before.port if port is None else port)
        assert (after.formats, after.protocol, after.direction, after.rtcp_mux) == (
            before.formats,
            before.protocol,
            before.direction,
            before.rtcp_mux,
        )
        connection = after.connection or again.connection
        if connection is not None:
            assert connection.address in ("10.1.2.3", "0.0.0.0", "::")
        if before.rtcp is not None and port is not None:
            assert after.rtcp is not None
            assert after.rtcp.port in (port, port + 1)


def test_a_revived_port_zero_stream_without_c_gets_the_anchor_address() -> None:
    body = sdp("v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "t=0 0", "m=audio 0 RTP/AVP 0")
    out = rewrite_sdp(body, "10.1.2.3", [4000])
    assert b"m=audio 4000 RTP/AVP 0\r\nc=IN IP4 10.1.2.3\r\n" in out
    assert connection_endpoint(parse_sdp(out), 0).ip == "10.1.2.3"


def _split_lines_reference(body: bytes) -> list[str]:
    """The line-by-line checks the one-expression fast path of the splitter stands for."""
    lines = []
    for raw in body.decode("utf-8", "surrogateescape").split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line:
            continue
        if "\r" in line or "\x00" in line:
            raise SdpError("bare CR or NUL inside an SDP line")
        if len(line) < 2 or line[1] != "=" or not (line[0].isascii() and line[0].isalpha()):
            raise SdpError(f"not an SDP line: {line[:40]!r}")
        lines.append(line)
    return lines


def _outcome(split: object, body: bytes) -> tuple[str, object]:
    try:
        return "lines", split(body)  # type: ignore[operator]
    except SdpError as exc:
        return "error", str(exc)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["v", "=", "0", "\r", "\n", "\r\n", "\x00", " ", "a", "é", "²"]))
       .map(lambda parts: "".join(parts).encode("utf-8", "surrogateescape"))
       | st.binary(max_size=40))  # fmt: skip
@example(b"v=0\r\na=\x00\r\n")
@example(b"v=0\r\r\nm=x")
@example("é=1\n".encode())
@example(b"v=0\n=x\n")
def test_sdp_lines_split_as_the_line_by_line_checks_do(body: bytes) -> None:
    from proxy.sip.sdp import _split_lines

    assert _outcome(_split_lines, body) == _outcome(_split_lines_reference, body)
