"""Setting a call up: the INVITE that creates it, and the answers to that INVITE.

An INVITE outside any dialog creates a :class:`Call`: the A leg is the dialog in which
the proxy answers it, the B leg a new dialog (own Call-ID, tags, CSeq) in which it sends
the INVITE on toward the route's next hop. Media is anchored when the offer arrives (in
the INVITE, or in the 2xx for a late offer). Responses come back on the B leg and are
relayed to the A leg; the interesting cases are the races: a CANCEL that crosses a 200
(confirm, then hang up), a 2xx retransmitted after our ACK, and an answer the proxy
cannot anchor media for.
"""

from __future__ import annotations

import contextlib
import logging

from proxy.b2bua.calls import CallTable
from proxy.b2bua.config import Config
from proxy.b2bua.dialogs import Dialogs
from proxy.b2bua.failover import FAILOVER_STATUSES, Failovers
from proxy.b2bua.legs import (
    PARTIES,
    Call,
    CallState,
    Leg,
    RelayedRequest,
    new_call_id,
    new_tag,
)
from proxy.b2bua.media import MediaHandle
from proxy.b2bua.messages import (
    Reject,
    contact_target,
    copy_end_to_end,
    forwarded_max_forwards,
    strip_star_code,
    supports_xsipura,
)
from proxy.b2bua.routing import Route, Router
from proxy.b2bua.sdes import SdesRefused
from proxy.b2bua.sdes_leg import SdesLegs
from proxy.b2bua.secure_leg import SecureLegs
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.teardown import Teardown
from proxy.logsetup import bind_call
from proxy.media.engine import MediaEngine, Side
from proxy.media.ports import PortsExhausted
from proxy.sip.headers import SipHeaderError
from proxy.sip.message import Request, Response
from proxy.sip.sdp import Sdp, SdpError, parse_sdp
from proxy.sip.transaction import ClientTransaction, ServerTransaction

log = logging.getLogger("sipura.b2bua")


class CallSetup:
    def __init__(
        self, config: Config, sides: SipSides, calls: CallTable, router: Router,
        media: MediaEngine, teardown: Teardown, dialogs: Dialogs, secure: SecureLegs,
        sdes: SdesLegs,
    ) -> None:  # fmt: skip
        self.config = config
        self.sides = sides
        self.calls = calls
        self.router = router
        self.media = media
        self.teardown = teardown
        self.dialogs = dialogs
        self.secure = secure
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
        route = self.router.route(side, request, tx.source, now)
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
                body = call.media.relay_sdp(side, body, offer)
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
        return self._send_invite(call, request, route, body, tx, now)

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
        out_side = side.other
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
        b_tag = new_tag()
        b = Leg(
            side=out_side,
            call_id=new_call_id(self.sides.advertised(out_side)[0]),
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
        a.dest = self.router.leg_dest(a, now)
        call = Call(a=a, b=b, line=route.line, invite_server=tx, created=now,
                    failover=route.failover)  # fmt: skip
        tx.context = call
        return call

    def _send_invite(
        self, call: Call, request: Request, route: Route, body: bytes, tx: ServerTransaction,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        a, b = call.a, call.b
        b.invite_cseq = b.next_cseq()
        outgoing = Request(method="INVITE", uri=route.ruri)
        max_forwards = forwarded_max_forwards(request, self.config.sip.max_forwards)
        self.sides.dialog_headers(outgoing, b, "INVITE", b.invite_cseq, max_forwards)
        outgoing.add("Contact", self.sides.contact(b.side, route.dest.transport))
        copy_end_to_end(request, outgoing)
        outgoing.body = body
        self.sides.advertise(b.side, outgoing)
        ctx, out = self.sides.send_request(b.side, outgoing, route.dest, now,
                                           RelayedRequest(call, a, tx))  # fmt: skip
        call.invite_client = ctx
        log.info("call %d %s: INVITE %s from %s -> %s (%s), line %s", call.id, call.direction,
                 request.uri, a.remote.uri, route.ruri, a.call_id,
                 route.line.user_id if route.line else "-", extra=call.fields())  # fmt: skip
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
        return MediaHandle(self.media, session, anchored, media_ip)

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

    # --- responses on the B leg -------------------------------------------------------

    def on_invite_response(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float,
        context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        """A response to an INVITE the proxy relayed on ``leg`` (the initial one, or a
        re-INVITE), relayed to the origin leg when there is one to relay to."""
        status = response.status
        stx = context.server_tx
        initial = stx is call.invite_server
        if 200 <= status < 300:
            if context.answered:  # a retransmitted 2xx: our ACK was lost, send it again
                return self._ack_again(leg, tx)
            context.answered = True
        if initial and (call.cancelled or call.state is CallState.TERMINATED):
            return self._after_cancel(call, leg, tx, response, now)
        if status == 100:
            if initial:
                call.got_provisional = True
            return []
        if initial and 200 <= status < 300 and not self._anchor_answer(call, response):
            return self._answer_without_ports(call, leg, tx, response, now, context)
        if status < 200:
            self._provisional(call, leg, response, initial, now)
        elif status < 300:
            self.learn_remote(leg, response, now, establishing=initial)
            if initial:
                if call.answered:
                    return []  # a retransmitted 2xx; the tx layer resends our answer
                call.state = CallState.ANSWERED
                call.answered_at = now
                self.sides.stats.calls_answered += 1
                log.info("call %d answered: %d %s", call.id, status, response.reason)
        elif initial and (retried := self._failed(call, tx, response, now)) is not None:
            return retried
        if stx is None:
            return []
        out = self._relay(call, leg, tx, stx, response, now, context)
        if initial and status >= 300:
            self.calls.finish(call)
        return out

    def _failed(
        self, call: Call, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound] | None:
        """A final failure of the initial INVITE: failover (what was sent instead), or
        None when it stands and is relayed to the caller."""
        status = response.status
        if status in FAILOVER_STATUSES:
            why = f"{status} {response.reason}"
            retried = self.failovers.invite_failed(call, tx, why, now)
            if retried is not None:
                return retried
        self.sides.stats.calls_failed += 1
        call.end(PARTIES[call.b.side], f"{status} {response.reason}")
        log.info("call %d failed: %d %s", call.id, status, response.reason)
        return None

    def _ack_again(self, leg: Leg, tx: ClientTransaction) -> list[Outbound]:
        cseq = tx.request.cseq.number
        if leg.ack_data is not None and leg.ack_cseq == cseq and leg.dest is not None:
            return [Outbound(leg.side, leg.ack_data, leg.dest)]
        return []

    def _after_cancel(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        """The caller cancelled (or the call ended) while the INVITE was out."""
        status = response.status
        if 200 <= status < 300:  # the CANCEL lost the race: confirm, then hang up
            self.learn_remote(leg, response, now)
            out = self.sides.ack(leg, tx.request.cseq.number)
            return out + self.teardown.send_bye(call, leg, now, "call cancelled")
        if status >= 200:
            self.calls.finish(call)
            return []
        call.got_provisional = True  # 100 Trying included (RFC 3261 §9.1)
        return self.teardown.send_cancel(call, now)

    def _answer_without_ports(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float,
        context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        """A late offer in the 2xx, and no media ports for it: confirm and hang up the
        B leg, 503 to the caller."""
        self.sides.refusal(
            503,
            "media ports exhausted",
            call.a.flow,
            now,
            f"call {call.id}: no media ports for the offer in the answer",
        )
        self.learn_remote(leg, response, now)
        self.sides.stats.calls_failed += 1
        out = self.sides.ack(leg, tx.request.cseq.number)
        out += self.teardown.send_bye(call, leg, now, "no media ports")
        stx = context.server_tx
        if stx is not None:
            origin = context.origin
            retry = [("Retry-After", "5")]
            out += self.sides.respond(origin.side, stx, 503, "Service Unavailable", now,
                                      to_tag=origin.local_tag, extra=retry)  # fmt: skip
        return out

    def _relay(
        self, call: Call, leg: Leg, tx: ClientTransaction, stx: ServerTransaction,
        response: Response, now: float, context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        """The response on to the caller; an answer SDES must refuse ends the call."""
        try:
            return self.dialogs.relay_response(context.origin, stx, response, call, now,
                                               offered=bool(tx.request.body))  # fmt: skip
        except SdesRefused as refused:
            return self._refused(call, leg, tx, stx, str(refused), now)

    def _refused(
        self, call: Call, leg: Leg, tx: ClientTransaction, stx: ServerTransaction, why: str,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        """``sdes = "require"`` and the answer has no keys: confirm and hang up the B leg,
        488 to the caller (the call never reaches the phone in the clear)."""
        log.warning("call %d: SRTP required: %s; call refused", call.id, why)
        self.sides.stats.calls_failed += 1
        out = self.sides.ack(leg, tx.request.cseq.number)
        out += self.teardown.send_bye(call, leg, now, "SRTP required", cause=488)
        origin = call.other(leg)
        warning = [("Warning", '399 - "the far end did not accept SRTP"')]
        out += self.sides.respond(origin.side, stx, 488, "Not Acceptable Here", now,
                                  to_tag=origin.local_tag, extra=warning)  # fmt: skip
        return out

    def _provisional(
        self, call: Call, leg: Leg, response: Response, initial: bool, now: float
    ) -> None:
        if response.to.tag:
            self.learn_remote(leg, response, now)
            if initial:
                call.state = CallState.EARLY
        call.got_provisional = True

    def _anchor_answer(self, call: Call, response: Response) -> bool:
        """Allocate media for an offer in a 2xx (late offer); False when no ports are left."""
        if call.media is not None or not response.body:
            return True
        if response.content_type != "application/sdp":
            return True
        return self.allocate_quietly(call, response.body) is not None

    def learn_remote(
        self, leg: Leg, response: Response, now: float, *, establishing: bool = True
    ) -> None:
        """Learn the peer's side of ``leg``'s dialog from a response (RFC 3261 §12.1.2)."""
        tag = response.to.tag
        if tag:
            leg.remote_tag = tag
            leg.remote = leg.remote.with_param("tag", tag)
        with contextlib.suppress(SipHeaderError):  # an unusable Contact keeps the old target
            leg.remote_target = contact_target(response.get_all("contact")) or leg.remote_target
        if leg.uac and establishing:  # the route set is fixed when the dialog forms
            leg.route_set = list(reversed(response.get_all("record-route")))
        leg.supports_xsipura = leg.supports_xsipura or supports_xsipura(response)
        leg.dest = self.router.leg_dest(leg, now)

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
            + self.teardown.send_bye(call, call.b, now, "no ACK")
            + self.teardown.send_bye(call, call.a, now, "no ACK")
        )
