"""An in-memory world for the sans-IO B2BUA: fake clock, fake media engine, fake peers.

The tests play the phones (inside) and the PBX/ITSP (outside) by hand: they build SIP
messages as text, feed them to :meth:`B2BUA.receive` with a source address, parse what
comes back (:class:`Outbound`) and answer it. Time only moves when a test calls
:meth:`World.advance`, which polls the core at every deadline it announces, so timer
behaviour (retransmissions, B/F/H/L) is exact and instant.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

from proxy.b2bua.config import Config, parse_config
from proxy.b2bua.core import B2BUA, Outbound
from proxy.b2bua.line_keys import Security
from proxy.b2bua.routing import ResolveQuery
from proxy.media.commands import (
    AcceptSrtp,
    ClearSrtp,
    MediaCommand,
    MediaEvent,
    PlayTone,
    Release,
    SetRemote,
    SetSrtp,
    SetTxSsrc,
    SrtpAuthenticated,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.engine import Side, StreamStats
from proxy.media.ports import PortsExhausted
from proxy.sip.headers import NameAddr
from proxy.sip.message import Request, Response, SipParseError, parse_message
from proxy.sip.transaction import Address

# --- the network -------------------------------------------------------------------------

PROXY_IN = Address("10.0.0.1", 5060)
PROXY_OUT = Address("192.0.2.1", 5060)
PHONE = Address("10.0.0.10", 5060)
"""The phone of line +14085551234 (registers, calls out)."""
PHONE_TCP = Address("10.0.0.10", 40001, "tcp", conn=11)
PHONE2 = Address("10.0.0.20", 5062)
"""The phone of line 14085555678 (static contact in the config)."""
UPSTREAM = Address("203.0.113.5", 5060)
UPSTREAM_TCP = Address("203.0.113.5", 5060, "tcp", conn=21)

LINE1 = "14085551234"
LINE2 = "14085555678"

CONFIG = """\
[inside]
listen = "10.0.0.1:5060"
media_ip = "10.0.0.1"
unknown_users = "{unknown_users}"
[outside]
listen = "192.0.2.1:5060"
media_ip = "192.0.2.1"
{outside_extra}
[media]
port_min = 20000
port_max = 20999
[sip]
user_agent = ""
{sip_extra}
[limits]
max_calls = {max_calls}
[[line]]
user_id = "+14085551234"
allowed_sources = ["10.0.0.10"]
[[line]]
user_id = "14085555678"
contact = "sip:10.0.0.20:5062"
[[line]]
user_id = "14085550000"
"""


def make_config(
    *,
    upstream: str | None = "sip:203.0.113.5:5060",
    registrar: str | None = None,
    unknown_users: str = "relay",
    max_calls: int = 0,
    sip_extra: str = "",
    media_extra: str = "",
) -> Config:
    outside = []
    if upstream:
        outside.append(f'upstream = "{upstream}"')
    if registrar:
        outside.append(f'registrar = "{registrar}"')
    text = CONFIG.format(
        unknown_users=unknown_users,
        outside_extra="\n".join(outside),
        max_calls=max_calls,
        sip_extra=sip_extra,
    )
    if media_extra:
        text = text.replace("port_max = 20999\n", f"port_max = 20999\n{media_extra}\n")
    return parse_config(text, "test.toml")


# --- a fake media engine -----------------------------------------------------------------


class FakeSession:
    """Records every command the core gives it; ports come from the engine's pool."""

    def __init__(
        self, engine: FakeMedia, sid: int, call_id: str, streams: int, ports: list[int]
    ) -> None:
        self.engine = engine
        self.id = sid
        self._call_id = call_id
        self._streams = streams
        self._ports = ports  # [inside0, outside0, inside1, outside1, ...]
        self.calls: list[MediaCommand] = []
        """Every command for this session, in order, as the core made it."""
        self.remotes: dict[tuple[Side, int], tuple[str, int, int, bool]] = {}
        self.srtp: dict[Side, SrtpKeys | None] = {}
        self.released = False
        self.packets_in = 0
        """What stats() reports as received from the phone (tests move it)."""
        self.watched: set[Side] = set()
        """Sides the core asked to watch (``WatchSrtp``): :meth:`authenticate` plays "a
        packet from that side authenticated"."""
        self.tx_ssrc: dict[Side, int | None] = {}

    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def streams(self) -> int:
        return self._streams

    def local(self, side: Side, index: int) -> tuple[str, int]:
        if not 0 <= index < self._streams:
            raise IndexError(index)
        ip = self.engine.ips[side]
        return ip, self._ports[2 * index + (0 if side is Side.INSIDE else 1)]

    def recorded(self, kind: type[C]) -> list[C]:
        """The recorded commands of one type, in order."""
        return [c for c in self.calls if isinstance(c, kind)]

    def authenticate(self, side: Side) -> None:
        """The engine reports that SRTP from ``side`` authenticated (it must have been
        watched once)."""
        assert side in self.watched, f"no WatchSrtp for the {side} side"
        self.engine.report(SrtpAuthenticated(self.id, side))

    def stats(self) -> dict[Side, list[StreamStats]]:
        def zero() -> StreamStats:
            # every counter the engine's StreamStats declares, whatever this version has
            counters: dict[str, object] = dict.fromkeys(StreamStats.__annotations__, 0)
            counters["drops"] = {}
            return cast(StreamStats, counters)

        stats = {side: [zero() for _ in range(self._streams)] for side in Side}
        stats[Side.INSIDE][0]["packets_in"] = self.packets_in
        return stats

    # --- what each command does to the fake (see FakeMedia.apply) ---------------------

    def set_remote(self, c: SetRemote) -> None:
        if not 0 <= c.index < self._streams:
            raise IndexError(c.index)
        assert not self.released, "SetRemote on a released session"
        self.remotes[(c.side, c.index)] = (c.ip, c.rtp_port, c.rtcp_port, c.rtcp_mux)

    def set_keys(self, c: SetSrtp | SwitchSrtp) -> None:
        self.srtp[c.side] = c.keys

    def clear_srtp(self, c: ClearSrtp) -> None:
        self.srtp[c.side] = None

    def set_tx_ssrc(self, c: SetTxSsrc) -> None:
        self.tx_ssrc[c.side] = c.ssrc

    def watch_srtp(self, c: WatchSrtp) -> None:
        self.watched.add(c.side)

    def release(self, c: Release) -> None:
        if not self.released:
            self.released = True
            self.engine.free.extend(self._ports)

    def nothing(self, c: MediaCommand) -> None:
        """Recorded only (AcceptSrtp, PlayTone)."""


C = TypeVar("C", bound=MediaCommand)

_FAKE_HANDLERS: dict[type, Callable[[FakeSession, Any], None]] = {
    SetRemote: FakeSession.set_remote,
    SetSrtp: FakeSession.set_keys,
    AcceptSrtp: FakeSession.nothing,
    SwitchSrtp: FakeSession.set_keys,
    ClearSrtp: FakeSession.clear_srtp,
    SetTxSsrc: FakeSession.set_tx_ssrc,
    PlayTone: FakeSession.nothing,
    WatchSrtp: FakeSession.watch_srtp,
    Release: FakeSession.release,
}


class FakeMedia:
    """``allocate`` takes two RTP ports (inside, outside) per stream from a small pool;
    ``apply`` records each command on its session."""

    def __init__(self, pairs: int = 40, port_min: int = 30000) -> None:
        self.free = list(range(port_min, port_min + 2 * pairs, 2))
        self.capacity = pairs
        self.sessions: list[FakeSession] = []
        self.by_id: dict[int, FakeSession] = {}
        self.ips = {Side.INSIDE: "10.0.0.1", Side.OUTSIDE: "192.0.2.1"}
        self.on_event: Callable[[MediaEvent], None] | None = None
        self.reports_flowing = False
        """Like the in-process relay: no ``MediaFlowing``, the core reads ``stats()``
        (tests move ``packets_in``); :meth:`report` a ``MediaFlowing`` after setting
        this to play a worker pool."""
        self.reports_final = False
        """Like the in-process relay: ``stats()`` before the release is final; a test
        that plays a worker pool sets it (before the core is made) and :meth:`report`s
        each ``MediaReleased``."""
        self._ids = itertools.count(1)

    def allocate(self, call_id: str, streams: int) -> FakeSession:
        if len(self.free) < 2 * streams:
            raise PortsExhausted("fake pool empty")
        ports = [self.free.pop(0) for _ in range(2 * streams)]
        session = FakeSession(self, next(self._ids), call_id, streams, ports)
        self.sessions.append(session)
        self.by_id[session.id] = session
        return session

    def apply(self, command: MediaCommand) -> None:
        session = self.by_id[command.session]
        session.calls.append(command)
        _FAKE_HANDLERS[type(command)](session, command)

    def report(self, event: MediaEvent) -> None:
        assert self.on_event is not None, "nobody listens to media events"
        self.on_event(event)

    def close_now(self) -> None:
        for session in self.active:
            self.apply(Release(session.id))

    async def close(self) -> None:
        self.close_now()

    @property
    def active(self) -> list[FakeSession]:
        return [s for s in self.sessions if not s.released]

    def all_returned(self) -> bool:
        return not self.active and len(self.free) == self.capacity

    # what /status reads
    @property
    def pooled(self) -> int:
        return 0

    def pooled_ports(self) -> list[int]:
        return []

    def workers(self) -> list[dict[str, Any]]:
        return []


# --- messages ----------------------------------------------------------------------------

_branches = itertools.count(1)


def branch() -> str:
    return f"z9hG4bK-test-{next(_branches)}-{secrets.token_hex(3)}"


def tag() -> str:
    return secrets.token_hex(4)


def sdp(ip: str, port: int, *, direction: str | None = None, video: int | None = None) -> bytes:
    lines = [
        "v=0",
        f"o=- 1234 1 IN IP4 {ip}",
        "s=call",
        f"c=IN IP4 {ip}",
        "t=0 0",
        f"m=audio {port} RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=ptime:20",
    ]
    if direction:
        lines.append(f"a={direction}")
    if video is not None:
        lines += [f"m=video {video} RTP/AVP 96", "a=rtpmap:96 H264/90000"]
    return ("\r\n".join(lines) + "\r\n").encode()


def via_for(addr: Address, br: str | None = None, *, rport: bool = True) -> str:
    transport = addr.transport.upper()
    return f"SIP/2.0/{transport} {addr.host}:{addr.port};branch={br or branch()}" + (
        ";rport" if rport else ""
    )


def build_request(
    method: str,
    uri: str,
    *,
    via: str | Sequence[str],
    from_: str,
    to: str,
    call_id: str,
    cseq: int,
    cseq_method: str | None = None,
    contact: str | None = None,
    max_forwards: int | None = 70,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str = "application/sdp",
) -> bytes:
    vias = [via] if isinstance(via, str) else list(via)
    lines = [f"{method} {uri} SIP/2.0"]
    lines += [f"Via: {v}" for v in vias]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines += [f"From: {from_}", f"To: {to}", f"Call-ID: {call_id}"]
    lines.append(f"CSeq: {cseq} {cseq_method or method}")
    if contact:
        lines.append(f"Contact: {contact}")
    lines += [f"{n}: {v}" for n, v in headers]
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def build_response(
    request: Request,
    status: int,
    reason: str = "",
    *,
    to_tag: str | None = None,
    contact: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    record_route: Sequence[str] | None = None,
    content_type: str = "application/sdp",
) -> bytes:
    """A UAS response to ``request`` (Via, From, To + tag, Call-ID, CSeq copied)."""
    reason = reason or {100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK"}.get(
        status, "Whatever"
    )
    lines = [f"SIP/2.0 {status} {reason}"]
    for hname, value in request.headers:
        key = hname.lower()
        if key in ("via", "v", "from", "f", "call-id", "i", "cseq"):
            lines.append(f"{hname}: {value}")
        elif key in ("to", "t"):
            if to_tag and ";tag=" not in value:
                value = f"{value};tag={to_tag}"
            lines.append(f"{hname}: {value}")
        elif key == "record-route" and record_route is None:
            lines.append(f"{hname}: {value}")
    for rr in record_route or ():
        lines.append(f"Record-Route: {rr}")
    if contact:
        lines.append(f"Contact: {contact}")
    lines += [f"{n}: {v}" for n, v in headers]
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse(data: bytes) -> Request | Response:
    return parse_message(data)


def uri_of(name_addr: str) -> str:
    return NameAddr.parse(name_addr).uri


# --- dialogs as a peer sees them ---------------------------------------------------------


@dataclass
class PeerDialog:
    """One end's view of a dialog with the proxy: enough to send in-dialog requests."""

    addr: Address
    call_id: str
    local: str
    """Our From value in requests we send (with our tag)."""
    remote: str
    """The To value in requests we send (with the proxy's tag)."""
    cseq: int
    target: str
    """The R-URI: the proxy's Contact."""
    contact: str
    route: list[str] = field(default_factory=list)

    @property
    def local_tag(self) -> str:
        return NameAddr.parse(self.local).tag or ""

    @property
    def remote_tag(self) -> str:
        return NameAddr.parse(self.remote).tag or ""

    def request(
        self,
        method: str,
        *,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        cseq: int | None = None,
        max_forwards: int | None = 70,
        content_type: str = "application/sdp",
        br: str | None = None,
    ) -> bytes:
        if cseq is None:
            if method != "ACK":
                self.cseq += 1
            cseq = self.cseq
        route = [("Route", r) for r in self.route]
        return build_request(
            method,
            self.target,
            via=via_for(self.addr, br),
            from_=self.local,
            to=self.remote,
            call_id=self.call_id,
            cseq=cseq,
            contact=self.contact,
            max_forwards=max_forwards,
            headers=[*route, *headers],
            body=body,
            content_type=content_type,
        )


def uac_dialog(addr: Address, request: Request, response: Response, contact: str) -> PeerDialog:
    """The caller's dialog after ``response`` (with a To tag) to its ``request``."""
    target = uri_of(response.get_all("contact")[0])
    route = list(reversed(response.get_all("record-route")))
    return PeerDialog(
        addr,
        request.call_id,
        request.get("from") or "",
        response.get("to") or "",
        request.cseq.number,
        target,
        contact,
        route,
    )


def uas_dialog(
    addr: Address, request: Request, my_tag: str, contact: str, cseq: int = 500
) -> PeerDialog:
    """The callee's dialog after answering ``request`` with ``my_tag``."""
    target = uri_of(request.get_all("contact")[0])
    to = request.get("to") or ""
    return PeerDialog(
        addr,
        request.call_id,
        f"{to};tag={my_tag}",
        request.get("from") or "",
        cseq,
        target,
        contact,
        request.get_all("record-route"),
    )


# --- the world ---------------------------------------------------------------------------


@dataclass
class Wire:
    """One message the proxy sent, parsed."""

    side: Side
    dest: Address
    msg: Request | Response

    @property
    def request(self) -> Request:
        assert isinstance(self.msg, Request), self.msg
        return self.msg

    @property
    def response(self) -> Response:
        assert isinstance(self.msg, Response), self.msg
        return self.msg


def wires(out: Iterable[Outbound]) -> list[Wire]:
    """Parse everything the proxy sent (it must always be well-formed SIP).

    The one exception is the salvage reply to an unparsable request (RFC 4475): it
    copies the sender's own Via/From/To/Call-ID/CSeq byte for byte, broken or not, and
    goes back to the source address only; it must still be a single clean status line
    plus those five headers."""
    result = []
    for item in out:
        try:
            msg = parse_message(item.data, stream=item.dest.reliable)
        except SipParseError:
            head = item.data.split(b"\r\n")
            assert re.match(rb"^SIP/2\.0 (400|413|505) [ -~]+$", head[0]), item.data[:80]
            assert [h.split(b":", 1)[0] for h in head[1:7]] == [
                b"Via",
                b"From",
                b"To",
                b"Call-ID",
                b"CSeq",
                b"Content-Length",
            ], item.data
            continue
        result.append(Wire(item.side, item.dest, msg))
    return result


NAMES: dict[str, str | list[Address]] = {}
"""What :class:`FakeResolver` knows: host name -> address, or the full list of targets
an RFC 3263 lookup would give (tests patch it per module)."""


class FakeResolver:
    """The I/O edge's name lookups: queries are noted, and :class:`World` answers them
    from :data:`NAMES` after each message, as an edge answers a moment later."""

    def __init__(self) -> None:
        self.asked: list[ResolveQuery] = []

    def request(self, query: ResolveQuery) -> None:
        self.asked.append(query)


class World:
    """The core, a fake clock and a fake media engine; every message it sent is kept."""

    def __init__(
        self,
        config: Config | None = None,
        media: FakeMedia | None = None,
        *,
        security: Security | None = None,
        utc_now: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config or make_config()
        self.media = media or FakeMedia()
        self.resolver = FakeResolver()
        if utc_now is None:
            self.core = B2BUA(self.config, self.media, security, resolver=self.resolver)
        else:
            self.core = B2BUA(self.config, self.media, security, utc_now, resolver=self.resolver)
        self.now = 1000.0
        self.sent: list[Wire] = []
        self.media_out: list[Outbound] = []
        """What the core answered to media events, returned by the next :meth:`advance`
        (the server sends it on the loop iteration after the event)."""
        self.media.on_event = self._media_event
        self.auto_lookups = True
        """Answer the core's name lookups after each message (False: the test does)."""

    def _media_event(self, event: MediaEvent) -> None:
        self.media_out += self.core.on_media_event(event, self.now)

    def answer_lookups(self) -> list[Outbound]:
        """Answer the name lookups the core asked for (from :data:`NAMES`)."""
        out: list[Outbound] = []
        while self.auto_lookups and self.resolver.asked:
            query = self.resolver.asked.pop(0)
            known = NAMES.get(query.host)
            transport = query.transport or "udp"
            port = query.port or (5061 if transport == "tls" else 5060)
            if isinstance(known, list):
                targets = known
            else:
                targets = [Address(known, port, transport)] if known else []
            out.extend(self.core.resolved(query, targets, 300.0, self.now))
        return out

    def send(self, side: Side, data: bytes, source: Address) -> list[Wire]:
        out = self.core.receive(side, data, source, self.now)
        out.extend(self.answer_lookups())
        parsed = wires(out)
        self.sent.extend(parsed)
        return parsed

    def phone(self, data: bytes, source: Address = PHONE) -> list[Wire]:
        return self.send(Side.INSIDE, data, source)

    def upstream(self, data: bytes, source: Address = UPSTREAM) -> list[Wire]:
        return self.send(Side.OUTSIDE, data, source)

    def advance(self, seconds: float) -> list[Wire]:
        """Move the clock, polling at every deadline on the way."""
        end = self.now + seconds
        out, self.media_out = self.media_out, []
        for _ in range(100_000):
            deadline = self.core.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            out.extend(self.core.poll(self.now))
            out.extend(self.answer_lookups())
        else:  # pragma: no cover - a deadline that never moves is a bug
            raise AssertionError("next_deadline() does not advance")
        self.now = end
        out.extend(self.core.poll(self.now))
        out.extend(self.answer_lookups())
        parsed = wires(out)
        self.sent.extend(parsed)
        return parsed

    def settle(self) -> list[Wire]:
        """Run every timer to completion (a few minutes of fake time)."""
        return self.advance(300.0)


def only(items: Sequence[Wire], what: str = "") -> Wire:
    assert len(items) == 1, f"expected one {what}, got {[summary(w) for w in items]}"
    return items[0]


def pick(
    items: Iterable[Wire],
    side: Side | None = None,
    *,
    method: str | None = None,
    status: int | None = None,
) -> list[Wire]:
    result = []
    for wire in items:
        if side is not None and wire.side is not side:
            continue
        msg = wire.msg
        if method is not None and (not isinstance(msg, Request) or msg.method != method):
            continue
        if status is not None and (not isinstance(msg, Response) or msg.status != status):
            continue
        result.append(wire)
    return result


def summary(wire: Wire) -> str:
    msg = wire.msg
    if isinstance(msg, Request):
        return f"{wire.side.value}: {msg.method} -> {wire.dest.host}:{wire.dest.port}"
    return f"{wire.side.value}: {msg.status} {msg.cseq} -> {wire.dest.host}:{wire.dest.port}"
