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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.b2bua.config import Config, LineConfig
from proxy.b2bua.legs import new_call_id, new_tag
from proxy.b2bua.messages import ALLOW, Reject, copy_end_to_end, digits, forwarded_max_forwards
from proxy.b2bua.sides import Outbound, SipSides
from proxy.media.engine import Side
from proxy.sip.headers import NameAddr, SipHeaderError, SipUri, bare_host
from proxy.sip.message import Request, Response
from proxy.sip.transaction import Address, ClientTransaction, ServerTransaction, response_to

if TYPE_CHECKING:
    from proxy.b2bua.routing import Router


@dataclass(slots=True)
class Binding:
    """A registered contact of an inside line: where inbound calls go."""

    contact: str
    flow: Address
    expires_at: float


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


class Registrar:
    """The bindings of the inside lines, and the REGISTER relay toward the outside."""

    def __init__(self, config: Config, sides: SipSides) -> None:
        self.config = config
        self.sides = sides
        self.router: Router | None = None
        """Set once the router exists (it reads the bindings; the relay resolves)."""
        self.bindings: dict[str, Binding] = {}
        self._register_ids: dict[str, tuple[str, int, str]] = {}

    def binding(self, line: LineConfig, now: float) -> Binding | None:
        """The line's live binding, if it has one."""
        binding = self.bindings.get(line.user_key)
        return binding if binding is not None and binding.expires_at > now else None

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
        registrar = self.config.outside.registrar
        if registrar:
            return self._relay(tx, request, line, contacts, registrar, now)
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
                self.bindings.pop(line.user_key, None)
                return []
            try:
                contact = NameAddr.parse(value)
            except SipHeaderError as exc:
                raise Reject(400, "Bad Request") from exc
            expires_text = granted or contact.param("expires") or default_expires or "3600"
            expires = int(expires_text) if expires_text.strip().isdigit() else 3600
            if expires == 0:
                self.bindings.pop(line.user_key, None)
                continue
            self.bindings[line.user_key] = Binding(contact.uri, flow, now + expires)
            self.sides.stats.registrations += 1
            confirmed.append(str(contact.with_param("expires", str(expires))))
        return confirmed

    def _relay(
        self, tx: ServerTransaction, request: Request, line: LineConfig | None,
        contacts: list[str], registrar: str, now: float,
    ) -> list[Outbound]:  # fmt: skip
        assert self.router is not None
        dest = self.router.resolve(registrar, None, now)
        # One upstream registration (Call-ID, From tag, CSeq space) per phone registration.
        host = self.sides.advertised(Side.OUTSIDE)[0]
        call_id, cseq, from_tag = self._register_ids.get(
            request.call_id, (new_call_id(host), 0, new_tag())
        )
        cseq += 1
        self._register_ids[request.call_id] = (call_id, cseq, from_tag)
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
                              request.get("expires"), sent)  # fmt: skip
        _, out = self.sides.send_request(Side.OUTSIDE, outgoing, dest, now, relay)
        return out

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
        stx = relay.server_tx
        relayed = response_to(stx.request, response.status, response.reason, to_tag=new_tag())
        if 200 <= response.status < 300:
            line = self.config.line_for_user(relay.user_key) if relay.user_key else None
            granted = granted_expires(relay, response)
            for contact in self._apply(
                line, relay.contacts, relay.default_expires, granted, relay.flow, now
            ):
                relayed.add("Contact", contact)
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        return self.sides.send_response(Side.INSIDE, stx, relayed, now)

    def on_timeout(self, relay: RegisterRelay, tx: ClientTransaction, now: float) -> list[Outbound]:
        return self.sides.respond(Side.INSIDE, relay.server_tx, 408, "Request Timeout", now)


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
