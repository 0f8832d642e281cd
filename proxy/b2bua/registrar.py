"""Phones' registrations: kept locally, or relayed upstream in the proxy's name.

A line's phone registers with the proxy. Without ``[outside] registrar`` the proxy is
the registrar: it keeps the binding (where inbound calls go) and answers 200. With one,
it relays the REGISTER upstream as its own registration (its Contact, its Call-ID and
CSeq space per phone registration), so the registrar's digest challenge reaches the
phone unchanged and the phone's credentials stay valid; the binding is kept when the
registrar accepts it, with the expiry the registrar granted.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.b2bua.config import Config, LineConfig
from proxy.b2bua.failover import retargeted
from proxy.b2bua.legs import new_call_id, new_tag
from proxy.b2bua.messages import ALLOW, Reject, copy_end_to_end, digits, forwarded_max_forwards
from proxy.b2bua.sides import Outbound, SipSides
from proxy.media.engine import Side
from proxy.sip.headers import NameAddr, SipHeaderError, SipUri, bare_host, parse_decimal
from proxy.sip.message import Request, Response
from proxy.sip.transaction import Address, ClientTransaction, ServerTransaction, response_to

if TYPE_CHECKING:
    from proxy.b2bua.failover import Failovers
    from proxy.b2bua.routing import Failover, Router


@dataclass(slots=True)
class Binding:
    """A registered contact of an inside line: where inbound calls go."""

    contact: str
    flow: Address
    expires_at: float


DEFAULT_EXPIRES = 3600
"""A binding's lifetime when no Expires says otherwise (RFC 3261 §10.2.1.1)."""
MAX_UPSTREAM_REGISTRATIONS = 10_000
"""Upstream registrations remembered at most (the oldest is forgotten first)."""


@dataclass(slots=True)
class UpstreamRegistration:
    """The proxy's own registration upstream for one phone registration (its Call-ID):
    the Call-ID, CSeq space and From tag a refresh must reuse."""

    call_id: str
    cseq: int
    from_tag: str
    expires_at: float
    """Forgotten after this: the binding's expiry, or a transaction's lifetime while the
    registrar has not accepted it (a challenge is answered within that)."""


@dataclass(slots=True)
class RegisterRelay:
    """Client-transaction context: a REGISTER relayed upstream on behalf of a phone."""

    server_tx: ServerTransaction
    user_key: str | None
    contacts: list[str]
    flow: Address
    default_expires: str | None = None
    """The phone's Expires header: what it asked for when the registrar does not say."""
    sent: list[str] = field(default_factory=list)
    """The URIs of the Contacts the proxy registered in the phone's name."""
    failover: Failover | None = None
    """The registrar targets still to try if this one fails (503, 408, timeout)."""
    phone_call_id: str = ""
    """The phone's Call-ID: the key of the upstream registration's CSeq space."""


class Registrar:
    """The bindings of the inside lines, and the REGISTER relay toward the outside."""

    def __init__(self, config: Config, sides: SipSides) -> None:
        self.config = config
        self.sides = sides
        self.router: Router | None = None
        """Set once the router exists (it reads the bindings; the relay resolves)."""
        self.failovers: Failovers | None = None
        """Set with the router: re-sends a REGISTER whose registrar failed."""
        self.bindings: dict[str, Binding] = {}
        self.upstream: OrderedDict[str, UpstreamRegistration] = OrderedDict()
        """By the phone's REGISTER Call-ID, oldest first."""
        self.on_flow: Callable[[Address, bool], None] | None = None
        """Set by the I/O edge: a binding's connection must be kept open however long it
        is idle (True) or may be closed again (False): RFC 5626, inbound calls go down
        the connection the phone registered on."""
        self._expiries: list[tuple[float, int, str]] = []
        """(when, kind, key) for bindings (kind 0, by line) and upstream registrations
        (kind 1, by Call-ID); stale entries are skipped when popped."""
        self._held: Counter[Address] = Counter()

    def binding(self, line: LineConfig, now: float) -> Binding | None:
        """The line's live binding, if it has one."""
        binding = self.bindings.get(line.user_key)
        return binding if binding is not None and binding.expires_at > now else None

    # --- state with a lifetime --------------------------------------------------------

    def next_deadline(self) -> float | None:
        while self._expiries:
            when, kind, key = self._expiries[0]
            if self._current(kind, key, when):
                return when
            heapq.heappop(self._expiries)
        return None

    def expire(self, now: float) -> None:
        """Forget bindings and upstream registrations whose time is up."""
        while self._expiries and self._expiries[0][0] <= now:
            when, kind, key = heapq.heappop(self._expiries)
            if not self._current(kind, key, when):
                continue
            if kind == _BINDING:
                self._unbind(key)
            else:
                del self.upstream[key]

    def _current(self, kind: int, key: str, when: float) -> bool:
        entry = self.bindings.get(key) if kind == _BINDING else self.upstream.get(key)
        return entry is not None and entry.expires_at == when

    def _bind(self, user_key: str, binding: Binding) -> None:
        old = self.bindings.get(user_key)
        self.bindings[user_key] = binding
        heapq.heappush(self._expiries, (binding.expires_at, _BINDING, user_key))
        self._hold(binding.flow, True)
        if old is not None:
            self._hold(old.flow, False)

    def _unbind(self, user_key: str) -> None:
        old = self.bindings.pop(user_key, None)
        if old is not None:
            self._hold(old.flow, False)

    def _hold(self, flow: Address, held: bool) -> None:
        """Count the bindings on a stream connection; tell the edge on 0 <-> 1."""
        if not flow.reliable or flow.conn is None:
            return
        self._held[flow] += 1 if held else -1
        count = self._held[flow]
        if count <= 0:
            del self._held[flow]
        if self.on_flow is not None and count == (1 if held else 0):
            self.on_flow(flow, held)

    def _upstream_for(self, phone_call_id: str, now: float) -> UpstreamRegistration:
        """The upstream registration of a phone registration (a new one if it has none),
        kept at least a transaction's lifetime from now: the registrar is about to be
        asked, and a challenge or a failover reuses it."""
        known = self.upstream.get(phone_call_id)
        pending_until = now + self.sides.layers[Side.OUTSIDE].timers.timeout
        if known is None:
            host = self.sides.advertised(Side.OUTSIDE)[0]
            known = UpstreamRegistration(new_call_id(host), 0, new_tag(), pending_until)
        known.expires_at = max(known.expires_at, pending_until)
        self._remember(phone_call_id, known)
        return known

    def _remember(self, phone_call_id: str, registration: UpstreamRegistration) -> None:
        self.upstream[phone_call_id] = registration
        self.upstream.move_to_end(phone_call_id)
        heapq.heappush(self._expiries, (registration.expires_at, _UPSTREAM, phone_call_id))
        while len(self.upstream) > MAX_UPSTREAM_REGISTRATIONS:
            self.upstream.popitem(last=False)

    def on_register(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        if side is not Side.INSIDE:
            raise Reject(405, "Method Not Allowed", [("Allow", ALLOW.replace(", REGISTER", ""))])
        try:
            user = request.to.sip_uri().user
        except SipHeaderError as exc:
            raise Reject(400, "Bad Request") from exc
        line = self.config.line_for_user(digits(user)) if user else None
        if line is None and self.config.inside.unknown_users == "reject":
            raise Reject(403, "Forbidden")
        contacts = request.get_all("contact")
        registrars = self.config.outside.registrar_uris
        if registrars:
            return self._relay(tx, request, line, contacts, registrars, now)
        bound = self._apply(line, contacts, request.get("expires"), None, tx.source, now)
        extra = [("Contact", c) for c in bound]
        return self.sides.respond(side, tx, 200, "OK", now, to_tag=new_tag(), extra=extra)

    def _apply(
        self, line: LineConfig | None, contacts: list[str], default_expires: str | None,
        granted: str | None, flow: Address, now: float,
    ) -> list[str]:  # fmt: skip
        """Store (or remove) the line's binding; returns the Contact values to confirm.

        ``granted`` (the registrar's answer) wins over the contact's own ``expires``
        parameter, which wins over the request's Expires header.
        """
        if line is None:
            return contacts
        confirmed: list[str] = []
        for value in contacts:
            if value.strip() == "*":
                self._unbind(line.user_key)
                return []
            try:
                contact = NameAddr.parse(value)
            except SipHeaderError as exc:
                raise Reject(400, "Bad Request") from exc
            expires = first_expires(granted, contact.param("expires"), default_expires)
            if expires == 0:
                self._unbind(line.user_key)
                continue
            self._bind(line.user_key, Binding(contact.uri, flow, now + expires))
            self.sides.stats.registrations += 1
            confirmed.append(str(contact.with_param("expires", str(expires))))
        return confirmed

    def _relay(
        self, tx: ServerTransaction, request: Request, line: LineConfig | None,
        contacts: list[str], registrars: tuple[str, ...], now: float,
    ) -> list[Outbound]:  # fmt: skip
        assert self.router is not None
        route = self.router.plan(registrars, (request.uri,) * len(registrars), line, now)
        dest = route.dest
        # One upstream registration (Call-ID, From tag, CSeq space) per phone registration.
        known = self._upstream_for(request.call_id, now)
        known.cseq += 1
        call_id, cseq, from_tag = known.call_id, known.cseq, known.from_tag
        outgoing = Request(method="REGISTER", uri=request.uri)
        outgoing.add("Via", self.sides.via(Side.OUTSIDE, dest.transport))
        max_forwards = forwarded_max_forwards(request, self.config.sip.max_forwards)
        outgoing.add("Max-Forwards", str(max_forwards))
        outgoing.add("From", str(request.from_.with_param("tag", from_tag)))
        outgoing.add("To", str(request.to.without_param("tag")))
        outgoing.add("Call-ID", call_id)
        outgoing.add("CSeq", f"{cseq} REGISTER")
        user = None
        with contextlib.suppress(SipHeaderError):
            user = request.to.sip_uri().user
        sent = self._relay_contacts(outgoing, contacts, dest.transport, user)
        copy_end_to_end(request, outgoing)
        outgoing.body = request.body
        self.sides.advertise(Side.OUTSIDE, outgoing)
        relay = RegisterRelay(tx, line.user_key if line else None, contacts, tx.source,
                              request.get("expires"), sent, route.failover,
                              request.call_id)  # fmt: skip
        _, out = self.sides.send_request(Side.OUTSIDE, outgoing, dest, now, relay)
        return out

    def _failed(
        self, relay: RegisterRelay, tx: ClientTransaction, why: str, now: float
    ) -> list[Outbound] | None:
        """The registrar target failed: the same registration to the next target (next
        CSeq of the same upstream registration); None when none is left."""
        if self.failovers is None:
            return None

        def resend(ruri: str, target: Address, now: float) -> list[Outbound]:
            known = self._upstream_for(relay.phone_call_id, now)
            known.cseq += 1
            via = self.sides.via(Side.OUTSIDE, target.transport)
            request = retargeted(tx.request, tx.request.uri, via, known.cseq, None)
            _, out = self.sides.send_request(Side.OUTSIDE, request, target, now, relay)
            return out

        return self.failovers.next(relay.failover, tx.dest, why, now, resend, "REGISTER")

    def _relay_contacts(
        self, outgoing: Request, contacts: list[str], transport: str, user: str | None
    ) -> list[str]:
        """The proxy's own Contact for each of the phone's, with the phone's parameters
        (``expires``, ``+sip.instance``...). Returns the URIs registered."""
        sent: list[str] = []
        for value in contacts:
            if value.strip() == "*":
                outgoing.add("Contact", "*")
                continue
            try:
                contact = NameAddr.parse(value)
            except SipHeaderError as exc:
                raise Reject(400, "Bad Request") from exc
            ours = NameAddr.parse(self.sides.contact(Side.OUTSIDE, transport, user or "sipura"))
            for name, pvalue in contact.params:
                ours = ours.with_param(name, pvalue)
            outgoing.add("Contact", str(ours))
            sent.append(ours.uri)
        return sent

    def on_response(
        self, relay: RegisterRelay, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        if response.status < 200:
            return []
        if response.status in (408, 503):
            retried = self._failed(relay, tx, f"{response.status} {response.reason}", now)
            if retried is not None:
                return retried
        stx = relay.server_tx
        relayed = response_to(stx.request, response.status, response.reason, to_tag=new_tag())
        if 200 <= response.status < 300:
            line = self.config.line_for_user(relay.user_key) if relay.user_key else None
            granted = granted_expires(relay, response)
            for contact in self._apply(
                line, relay.contacts, relay.default_expires, granted, relay.flow, now
            ):
                relayed.add("Contact", contact)
            self._accepted(relay, first_expires(granted, None, relay.default_expires), now)
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        return self.sides.send_response(Side.INSIDE, stx, relayed, now)

    def _accepted(self, relay: RegisterRelay, lifetime: int, now: float) -> None:
        """The registrar accepted: remember the upstream registration as long as it
        lives (forget it now for an unregistration)."""
        known = self.upstream.get(relay.phone_call_id)
        if known is None:
            return
        if lifetime == 0:
            del self.upstream[relay.phone_call_id]
            return
        known.expires_at = now + lifetime
        self._remember(relay.phone_call_id, known)

    def on_timeout(self, relay: RegisterRelay, tx: ClientTransaction, now: float) -> list[Outbound]:
        retried = self._failed(relay, tx, "timeout", now)
        if retried is not None:
            return retried
        return self.sides.respond(Side.INSIDE, relay.server_tx, 408, "Request Timeout", now)


_BINDING = 0
_UPSTREAM = 1


def first_expires(*candidates: str | None) -> int:
    """The first well-formed expiry among ``candidates`` (seconds, ASCII digits only),
    else :data:`DEFAULT_EXPIRES`: a malformed value (``Expires: ²``) is ignored, never
    fatal."""
    for text in candidates:
        if text is None:
            continue
        with contextlib.suppress(SipHeaderError):
            return parse_decimal(text, what="Expires")
    return DEFAULT_EXPIRES


def granted_expires(relay: RegisterRelay, response: Response) -> str | None:
    """What the registrar's 2xx says about the binding the proxy registered.

    RFC 3261 §10.3: the 2xx lists every current binding. Ours listed: its ``expires``
    (else the response's Expires). Others listed but not ours: it is gone ("0"). Nothing
    listed (a lax registrar): the response's Expires, else None (the request decides).
    """
    listed: list[NameAddr] = []
    for value in response.get_all("contact"):
        with contextlib.suppress(SipHeaderError):
            listed.append(NameAddr.parse(value))
    if not listed:
        return response.get("expires")
    for contact in listed:
        if any(_same_uri(contact.uri, sent) for sent in relay.sent):
            return contact.param("expires") or response.get("expires")
    return "0" if relay.sent else None


def _same_uri(a: str, b: str) -> bool:
    try:
        ua, ub = SipUri.parse(a), SipUri.parse(b)
    except SipHeaderError:
        return a == b
    return (ua.user, bare_host(ua.host).lower(), ua.port or 5060) == (
        ub.user, bare_host(ub.host).lower(), ub.port or 5060
    )  # fmt: skip
