"""The B2BUA engine: two SIP sides, calls bridged between them, sans-IO.

:class:`B2BUA` is fed datagrams/stream messages with the side and address they came
from and the current time; it returns :class:`Outbound` messages (side + bytes +
destination) and asks :meth:`next_deadline` to be woken. Sockets, DNS and timers live
in :mod:`proxy.b2bua.server`; media ports live behind :class:`MediaEngine`. That split
is what lets the whole call model be tested in memory with a fake clock.

What passes through unchanged is everything the B2BUA does not own: every header not
listed in :data:`OWNED_HEADERS` (X- headers, Alert-Info, P-Asserted-Identity,
Session-Expires, Diversion, Authorization/WWW-Authenticate...), and every body except
SDP, whose connection data is rewritten to anchor media. What it owns it rewrites per
leg: Via, Contact, Route/Record-Route, Call-ID, tags, CSeq, Max-Forwards and
Content-Length.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from datetime import UTC, datetime
from typing import Protocol

from proxy.b2bua import secure as sec
from proxy.b2bua.config import Config, LineConfig, SideConfig
from proxy.b2bua.legs import Call, CallState, Leg, ProxyRequest, Relay, new_call_id, new_tag
from proxy.b2bua.line_keys import Security
from proxy.b2bua.media import MediaHandle, stream_count
from proxy.media.engine import MediaSession, Side
from proxy.media.ports import PortsExhausted
from proxy.sip.headers import (
    NameAddr,
    SipHeaderError,
    SipUri,
    bare_host,
    format_hostport,
    split_header_values,
)
from proxy.sip.message import (
    Request,
    Response,
    SipMessage,
    SipParseError,
    canonical,
    parse_message,
)
from proxy.sip.sdp import SdpError
from proxy.sip.transaction import (
    AckReceived,
    Address,
    ClientTransaction,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    StrayResponse,
    Timers,
    TransactionEvent,
    TransactionLayer,
    TransactionTimeout,
    Transmit,
    new_branch,
    response_to,
)
from proxy.xsipura.handshake import ClearReason, PeerIdentity

log = logging.getLogger("sipura.b2bua")

OWNED_HEADERS = frozenset(
    {"via", "route", "record-route", "contact", "call-id", "from", "to", "cseq",
     "content-length", "max-forwards"}
)  # fmt: skip
"""Headers the B2BUA rewrites per leg; all others pass through in order."""

TARGET_REFRESH = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK, REFER, NOTIFY, MESSAGE, REGISTER"
ONE_SHOT_METHODS = frozenset({"MESSAGE", "NOTIFY", "PUBLISH", "INFO"})
"""Out-of-dialog requests relayed as a single transaction (no dialog to keep)."""
XSIPURA = "x-sipura"


class MediaEngine(Protocol):
    def allocate(self, call_id: str, streams: int) -> MediaSession: ...


@dataclass(frozen=True, slots=True)
class Outbound:
    side: Side
    data: bytes
    dest: Address


@dataclass(slots=True)
class Binding:
    """A registered contact of an inside line: where inbound calls go."""

    contact: str
    flow: Address
    expires_at: float


@dataclass(slots=True)
class RegisterRelay:
    """A REGISTER relayed upstream on behalf of a phone."""

    server_tx: ServerTransaction
    user_key: str | None
    contacts: list[str]
    flow: Address
    default_expires: str | None = None
    """The phone's Expires header: what it asked for when the registrar does not say."""
    sent: list[str] = field(default_factory=list)
    """The URIs of the Contacts the proxy registered in the phone's name."""


@dataclass(slots=True)
class OneShot:
    """An out-of-dialog non-INVITE relayed to the other side."""

    server_tx: ServerTransaction
    to_tag: str


@dataclass(slots=True)
class Stats:
    calls_total: int = 0
    calls_answered: int = 0
    calls_failed: int = 0
    bad_messages: int = 0
    registrations: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    secured: int = 0
    """Calls whose outside leg became SRTP (x-sipura)."""
    clear_reasons: dict[str, int] = field(default_factory=dict)
    """Why secure attempts ended in the clear, by ClearReason value."""


@dataclass(frozen=True, slots=True)
class _Route:
    ruri: str
    dest: Address
    line: LineConfig | None


class _Reject(Exception):
    def __init__(self, status: int, reason: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.extra = list(extra)


def _digits(user: str | None) -> str:
    return (user or "").removeprefix("+")


class B2BUA:
    """Both SIP sides of the proxy and every call bridged between them."""

    def __init__(
        self,
        config: Config,
        media: MediaEngine,
        security: Security | None = None,
        utc_now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.media = media
        self.security = security
        self.utc_now = utc_now
        """Wall clock for MC expiry only (injected: the core reads no clock itself)."""
        self.on_wakeup: Callable[[], None] | None = None
        """Set by the IO edge: called when media reports an event (SRTP authenticated),
        so that :meth:`poll` runs soon."""
        self._srtp_events: list[int] = []
        timers = Timers(config.sip.t1_s, config.sip.t2_s, config.sip.t4_s)
        self.layers = {
            Side.INSIDE: TransactionLayer(timers),
            Side.OUTSIDE: TransactionLayer(timers),
        }
        self.sides: dict[Side, SideConfig] = {
            Side.INSIDE: config.inside,
            Side.OUTSIDE: config.outside,
        }
        self.calls: dict[int, Call] = {}
        self._legs: dict[tuple[Side, str, str], tuple[Call, Leg]] = {}
        self.bindings: dict[str, Binding] = {}
        self._register_ids: dict[str, tuple[str, int, str]] = {}
        self.stats = Stats()
        self._resolved: dict[str, str] = {}

    # --- public interface -------------------------------------------------------------

    def receive(self, side: Side, data: bytes, source: Address, now: float) -> list[Outbound]:
        """One message from the network. Never raises for bad input."""
        try:
            message = parse_message(data, stream=source.reliable)
            _check_addresses(message)
        except SipParseError as exc:
            self.stats.bad_messages += 1
            log.info("%s: dropped malformed message from %s:%s: %s", side.value, source.host,
                     source.port, exc)  # fmt: skip
            reply = bad_request(data, str(exc), exc.status)
            return [] if reply is None else [Outbound(side, reply, source)]
        layer = self.layers[side]
        try:
            events, transmits = layer.receive(message, source, now)
            out = self._wrap(side, transmits)
            for event in events:
                out.extend(self._on_event(side, event, now))
        except (SipParseError, SipHeaderError) as exc:
            self.stats.bad_messages += 1
            log.info("%s: cannot process message from %s: %s", side.value, source.host, exc)
            return []
        return out

    def poll(self, now: float) -> list[Outbound]:
        out: list[Outbound] = []
        for side, layer in self.layers.items():
            events, transmits = layer.poll(now)
            out.extend(self._wrap(side, transmits))
            for event in events:
                out.extend(self._on_event(side, event, now))
        out.extend(self._poll_security(now))
        out.extend(self._poll_rtp_timeout(now))
        return out

    def next_deadline(self) -> float | None:
        deadlines = [
            d for layer in self.layers.values() if (d := layer.next_deadline()) is not None
        ]
        for call in self.calls.values() if self.security is not None else ():
            if call.security is None or call.state is not CallState.CONFIRMED:
                continue  # stage 2 runs in a confirmed dialog only (profile §2)
            if (d := call.security.next_deadline()) is not None:
                deadlines.append(d)
        if self._srtp_events:
            deadlines.append(0.0)
        timeout = self.config.media.rtp_timeout_s
        if timeout:
            deadlines.extend(
                c.media_seen_at + timeout
                for c in self.calls.values()
                if c.state is CallState.CONFIRMED and c.media is not None
            )
        return min(deadlines) if deadlines else None

    def _poll_rtp_timeout(self, now: float) -> list[Outbound]:
        """Hang up confirmed calls whose media stopped (a phone that died mid-call)."""
        timeout = self.config.media.rtp_timeout_s
        out: list[Outbound] = []
        if not timeout:
            return out
        for call in list(self.calls.values()):
            if call.state is not CallState.CONFIRMED or call.media is None:
                continue
            stats = call.media.session.stats()
            packets = sum(int(s["packets_in"]) for streams in stats.values() for s in streams)
            if packets != call.media_packets:
                call.media_packets = packets
                call.media_seen_at = now
            elif now >= call.media_seen_at + timeout:
                log.warning("call %d: no RTP for %d s; hanging up", call.id, timeout)
                out += self._send_bye(call, call.a, now, "RTP timeout")
                out += self._send_bye(call, call.b, now, "RTP timeout")
        return out

    def media_lost(self, sessions: Iterable[MediaSession], now: float) -> list[Outbound]:
        """The engine lost these sessions (a media worker process died): their calls
        cannot carry audio any more, so they end cleanly instead of going silent. An
        answered call gets a BYE with a Reason on both legs (it finishes when they are
        answered or time out); one still ringing is cancelled toward the callee and
        answered 487 toward the caller. Calls on other sessions are not touched."""
        lost = {id(session) for session in sessions}
        out: list[Outbound] = []
        for call in list(self.calls.values()):
            media = call.media
            if media is None or id(media.session) not in lost:
                continue
            log.warning("call %d: its media relay process died; hanging up", call.id)
            if call.state in (CallState.INVITING, CallState.EARLY):
                out += self._cancel_call(call, now)
            elif call.state in (CallState.ANSWERED, CallState.CONFIRMED):
                byes = self._send_bye(call, call.a, now, "media relay failed")
                byes += self._send_bye(call, call.b, now, "media relay failed")
                if not byes:  # no dialog to send a BYE in
                    self._finish(call)
                out += byes
        return out

    def active_calls(self) -> list[dict[str, object]]:
        return [
            {
                "id": call.id,
                "direction": call.direction,
                "state": call.state.value,
                "a_call_id": call.a.call_id,
                "b_call_id": call.b.call_id,
                "line": call.line.user_id if call.line else None,
                "secure": call.security.describe() if call.security else None,
                "media": call.media.session.stats() if call.media else None,
            }
            for call in self.calls.values()
        ]

    # --- helpers ----------------------------------------------------------------------

    @staticmethod
    def _wrap(side: Side, transmits: Iterable[Transmit]) -> list[Outbound]:
        return [Outbound(side, t.data, t.dest) for t in transmits]

    def _other(self, side: Side) -> Side:
        return Side.OUTSIDE if side is Side.INSIDE else Side.INSIDE

    def _via(self, side: Side, transport: str) -> str:
        host, port = self.sides[side].advertised
        return (
            f"SIP/2.0/{transport.upper()} {format_hostport(host, port)};branch={new_branch()};rport"
        )

    def _contact(self, side: Side, transport: str, user: str = "sipura") -> str:
        host, port = self.sides[side].advertised
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{user}@{format_hostport(host, port)}{suffix}>"

    def _resolve(self, uri_text: str, transport_hint: str | None = None) -> Address:
        """A SIP URI -> an address. IP literals as is; names via the system resolver once.

        DNS SRV/NAPTR (RFC 3263) is not done: upstreams are configured with host:port.
        """
        try:
            uri = SipUri.parse(uri_text)
        except SipHeaderError as exc:
            raise _Reject(416, "Unsupported URI Scheme") from exc
        host = bare_host(uri.param("maddr") or uri.host)
        transport = uri.param("transport")
        transport = (transport or transport_hint or "udp").lower()
        if transport not in self.config.sip.transports:
            raise _Reject(503, "Service Unavailable", [("Warning", f'399 - "no {transport}"')])
        return Address(self._resolve_host(host), uri.port or uri.default_port, transport)

    def _resolve_host(self, host: str) -> str:
        cached = self._resolved.get(host)
        if cached is not None:
            return cached
        try:
            cached = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                cached = str(socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0])
            except (OSError, IndexError) as exc:
                raise _Reject(
                    502, "Bad Gateway", [("Warning", f'399 - "cannot resolve {host}"')]
                ) from exc
        if len(self._resolved) < 4096:  # literals and names both: checked once each
            self._resolved[host] = cached
        return cached

    def _respond(
        self, side: Side, tx: ServerTransaction, status: int, reason: str, now: float,
        *, to_tag: str | None = None, extra: Iterable[tuple[str, str]] = (),
    ) -> list[Outbound]:  # fmt: skip
        response = response_to(tx.request, status, reason, to_tag=to_tag)
        for name, value in extra:
            response.add(name, value)
        self._brand(response)
        self.stats.responses[status] = self.stats.responses.get(status, 0) + 1
        return self._wrap(side, self.layers[side].respond(tx, response, now))

    def _brand(self, message: SipMessage, *, request: bool = False) -> None:
        agent = self.config.sip.user_agent
        if agent and not message.has("server") and not message.has("user-agent"):
            message.add("User-Agent" if request else "Server", agent)

    # --- dispatch ---------------------------------------------------------------------

    def _on_event(self, side: Side, event: TransactionEvent, now: float) -> list[Outbound]:
        if isinstance(event, RequestReceived):
            try:
                return self._on_request(side, event.tx, event.request, now)
            except _Reject as rejection:
                return self._respond(side, event.tx, rejection.status, rejection.reason, now,
                                     to_tag=new_tag(), extra=rejection.extra)  # fmt: skip
        if isinstance(event, AckReceived):
            return self._on_ack(side, event.request, event.source, now)
        if isinstance(event, ResponseReceived):
            return self._on_response(side, event.tx, event.response, now)
        if isinstance(event, StrayResponse):
            return self._on_stray(side, event.response, event.source, now)
        if isinstance(event, TransactionTimeout):
            return self._on_timeout(side, event.tx, now)
        return []

    def _on_request(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        method = request.method
        if method == "CANCEL":
            return self._on_cancel(side, tx, request, now)
        max_forwards = request.get("max-forwards")
        if max_forwards is not None and int(max_forwards.strip()) == 0:
            if method == "OPTIONS":
                return self._options(side, tx, now)
            raise _Reject(483, "Too Many Hops")  # in a dialog too: it cannot be relayed
        to_tag = request.to.tag
        if to_tag:
            found = self._legs.get((side, request.call_id, to_tag))
            if found is None:
                raise _Reject(481, "Call/Transaction Does Not Exist")
            return self._in_dialog(side, tx, request, found[0], found[1], now)
        if request.get("require"):
            unsupported = [
                o for o in split_header_values(request.get("require") or "")
                if o.lower() not in ("100rel", "timer", "replaces", XSIPURA)
            ]  # fmt: skip
            if unsupported and method not in ("INVITE",):
                raise _Reject(420, "Bad Extension", [("Unsupported", ", ".join(unsupported))])
        if method == "INVITE":
            return self._new_invite(side, tx, request, now)
        if method == "OPTIONS":
            return self._options(side, tx, now)
        if method == "REGISTER":
            return self._register(side, tx, request, now)
        if method in ONE_SHOT_METHODS:
            return self._one_shot(side, tx, request, now)
        raise _Reject(501, "Not Implemented", [("Allow", ALLOW)])

    def _options(self, side: Side, tx: ServerTransaction, now: float) -> list[Outbound]:
        extra = [("Allow", ALLOW), ("Accept", "application/sdp")]
        if side is Side.OUTSIDE:
            extra.append(("Supported", XSIPURA))
        return self._respond(side, tx, 200, "OK", now, to_tag=new_tag(), extra=extra)

    # --- routing ----------------------------------------------------------------------

    def _route(self, side: Side, request: Request, source: Address, now: float) -> _Route:
        if side is Side.INSIDE:
            line = self._caller_line(request, source)
            if line is None and self.config.inside.unknown_users == "reject":
                raise _Reject(403, "Forbidden")
            upstream = self.config.outside.upstream
            if upstream:
                return _Route(self._retarget(request.uri, upstream), self._resolve(upstream), line)
            return _Route(request.uri, self._resolve(request.uri), line)
        try:
            user = SipUri.parse(request.uri).user
        except SipHeaderError as exc:
            raise _Reject(416, "Unsupported URI Scheme") from exc
        line = self.config.line_for_user(_digits(user)) if user else None
        if line is None:
            raise _Reject(404, "Not Found")
        binding = self.bindings.get(line.user_key)
        if binding is not None and binding.expires_at > now:
            return _Route(binding.contact, binding.flow, line)
        if line.contact:
            return _Route(line.contact, self._resolve(line.contact), line)
        raise _Reject(480, "Temporarily Unavailable")

    def _retarget(self, ruri: str, upstream: str) -> str:
        """A phone that uses the proxy as its server dials ``user@<proxy inside>``: the
        upstream would not recognise itself in that URI, so its host:port becomes the
        upstream's. Any other Request-URI (``user@pbx.example``) passes unchanged, which
        keeps the phone's digest credentials valid upstream."""
        try:
            uri = SipUri.parse(ruri)
            target = SipUri.parse(upstream)
        except SipHeaderError:
            return ruri
        ours = {self.config.inside.advertised, (self.config.inside.listen_host,
                                                 self.config.inside.listen_port)}  # fmt: skip
        if (bare_host(uri.host), uri.port or uri.default_port) not in ours:
            return ruri
        return str(dataclasses_replace(uri, host=target.host, port=target.port))

    def _caller_line(self, request: Request, source: Address) -> LineConfig | None:
        try:
            user = request.from_.sip_uri().user
        except SipHeaderError:
            user = None
        if user and _digits(user).isdigit():
            line = self.config.line_for_user(_digits(user))
            if line is not None:
                return line
        for line in self.config.lines:
            binding = self.bindings.get(line.user_key)
            if binding and (binding.flow.host, binding.flow.port) == (source.host, source.port):
                return line
            if line.contact:
                try:
                    uri = SipUri.parse(line.contact)
                except SipHeaderError:
                    continue
                if (bare_host(uri.host), uri.port or 5060) == (source.host, source.port):
                    return line
        return None

    # --- new calls --------------------------------------------------------------------

    def _new_invite(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        limit = self.config.limits.max_calls
        if limit and len(self.calls) >= limit:
            raise _Reject(503, "Service Unavailable", [("Retry-After", "5")])
        original = request  # the A leg's identity: responses copy its To unchanged
        forced: bool | None = None
        if side is Side.INSIDE:
            request, forced = _strip_star_code(original)
        route = self._route(side, request, tx.source, now)
        out_side = self._other(side)
        try:
            caller = request.from_
            remote_target = _contact_target(request.get_all("contact"))
        except SipHeaderError as exc:
            raise _Reject(400, "Bad Request") from exc
        a = Leg(
            side=side,
            call_id=request.call_id,
            local_tag=new_tag(),
            local=original.to,
            remote=caller,
            uac=False,
            local_cseq=1,
            remote_tag=caller.tag,
            remote_cseq=request.cseq.number,
            remote_target=remote_target,
            route_set=request.get_all("record-route"),
            flow=tx.source,
            supports_xsipura=_supports(request),
        )
        a.local = a.local.with_param("tag", a.local_tag)
        host = self.sides[out_side].advertised[0]
        b_tag = new_tag()
        b = Leg(
            side=out_side,
            call_id=new_call_id(host),
            local_tag=b_tag,
            local=caller.with_param("tag", b_tag),
            remote=request.to.without_param("tag"),
            uac=True,
            local_cseq=0,
            remote_target=route.ruri,
            dest=route.dest,
        )
        if out_side is Side.INSIDE:
            b.flow = route.dest  # the registered flow (NAT, TCP connection) stays the path
        a.dest = self._leg_dest(a)
        call = Call(a=a, b=b, line=route.line, invite_server=tx, created=now)
        tx.context = call
        call.security = self._call_security(call, request, forced)
        body = request.body
        if body and request.content_type == "application/sdp":
            call.media = self._allocate(call, body)
            try:
                body = call.media.relay_sdp(side, body)
            except SdpError as exc:
                self._drop_call(call)
                raise _Reject(
                    488, "Not Acceptable Here", [("Warning", f'399 - "bad SDP: {exc}"')]
                ) from exc
        self.calls[call.id] = call
        self._index(call)
        self.stats.calls_total += 1
        b.invite_cseq = b.next_cseq()
        outgoing = Request(method="INVITE", uri=route.ruri)
        mf = request.get("max-forwards")
        max_forwards = int(mf) - 1 if mf is not None else self.config.sip.max_forwards
        self._dialog_headers(outgoing, b, "INVITE", b.invite_cseq, max_forwards)
        outgoing.add("Contact", self._contact(out_side, route.dest.transport))
        copy_end_to_end(request, outgoing)
        outgoing.body = body
        self._advertise(out_side, outgoing)
        ctx, transmits = self.layers[out_side].send_request(
            outgoing, route.dest, now, Relay(call, a, tx)
        )
        call.invite_client = ctx
        log.info("call %d %s: INVITE %s from %s -> %s (%s), line %s", call.id, call.direction,
                 request.uri, caller.uri, route.ruri, a.call_id,
                 route.line.user_id if route.line else "-")  # fmt: skip
        return self._wrap(out_side, transmits)

    def _allocate(self, call: Call, offer: bytes) -> MediaHandle:
        streams = stream_count(offer)
        try:
            session = self.media.allocate(call.a.call_id, streams)
        except PortsExhausted as exc:
            raise _Reject(503, "Service Unavailable", [("Retry-After", "5")]) from exc
        media_ip = {
            Side.INSIDE: self.config.inside.media_ip,
            Side.OUTSIDE: self.config.outside.media_ip,
        }
        return MediaHandle(session, streams, media_ip)

    def _index(self, call: Call) -> None:
        for leg in (call.a, call.b):
            self._legs[(leg.side, leg.call_id, leg.local_tag)] = (call, leg)

    def _dialog_headers(
        self, message: Request, leg: Leg, method: str, cseq: int, max_forwards: int
    ) -> None:
        transport = leg.dest.transport if leg.dest else "udp"
        message.add("Via", self._via(leg.side, transport))
        for route in leg.route_set:
            message.add("Route", route)
        message.add("Max-Forwards", str(max(0, max_forwards)))
        message.add("From", str(leg.local))
        message.add("To", str(leg.remote))
        message.add("Call-ID", leg.call_id)
        message.add("CSeq", f"{cseq} {method}")

    def _advertise(self, side: Side, message: SipMessage) -> None:
        """The outside leg carries ``Supported: x-sipura`` (the SPA's advertisement)."""
        if side is not Side.OUTSIDE:
            self._brand(message, request=isinstance(message, Request))
            return
        supported = [v.lower() for v in message.get_all("supported")]
        if XSIPURA not in supported:
            message.add("Supported", XSIPURA)
        self._brand(message, request=isinstance(message, Request))

    # --- responses from the far side --------------------------------------------------

    def _on_response(
        self, side: Side, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        context = tx.context
        if isinstance(context, ProxyRequest):
            return self._proxy_request_response(context, tx, response, now)
        if isinstance(context, RegisterRelay):
            return self._register_response(side, context, response, now)
        if isinstance(context, OneShot):
            return self._one_shot_response(side, context, response, now)
        if not isinstance(context, Relay):
            return []
        call, origin = context.call, context.origin
        leg = call.other(origin)
        method = tx.request.method
        if method == "INVITE":
            return self._invite_response(call, leg, tx, response, now, context)
        if method == "CANCEL":
            return []
        if context.server_tx is None:  # our own BYE: nothing to relay
            if method == "BYE" and response.status >= 200:
                self._finish(call)
            return []
        out = self._relay_response(origin, context.server_tx, response, call, now)
        if method == "BYE" and response.status >= 200:
            self._finish(call)
        return out

    def _update_remote(self, leg: Leg, response: Response, *, establishing: bool = True) -> None:
        tag = response.to.tag
        if tag:
            leg.remote_tag = tag
            leg.remote = leg.remote.with_param("tag", tag)
        with contextlib.suppress(SipHeaderError):  # an unusable Contact keeps the old target
            leg.remote_target = _contact_target(response.get_all("contact")) or leg.remote_target
        if leg.uac and establishing:  # the route set is fixed when the dialog forms
            leg.route_set = list(reversed(response.get_all("record-route")))
        leg.supports_xsipura = leg.supports_xsipura or _supports(response)
        leg.dest = self._leg_dest(leg)

    def _leg_dest(self, leg: Leg) -> Address | None:
        if leg.side is Side.INSIDE and leg.flow is not None:
            return leg.flow  # symmetric signalling toward phones (NAT, TCP reuse)
        target = leg.route_set[0] if leg.route_set else leg.remote_target
        if target is None:
            return leg.dest
        try:
            uri = NameAddr.parse(target).uri if target.startswith("<") or " " in target else target
            transport = leg.dest.transport if leg.dest else None
            return self._resolve(uri, transport)
        except (SipHeaderError, _Reject):
            return leg.dest

    def _invite_response(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float,
        context: Relay,
    ) -> list[Outbound]:  # fmt: skip
        status = response.status
        origin = context.origin
        stx = context.server_tx
        initial = stx is call.invite_server
        if 200 <= status < 300:
            if context.answered:  # a retransmitted 2xx: our ACK was lost, send it again
                cseq = tx.request.cseq.number
                if leg.ack_data is not None and leg.ack_cseq == cseq and leg.dest is not None:
                    return [Outbound(leg.side, leg.ack_data, leg.dest)]
                return []
            context.answered = True
        if initial and (call.cancelled or call.state is CallState.TERMINATED):
            if 200 <= status < 300:  # the CANCEL lost the race: confirm, then hang up
                self._update_remote(leg, response)
                out = self._ack(leg, tx.request.cseq.number, b"", "", now)
                return out + self._send_bye(call, leg, now, "call cancelled")
            if status >= 200:
                self._finish(call)
                return []
            call.got_provisional = True  # 100 Trying included (RFC 3261 §9.1)
            return self._send_cancel(call, now)
        if status == 100:
            if initial:
                call.got_provisional = True
            return []
        if initial and 200 <= status < 300 and not self._anchor_answer(call, response):
            log.warning("call %d: no media ports for the offer in the answer", call.id)
            self._update_remote(leg, response)
            self.stats.calls_failed += 1
            out = self._ack(leg, tx.request.cseq.number, b"", "", now)
            out += self._send_bye(call, leg, now, "no media ports")
            if stx is not None:
                out += self._respond(
                    origin.side, stx, 503, "Service Unavailable", now,
                    to_tag=origin.local_tag, extra=[("Retry-After", "5")],
                )  # fmt: skip
            return out
        if status < 200:
            if response.to.tag:
                self._update_remote(leg, response)
                if initial:
                    call.state = CallState.EARLY
            call.got_provisional = True
        elif status < 300:
            self._update_remote(leg, response, establishing=initial)
            if initial:
                if call.state is CallState.ANSWERED or call.state is CallState.CONFIRMED:
                    return []  # a retransmitted 2xx; the tx layer resends our answer
                call.state = CallState.ANSWERED
                self.stats.calls_answered += 1
                log.info("call %d answered: %d %s", call.id, status, response.reason)
        elif initial:
            self.stats.calls_failed += 1
            log.info("call %d failed: %d %s", call.id, status, response.reason)
        if stx is None:
            return []
        out = self._relay_response(origin, stx, response, call, now)
        if initial and status >= 300:
            self._finish(call)
        return out

    def _anchor_answer(self, call: Call, response: Response) -> bool:
        """Allocate media for an offer in a 2xx (late offer); False when no ports are left."""
        if call.media is not None or not response.body:
            return True
        if response.content_type != "application/sdp":
            return True
        try:
            call.media = self._allocate(call, response.body)
        except _Reject:
            return False
        return True

    def _relay_response(
        self, origin: Leg, stx: ServerTransaction, response: Response, call: Call, now: float
    ) -> list[Outbound]:
        status = response.status
        relayed = response_to(stx.request, status, response.reason, to_tag=origin.local_tag)
        if 300 <= status < 400:  # redirect targets are the payload of a 3xx, not our contact
            for contact in response.get_all("contact"):
                relayed.add("Contact", contact)
        elif response.has("contact"):
            transport = stx.source.transport
            relayed.add("Contact", self._contact(origin.side, transport))
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        if response.body and response.content_type == "application/sdp":
            relayed.body = self._relay_sdp(call, self._other(origin.side), response.body)
        self._advertise(origin.side, relayed)
        self.stats.responses[status] = self.stats.responses.get(status, 0) + 1
        return self._wrap(origin.side, self.layers[origin.side].respond(stx, relayed, now))

    def _relay_sdp(self, call: Call, from_side: Side, body: bytes) -> bytes:
        if call.media is None:
            if call.state is CallState.TERMINATED:
                return body  # a late answer for a call already gone: nothing to anchor
            try:
                call.media = self._allocate(call, body)
            except _Reject:
                log.warning("call %d: no media ports for a late offer; SDP passed as is", call.id)
                return body
        try:
            return call.media.relay_sdp(from_side, body)
        except SdpError as exc:
            log.info("call %d: unparsable SDP passed through as is: %s", call.id, exc)
            return body

    # --- ACK, CANCEL, in-dialog -------------------------------------------------------

    def _on_ack(self, side: Side, request: Request, source: Address, now: float) -> list[Outbound]:
        tag = request.to.tag
        found = self._legs.get((side, request.call_id, tag or ""))
        if found is None:
            return []
        call, leg = found
        leg.flow = source
        other = call.other(leg)
        confirmed = call.state is CallState.ANSWERED
        if confirmed:
            call.state = CallState.CONFIRMED
            call.media_seen_at = now
        body = request.body
        if body and request.content_type == "application/sdp":
            body = self._relay_sdp(call, side, body)
        out = self._ack(other, other.invite_cseq, body, request.get("content-type") or "", now)
        if confirmed and call.security is not None:
            if call.security.role is sec.Role.CALLER:
                out += self._arm_security(call, now)
            else:
                call.security.arm(now)
        return out

    def _ack(
        self, leg: Leg, cseq: int, body: bytes, content_type: str, now: float
    ) -> list[Outbound]:
        ack = Request(method="ACK", uri=leg.remote_target or "")
        self._dialog_headers(ack, leg, "ACK", cseq, self.config.sip.max_forwards)
        if body:
            ack.add("Content-Type", content_type)
            ack.body = body
        dest = leg.dest
        if dest is None:
            return []
        leg.ack_data = ack.serialize()
        leg.ack_cseq = cseq
        return [Outbound(leg.side, leg.ack_data, dest)]

    def _on_stray(
        self, side: Side, response: Response, source: Address, now: float
    ) -> list[Outbound]:
        """A 2xx retransmission after our INVITE transaction ended: re-send our ACK."""
        if not 200 <= response.status < 300 or response.cseq.method != "INVITE":
            return []
        found = self._legs.get((side, response.call_id, response.from_.tag or ""))
        if found is None:
            return []
        leg = found[1]
        if leg.ack_data is None or leg.dest is None or leg.ack_cseq != response.cseq.number:
            return []
        return [Outbound(side, leg.ack_data, leg.dest)]

    def _on_cancel(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        invite_tx = self.layers[side].find_invite_server(request)
        if invite_tx is None:
            return self._respond(side, tx, 481, "Call/Transaction Does Not Exist", now)
        call = invite_tx.context
        to_tag = call.a.local_tag if isinstance(call, Call) else None
        out = self._respond(side, tx, 200, "OK", now, to_tag=to_tag)  # §9.2: same To tag
        if not isinstance(call, Call) or call.state not in (CallState.INVITING, CallState.EARLY):
            return out  # already answered: the CANCEL has no effect (§9.2)
        log.info("call %d cancelled by the caller", call.id)
        return out + self._cancel_call(call, now)

    def _cancel_call(self, call: Call, now: float) -> list[Outbound]:
        """End an unanswered call: 487 to the caller, CANCEL to the callee (when allowed)."""
        call.cancelled = True
        out = self._respond(call.a.side, call.invite_server, 487, "Request Terminated", now,
                            to_tag=call.a.local_tag)  # fmt: skip
        if call.got_provisional:
            out += self._send_cancel(call, now)
        return out

    def _send_cancel(self, call: Call, now: float) -> list[Outbound]:
        ctx = call.invite_client
        if ctx is None or call.cancel_sent:
            return []
        call.cancel_sent = True
        invite = ctx.request
        cancel = Request(method="CANCEL", uri=invite.uri)
        cancel.add("Via", str(invite.top_via))
        for route in invite.get_all("route"):
            cancel.add("Route", route)
        cancel.add("Max-Forwards", str(self.config.sip.max_forwards))
        cancel.add("From", invite.get("from") or "")
        cancel.add("To", invite.get("to") or "")
        cancel.add("Call-ID", invite.call_id)
        cancel.add("CSeq", f"{invite.cseq.number} CANCEL")
        self._brand(cancel, request=True)
        _, transmits = self.layers[call.b.side].send_request(
            cancel, ctx.dest, now, Relay(call, call.a, None)
        )
        return self._wrap(call.b.side, transmits)

    def _in_dialog(
        self, side: Side, tx: ServerTransaction, request: Request, call: Call, leg: Leg,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        method = request.method
        cseq = request.cseq.number
        if leg.remote_cseq is not None and cseq <= leg.remote_cseq and method != "ACK":
            raise _Reject(500, "Server Internal Error", [("Retry-After", "1")])
        leg.remote_cseq = cseq
        leg.flow = tx.source
        other = call.other(leg)
        if call.state in (CallState.TERMINATING, CallState.TERMINATED) and method != "BYE":
            raise _Reject(481, "Call/Transaction Does Not Exist")
        if method in TARGET_REFRESH and request.has("contact"):
            try:
                target = _contact_target(request.get_all("contact"))
            except SipHeaderError as exc:
                raise _Reject(400, "Bad Request") from exc
            if target is not None:
                leg.remote_target = target
                leg.dest = self._leg_dest(leg)
        if other.dest is None or (other.remote_tag is None and method != "BYE"):
            raise _Reject(481, "Call/Transaction Does Not Exist")
        if method == "INFO" and side is Side.OUTSIDE and call.security is not None:
            kind = sec.is_xsipura_info(request.content_type, request.body)
            if kind is None:  # profile §2a: an empty INFO is answered and ignored
                return self._respond(side, tx, 200, "OK", now)
            if kind:
                return self._xsipura_info(call, tx, request, now)
        if method == "BYE" and leg is call.a and call.state in (CallState.INVITING,
                                                                CallState.EARLY):  # fmt: skip
            # The caller hangs up an early dialog: the INVITE ends as if CANCELled.
            log.info("call %d: BYE from the caller before the answer", call.id)
            return self._respond(side, tx, 200, "OK", now) + self._cancel_call(call, now)
        if method == "BYE" and call.state is CallState.TERMINATING:
            return self._respond(side, tx, 200, "OK", now)  # BYEs crossed: one is enough
        if method == "BYE":
            call.state = CallState.TERMINATING
            log.info("call %d: BYE from the %s side", call.id, side.value)
            if other.remote_tag is None:  # early: nothing to hang up on the far side
                self._finish(call)
                return self._respond(side, tx, 200, "OK", now)
        if method == "INVITE":
            other.invite_cseq = other.next_cseq()
            cseq_out = other.invite_cseq
        else:
            cseq_out = other.next_cseq()
        outgoing = Request(method=method, uri=other.remote_target or "")
        mf = request.get("max-forwards")
        self._dialog_headers(outgoing, other, method, cseq_out,
                             int(mf) - 1 if mf else self.config.sip.max_forwards)  # fmt: skip
        if method in TARGET_REFRESH:
            outgoing.add("Contact", self._contact(other.side, other.dest.transport))
        copy_end_to_end(request, outgoing)
        if method == "PRACK":
            _rewrite_rack(outgoing, other.invite_cseq)
        outgoing.body = request.body
        if request.body and request.content_type == "application/sdp":
            outgoing.body = self._relay_sdp(call, side, request.body)
        self._advertise(other.side, outgoing)
        _, transmits = self.layers[other.side].send_request(
            outgoing, other.dest, now, Relay(call, leg, tx)
        )
        return self._wrap(other.side, transmits)

    def _send_bye(self, call: Call, leg: Leg, now: float, reason: str) -> list[Outbound]:
        if leg.dest is None or leg.remote_tag is None:
            return []
        bye = Request(method="BYE", uri=leg.remote_target or "")
        self._dialog_headers(bye, leg, "BYE", leg.next_cseq(), self.config.sip.max_forwards)
        bye.add("Reason", f'SIP;cause=200;text="{reason}"')
        self._brand(bye, request=True)
        call.state = CallState.TERMINATING
        _, transmits = self.layers[leg.side].send_request(
            bye, leg.dest, now, Relay(call, leg, None)
        )
        return self._wrap(leg.side, transmits)

    # --- timeouts ---------------------------------------------------------------------

    def _on_timeout(
        self, side: Side, tx: ClientTransaction | ServerTransaction, now: float
    ) -> list[Outbound]:
        context = tx.context
        if isinstance(tx, ServerTransaction):
            call = context if isinstance(context, Call) else None
            if call is not None and call.state is CallState.ANSWERED:
                log.info("call %d: no ACK from the caller; hanging up", call.id)
                acked: list[Outbound] = []
                if call.b.ack_cseq != call.b.invite_cseq:
                    acked = self._ack(call.b, call.b.invite_cseq, b"", "", now)  # §13.2.2.4
                return (
                    acked
                    + self._send_bye(call, call.b, now, "no ACK")
                    + self._send_bye(call, call.a, now, "no ACK")
                )
            return []
        if isinstance(context, ProxyRequest):
            return self._proxy_request_timeout(context, now)
        if isinstance(context, RegisterRelay):
            return self._respond(Side.INSIDE, context.server_tx, 408, "Request Timeout", now)
        if isinstance(context, OneShot):
            return self._respond(self._other(side), context.server_tx, 408, "Request Timeout", now,
                                 to_tag=context.to_tag)  # fmt: skip
        if not isinstance(context, Relay):
            return []
        call = context.call
        method = tx.request.method
        out: list[Outbound] = []
        if context.server_tx is not None and method != "ACK":
            origin = context.origin
            out = self._respond(origin.side, context.server_tx, 408, "Request Timeout", now,
                                to_tag=origin.local_tag)  # fmt: skip
        if method == "INVITE" and context.server_tx is call.invite_server:
            log.info("call %d: no answer from the %s side (timeout)", call.id, side.value)
            self.stats.calls_failed += 1
            self._finish(call)
        elif method == "BYE":
            self._finish(call)
        return out

    # --- teardown ---------------------------------------------------------------------

    def _finish(self, call: Call) -> None:
        if call.state is CallState.TERMINATED:
            return
        call.state = CallState.TERMINATED
        self._drop_call(call)
        log.info("call %d ended", call.id)

    def _drop_call(self, call: Call) -> None:
        for leg in (call.a, call.b):
            self._legs.pop((leg.side, leg.call_id, leg.local_tag), None)
        self.calls.pop(call.id, None)
        if call.media is not None:
            call.media.release()
            call.media = None

    # --- x-sipura on the outside leg -------------------------------------------------

    def _call_security(
        self, call: Call, request: Request, forced: bool | None
    ) -> sec.CallSecurity | None:
        """Who secures this call: the proxy plays the line's SPA on the outside leg."""
        if self.security is None or call.line is None:
            return None
        line = self.security.lines.get(call.line.user_key)
        if line is None:
            if forced:
                log.warning("call %d: *18 dialled, but line %s has no Mini Certificate",
                            call.id, call.line.user_id)  # fmt: skip
            return None
        settings = self.security.xsipura
        if call.a.side is Side.INSIDE:  # the phone calls out: the proxy is the x-sipura caller
            wanted = line.secure_by_default if forced is None else forced
            wanted = wanted or line.require_secure  # *19 cannot defeat a policy
            if not wanted:
                log.info("call %d: secure call not requested (%s)", call.id,
                         "*19" if forced is False else "line not secure by default")  # fmt: skip
                return None
            try:
                dialled = SipUri.parse(request.uri).user or ""
            except SipHeaderError:
                dialled = ""
            role = sec.Role.CALLER
        else:  # inbound: the peer decides; the proxy answers as the line's callee
            dialled, role = "", sec.Role.CALLEE
        call.secure_ssrc = secrets.randbits(32) or 1
        return sec.CallSecurity(
            role=role, line=line, settings=settings, label=f"{call.id} ({call.a.call_id})",
            dialled_user_id=dialled,
        )  # fmt: skip

    def _arm_security(self, call: Call, now: float) -> list[Outbound]:
        """Caller role, dialog confirmed: stage 2 if the peer supports it (or probing)."""
        security = call.security
        assert security is not None
        if call.media is None:
            return self._secure_actions(call, security.give_up(
                ClearReason.PEER_UNSUPPORTED, "no anchored media to secure"), now)  # fmt: skip
        settings = security.settings
        if not call.b.supports_xsipura and not settings.probe_unadvertised:
            return self._secure_actions(call, security.give_up(
                ClearReason.PEER_UNSUPPORTED, "peer did not advertise Supported: x-sipura"),
                now)  # fmt: skip
        security.arm(now)
        return []

    def _poll_security(self, now: float) -> list[Outbound]:
        out: list[Outbound] = []
        pending, self._srtp_events = self._srtp_events, []
        for call_id in pending:
            call = self.calls.get(call_id)
            if call is not None and call.security is not None:
                out += self._secure_actions(call, call.security.srtp_authenticated(now), now)
        for call in list(self.calls.values()) if self.security is not None else ():
            security = call.security
            if security is None or call.state is not CallState.CONFIRMED:
                continue
            if security.ready_to_start(now):
                if not _phone_media_flows(call):
                    security.postpone(now)  # profile §2: after the dialog *and* media
                elif call.media is not None:
                    call.media.session.set_tx_ssrc(Side.OUTSIDE, call.secure_ssrc)
                    out += self._secure_actions(call, security.start(now, call.secure_ssrc), now)
            deadline = security.next_deadline()
            if deadline is not None and deadline <= now:
                out += self._secure_actions(call, security.poll(now), now)
        return out

    def _xsipura_info(
        self, call: Call, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        """Callee role: the INFO is consumed here, never relayed to the phone."""
        security = call.security
        assert security is not None
        if security.role is not sec.Role.CALLEE:
            # Only the dialog's caller starts stage 2 (profile §2).
            warning = [("Warning", '399 - "x-sipura: only the caller starts stage 2"')]
            return self._respond(Side.OUTSIDE, tx, 400, "Bad Request", now, extra=warning)
        if call.media is not None:
            call.media.session.set_tx_ssrc(Side.OUTSIDE, call.secure_ssrc)
        actions = security.on_info(request.body, now, self.utc_now(), call.secure_ssrc)
        out: list[Outbound] = []
        for action in actions:
            if isinstance(action, sec.RespondInfo):
                extra = [("Content-Type", action.content_type)] if action.body else []
                response = response_to(tx.request, action.status, action.reason)
                for name, value in extra:
                    response.add(name, value)
                if action.body:
                    response.body = action.body.encode("ascii")
                self._advertise(Side.OUTSIDE, response)
                out += self._wrap(
                    Side.OUTSIDE, self.layers[Side.OUTSIDE].respond(tx, response, now)
                )
        return out + self._secure_actions(
            call, [a for a in actions if not isinstance(a, sec.RespondInfo)], now
        )

    def _secure_actions(self, call: Call, actions: list[sec.Action], now: float) -> list[Outbound]:
        out: list[Outbound] = []
        session = call.media.session if call.media is not None else None
        settings = call.security.settings if call.security else None
        for action in actions:
            if isinstance(action, sec.SendInfo):
                leg = call.leg_on(Side.OUTSIDE)
                out += self._send_proxy_request(call, leg, "INFO", now, "x-sipura",
                    body=action.body.encode("ascii"), content_type=action.content_type)  # fmt: skip
            elif isinstance(action, sec.AcceptSrtp) and session is not None and settings:
                session.accept_srtp(Side.OUTSIDE, action.context, settings.srtcp)
                session.on_srtp_authenticated(Side.OUTSIDE, self._srtp_callback(call))
            elif isinstance(action, sec.SwitchSrtp) and session is not None:
                session.switch_srtp(Side.OUTSIDE, action.context, action.grace_s,
                                    srtcp=action.srtcp)  # fmt: skip
                session.on_srtp_authenticated(Side.OUTSIDE, self._srtp_callback(call))
            elif isinstance(action, sec.ClearSrtp) and session is not None:
                session.clear_srtp(Side.OUTSIDE)
                session.set_tx_ssrc(Side.OUTSIDE, None)
            elif isinstance(action, sec.Secured):
                if not action.rekey:
                    self.stats.secured += 1
                    out += self._user_indication(call, action.peer, now)
            elif isinstance(action, sec.Cleared):
                key = action.reason.value
                self.stats.clear_reasons[key] = self.stats.clear_reasons.get(key, 0) + 1
            elif isinstance(action, sec.HangUp):
                log.warning("call %d: require_secure: hanging up (%s)", call.id, action.reason)
                out += self._send_bye(call, call.a, now, action.reason)
                out += self._send_bye(call, call.b, now, action.reason)
        return out

    def _srtp_callback(self, call: Call) -> Callable[[], None]:
        call_id = call.id

        def authenticated() -> None:  # runs inside the relay's packet handler
            self._srtp_events.append(call_id)
            if self.on_wakeup is not None:
                self.on_wakeup()

        return authenticated

    def _user_indication(self, call: Call, peer: PeerIdentity, now: float) -> list[Outbound]:
        """What an SPA user perceives: the secure-call tone and ``$`` + the peer's name."""
        settings = call.security.settings if call.security else None
        if settings is None:
            return []
        if call.media is not None and settings.tone is not None:
            call.media.session.play_tone(Side.INSIDE, 0, settings.tone)
        mode = settings.callerid_refresh
        if mode == "off":
            return []
        leg = call.leg_on(Side.INSIDE)
        host, _ = self.sides[Side.INSIDE].advertised
        name = ("$" + peer.name).replace("\\", "").replace('"', "")
        identity = f'"{name}" <sip:{peer.user_id}@{format_hostport(host, None)}>'
        party = "called" if call.a.side is Side.INSIDE else "calling"
        headers = [
            ("P-Asserted-Identity", identity),
            ("Remote-Party-ID", f"{identity};party={party};screen=yes;privacy=off"),
        ]
        if mode == "reinvite" and call.media is not None and Side.INSIDE in call.media.last_sent:
            return self._send_proxy_request(call, leg, "INVITE", now, "callerid",
                body=call.media.last_sent[Side.INSIDE], content_type="application/sdp",
                headers=headers)  # fmt: skip
        return self._send_proxy_request(call, leg, "UPDATE", now, "callerid", headers=headers)

    def _send_proxy_request(
        self, call: Call, leg: Leg, method: str, now: float, purpose: str, *,
        body: bytes = b"", content_type: str = "", headers: Iterable[tuple[str, str]] = (),
    ) -> list[Outbound]:  # fmt: skip
        if leg.dest is None or leg.remote_target is None:
            return []
        cseq = leg.next_cseq()
        if method == "INVITE":
            leg.invite_cseq = cseq
        request = Request(method=method, uri=leg.remote_target)
        self._dialog_headers(request, leg, method, cseq, self.config.sip.max_forwards)
        if method in TARGET_REFRESH:
            request.add("Contact", self._contact(leg.side, leg.dest.transport))
        for name, value in headers:
            request.add(name, value)
        if body:
            request.add("Content-Type", content_type)
            request.body = body
        self._advertise(leg.side, request)
        _, transmits = self.layers[leg.side].send_request(
            request, leg.dest, now, ProxyRequest(call, leg, purpose)
        )
        return self._wrap(leg.side, transmits)

    def _proxy_request_response(
        self, context: ProxyRequest, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        call = context.call
        if response.status < 200 or call.state is CallState.TERMINATED:
            return []
        if context.purpose == "x-sipura" and call.security is not None:
            actions = call.security.on_info_response(
                response.status, response.body, now, self.utc_now()
            )
            return self._secure_actions(call, actions, now)
        if tx.request.method == "INVITE" and 200 <= response.status < 300:
            if response.body and call.media is not None:
                with contextlib.suppress(SdpError):  # learn where the phone now sends from
                    call.media.relay_sdp(context.leg.side, response.body)
            return self._ack(context.leg, tx.request.cseq.number, b"", "", now)
        if response.status >= 300:
            log.info("call %d: the phone answered the caller-ID refresh %s with %d", call.id,
                     tx.request.method, response.status)  # fmt: skip
        return []

    def _proxy_request_timeout(self, context: ProxyRequest, now: float) -> list[Outbound]:
        call = context.call
        if context.purpose == "x-sipura" and call.security is not None:
            return self._secure_actions(call, call.security.on_info_timeout(now), now)
        return []

    # --- REGISTER ---------------------------------------------------------------------

    def _register(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        if side is not Side.INSIDE:
            raise _Reject(405, "Method Not Allowed", [("Allow", ALLOW.replace(", REGISTER", ""))])
        try:
            user = request.to.sip_uri().user
        except SipHeaderError as exc:
            raise _Reject(400, "Bad Request") from exc
        line = self.config.line_for_user(_digits(user)) if user else None
        if line is None and self.config.inside.unknown_users == "reject":
            raise _Reject(403, "Forbidden")
        contacts = request.get_all("contact")
        default_expires = request.get("expires")
        registrar = self.config.outside.registrar
        if registrar:
            return self._relay_register(tx, request, line, contacts, registrar, now)
        bound = self._apply_binding(line, contacts, default_expires, None, tx.source, now)
        extra = [("Contact", c) for c in bound]
        return self._respond(side, tx, 200, "OK", now, to_tag=new_tag(), extra=extra)

    def _apply_binding(
        self, line: LineConfig | None, contacts: list[str], default_expires: str | None,
        granted: str | None, flow: Address, now: float,
    ) -> list[str]:  # fmt: skip
        """Store (or remove) the line's binding; returns the Contact values to confirm.

        ``granted`` (the registrar's answer) wins over the contact's own ``expires``
        parameter, which wins over the request's Expires header.
        """
        if line is None:
            return contacts
        confirmed: list[str] = []
        for value in contacts:
            if value.strip() == "*":
                self.bindings.pop(line.user_key, None)
                return []
            try:
                contact = NameAddr.parse(value)
            except SipHeaderError as exc:
                raise _Reject(400, "Bad Request") from exc
            expires_text = granted or contact.param("expires") or default_expires or "3600"
            expires = int(expires_text) if expires_text.strip().isdigit() else 3600
            if expires == 0:
                self.bindings.pop(line.user_key, None)
                continue
            self.bindings[line.user_key] = Binding(contact.uri, flow, now + expires)
            self.stats.registrations += 1
            confirmed.append(str(contact.with_param("expires", str(expires))))
        return confirmed

    def _relay_register(
        self, tx: ServerTransaction, request: Request, line: LineConfig | None,
        contacts: list[str], registrar: str, now: float,
    ) -> list[Outbound]:  # fmt: skip
        dest = self._resolve(registrar)
        # One upstream registration (Call-ID, From tag, CSeq space) per phone registration.
        host = self.sides[Side.OUTSIDE].advertised[0]
        call_id, cseq, from_tag = self._register_ids.get(
            request.call_id, (new_call_id(host), 0, new_tag())
        )
        cseq += 1
        self._register_ids[request.call_id] = (call_id, cseq, from_tag)
        outgoing = Request(method="REGISTER", uri=request.uri)
        outgoing.add("Via", self._via(Side.OUTSIDE, dest.transport))
        mf = request.get("max-forwards")
        outgoing.add("Max-Forwards", str(int(mf) - 1 if mf else self.config.sip.max_forwards))
        outgoing.add("From", str(request.from_.with_param("tag", from_tag)))
        outgoing.add("To", str(request.to.without_param("tag")))
        outgoing.add("Call-ID", call_id)
        outgoing.add("CSeq", f"{cseq} REGISTER")
        user = None
        with contextlib.suppress(SipHeaderError):
            user = request.to.sip_uri().user
        sent: list[str] = []
        for value in contacts:
            if value.strip() == "*":
                outgoing.add("Contact", "*")
                continue
            try:
                contact = NameAddr.parse(value)
            except SipHeaderError as exc:
                raise _Reject(400, "Bad Request") from exc
            ours = NameAddr.parse(self._contact(Side.OUTSIDE, dest.transport, user or "sipura"))
            for name, pvalue in contact.params:
                ours = ours.with_param(name, pvalue)
            outgoing.add("Contact", str(ours))
            sent.append(ours.uri)
        copy_end_to_end(request, outgoing)
        outgoing.body = request.body
        self._advertise(Side.OUTSIDE, outgoing)
        relay = RegisterRelay(tx, line.user_key if line else None, contacts, tx.source,
                              request.get("expires"), sent)  # fmt: skip
        _, transmits = self.layers[Side.OUTSIDE].send_request(outgoing, dest, now, relay)
        return self._wrap(Side.OUTSIDE, transmits)

    def _register_response(
        self, side: Side, relay: RegisterRelay, response: Response, now: float
    ) -> list[Outbound]:
        if response.status < 200:
            return []
        stx = relay.server_tx
        relayed = response_to(stx.request, response.status, response.reason, to_tag=new_tag())
        if 200 <= response.status < 300:
            line = self.config.line_for_user(relay.user_key) if relay.user_key else None
            granted = _granted_expires(relay, response)
            for contact in self._apply_binding(
                line, relay.contacts, relay.default_expires, granted, relay.flow, now
            ):
                relayed.add("Contact", contact)
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        return self._wrap(Side.INSIDE, self.layers[Side.INSIDE].respond(stx, relayed, now))

    # --- out-of-dialog one-shot requests ----------------------------------------------

    def _one_shot(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        route = self._route(side, request, tx.source, now)
        out_side = self._other(side)
        outgoing = Request(method=request.method, uri=route.ruri)
        outgoing.add("Via", self._via(out_side, route.dest.transport))
        mf = request.get("max-forwards")
        outgoing.add("Max-Forwards", str(int(mf) - 1 if mf else self.config.sip.max_forwards))
        outgoing.add("From", str(request.from_.with_param("tag", new_tag())))
        outgoing.add("To", str(request.to))
        outgoing.add("Call-ID", new_call_id(self.sides[out_side].advertised[0]))
        outgoing.add("CSeq", f"1 {request.method}")
        copy_end_to_end(request, outgoing)
        outgoing.body = request.body
        self._advertise(out_side, outgoing)
        context = OneShot(tx, new_tag())
        _, transmits = self.layers[out_side].send_request(outgoing, route.dest, now, context)
        return self._wrap(out_side, transmits)

    def _one_shot_response(
        self, side: Side, context: OneShot, response: Response, now: float
    ) -> list[Outbound]:
        if response.status < 200:
            return []
        stx = context.server_tx
        relayed = response_to(stx.request, response.status, response.reason, to_tag=context.to_tag)
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        origin = self._other(side)
        return self._wrap(origin, self.layers[origin].respond(stx, relayed, now))


def _contact_target(values: list[str]) -> str | None:
    """The first Contact's URI when it can be a Request-URI (sip:/sips:, no ``?headers``).

    Raises :class:`SipHeaderError` otherwise (``*``, ``tel:``, a URI with no host...):
    a remote target that cannot be written into a request line must never be adopted.
    """
    if not values:
        return None
    uri = NameAddr.parse(values[0]).uri
    if SipUri.parse(uri).headers:
        raise SipHeaderError("a remote target cannot carry URI headers")
    return uri


def _check_addresses(message: SipMessage) -> None:
    """From and To must be addresses; the parser lets ``*`` (a Contact form) through."""
    if "*" in (message.from_.uri, message.to.uri):
        raise SipParseError("From/To must be a name-addr or addr-spec, not *")


def _granted_expires(relay: RegisterRelay, response: Response) -> str | None:
    """What the registrar's 2xx says about the binding the proxy registered.

    RFC 3261 §10.3: the 2xx lists every current binding. Ours listed: its ``expires``
    (else the response's Expires). Others listed but not ours: it is gone ("0"). Nothing
    listed (a lax registrar): the response's Expires, else None (the request decides).
    """
    listed: list[NameAddr] = []
    for value in response.get_all("contact"):
        with contextlib.suppress(SipHeaderError):
            listed.append(NameAddr.parse(value))
    if not listed:
        return response.get("expires")
    for contact in listed:
        if any(_same_uri(contact.uri, sent) for sent in relay.sent):
            return contact.param("expires") or response.get("expires")
    return "0" if relay.sent else None


def _same_uri(a: str, b: str) -> bool:
    try:
        ua, ub = SipUri.parse(a), SipUri.parse(b)
    except SipHeaderError:
        return a == b
    return (ua.user, bare_host(ua.host).lower(), ua.port or 5060) == (
        ub.user, bare_host(ub.host).lower(), ub.port or 5060
    )  # fmt: skip


def _rewrite_rack(message: SipMessage, invite_cseq: int) -> None:
    """RFC 3262 ``RAck: rseq cseq method``: the CSeq is the relayed INVITE's, per leg.

    RSeq values pass through unchanged (each reliable 18x is relayed one to one), so only
    the middle number differs between the legs.
    """
    for index, (name, value) in enumerate(message.headers):
        if canonical(name) != "rack":
            continue
        parts = value.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            message.headers[index] = (name, f"{parts[0]} {invite_cseq} {parts[2]}")


def _phone_media_flows(call: Call) -> bool:
    if call.media is None:
        return False
    streams = call.media.session.stats().get(Side.INSIDE) or []
    return bool(streams) and int(streams[0]["packets_in"]) > 0


def _strip_star_code(original: Request) -> tuple[Request, bool | None]:
    """``*18`` + number: secure this call; ``*19`` + number: clear (profile §4).

    Returns the request to route and send on (a copy, with the prefix removed from the
    Request-URI and the To URI, as the SPA removes it before dialling; the phone's own
    request is untouched, its responses must echo its To) and True, False, or None when
    there is no prefix.
    """
    try:
        uri = SipUri.parse(original.uri)
    except SipHeaderError:
        return original, None
    user = uri.user or ""
    if not user.startswith(("*18", "*19")) or len(user) == 3:
        return original, None
    forced = user.startswith("*18")
    request = dataclasses_replace(original, headers=list(original.headers))
    request.uri = str(dataclasses_replace(uri, user=user[3:]))
    to = request.to
    with contextlib.suppress(SipHeaderError):
        to_uri = to.sip_uri()
        if to_uri.user and to_uri.user.startswith(("*18", "*19")):
            request.set(
                "To", str(to.with_uri(str(dataclasses_replace(to_uri, user=to_uri.user[3:]))))
            )
    return request, forced


def _supports(message: SipMessage) -> bool:
    return any(v.strip().lower() == XSIPURA for v in message.get_all("supported"))


def copy_end_to_end(source: SipMessage, target: SipMessage) -> None:
    """Append every header the B2BUA does not own, in order, spelled as received."""
    for name, value in source.headers:
        if canonical(name) not in OWNED_HEADERS:
            target.headers.append((name, value))


_HEADER_LINE = re.compile(rb"^(via|v|from|f|to|t|call-id|i|cseq)[ \t]*:(.*)$", re.I | re.M)


def bad_request(data: bytes, reason: str, status: int = 400) -> bytes | None:
    """A 400 for an unparsable *request*, when enough of it survives to address one.

    RFC 4475 asks elements to answer what they can; a response needs Via, From, To,
    Call-ID and CSeq, copied byte for byte even when one of them is the broken part (the
    reply goes to the source address, so a broken Via cannot misroute it; CR, LF and NUL
    never get through the line-based copy). Responses and hopeless requests are dropped.
    """
    head = data.split(b"\r\n\r\n", 1)[0]
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if first.startswith(b"SIP/") or not re.match(
        rb"^[A-Za-z!%*_+`'~.-]+[ \t]+\S.*[ \t]SIP/", first
    ):
        return None
    found: dict[str, bytes] = {}
    for match in _HEADER_LINE.finditer(head):
        key = canonical(match.group(1).decode("ascii"))
        value = match.group(2).strip()
        if b"\x00" in value or b"\r" in value:
            return None
        found.setdefault(key, value)
    if not {"via", "from", "to", "call-id", "cseq"} <= found.keys():
        return None
    safe_reason = re.sub(r"[^\x20-\x7e]", "?", reason)[:100]
    phrase = "Version Not Supported" if status == 505 else "Bad Request"
    lines = [f"SIP/2.0 {status} {phrase} ({safe_reason})".encode()]
    lines += [
        b"Via: " + found["via"],
        b"From: " + found["from"],
        b"To: " + found["to"],
        b"Call-ID: " + found["call-id"],
        b"CSeq: " + found["cseq"],
        b"Content-Length: 0",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


__all__ = ["B2BUA", "Outbound", "bad_request", "copy_end_to_end"]
