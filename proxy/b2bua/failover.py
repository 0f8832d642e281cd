"""Failover: a request that starts something, sent again to the next target.

When the target of a call's initial INVITE (or of a relayed REGISTER) answers 503 or
408, times out, or cannot be reached (RFC 3263 §4.3: "the client SHOULD try the next
element"), the request goes to the next target of the route's :class:`~proxy.b2bua.
routing.Failover` plan: the next address of that URI's RFC 3263 answer, then the next
``upstream`` URI. It is a new client transaction (new branch, next CSeq, the new
target's Request-URI and transport) in the same B-leg dialog-to-be, so the phone sees
nothing but a longer wait: its INVITE transaction is still open and gets whatever the
next target answers. Only a call still in "inviting" fails over: once a target has
answered with a provisional response carrying a tag (an early dialog), or the caller
cancelled, the answer stands. The failed target is held down
(``[outside] failover_hold_down_s``), so new calls try the others first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy.b2bua.legs import Call, CallState, RelayedRequest
from proxy.b2bua.messages import Reject
from proxy.b2bua.routing import Failover, Router, Unresolved
from proxy.b2bua.sdes_leg import SdesLegs
from proxy.b2bua.sides import Outbound, SipSides
from proxy.sip.message import Request, canonical
from proxy.sip.transaction import Address, ClientTransaction

log = logging.getLogger("sipura.b2bua")

FAILOVER_STATUSES = frozenset({408, 503})
"""Final responses that mean "this target cannot serve it now": try the next one."""

Resend = Callable[[str, Address, float], list[Outbound]]
"""Send the request again to (Request-URI, target) at ``now``."""


def retargeted(previous: Request, ruri: str, via: str, cseq: int, contact: str | None) -> Request:
    """``previous`` as a new transaction toward another target: every header kept in
    order, except its Via (a new branch), CSeq (the next number) and Contact (the new
    target's transport)."""
    request = Request(method=previous.method, uri=ruri)
    for name, value in previous.headers:
        key = canonical(name)
        if key == "via":
            continue  # the proxy's own, replaced below (one Via: the proxy is the UAC)
        if key == "cseq":
            value = f"{cseq} {previous.method}"
        elif key == "contact" and contact is not None:
            value = contact
        request.headers.append((name, value))
    request.headers.insert(0, ("Via", via))
    request.body = previous.body
    return request


class Failovers:
    """Re-sends failed initial INVITEs (and relayed REGISTERs) to the next target."""

    def __init__(self, sides: SipSides, router: Router, sdes: SdesLegs | None = None) -> None:
        self.sides = sides
        self.router = router
        self.sdes = sdes

    def next(
        self, plan: Failover | None, failed: Address, why: str, now: float, resend: Resend,
        label: str,
    ) -> list[Outbound] | None:  # fmt: skip
        """Hold ``failed`` down and resend to the next target of ``plan``; None when
        there is none (the failure stands). A next URI whose name is not known yet parks
        the retry until its answer is in."""
        if plan is None:
            return None
        self.router.failed(failed, now)
        try:
            found = self.router.next_target(plan, now)
        except Unresolved as pending:

            def later(now: float) -> list[Outbound]:
                return self.next(plan, failed, why, now, resend, label) or []

            return [] if self.router.lookups.park(pending.query, later) else None
        except Reject:
            return None
        if found is None:
            log.info("%s: %s from %s:%s; no other target left", label, why, failed.host,
                     failed.port)  # fmt: skip
            return None
        ruri, target = found
        log.info("%s: %s from %s:%s; trying %s via %s %s:%s", label, why, failed.host,
                 failed.port, ruri, target.transport, target.host, target.port)  # fmt: skip
        return resend(ruri, target, now)

    def invite_failed(
        self, call: Call, tx: ClientTransaction, why: str, now: float
    ) -> list[Outbound] | None:
        """The call's initial INVITE failed at its target; None: no failover (relay the
        failure as usual)."""
        if call.cancelled or call.state is not CallState.INVITING or call.forked:
            return None

        def resend(ruri: str, target: Address, now: float) -> list[Outbound]:
            if call.cancelled or call.state is not CallState.INVITING:
                return []  # cancelled while the next URI was being looked up
            return self._resend_invite(call, tx.request, ruri, target, now)

        return self.next(call.failover, tx.dest, why, now, resend, f"call {call.id}")

    def _resend_invite(
        self, call: Call, previous: Request, ruri: str, target: Address, now: float
    ) -> list[Outbound]:
        b = call.b
        branch = call.winner
        assert branch is not None
        b.invite_cseq = b.next_cseq()
        b.remote_target = ruri
        b.dest = target
        via = self.sides.via(b.side, target.transport)
        contact = self.sides.contact(b.side, target.transport)
        request = retargeted(previous, ruri, via, b.invite_cseq, contact)
        if self.sdes is not None:
            request.body = self.sdes.retarget(call, target, request.body)
        branch.got_provisional = False  # a CANCEL waits for the new target's first answer
        context = RelayedRequest(call, call.a, call.invite_server, branch=branch)
        branch.invite_client, out = self.sides.send_request(b.side, request, target, now,
                                                            context)  # fmt: skip
        return out
