"""Setting a call up: the INVITE that creates it.

An INVITE outside any dialog creates a :class:`Call`: the A leg is the dialog in which
the proxy answers it, the B leg a new dialog (own Call-ID, tags, CSeq) in which it sends
the INVITE on toward the route's next hop; an inbound call to a user with several
registered devices gets one such branch per device (:mod:`proxy.b2bua.forking`). Media
is anchored when the offer arrives (in the INVITE, or in the 2xx for a late offer). An
INVITE with ``Replaces`` naming a bridged call goes out naming that call's dialog on the
outgoing side (:mod:`proxy.b2bua.transfer`). The answers are :mod:`proxy.b2bua.answers`'
business.
"""

from __future__ import annotations

import logging

from proxy.b2bua.calls import CallTable
from proxy.b2bua.config import Config
from proxy.b2bua.dialogs import Dialogs
from proxy.b2bua.failover import Failovers
from proxy.b2bua.legs import Branch, Call, CallState, Leg, RelayedRequest, new_call_id, new_tag
from proxy.b2bua.media import MediaHandle
from proxy.b2bua.messages import (
    Reject,
    contact_target,
    copy_end_to_end,
    forwarded_max_forwards,
    strip_star_code,
    supports_xsipura,
)
from proxy.b2bua.routing import Route, Router, Target
from proxy.b2bua.sdes_leg import SdesLegs
from proxy.b2bua.secure_leg import SecureLegs
from proxy.b2bua.session_timer import CallTimers
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.transfer import Transfers
from proxy.logsetup import bind_call
from proxy.media.engine import MediaEngine, MediaSession, Side
from proxy.media.ports import PortsExhausted
from proxy.sip.headers import NameAddr, SipHeaderError
from proxy.sip.message import Request
from proxy.sip.sdp import Sdp, SdpError, parse_sdp
from proxy.sip.transaction import ServerTransaction

log = logging.getLogger("sipura.b2bua")


class CallSetup:
    def __init__(
        self, config: Config, sides: SipSides, calls: CallTable, router: Router,
        media: MediaEngine, dialogs: Dialogs, secure: SecureLegs, sdes: SdesLegs,
        transfers: Transfers, timers: CallTimers,
    ) -> None:  # fmt: skip
        self.config = config
        self.sides = sides
        self.calls = calls
        self.router = router
        self.media = media
        self.dialogs = dialogs
        self.secure = secure
        self.transfers = transfers
        self.timers = timers
        self.sdes = sdes
        self.failovers = Failovers(sides, router, sdes)

    # --- the INVITE that creates a call -----------------------------------------------

    def on_invite(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        limit = self.config.limits.max_calls
        if limit and len(self.calls) >= limit:
            raise Reject(503, "Service Unavailable", [("Retry-After", "5")],
                         cause=f"max_calls ({limit}) reached")  # fmt: skip
        original = request  # the A leg's identity: responses copy its To unchanged
        forced: bool | None = None
        if side is Side.INSIDE:
            request, forced = strip_star_code(original)
        replacing = self.transfers.replacing(side, request, now)
        route = self.router.route(side, request, tx.source, now)
        if replacing is not None:
            route = self.transfers.route(replacing[0], side.other, route)
        offer = self._offer(request)
        call = self._new_call(side, tx, original, request, route, now)
        with bind_call(call.fields()):
            call.security = self.secure.for_new_call(call, request, forced)
        call.sdes = self.sdes.for_new_call(call, route.dest if side is Side.INSIDE else tx.source)
        if forced is False:
            call.sdes = None  # *19: this call in the clear
        body = request.body
        if offer is not None:
            call.media = self._allocate(call, len(offer.media))
            try:
                body = call.media.relay_sdp(side, body, offer, signal_host=tx.source.host)
                body = self.sdes.crossing(call, side, body, offer=True)
            except SdpError as exc:
                self.calls.drop(call)
                raise Reject(
                    488, "Not Acceptable Here", [("Warning", f'399 - "bad SDP: {exc}"')]
                ) from exc
            except Reject:
                self.calls.drop(call)
                raise
        self.calls.add(call)
        self.sides.stats.call_started(call.direction)
        extra: list[tuple[str, str]] = []
        if replacing is not None:
            call.replaces = replacing[0]
            extra.append(("Replaces", replacing[1]))
            log.info("call %d replaces call %d", call.id, replacing[0].id)
        out: list[Outbound] = []
        for branch in call.branches:
            out += self._send_invite(call, branch, request, body, tx, extra, now)
        self.timers.ringing(call, now)
        log.info("call %d %s: INVITE %s from %s -> %s (%s), line %s%s", call.id,
                 call.direction, request.uri, call.a.remote.uri, route.ruri, call.a.call_id,
                 route.line.user_id if route.line else "-",
                 f", forked to {len(call.branches)}" if call.forked else "",
                 extra=call.fields())  # fmt: skip
        return out

    @staticmethod
    def _offer(request: Request) -> Sdp | None:
        """The INVITE's SDP offer, parsed once for allocation and rewriting (None: no
        offer, a late-offer INVITE). Unparsable SDP is refused before anything is held."""
        if not request.body or request.content_type != "application/sdp":
            return None
        try:
            return parse_sdp(request.body)
        except SdpError as exc:
            raise Reject(
                488, "Not Acceptable Here", [("Warning", f'399 - "bad SDP: {exc}"')]
            ) from exc

    def _new_call(
        self, side: Side, tx: ServerTransaction, original: Request, request: Request,
        route: Route, now: float,
    ) -> Call:  # fmt: skip
        try:
            caller = request.from_
            remote_target = contact_target(request.get_all("contact"))
        except SipHeaderError as exc:
            raise Reject(400, "Bad Request") from exc
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
            supports_xsipura=supports_xsipura(request),
        )
        a.local = a.local.with_param("tag", a.local_tag)
        targets = [Target(route.ruri, route.dest), *route.forks]
        branches = [Branch(self._b_leg(side.other, caller, request, t)) for t in targets]
        a.dest = self.router.leg_dest(a, now)
        call = Call(a=a, b=branches[0].leg, line=route.line, invite_server=tx, created=now,
                    branches=branches, failover=route.failover)  # fmt: skip
        tx.context = call
        return call

    def _b_leg(self, out_side: Side, caller: NameAddr, request: Request, target: Target) -> Leg:
        """A new dialog toward one target: its own Call-ID, tag and CSeq space."""
        b_tag = new_tag()
        b = Leg(
            side=out_side,
            call_id=new_call_id(self.sides.advertised(out_side)[0]),
            local_tag=b_tag,
            local=caller.with_param("tag", b_tag),
            remote=request.to.without_param("tag"),
            uac=True,
            local_cseq=0,
            remote_target=target.ruri,
            dest=target.dest,
        )
        if out_side is Side.INSIDE:
            b.flow = target.dest  # the registered flow (NAT, TCP connection) stays the path
        return b

    def _send_invite(
        self, call: Call, branch: Branch, request: Request, body: bytes, tx: ServerTransaction,
        extra: list[tuple[str, str]], now: float,
    ) -> list[Outbound]:  # fmt: skip
        b = branch.leg
        assert b.dest is not None and b.remote_target is not None
        b.invite_cseq = b.next_cseq()
        outgoing = Request(method="INVITE", uri=b.remote_target)
        max_forwards = forwarded_max_forwards(request, self.config.sip.max_forwards)
        self.sides.dialog_headers(outgoing, b, "INVITE", b.invite_cseq, max_forwards)
        outgoing.add("Contact", self.sides.contact(b.side, b.dest.transport))
        copy_end_to_end(request, outgoing)
        for name, value in extra:
            outgoing.set(name, value)
        outgoing.body = body
        self.sides.advertise(b.side, outgoing)
        context = RelayedRequest(call, call.a, tx, branch=branch)
        branch.invite_client, out = self.sides.send_request(b.side, outgoing, b.dest, now,
                                                            context)  # fmt: skip
        return out

    def _allocate(self, call: Call, streams: int) -> MediaHandle:
        """Ports for the call's first ``streams`` m= lines, at most ``[limits]
        max_streams_per_call``: four INVITEs with 62 m= lines each once bound 992 of
        1,000 ports. Streams beyond are declined with port 0 (:class:`MediaHandle`)."""
        anchored = max(1, min(streams, self.config.limits.max_streams_per_call))
        try:
            session = self.media.allocate(call.a.call_id, anchored)
        except PortsExhausted as exc:
            raise Reject(503, "Service Unavailable", [("Retry-After", "5")],
                         cause="media ports exhausted") from exc  # fmt: skip
        media_ip = {
            Side.INSIDE: self.config.inside.media_ip,
            Side.OUTSIDE: self.config.outside.media_ip,
        }
        self.calls.media_allocated(call, session.id)
        latch = self.config.media.latch
        return MediaHandle(self.media, session, anchored, media_ip, latch,
                           lambda more: self._more(call, more),
                           max_streams=self.config.limits.max_streams_per_call)  # fmt: skip

    def _more(self, call: Call, streams: int) -> MediaSession:
        """A further session for streams an offer adds beyond the call's (raises
        PortsExhausted)."""
        session = self.media.allocate(call.a.call_id, streams)
        self.calls.media_allocated(call, session.id)
        return session

    def allocate_quietly(self, call: Call, offer: bytes) -> MediaHandle | None:
        """Media for an offer that arrives after the INVITE (late offer): None when no
        ports are left (the SDP then passes unanchored). Unparsable SDP anchors one
        stream, so a later offer on the call can still use it."""
        try:
            streams = len(parse_sdp(offer).media)
        except SdpError:
            streams = 1
        try:
            call.media = self._allocate(call, streams)
        except Reject:
            return None
        return call.media

    # --- the A leg's server transaction -----------------------------------------------

    def on_server_timeout(self, call: Call, tx: ServerTransaction, now: float) -> list[Outbound]:
        """Timer H/L on the A leg's INVITE: the caller never ACKed our 2xx."""
        if call.state is not CallState.ANSWERED:
            return []
        log.info("call %d: no ACK from the caller; hanging up", call.id)
        acked: list[Outbound] = []
        b = call.b
        if b.ack_cseq != b.invite_cseq:
            acked = self.sides.ack(b, b.invite_cseq)  # RFC 3261 §13.2.2.4
        return (
            acked
            + self.dialogs.teardown.send_bye(call, call.b, now, "no ACK")
            + self.dialogs.teardown.send_bye(call, call.a, now, "no ACK")
        )
