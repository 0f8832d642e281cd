"""Ending calls: BYE in a dialog, CANCEL before the answer, both legs at once.

The far side and the phone must both learn that a call is over, whoever ended it and
however (a hang-up, a CANCEL, a timeout, a security policy, a dead media worker). The
proxy's own BYEs carry a ``Reason`` header (RFC 3326) saying why, so an operator reading
either end's logs sees the cause. A call is dropped from the table (and its media ports
released) when its last BYE is answered or times out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from proxy.b2bua.calls import CallTable
from proxy.b2bua.legs import Branch, Call, CallState, Leg, RelayedRequest
from proxy.b2bua.sides import Outbound, SipSides
from proxy.media.engine import Side
from proxy.sip.message import Request
from proxy.sip.transaction import ClientTransaction

log = logging.getLogger("sipura.b2bua")


def reason_header(cause: int, text: str) -> str:
    """An RFC 3326 ``Reason`` value: the same on a call's BYEs and CANCELs."""
    return f'SIP;cause={cause};text="{text}"'


class Teardown:
    def __init__(self, sides: SipSides, calls: CallTable) -> None:
        self.sides = sides
        self.calls = calls

    def send_bye(
        self, call: Call, leg: Leg, now: float, reason: str, cause: int = 200
    ) -> list[Outbound]:
        """BYE on ``leg`` (if it has a dialog) with ``Reason: SIP;cause=..``."""
        if leg.dest is None or leg.remote_tag is None:
            return []
        call.end("proxy", reason)
        bye = self.sides.dialog_request(
            leg, "BYE", leg.next_cseq(), self.sides.config.sip.max_forwards
        )
        bye.add("Reason", reason_header(cause, reason))
        self.sides.brand(bye, request=True)
        call.state = CallState.TERMINATING
        _, out = self.sides.send_request(
            leg.side, bye, leg.dest, now, RelayedRequest(call, leg, None)
        )
        return out

    def hang_up(
        self, call: Call, now: float, reason: str, cause: int = 200,
        final: tuple[int, str, Iterable[tuple[str, str]]] = (487, "Request Terminated", ()),
    ) -> list[Outbound]:  # fmt: skip
        """End ``call`` on both legs: a ringing call is cancelled (``final``, 487 unless
        told, to the caller; CANCEL toward the callee), an answered one gets BYE on both
        legs; the BYEs and CANCELs carry ``Reason: SIP;cause=<cause>;text="<reason>"``.
        One with no dialog to send a BYE in is dropped at once. A call already ending is
        left to finish."""
        call.end("proxy", reason)
        if call.ringing:
            call.cancel_reason = reason_header(cause, reason)
            status, phrase, extra = final
            return self.cancel_call(call, now, status, phrase, extra)
        if not call.answered:
            return []
        out = self.send_bye(call, call.a, now, reason, cause)
        out += self.send_bye(call, call.b, now, reason, cause)
        if not out:
            self.calls.finish(call)
        return out

    def cancel_call(
        self, call: Call, now: float, status: int = 487, reason: str = "Request Terminated",
        extra: Iterable[tuple[str, str]] = (),
    ) -> list[Outbound]:  # fmt: skip
        """End an unanswered call: 487 (or ``status``, with ``extra`` headers) to the
        caller, CANCEL to every branch toward the callee (each once it has answered
        provisionally, §9.1)."""
        call.cancelled = True
        out = self.sides.respond(call.a.side, call.invite_server, status, reason, now,
                                 to_tag=call.a.local_tag, extra=extra)  # fmt: skip
        for branch in call.branches:
            if branch.pending:
                out += self.cancel_branch(call, branch, now)
        return out

    def cancel_branch(self, call: Call, branch: Branch, now: float) -> list[Outbound]:
        """CANCEL one branch's INVITE, if it answered provisionally and was not
        cancelled yet (else its first provisional answer triggers it). It carries the
        call's ``cancel_reason`` when the proxy itself ended the call, also when it
        goes out late."""
        tx = branch.invite_client
        if tx is None or branch.cancel_sent or not branch.got_provisional:
            return []
        branch.cancel_sent = True
        context = RelayedRequest(call, call.a, None)
        return self.cancel_transaction(branch.leg.side, tx, now, context, call.cancel_reason)

    def cancel_transaction(
        self, side: Side, tx: ClientTransaction, now: float, context: object,
        reason: str | None = None,
    ) -> list[Outbound]:  # fmt: skip
        """The CANCEL of the INVITE ``tx`` (RFC 3261 §9.1: same Request-URI, Via branch,
        Route, Call-ID, From, To and CSeq number), with ``Reason: <reason>`` (RFC 3326)
        if given."""
        invite = tx.request
        cancel = Request(method="CANCEL", uri=invite.uri)
        cancel.add("Via", str(invite.top_via))
        for route in invite.get_all("route"):
            cancel.add("Route", route)
        cancel.add("Max-Forwards", str(self.sides.config.sip.max_forwards))
        cancel.add("From", invite.get("from") or "")
        cancel.add("To", invite.get("to") or "")
        cancel.add("Call-ID", invite.call_id)
        cancel.add("CSeq", f"{invite.cseq.number} CANCEL")
        if reason is not None:
            cancel.add("Reason", reason)
        self.sides.brand(cancel, request=True)
        _, out = self.sides.send_request(side, cancel, tx.dest, now, context)
        return out
