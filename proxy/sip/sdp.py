"""SDP bodies (RFC 4566): the small model the media anchor needs, and the rewrite.

The B2BUA anchors media, so each SDP it forwards must point the far side at the proxy's
own ports: every connection address becomes the proxy's media address, every m= port the
port the media engine allocated for that stream, and ``a=rtcp:`` (RFC 3605) follows the
new port. Everything else (codecs, ptime, telephone-event, direction, o=, attributes
this module has never heard of) is end-to-end business between the phones and passes
through byte for byte, in order. That is why the model keeps every line verbatim and
:func:`rewrite_sdp` edits only the lines it owns instead of re-serialising a model.

Parsing is strict about the few lines it interprets (``v=``, ``c=``, ``m=``,
``a=rtcp:``) and opaque about the rest. Every malformed input raises :class:`SdpError`,
nothing else, so the B2BUA can answer 488 (or 400) instead of guessing. Line ends: LF
alone is accepted (old phones send it), CRLF is always emitted; blank lines are dropped.
The body is decoded with ``surrogateescape`` so a non-UTF-8 session name survives the
round trip unchanged.

Two deliberate refinements of "replace every address and port":

* A null connection address (``0.0.0.0`` or ``::``) is the RFC 2543 hold signal
  (RFC 3264 §8.4) and is kept: replacing it with a live address would turn a hold into
  a resume for the far side, and a PBX would stop playing music on hold.
* With ``a=rtcp-mux`` (RFC 5761 §5.1.3) an ``a=rtcp:`` that names the RTP port itself
  says "RTCP is multiplexed"; it becomes the new RTP port, not port + 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from proxy.sip.headers import ip_literal

__all__ = [
    "Connection",
    "Direction",
    "Endpoint",
    "Media",
    "Rtcp",
    "Sdp",
    "SdpError",
    "connection_endpoint",
    "parse_sdp",
    "rewrite_sdp",
]

CRLF = "\r\n"
NULL_IPV4 = "0.0.0.0"  # noqa: S104  # an SDP value, never bound
NULL_ADDRESSES = frozenset({NULL_IPV4, "::"})
"""Connection addresses that mean "send me nothing" (hold), never a destination."""


class SdpError(ValueError):
    """A body that is not SDP this proxy can anchor: the one exception parsing raises."""


class Direction(StrEnum):
    """The RFC 3264 direction attribute, as seen from the side that wrote the SDP."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"


_DIRECTIONS = {d.value: d for d in Direction}


@dataclass(frozen=True, slots=True)
class Connection:
    """A ``c=`` line (or the address part of ``a=rtcp:``).

    ``address`` is kept as written, without any multicast ``/ttl`` suffix; it may be an
    FQDN (RFC 4566 allows one), which :func:`connection_endpoint` refuses.
    """

    network_type: str
    address_type: str
    address: str

    @property
    def is_null(self) -> bool:
        return self.address in NULL_ADDRESSES


@dataclass(frozen=True, slots=True)
class Rtcp:
    """``a=rtcp:PORT [IN IP4 ADDRESS]`` (RFC 3605)."""

    port: int
    connection: Connection | None = None


@dataclass(frozen=True, slots=True)
class Media:
    """One media section: its ``m=`` line and every line up to the next ``m=``."""

    lines: tuple[str, ...]
    """The section's lines verbatim, ``m=`` first, without line ends."""
    media: str
    port: int
    port_count: int | None
    protocol: str
    formats: tuple[str, ...]
    connection: Connection | None
    """The media-level ``c=``; None means the session-level one applies."""
    rtcp: Rtcp | None
    rtcp_mux: bool
    direction: Direction
    """Effective direction: the media's own attribute, else the session's, else sendrecv."""


@dataclass(frozen=True, slots=True)
class Sdp:
    session_lines: tuple[str, ...]
    """Lines before the first ``m=``, verbatim, ``v=`` first, without line ends."""
    connection: Connection | None
    direction: Direction
    """Session-level direction attribute (sendrecv when absent)."""
    media: tuple[Media, ...]

    def lines(self) -> Iterator[str]:
        yield from self.session_lines
        for media in self.media:
            yield from media.lines

    def encode(self) -> bytes:
        """The body with CRLF line ends: the input, byte for byte, for CRLF input."""
        return "".join(line + CRLF for line in self.lines()).encode("utf-8", "surrogateescape")


class Endpoint(NamedTuple):
    """Where a stream's RTP and RTCP go, as the relay needs it."""

    ip: str
    """Normalised IP literal; ``0.0.0.0`` / ``::`` mean hold (send nothing)."""
    rtp_port: int
    """0 means the stream is rejected or disabled (send nothing)."""
    rtcp_port: int
    """``a=rtcp:`` port, else RTP + 1; 0 when there is no RTP port."""
    rtcp_mux: bool
    """``a=rtcp-mux`` in *this* SDP; multiplexing is in use only if offer and answer agree."""


# --------------------------------------------------------------------------- parsing


_WELL_FORMED = re.compile(r"(?:[A-Za-z]=[^\r\n\x00]*)?\r?(?:\n(?:[A-Za-z]=[^\r\n\x00]*)?\r?)*")
"""A body every line of which passes the checks of :func:`_split_lines`' loop (empty,
or ``x=`` and no CR or NUL, each with one optional CR before its LF): one regular
expression at C speed instead of four checks per line in Python."""


def _split_lines(body: bytes) -> list[str]:
    if not isinstance(body, bytes | bytearray | memoryview):
        raise SdpError("SDP body must be bytes")
    text = bytes(body).decode("utf-8", "surrogateescape")
    if _WELL_FORMED.fullmatch(text):
        return [line for raw in text.split("\n") if (line := raw.removesuffix("\r"))]
    lines = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line:
            continue
        if "\r" in line or "\x00" in line:
            raise SdpError("bare CR or NUL inside an SDP line")
        if len(line) < 2 or line[1] != "=" or not (line[0].isascii() and line[0].isalpha()):
            raise SdpError(f"not an SDP line: {line[:40]!r}")
        lines.append(line)
    return lines


def _number(text: str, what: str, low: int = 0, high: int = 65535) -> int:
    # isdecimal() alone accepts non-ASCII digits that int() would happily convert.
    if not (text.isascii() and text.isdecimal()) or len(text) > 5:
        raise SdpError(f"{what} is not a number: {text[:20]!r}")
    value = int(text)
    if not low <= value <= high:
        raise SdpError(f"{what} out of range: {value}")
    return value


def _connection(tokens: Sequence[str], what: str) -> Connection:
    if len(tokens) != 3:
        raise SdpError(f"{what} must be '<nettype> <addrtype> <address>'")
    address = tokens[2].partition("/")[0]
    if not address:
        raise SdpError(f"{what} has an empty address")
    return Connection(tokens[0], tokens[1], address)


def _parse_rtcp(value: str) -> Rtcp:
    tokens = value.split()
    if not tokens:
        raise SdpError("a=rtcp: without a port")
    port = _number(tokens[0], "a=rtcp port")
    if len(tokens) == 1:
        return Rtcp(port)
    return Rtcp(port, _connection(tokens[1:], "a=rtcp address"))


_M_PORT = re.compile(r"([0-9]+)(?:/([0-9]+))?")


def _parse_m(value: str) -> tuple[str, int, int | None, str, tuple[str, ...]]:
    tokens = value.split()
    if len(tokens) < 3:
        raise SdpError("m= line must be '<media> <port> <proto> <fmt> ...'")
    match = _M_PORT.fullmatch(tokens[1])
    if match is None:
        raise SdpError(f"m= port is not a number: {tokens[1][:20]!r}")
    port = _number(match[1], "m= port")
    count = None if match[2] is None else _number(match[2], "m= port count", low=1)
    return tokens[0], port, count, tokens[2], tuple(tokens[3:])


class _Section:
    """Accumulates one section's interpreted lines while parsing."""

    __slots__ = ("connection", "direction", "lines", "rtcp", "rtcp_mux")

    def __init__(self, first: str) -> None:
        self.lines = [first]
        self.connection: Connection | None = None
        self.direction: Direction | None = None
        self.rtcp: Rtcp | None = None
        self.rtcp_mux = False

    def add(self, line: str, media_level: bool) -> None:
        self.lines.append(line)
        kind, value = line[0], line[2:]
        if kind == "c":
            if self.connection is not None:
                raise SdpError("more than one c= line in a section")
            self.connection = _connection(value.split(), "c= line")
        elif kind == "a":
            name, colon, rest = value.partition(":")
            if not colon and name in _DIRECTIONS:
                self.direction = _DIRECTIONS[name]
            elif media_level and colon and name == "rtcp":
                if self.rtcp is not None:
                    raise SdpError("more than one a=rtcp: line in a media section")
                self.rtcp = _parse_rtcp(rest)
            elif not colon and name == "rtcp-mux":
                self.rtcp_mux = True
        elif kind == "v":
            raise SdpError("v= line after the first line")


def parse_sdp(body: bytes) -> Sdp:
    """Parse an SDP body; raises :class:`SdpError` (only) if it is malformed.

    Required: ``v=0`` as the first line; every ``m=`` well formed; ``c=``, ``a=rtcp:``
    well formed where present, at most one of each per section; a connection address
    (media-level or session-level) for every stream that is not rejected (port 0).
    """
    lines = _split_lines(body)
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP must start with v=0")
    session = _Section(lines[0])
    sections: list[tuple[str, _Section]] = []
    current = session
    for line in lines[1:]:
        if line[0] == "m":
            current = _Section(line)
            sections.append((line[2:], current))
        else:
            current.add(line, media_level=current is not session)

    session_direction = session.direction or Direction.SENDRECV
    media = []
    for value, section in sections:
        kind, port, count, protocol, formats = _parse_m(value)
        if port and section.connection is None and session.connection is None:
            raise SdpError(f"m={kind} has no c= line and the session has none")
        media.append(
            Media(
                lines=tuple(section.lines),
                media=kind,
                port=port,
                port_count=count,
                protocol=protocol,
                formats=formats,
                connection=section.connection,
                rtcp=section.rtcp,
                rtcp_mux=section.rtcp_mux,
                direction=section.direction or session_direction,
            )
        )
    return Sdp(
        session_lines=tuple(session.lines),
        connection=session.connection,
        direction=session_direction,
        media=tuple(media),
    )


def connection_endpoint(sdp: Sdp, index: int) -> Endpoint:
    """Where stream ``index`` of this SDP wants its RTP and RTCP.

    The address of ``a=rtcp:``, if any, is not reported: the relay latches RTCP on the
    source it actually arrives from (RFC 4961 symmetric RTP), like RTP.
    Raises :class:`SdpError` if the connection address is not an IP literal (an FQDN)
    and :class:`IndexError` if there is no such stream.
    """
    media = sdp.media[index]
    connection = media.connection or sdp.connection
    if connection is None:  # only possible for a rejected stream (port 0)
        return Endpoint(NULL_IPV4, 0, 0, media.rtcp_mux)
    literal = ip_literal(connection.address)
    if literal is None:
        message = f"connection address is not an IP address: {connection.address!r}"
        raise SdpError(message)
    ip = literal[1]
    rtp_port = media.port
    if media.rtcp is not None:
        rtcp_port = media.rtcp.port
    else:
        rtcp_port = rtp_port + 1 if 0 < rtp_port < 65535 else 0
    return Endpoint(ip, rtp_port, rtcp_port if rtp_port else 0, media.rtcp_mux)


# --------------------------------------------------------------------------- rewriting


def _media_address(media_ip: str) -> str:
    """``IN IP4 x`` / ``IN IP6 x`` for a validated, unicast media address."""
    literal = ip_literal(media_ip)
    if literal is None:
        raise ValueError(f"media_ip is not an IP address: {media_ip!r}")
    address = literal[0]
    if address.is_unspecified:
        raise ValueError("media_ip must not be the unspecified address (that means hold)")
    return f"IN IP{address.version} {address}"


def _rewrite_c(line: str, address: str) -> str:
    # Parsed already; a null address is a hold and is kept (see the module docstring).
    if line[2:].split()[2].partition("/")[0] in NULL_ADDRESSES:
        return line
    return "c=" + address


_M_LINE_PORT = re.compile(r"(m=\s*\S+\s+)[0-9]+")


def _rewrite_m(line: str, port: int) -> str:
    # Replace only the port digits so the rest of the line keeps its exact spelling.
    return _M_LINE_PORT.sub(lambda m: f"{m[1]}{port}", line, count=1)


def _rewrite_rtcp(media: Media, new_port: int | None, address: str) -> str:
    assert media.rtcp is not None
    rtcp = media.rtcp
    if new_port is None:
        port = rtcp.port
    elif new_port == 0:
        port = 0  # a declined stream: nothing to send RTCP to
    elif media.rtcp_mux and rtcp.port == media.port:
        port = new_port  # RFC 5761: "RTCP is on the RTP port"
    else:
        port = new_port + 1
    if rtcp.connection is None:
        return f"a=rtcp:{port}"
    if rtcp.connection.is_null:
        c = rtcp.connection
        return f"a=rtcp:{port} {c.network_type} {c.address_type} {c.address}"
    return f"a=rtcp:{port} {address}"


def rewrite_sdp(
    sdp_body: bytes, media_ip: str, ports: Sequence[int | None], parsed: Sdp | None = None
) -> bytes:
    """The body with the media anchored on ``media_ip`` and ``ports``; nothing else changed.

    ``ports[i]`` replaces the port of the i-th ``m=`` line; None leaves it (e.g. a
    rejected stream's 0). Every ``c=`` becomes ``IN IP4|IP6 media_ip`` unless it holds
    a null (hold) address; ``a=rtcp:`` becomes the new port + 1, with its address (if
    any) replaced by ``media_ip``. Raises :class:`SdpError` for a malformed body and
    :class:`ValueError` for bad arguments (``media_ip`` not an IP address, wrong number
    of ports, port out of range). ``parsed``: ``sdp_body`` already parsed by the caller
    (the media glue parses every body it relays; a second parse was ~5 % of a call).
    """
    address = _media_address(media_ip)
    sdp = parsed if parsed is not None else parse_sdp(sdp_body)
    if len(ports) != len(sdp.media):
        raise ValueError(f"{len(ports)} ports given for {len(sdp.media)} m= lines")
    for port in ports:
        if port is not None and not 0 <= port <= 65534:
            raise ValueError(f"port out of range: {port}")

    out = [_rewrite_c(line, address) if line[0] == "c" else line for line in sdp.session_lines]
    for media, new_port in zip(sdp.media, ports, strict=True):
        out.append(media.lines[0] if new_port is None else _rewrite_m(media.lines[0], new_port))
        if new_port and media.connection is None and sdp.connection is None:
            # A stream revived from port 0 had no c= (RFC 4566 allows that for port 0):
            # once it has a port it needs the address it is anchored on.
            out.append(f"c={address}")
        for line in media.lines[1:]:
            if line[0] == "c":
                out.append(_rewrite_c(line, address))
            elif line.startswith("a=rtcp:"):
                out.append(_rewrite_rtcp(media, new_port, address))
            else:
                out.append(line)
    return "".join(line + CRLF for line in out).encode("utf-8", "surrogateescape")
