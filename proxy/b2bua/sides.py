"""The proxy's two SIP sides: one transaction layer each, and how messages leave them.

Every part of the call core sends through :class:`SipSides`: a response on a server
transaction, a request on a new client transaction, or bytes with no transaction (an
ACK for a 2xx). It also writes what the proxy owns in a message it sends on a side:
its Via and Contact (the side's advertised address), the dialog headers of a leg,
``Supported: x-sipura`` on the outside leg (the SPA's advertisement) and the
User-Agent/Server header. Each side has its own :class:`TransactionLayer`, so a
transaction can never be matched across legs (decision 10). The parts count through
:attr:`SipSides.stats` (:mod:`proxy.b2bua.stats`) and log repeated noise through
:attr:`SipSides.noise`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.b2bua.config import Config, SideConfig
from proxy.b2bua.legs import Leg
from proxy.b2bua.messages import XSIPURA
from proxy.b2bua.stats import Stats
from proxy.media.engine import Side
from proxy.ratelimit import LogLimiter
from proxy.sip.headers import format_hostport
from proxy.sip.message import Request, Response, SipMessage
from proxy.sip.retention import RetainedBytes
from proxy.sip.transaction import (
    Address,
    ClientTransaction,
    ServerTransaction,
    Timers,
    TransactionLayer,
    Transmit,
    new_branch,
    response_to,
)

log = logging.getLogger("sipura.b2bua")


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message for the I/O edge to send: on which side, the bytes, where to."""

    side: Side
    data: bytes
    dest: Address


class SipSides:
    """Both sides' transaction layers and the proxy's own headers on each side."""

    def __init__(self, config: Config, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self.noise = LogLimiter(log)
        """The core's one limiter for repeated log lines (malformed messages, refusals),
        keyed by (reason, source); :class:`~proxy.b2bua.core.B2BUA` flushes it."""
        timers = Timers(config.sip.t1_s, config.sip.t2_s, config.sip.t4_s)
        budget = RetainedBytes()
        """One budget for both sides: a request relayed from one side holds a server
        transaction there and a client transaction on the other."""
        self.layers = {
            Side.INSIDE: TransactionLayer(timers, budget),
            Side.OUTSIDE: TransactionLayer(timers, budget),
        }
        self.configs: dict[Side, SideConfig] = {
            Side.INSIDE: config.inside,
            Side.OUTSIDE: config.outside,
        }

    # --- what the proxy writes --------------------------------------------------------

    def advertised(self, side: Side) -> tuple[str, int]:
        return self.configs[side].advertised

    def via(self, side: Side, transport: str) -> str:
        host, port = self.configs[side].advertised_for(transport)
        hostport = format_hostport(host, port)
        return f"SIP/2.0/{transport.upper()} {hostport};branch={new_branch()};rport"

    def contact(self, side: Side, transport: str, user: str = "sipura") -> str:
        host, port = self.configs[side].advertised_for(transport)
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{user}@{format_hostport(host, port)}{suffix}>"

    def dialog_headers(
        self, message: Request, leg: Leg, method: str, cseq: int, max_forwards: int
    ) -> None:
        """The headers that make ``message`` part of ``leg``'s dialog (RFC 3261 §12.2.1.1)."""
        transport = leg.dest.transport if leg.dest else "udp"
        message.add("Via", self.via(leg.side, transport))
        for route in leg.route_set:
            message.add("Route", route)
        message.add("Max-Forwards", str(max(0, max_forwards)))
        message.add("From", str(leg.local))
        message.add("To", str(leg.remote))
        message.add("Call-ID", leg.call_id)
        message.add("CSeq", f"{cseq} {method}")

    def dialog_request(self, leg: Leg, method: str, cseq: int, max_forwards: int) -> Request:
        request = Request(method=method, uri=leg.remote_target or "")
        self.dialog_headers(request, leg, method, cseq, max_forwards)
        return request

    def brand(self, message: SipMessage, *, request: bool = False) -> None:
        agent = self.config.sip.user_agent
        if agent and not message.has("server") and not message.has("user-agent"):
            message.add("User-Agent" if request else "Server", agent)

    def advertise(self, side: Side, message: SipMessage) -> None:
        """The outside leg carries ``Supported: x-sipura`` (the SPA's advertisement)."""
        if side is Side.OUTSIDE:
            supported = [v.lower() for v in message.get_all("supported")]
            if XSIPURA not in supported:
                message.add("Supported", XSIPURA)
        self.brand(message, request=isinstance(message, Request))

    # --- sending ----------------------------------------------------------------------

    @staticmethod
    def wrap(side: Side, transmits: Iterable[Transmit]) -> list[Outbound]:
        return [Outbound(side, t.data, t.dest) for t in transmits]

    def respond(
        self, side: Side, tx: ServerTransaction, status: int, reason: str, now: float,
        *, to_tag: str | None = None, extra: Iterable[tuple[str, str]] = (),
    ) -> list[Outbound]:  # fmt: skip
        """A response of the proxy's own making on ``tx``."""
        response = response_to(tx.request, status, reason, to_tag=to_tag)
        for name, value in extra:
            response.add(name, value)
        self.brand(response)
        self.stats.count_response(status)
        return self.wrap(side, self.layers[side].respond(tx, response, now))

    def refusal(
        self, status: int, cause: str, source: Address | None, now: float, detail: str
    ) -> None:
        """Log a refusal the proxy's own limits caused (rate-limited per cause and
        source; the count of the lines held back comes with the next one)."""
        host = source.host if source is not None else "-"
        self.noise.log(logging.WARNING, cause, host, now, "%d (%s): %s", status, cause, detail)

    def send_response(
        self, side: Side, tx: ServerTransaction, response: Response, now: float
    ) -> list[Outbound]:
        """A response the caller built (relayed from the other leg, or an x-sipura one)."""
        self.stats.count_response(response.status)
        return self.wrap(side, self.layers[side].respond(tx, response, now))

    def ack(self, leg: Leg, cseq: int, body: bytes = b"", content_type: str = "") -> list[Outbound]:
        """The ACK for a 2xx on a UAC leg (its own transaction, RFC 3261 §13.2.2.4). It is
        kept on the leg, so a retransmitted 2xx is answered with the same bytes."""
        if leg.dest is None:
            return []
        ack = self.dialog_request(leg, "ACK", cseq, self.config.sip.max_forwards)
        if body:
            ack.add("Content-Type", content_type)
            ack.body = body
        leg.ack_data = ack.serialize()
        leg.ack_cseq = cseq
        return [Outbound(leg.side, leg.ack_data, leg.dest)]

    def send_request(
        self, side: Side, request: Request, dest: Address, now: float, context: object
    ) -> tuple[ClientTransaction, list[Outbound]]:
        """``request`` on a new client transaction whose responses carry ``context``."""
        tx, transmits = self.layers[side].send_request(request, dest, now, context)
        return tx, self.wrap(side, transmits)
