"""Requests outside any dialog that are not calls: OPTIONS, and one-shot relays.

OPTIONS is answered by the proxy itself (it is what a dispatcher or a phone probes the
proxy with). MESSAGE, NOTIFY, PUBLISH and INFO outside a dialog are relayed to the other
side as a single transaction with the proxy's own Call-ID and tags, and the far side's
final answer is relayed back; nothing is kept once it is answered.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.b2bua.legs import new_call_id, new_tag
from proxy.b2bua.messages import ALLOW, XSIPURA, copy_end_to_end, forwarded_max_forwards
from proxy.b2bua.routing import Router
from proxy.b2bua.sides import Outbound, SipSides
from proxy.media.engine import Side
from proxy.sip.message import Request, Response
from proxy.sip.transaction import ClientTransaction, ServerTransaction, response_to


@dataclass(slots=True)
class OneShot:
    """Client-transaction context: an out-of-dialog request relayed to the other side."""

    server_tx: ServerTransaction
    origin: Side
    to_tag: str


class OutOfDialog:
    def __init__(self, sides: SipSides, router: Router) -> None:
        self.sides = sides
        self.router = router

    def options(self, side: Side, tx: ServerTransaction, now: float) -> list[Outbound]:
        extra = [("Allow", ALLOW), ("Accept", "application/sdp")]
        if side is Side.OUTSIDE:
            extra.append(("Supported", XSIPURA))
        return self.sides.respond(side, tx, 200, "OK", now, to_tag=new_tag(), extra=extra)

    def relay(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        route = self.router.route(side, request, tx.source, now)
        out_side = side.other
        sides = self.sides
        outgoing = Request(method=request.method, uri=route.ruri)
        outgoing.add("Via", sides.via(out_side, route.dest.transport))
        max_forwards = forwarded_max_forwards(request, sides.config.sip.max_forwards)
        outgoing.add("Max-Forwards", str(max_forwards))
        outgoing.add("From", str(request.from_.with_param("tag", new_tag())))
        outgoing.add("To", str(request.to))
        outgoing.add("Call-ID", new_call_id(sides.advertised(out_side)[0]))
        outgoing.add("CSeq", f"1 {request.method}")
        copy_end_to_end(request, outgoing)
        outgoing.body = request.body
        sides.advertise(out_side, outgoing)
        context = OneShot(tx, side, new_tag())
        _, out = sides.send_request(out_side, outgoing, route.dest, now, context)
        return out

    def on_response(
        self, context: OneShot, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        if response.status < 200:
            return []
        stx = context.server_tx
        relayed = response_to(stx.request, response.status, response.reason, to_tag=context.to_tag)
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        return self.sides.send_response(context.origin, stx, relayed, now)

    def on_timeout(self, context: OneShot, tx: ClientTransaction, now: float) -> list[Outbound]:
        return self.sides.respond(context.origin, context.server_tx, 408, "Request Timeout",
                                  now, to_tag=context.to_tag)  # fmt: skip
