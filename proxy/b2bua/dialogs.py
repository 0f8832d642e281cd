"""Requests and responses inside a bridged call's dialogs, relayed leg to leg.

Once a call exists, each request on one leg (re-INVITE, UPDATE, INFO, PRACK, REFER,
NOTIFY, BYE...) becomes the same request on the other leg, in that leg's dialog (its
Call-ID, tags, CSeq, route set, remote target), with every header the proxy does not
own copied in order (decision 11) and any SDP anchored on the proxy's media ports. The
far side's answer comes back the same way. Exceptions the proxy handles itself: the
x-sipura INFOs of a secured outside leg (:mod:`proxy.b2bua.secure_leg`), a BYE that
crosses another, the caller's BYE or CANCEL of a call not yet answered, a CANCEL of a
pending re-INVITE (relayed as the CANCEL of the re-INVITE it caused), requests in a
dialog the call does not keep (:mod:`proxy.b2bua.forking`), a REFER's ``Replaces``
(:mod:`proxy.b2bua.transfer`) and a T.38 re-offer on a secured call
(:mod:`proxy.b2bua.fax`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.b2bua import secure as sec
from proxy.b2bua.calls import CallTable
from proxy.b2bua.fax import FaxPolicy
from proxy.b2bua.forking import Forking
from proxy.b2bua.legs import PARTIES, Call, CallState, Leg, RelayedRequest
from proxy.b2bua.media_watch import MediaWatch
from proxy.b2bua.messages import (
    TARGET_REFRESH,
    Reject,
    contact_target,
    copy_end_to_end,
    forwarded_max_forwards,
    rewrite_rack,
)
from proxy.b2bua.routing import Router
from proxy.b2bua.sdes_leg import SdesLegs
from proxy.b2bua.secure_leg import SecureLegs
from proxy.b2bua.session_timer import CallTimers
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.teardown import Teardown
from proxy.b2bua.transfer import Transfers
from proxy.media.engine import Side
from proxy.sip.headers import SipHeaderError
from proxy.sip.message import Request, Response
from proxy.sip.sdp import SdpError
from proxy.sip.transaction import Address, ClientTransaction, ServerTransaction, response_to

if TYPE_CHECKING:
    from proxy.b2bua.answers import InviteAnswers
    from proxy.b2bua.invite import CallSetup

log = logging.getLogger("sipura.b2bua")


class Dialogs:
    def __init__(
        self, sides: SipSides, calls: CallTable, router: Router, teardown: Teardown,
        secure: SecureLegs, watch: MediaWatch, sdes: SdesLegs, forking: Forking,
        transfers: Transfers, timers: CallTimers, fax: FaxPolicy,
    ) -> None:  # fmt: skip
        self.sides = sides
        self.calls = calls
        self.router = router
        self.teardown = teardown
        self.secure = secure
        self.watch = watch
        self.forking = forking
        self.transfers = transfers
        self.timers = timers
        self.fax = fax
        self.sdes = sdes
        self.setup: CallSetup | None = None
        """Set once call set-up exists (late offers allocate media there)."""
        self.answers: InviteAnswers | None = None
        """Set once it exists: the answers to INVITEs."""

    # --- requests in a dialog ---------------------------------------------------------

    def on_request(
        self, side: Side, tx: ServerTransaction, request: Request, call: Call, leg: Leg,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        """A request in ``leg``'s dialog, from its peer."""
        method = request.method
        if (leg is not call.a and leg is not call.b) or not _same_dialog(leg, request):
            return self.forking.stray_request(tx, request, leg, now)
        self._accept_in_dialog(tx, request, call, leg, now)
        other = call.other(leg)
        if other.dest is None or (other.remote_tag is None and method != "BYE"):
            raise Reject(481, "Call/Transaction Does Not Exist")
        if method == "INFO" and side is Side.OUTSIDE and call.security is not None:
            kind = sec.is_xsipura_info(request.content_type, request.body)
            if kind is None:  # profile §2a: an empty INFO is answered and ignored
                return self.sides.respond(side, tx, 200, "OK", now)
            if kind:
                return self.secure.on_info(call, tx, request, now)
        if method == "BYE":
            handled = self._bye(side, tx, call, leg, now, bye_reason(request))
            if handled is not None:
                return handled
        if method == "INVITE":
            self.fax.on_offer(call, request.content_type, request.body, side.value, now)
        return self._forward(tx, request, call, leg, now)

    def _accept_in_dialog(
        self, tx: ServerTransaction, request: Request, call: Call, leg: Leg, now: float
    ) -> None:
        """RFC 3261 §12.2.2: CSeq order, a live dialog, and the target refresh."""
        method = request.method
        cseq = request.cseq.number
        if leg.remote_cseq is not None and cseq <= leg.remote_cseq and method != "ACK":
            raise Reject(500, "Server Internal Error", [("Retry-After", "1")])
        leg.remote_cseq = cseq
        leg.flow = tx.source
        if call.state in (CallState.TERMINATING, CallState.TERMINATED) and method != "BYE":
            raise Reject(481, "Call/Transaction Does Not Exist")
        if method in TARGET_REFRESH and request.has("contact"):
            try:
                target = contact_target(request.get_all("contact"))
            except SipHeaderError as exc:
                raise Reject(400, "Bad Request") from exc
            if target is not None:
                leg.remote_target = target
                leg.dest = self.router.leg_dest(leg, now)

    def _bye(
        self, side: Side, tx: ServerTransaction, call: Call, leg: Leg, now: float, why: str
    ) -> list[Outbound] | None:
        """A BYE the proxy answers itself; None when it is to be relayed. ``why``: the BYE
        and its Reason, for the call's summary (the server transaction keeps no Reason)."""
        if leg is call.a and call.ringing:
            # The caller hangs up an early dialog: the INVITE ends as if CANCELled.
            log.info("call %d: BYE from the caller before the answer", call.id)
            call.end(PARTIES[side], "BYE before the answer")
            return self.sides.respond(side, tx, 200, "OK", now) + self.teardown.cancel_call(
                call, now
            )
        if call.state is CallState.TERMINATING:
            return self.sides.respond(side, tx, 200, "OK", now)  # BYEs crossed: one is enough
        call.state = CallState.TERMINATING
        call.end(PARTIES[side], why)
        log.info("call %d: BYE from the %s side", call.id, side.value)
        if call.other(leg).remote_tag is None:  # early: nothing to hang up on the far side
            self.calls.finish(call)
            return self.sides.respond(side, tx, 200, "OK", now)
        return None

    def _forward(
        self, tx: ServerTransaction, request: Request, call: Call, leg: Leg, now: float
    ) -> list[Outbound]:
        """The same request in the other leg's dialog."""
        method = request.method
        other = call.other(leg)
        assert other.dest is not None
        if method == "INVITE":
            other.invite_cseq = other.next_cseq()
            cseq_out = other.invite_cseq
        else:
            cseq_out = other.next_cseq()
        max_forwards = forwarded_max_forwards(request, self.sides.config.sip.max_forwards)
        outgoing = self.sides.dialog_request(other, method, cseq_out, max_forwards)
        if method in TARGET_REFRESH:
            outgoing.add("Contact", self.sides.contact(other.side, other.dest.transport))
        copy_end_to_end(request, outgoing)
        if method == "PRACK":
            rewrite_rack(outgoing, other.invite_cseq)
        elif method == "REFER":
            refer_to = self.transfers.refer_to(leg.side, call, request)
            if refer_to is not None:
                outgoing.set("Refer-To", refer_to)
        outgoing.body = request.body
        if request.body and request.content_type == "application/sdp":
            offer = method not in ("ACK", "PRACK")  # PRACK: the answer to an offer in a 18x
            outgoing.body = self.relay_sdp(call, leg, request.body, now, offer=offer)
        self.sides.advertise(other.side, outgoing)
        context = RelayedRequest(call, leg, tx)
        context.client_tx, out = self.sides.send_request(other.side, outgoing, other.dest, now,
                                                         context)  # fmt: skip
        if method == "INVITE":
            tx.context = context  # a CANCEL of this re-INVITE finds its relayed copy
        return out

    def on_ack(self, side: Side, request: Request, source: Address, now: float) -> list[Outbound]:
        """An ACK for a 2xx the proxy relayed: confirm the dialog, ACK the other leg."""
        found = self.calls.find(side, request.call_id, request.to.tag or "")
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
            body = self.relay_sdp(call, leg, body, now, offer=False)
        out = self.sides.ack(other, other.invite_cseq, body, request.get("content-type") or "")
        if confirmed:
            self.watch.on_confirmed(call, now)
            out += self.secure.on_confirmed(call, now)
        return out

    def on_stray(self, side: Side, response: Response) -> list[Outbound]:
        """A 2xx retransmission after our INVITE transaction ended: re-send our ACK."""
        if not 200 <= response.status < 300 or response.cseq.method != "INVITE":
            return []
        found = self.calls.find(side, response.call_id, response.from_.tag or "")
        if found is None:
            return []
        leg = found[1]
        if leg.ack_data is None or leg.dest is None or leg.ack_cseq != response.cseq.number:
            return []
        return [Outbound(side, leg.ack_data, leg.dest)]

    def on_cancel(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        invite_tx = self.sides.layers[side].find_invite_server(request)
        if invite_tx is None:
            return self.sides.respond(side, tx, 481, "Call/Transaction Does Not Exist", now)
        call = invite_tx.context
        if isinstance(call, RelayedRequest):  # a pending re-INVITE
            out = self.sides.respond(side, tx, 200, "OK", now)
            return out + self._cancel_reinvite(call, invite_tx, now)
        to_tag = call.a.local_tag if isinstance(call, Call) else None
        out = self.sides.respond(side, tx, 200, "OK", now, to_tag=to_tag)  # §9.2: same To tag
        if not isinstance(call, Call) or not call.ringing:
            return out  # already answered: the CANCEL has no effect (§9.2)
        log.info("call %d cancelled by the caller", call.id, extra=call.fields())
        call.end(PARTIES[side], "CANCEL")
        return out + self.teardown.cancel_call(call, now)

    def _cancel_reinvite(
        self, context: RelayedRequest, invite_tx: ServerTransaction, now: float
    ) -> list[Outbound]:
        """The origin CANCELs a re-INVITE it sent: the CANCEL goes to the re-INVITE the
        proxy relayed (once the far side has answered provisionally, §9.1), and the
        far side's 487 comes back as the answer to the origin's re-INVITE."""
        if context.answered or context.cancel_wanted or invite_tx.last_status >= 200:
            return []  # already answered: the CANCEL has no effect (§9.2)
        log.info("call %d: re-INVITE cancelled by the %s side", context.call.id,
                 context.origin.side.value)  # fmt: skip
        context.cancel_wanted = True
        if not context.got_provisional:
            return []  # sent when the first provisional answer arrives
        return self.cancel_reinvite(context.call, context, now)

    def cancel_reinvite(self, call: Call, context: RelayedRequest, now: float) -> list[Outbound]:
        client = context.client_tx
        if client is None:
            return []
        other = call.other(context.origin)
        cancel = RelayedRequest(call, context.origin, None)
        return self.teardown.cancel_transaction(other.side, client, now, cancel)

    # --- responses to relayed requests ------------------------------------------------

    def on_response(
        self, context: RelayedRequest, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        call, origin = context.call, context.origin
        method = tx.request.method
        if method == "INVITE":
            assert self.answers is not None
            leg = context.branch.leg if context.branch is not None else call.other(origin)
            return self.answers.on_invite_response(call, leg, tx, response, now, context)
        if method == "CANCEL":
            return []
        if method == "UPDATE" and 200 <= response.status < 300:
            self.timers.refreshed(call, response, now)
        out: list[Outbound] = []
        if context.server_tx is not None:  # else our own BYE: nothing to relay
            out = self.relay_response(origin, context.server_tx, response, call, now)
        if method == "BYE" and response.status >= 200:
            self.calls.finish(call)
        return out

    def on_timeout(
        self, context: RelayedRequest, tx: ClientTransaction, now: float
    ) -> list[Outbound]:
        """Timer B/F on a relayed request: 408 to the origin; a dead INVITE or BYE ends
        the call."""
        call = context.call
        method = tx.request.method
        initial = method == "INVITE" and context.server_tx is call.invite_server
        if initial and self.setup is not None:
            retried = self.setup.failovers.invite_failed(call, tx, "timeout", now)
            if retried is not None:
                return retried
        out: list[Outbound] = []
        branch = context.branch
        if branch is not None and call.forked and context.server_tx is call.invite_server:
            done = self.forking.on_branch_timeout(call, branch)
            if not done or not call.ringing:
                return []  # other branches still ring (or the call is over)
        if context.server_tx is not None and method != "ACK":
            origin = context.origin
            out = self.sides.respond(origin.side, context.server_tx, 408, "Request Timeout", now,
                                     to_tag=origin.local_tag)  # fmt: skip
        if initial:
            log.info("call %d: no answer from the %s side (timeout)", call.id,
                     call.other(context.origin).side.value)  # fmt: skip
            call.end("proxy", "no answer (timeout)")
            self.sides.stats.calls_failed += 1
            self.calls.finish(call)
        elif method == "BYE":
            self.calls.finish(call)
        return out

    def relay_response(
        self, origin: Leg, stx: ServerTransaction, response: Response, call: Call, now: float,
        source: Leg | None = None,
    ) -> list[Outbound]:  # fmt: skip
        """The far side's response (from ``source``, by default the other leg), as the
        response on ``origin``'s server transaction."""
        status = response.status
        relayed = response_to(stx.request, status, response.reason, to_tag=origin.local_tag)
        if 300 <= status < 400:  # redirect targets are the payload of a 3xx, not our contact
            for contact in response.get_all("contact"):
                relayed.add("Contact", contact)
        elif response.has("contact"):
            relayed.add("Contact", self.sides.contact(origin.side, stx.source.transport))
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        if response.body and response.content_type == "application/sdp":
            from_leg = source if source is not None else call.other(origin)
            offer = not stx.had_body  # a late offer, in the answer to a bodiless INVITE
            relayed.body = self.relay_sdp(call, from_leg, response.body, now, offer=offer,
                                          final=status >= 200)  # fmt: skip
        self.sides.advertise(origin.side, relayed)
        return self.sides.send_response(origin.side, stx, relayed, now)

    def relay_sdp(
        self, call: Call, leg: Leg, body: bytes, now: float, *, offer: bool, final: bool = True
    ) -> bytes:
        """Anchor an SDP body from ``leg``'s peer on the proxy's ports; allocate media if
        the call has none yet (a late offer). Unusable SDP passes through as it is.
        The address ``leg``'s SIP comes from decides NAT (``[media] latch = "auto"``)."""
        if call.media is None:
            if call.state is CallState.TERMINATED:
                return body  # a late answer for a call already gone: nothing to anchor
            assert self.setup is not None
            media = self.setup.allocate_quietly(call, body)
            if media is None:
                log.warning("call %d: no media ports for a late offer; SDP passed as is", call.id)
                return body
        assert call.media is not None
        try:
            anchored = call.media.relay_sdp(leg.side, body, signal_host=signal_host(leg))
        except SdpError as exc:
            log.info("call %d: unparsable SDP passed through as is: %s", call.id, exc)
            return body
        self.watch.on_sdp(call, now)
        return self.sdes.crossing(call, leg.side, anchored, offer=offer, final=final)


def signal_host(leg: Leg) -> str | None:
    """Where ``leg``'s peer sends its SIP from: the flow its requests came on, else the
    address the proxy sends to (its responses come from there)."""
    if leg.flow is not None:
        return leg.flow.host
    return leg.dest.host if leg.dest is not None else None


def _same_dialog(leg: Leg, request: Request) -> bool:
    """The request's From tag is the leg's peer tag (or one of its early dialogs'); a
    request from another dialog that shares our tag (a fork beyond us whose 2xx lost)
    must not reach the call."""
    tag = request.from_.tag
    if leg.remote_tag is None or tag is None or tag == leg.remote_tag:
        return True
    early = leg.early.get(tag)
    if early is None:
        return False
    leg.remote_tag, leg.remote = tag, early.remote  # the UAS talks in this early dialog
    leg.remote_target, leg.route_set = early.remote_target, list(early.route_set)
    return True


REASON_TEXT_MAX = 80
"""Characters of a BYE's ``Reason`` header kept in the end-of-call summary."""


def bye_reason(request: Request) -> str:
    """``BYE``, with the sender's ``Reason`` header (RFC 3326) when it gave one."""
    reason = request.get("reason")
    if not reason:
        return "BYE"
    return f"BYE, Reason: {reason.strip()[:REASON_TEXT_MAX]}"
