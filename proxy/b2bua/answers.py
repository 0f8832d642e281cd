"""Answers to the INVITEs the proxy sent on: the call's own, its forks, re-INVITEs.

Responses come back on the outgoing leg (or branch) and are relayed to the leg the
INVITE came from. The interesting cases are the races and the dialogs the call does
not keep: a CANCEL that crosses a 200 (confirm, then hang up), a 2xx retransmitted
after our ACK (send the same ACK again), a 2xx from another dialog (another To tag from
a forking proxy beyond us, or a branch that lost: ACK and BYE it, RFC 3261 §13.2.2.4),
a late offer in a 2xx the proxy has no ports for, and a re-INVITE the caller CANCELled
(the CANCEL follows the far side's first provisional answer). Early dialogs are
remembered per To tag (:class:`~proxy.b2bua.legs.EarlyDialog`). Timer C restarts on
each provisional answer and stops on the final one; a 2xx states the RFC 4028 session
interval in force (:mod:`proxy.b2bua.session_timer`); the answer to a replacing INVITE
hangs up the call it replaces (:mod:`proxy.b2bua.transfer`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from proxy.b2bua.calls import CallTable
from proxy.b2bua.dialogs import Dialogs
from proxy.b2bua.failover import FAILOVER_STATUSES
from proxy.b2bua.forking import Forking
from proxy.b2bua.legs import (
    MAX_EARLY_DIALOGS,
    PARTIES,
    Branch,
    Call,
    CallState,
    EarlyDialog,
    Leg,
    RelayedRequest,
)
from proxy.b2bua.messages import contact_target, supports_xsipura
from proxy.b2bua.routing import Router
from proxy.b2bua.sdes import SdesRefused
from proxy.b2bua.session_timer import CallTimers
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.teardown import Teardown
from proxy.b2bua.transfer import Transfers
from proxy.sip.headers import SipHeaderError
from proxy.sip.message import Response
from proxy.sip.transaction import ClientTransaction

if TYPE_CHECKING:
    from proxy.b2bua.invite import CallSetup

log = logging.getLogger("sipura.b2bua")


class InviteAnswers:
    def __init__(
        self, sides: SipSides, calls: CallTable, router: Router, teardown: Teardown,
        dialogs: Dialogs, forking: Forking, transfers: Transfers, timers: CallTimers,
        setup: CallSetup,
    ) -> None:  # fmt: skip
        self.sides = sides
        self.calls = calls
        self.router = router
        self.teardown = teardown
        self.dialogs = dialogs
        self.forking = forking
        self.transfers = transfers
        self.timers = timers
        self.setup = setup

    def on_invite_response(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float,
        context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        """A response to an INVITE the proxy relayed on ``leg`` (the initial one on one
        of its branches, or a re-INVITE)."""
        status = response.status
        if 200 <= status < 300:
            if context.answered:
                if _other_dialog(leg, response):
                    return self.forking.end_dialog(call, leg, tx, response, now)
                return self._ack_again(leg, tx)  # our ACK was lost: send it again
            context.answered = True
        branch = context.branch
        if branch is None or context.server_tx is not call.invite_server:
            return self._reinvite_response(call, leg, tx, response, now, context)
        if call.cancelled or call.state is CallState.TERMINATED:
            return self._after_cancel(call, branch, tx, response, now)
        if self.forking.lost(call, branch):
            return self.forking.on_loser_response(call, branch, tx, response, now)
        if status == 100:
            branch.got_provisional = True
            return []
        if status < 200:
            return self._provisional(call, branch, response, now, context)
        if status < 300:
            return self._answered(call, branch, tx, response, now, context)
        return self._failed(call, branch, tx, response, now, context)

    def _ack_again(self, leg: Leg, tx: ClientTransaction) -> list[Outbound]:
        cseq = tx.request.cseq.number
        if leg.ack_data is not None and leg.ack_cseq == cseq and leg.dest is not None:
            return [Outbound(leg.side, leg.ack_data, leg.dest)]
        return []

    # --- the call's own INVITE --------------------------------------------------------

    def _provisional(
        self, call: Call, branch: Branch, response: Response, now: float,
        context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        branch.got_provisional = True
        if response.to.tag:
            self.learn_remote(branch.leg, response, now)
            _remember_early(branch.leg, response)
            call.state = CallState.EARLY
        self.timers.ringing(call, now)
        assert context.server_tx is not None
        try:
            return self.dialogs.relay_response(call.a, context.server_tx, response, call, now,
                                               branch.leg)  # fmt: skip
        except SdesRefused as refused:  # an early answer without the keys required
            log.info("call %d: %s in a provisional answer; not relayed", call.id, refused)
            return []

    def _answered(
        self, call: Call, branch: Branch, tx: ClientTransaction, response: Response,
        now: float, context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        leg = branch.leg
        if not self._anchor_answer(call, response):
            return self._answer_without_ports(call, leg, tx, response, now, context)
        out = self.forking.won(call, branch, now)
        self.learn_remote(leg, response, now)
        leg.early.clear()
        if call.answered:
            return out  # a retransmitted 2xx; the tx layer resends our answer
        call.state = CallState.ANSWERED
        call.answered_at = now
        self.sides.stats.calls_answered += 1
        log.info("call %d answered: %d %s", call.id, response.status, response.reason)
        self.timers.answered(call)
        self.timers.refreshed(call, response, now)
        assert context.server_tx is not None
        try:
            out += self.dialogs.relay_response(call.a, context.server_tx, response, call, now,
                                               leg)  # fmt: skip
        except SdesRefused as refused:
            return out + self._refused(call, leg, tx, context, str(refused), now)
        replaced = self.transfers.completed(call)
        if replaced is not None:
            out += self.teardown.hang_up(replaced, now, f"replaced by call {call.id}")
        return out

    def _failed(
        self, call: Call, branch: Branch, tx: ClientTransaction, response: Response,
        now: float, context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        if response.status in FAILOVER_STATUSES:  # the next upstream target, if any
            why = f"{response.status} {response.reason}"
            retried = self.setup.failovers.invite_failed(call, tx, why, now)
            if retried is not None:
                return retried
        out: list[Outbound] = []
        if call.forked:
            best, out = self.forking.on_failure(call, branch, response, now)
            if best is None:
                return out  # other branches still ring
            response = best
        else:
            branch.final = response
        self.timers.answered(call)
        self.sides.stats.calls_failed += 1
        call.end(PARTIES[call.b.side], f"{response.status} {response.reason}")
        log.info("call %d failed: %d %s", call.id, response.status, response.reason)
        assert context.server_tx is not None
        out += self.dialogs.relay_response(call.a, context.server_tx, response, call, now)
        self.calls.finish(call)
        return out

    def _after_cancel(
        self, call: Call, branch: Branch, tx: ClientTransaction, response: Response,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        """The caller cancelled (or the call ended) while the INVITE was out."""
        status = response.status
        leg = branch.leg
        if 200 <= status < 300:  # the CANCEL lost the race: confirm, then hang up
            if call.forked:
                branch.final = response
                out = self.forking.end_dialog(call, leg, tx, response, now)
                self._finish_if_done(call)
                return out
            self.learn_remote(leg, response, now)
            out = self.sides.ack(leg, tx.request.cseq.number)
            return out + self.teardown.send_bye(call, leg, now, "call cancelled")
        if status >= 200:
            branch.final = response
            self._finish_if_done(call)
            return []
        branch.got_provisional = True  # 100 Trying included (RFC 3261 §9.1)
        return self.teardown.cancel_branch(call, branch, now)

    def _finish_if_done(self, call: Call) -> None:
        if not any(branch.pending for branch in call.branches):
            self.calls.finish(call)

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
        self.forking.won(call, context.branch or call.branches[0], now)
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

    def _refused(
        self, call: Call, leg: Leg, tx: ClientTransaction, context: RelayedRequest, why: str,
        now: float,
    ) -> list[Outbound]:  # fmt: skip
        """``sdes = "require"`` and the answer has no keys: confirm and hang up the B leg,
        488 to the caller (the call never reaches the phone in the clear)."""
        log.warning("call %d: SRTP required: %s; call refused", call.id, why)
        self.sides.stats.calls_failed += 1
        out = self.sides.ack(leg, tx.request.cseq.number)
        out += self.teardown.send_bye(call, leg, now, "SRTP required", cause=488)
        origin, stx = context.origin, context.server_tx
        if stx is None:
            return out
        warning = [("Warning", '399 - "the far end did not accept SRTP"')]
        out += self.sides.respond(origin.side, stx, 488, "Not Acceptable Here", now,
                                  to_tag=origin.local_tag, extra=warning)  # fmt: skip
        return out

    def _anchor_answer(self, call: Call, response: Response) -> bool:
        """Allocate media for an offer in a 2xx (late offer); False when no ports are left."""
        if call.media is not None or not response.body:
            return True
        if response.content_type != "application/sdp":
            return True
        return self.setup.allocate_quietly(call, response.body) is not None

    # --- re-INVITEs -------------------------------------------------------------------

    def _reinvite_response(
        self, call: Call, leg: Leg, tx: ClientTransaction, response: Response, now: float,
        context: RelayedRequest,
    ) -> list[Outbound]:  # fmt: skip
        status = response.status
        out: list[Outbound] = []
        if status < 200 and not context.got_provisional:
            context.got_provisional = True
            if context.cancel_wanted:  # the origin CANCELled before this: now it may go
                out += self.dialogs.cancel_reinvite(call, context, now)
        if status == 100:
            return out
        if status < 200 and response.to.tag:
            self.learn_remote(leg, response, now)
        elif 200 <= status < 300:
            self.learn_remote(leg, response, now, establishing=False)
            self.timers.refreshed(call, response, now)
        if context.server_tx is None:
            return out
        try:
            return out + self.dialogs.relay_response(context.origin, context.server_tx,
                                                     response, call, now, leg)  # fmt: skip
        except SdesRefused as refused:
            return out + self._refused(call, leg, tx, context, str(refused), now)

    # --- the peer's side of a dialog --------------------------------------------------

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


def _other_dialog(leg: Leg, response: Response) -> bool:
    """A 2xx whose To tag is not the dialog's: another dialog (a fork beyond us)."""
    tag = response.to.tag
    return bool(tag and leg.remote_tag and tag != leg.remote_tag)


def _remember_early(leg: Leg, response: Response) -> None:
    """Track the early dialog of a provisional answer by its To tag (bounded)."""
    tag = response.to.tag
    if not tag or (tag not in leg.early and len(leg.early) >= MAX_EARLY_DIALOGS):
        return
    leg.early[tag] = EarlyDialog(leg.remote, leg.remote_target, list(leg.route_set))
