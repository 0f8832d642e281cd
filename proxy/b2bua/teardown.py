"""Ending calls: BYE in a dialog, CANCEL before the answer, both legs at once.

The far side and the phone must both learn that a call is over, whoever ended it and
however (a hang-up, a CANCEL, a timeout, a security policy, a dead media worker). The
proxy's own BYEs carry a ``Reason`` header (RFC 3326) saying why, so an operator reading
either end's logs sees the cause. A call is dropped from the table (and its media ports
released) when its last BYE is answered or times out.
"""

from __future__ import annotations

import logging

from proxy.b2bua.calls import CallTable
from proxy.b2bua.legs import Call, CallState, Leg, RelayedRequest
from proxy.b2bua.sides import Outbound, SipSides
from proxy.sip.message import Request

log = logging.getLogger("sipura.b2bua")


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
        bye.add("Reason", f'SIP;cause={cause};text="{reason}"')
        self.sides.brand(bye, request=True)
        call.state = CallState.TERMINATING
        _, out = self.sides.send_request(
            leg.side, bye, leg.dest, now, RelayedRequest(call, leg, None)
        )
        return out

    def hang_up(self, call: Call, now: float, reason: str, cause: int = 200) -> list[Outbound]:
        """End ``call`` on both legs: a ringing call is cancelled (487 to the caller), an
        answered one gets BYE on both legs; one with no dialog to send a BYE in is dropped
        at once. A call already ending is left to finish."""
        call.end("proxy", reason)
        if call.ringing:
            return self.cancel_call(call, now)
        if not call.answered:
            return []
        out = self.send_bye(call, call.a, now, reason, cause)
        out += self.send_bye(call, call.b, now, reason, cause)
        if not out:
            self.calls.finish(call)
        return out

    def cancel_call(self, call: Call, now: float) -> list[Outbound]:
        """End an unanswered call: 487 to the caller, CANCEL to the callee (when allowed)."""
        call.cancelled = True
        out = self.sides.respond(call.a.side, call.invite_server, 487, "Request Terminated", now,
                                 to_tag=call.a.local_tag)  # fmt: skip
        if call.got_provisional:
            out += self.send_cancel(call, now)
        return out

    def send_cancel(self, call: Call, now: float) -> list[Outbound]:
        """CANCEL the B leg's INVITE (RFC 3261 §9.1: only after a provisional response)."""
        ctx = call.invite_client
        if ctx is None or call.cancel_sent:
            return []
        call.cancel_sent = True
        invite = ctx.request
        cancel = Request(method="CANCEL", uri=invite.uri)
        cancel.add("Via", str(invite.top_via))
        for route in invite.get_all("route"):
            cancel.add("Route", route)
        cancel.add("Max-Forwards", str(self.sides.config.sip.max_forwards))
        cancel.add("From", invite.get("from") or "")
        cancel.add("To", invite.get("to") or "")
        cancel.add("Call-ID", invite.call_id)
        cancel.add("CSeq", f"{invite.cseq.number} CANCEL")
        self.sides.brand(cancel, request=True)
        context = RelayedRequest(call, call.a, None)
        _, out = self.sides.send_request(call.b.side, cancel, ctx.dest, now, context)
        return out
