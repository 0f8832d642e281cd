"""Forking: one inbound call rung on every registered device, and dialogs not kept.

A line (or relayed user) with several registered contacts gets each inbound call on all
of them at once (decision 46). The call's B side is then several *branches*, each its
own INVITE in its own dialog (Call-ID, tags): the first 2xx wins and becomes the call's
B leg, every other branch gets a CANCEL (or, when its 2xx crossed the CANCEL, an ACK and
a BYE); a 6xx from any branch ends the call at once (RFC 3261 §16.7 step 5); when every
branch failed, the best final answer goes to the caller (6xx, else the lowest class).
Provisional answers of every branch reach the caller (one dialog on its side: ours).
x-sipura runs on the outside leg, which is the caller's, so it is the same whichever
branch wins.

The same "ACK, then BYE" applies to any dialog a call does not keep (RFC 3261
§13.2.2.4): a second 2xx with another To tag to one of our INVITEs (a forking proxy
beyond us), or a branch that answered after losing. Those dialogs are ended with
:class:`EndedDialog` as the BYE's context, so their answer never touches the call.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace

from proxy.b2bua.calls import CallTable
from proxy.b2bua.legs import Branch, Call, Leg
from proxy.b2bua.messages import contact_target
from proxy.b2bua.routing import Router
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.teardown import Teardown
from proxy.sip.headers import SipHeaderError
from proxy.sip.message import Request, Response
from proxy.sip.transaction import ClientTransaction, ServerTransaction

log = logging.getLogger("sipura.b2bua")


MAX_ENDED = 16
"""Dialogs being ended kept findable per call (a forking proxy beyond us could send any
number of 2xx with new To tags)."""


@dataclass(eq=False, slots=True)
class EndedDialog:
    """Client-transaction context: the BYE ending a dialog the call does not keep."""

    call: Call
    leg: Leg


class Forking:
    def __init__(
        self, sides: SipSides, calls: CallTable, router: Router, teardown: Teardown
    ) -> None:
        self.sides = sides
        self.calls = calls
        self.router = router
        self.teardown = teardown
        self.ended_dialogs = 0
        """Dialogs ACKed and BYEd because the call did not keep them (for /status)."""

    # --- branches of a forked call ----------------------------------------------------

    @staticmethod
    def lost(call: Call, branch: Branch) -> bool:
        """Another branch answered: this one only needs cleaning up."""
        return branch.leg is not call.b and (call.answered or not call.ringing)

    def on_loser_response(
        self, call: Call, branch: Branch, tx: ClientTransaction, response: Response,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        """A response on a branch that lost, or of a call already cancelled."""
        status = response.status
        if status < 200:
            branch.got_provisional = True
            return self.teardown.cancel_branch(call, branch, now)
        if status >= 300:
            branch.final = response
            return []
        return self.end_dialog(call, branch.leg, tx, response, now)

    def won(self, call: Call, branch: Branch, now: float) -> list[Outbound]:
        """The first 2xx: ``branch`` is the call's B leg; every other one is cancelled."""
        if call.b is not branch.leg:
            call.b = branch.leg
        if not call.forked:
            return []
        log.info("call %d: answered by %s; cancelling %d other branch(es)", call.id,
                 branch.leg.remote_target, len(call.branches) - 1)  # fmt: skip
        out: list[Outbound] = []
        for other in call.branches:
            if other is not branch and other.pending:
                out += self.teardown.cancel_branch(call, other, now)
        return out

    def on_failure(
        self, call: Call, branch: Branch, response: Response, now: float
    ) -> tuple[Response | None, list[Outbound]]:
        """A final non-2xx on a branch of a forked, ringing call: the response to relay
        to the caller now (None: wait for the others) and the CANCELs it causes."""
        branch.final = response
        if response.status >= 600:
            log.info("call %d: %d from a branch ends the call", call.id, response.status)
            out: list[Outbound] = []
            for other in call.branches:
                if other.pending:
                    out += self.teardown.cancel_branch(call, other, now)
            return response, out
        if any(other.pending for other in call.branches):
            return None, []
        return best_response(call.branches), []

    def on_branch_timeout(self, call: Call, branch: Branch) -> bool:
        """Timer B on one branch of a forked call: True when the caller must now get
        the best answer (408 if nothing better came)."""
        branch.final = Response(status=408, reason="Request Timeout")
        return not any(other.pending for other in call.branches)

    # --- dialogs the call does not keep -----------------------------------------------

    def end_dialog(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        """ACK a 2xx that formed a dialog the call does not keep, then BYE it."""
        ended = leg
        if leg is call.b or leg is call.a:  # another To tag on a leg the call keeps
            ended = dataclasses_replace(leg, early={})
        tag = response.to.tag
        if tag:
            ended.remote_tag = tag
            ended.remote = ended.remote.with_param("tag", tag)
        with contextlib.suppress(SipHeaderError):
            ended.remote_target = contact_target(response.get_all("contact")) or leg.remote_target
        ended.route_set = list(reversed(response.get_all("record-route")))
        ended.dest = self.router.leg_dest(ended, now)
        log.info("call %d: 2xx from another dialog (To tag %s): ACK and BYE", call.id, tag)
        self.ended_dialogs += 1
        out = self.sides.ack(ended, tx.request.cseq.number)
        if ended.dest is None or ended.remote_tag is None:
            return out
        bye = self.sides.dialog_request(ended, "BYE", ended.next_cseq(),
                                        self.sides.config.sip.max_forwards)  # fmt: skip
        bye.add("Reason", 'SIP;cause=200;text="call completed elsewhere"')
        self.sides.brand(bye, request=True)
        if ended is not leg and len(call.ending_dialogs) < MAX_ENDED:
            call.ending_dialogs.append(ended)  # (beyond the bound: still BYEd, just not findable)
        _, sent = self.sides.send_request(ended.side, bye, ended.dest, now,
                                          EndedDialog(call, ended))  # fmt: skip
        return out + sent

    def on_ended_response(
        self, context: EndedDialog, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        if response.status >= 200:
            self._forget(context)
        return []

    def on_ended_timeout(
        self, context: EndedDialog, tx: ClientTransaction, now: float
    ) -> list[Outbound]:
        self._forget(context)
        return []

    @staticmethod
    def _forget(context: EndedDialog) -> None:
        with contextlib.suppress(ValueError):
            context.call.ending_dialogs.remove(context.leg)

    def stray_request(
        self, tx: ServerTransaction, request: Request, leg: Leg, now: float
    ) -> list[Outbound]:
        """A request in a dialog the call does not keep (a branch that lost, another
        To tag): a BYE is answered 200, anything else 481."""
        if request.method == "BYE":
            return self.sides.respond(leg.side, tx, 200, "OK", now)
        return self.sides.respond(leg.side, tx, 481, "Call/Transaction Does Not Exist", now)


def best_response(branches: list[Branch]) -> Response:
    """RFC 3261 §16.7 step 6: a 6xx if any, else the lowest class (first received
    within it); 408 when no branch answered at all."""
    finals = [b.final for b in branches if b.final is not None]
    if not finals:
        return Response(status=408, reason="Request Timeout")
    six = [r for r in finals if r.status >= 600]
    if six:
        return six[0]
    return min(finals, key=lambda r: r.status // 100)
