"""Phones' registrations: kept locally, or relayed upstream in the proxy's name.

A phone registers with the proxy. Without ``[outside] registrar`` the proxy is the
registrar: it keeps every contact of the address-of-record (RFC 3261 §10, each with its
own expiry, in :mod:`proxy.b2bua.bindings`) and answers 200 listing them with the expiry
granted to each. With one, it relays the REGISTER upstream as its own registration (its
Contact, its Call-ID and CSeq space per phone registration), so the registrar's digest
challenge reaches the phone unchanged and the phone's credentials stay valid; each phone
contact gets its own upstream Contact (``;bnd=`` + a token), so one device's refresh or
``Expires: 0`` touches only its own binding, upstream and here, and an inbound call the
upstream sends to that Contact reaches that device only. The binding is stored when the
registrar accepts it, with the expiry the registrar granted, and the phone's 200 says so.

Registered users without a ``[[line]]`` (``unknown_users = "relay"``) are kept too: their
inbound calls reach them in the clear.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.b2bua.bindings import (
    BINDING_PARAM,
    Binding,
    Bindings,
    BindingsFull,
    behind_nat,
    binding_key,
    binding_token,
)
from proxy.b2bua.config import Config, LineConfig
from proxy.b2bua.failover import retargeted
from proxy.b2bua.identity import LineIdentity
from proxy.b2bua.legs import new_call_id, new_tag
from proxy.b2bua.messages import ALLOW, Reject, copy_end_to_end, digits, forwarded_max_forwards
from proxy.b2bua.sides import Outbound, SipSides
from proxy.media.engine import Side
from proxy.ratelimit import LogLimiter
from proxy.sip.headers import NameAddr, SipHeaderError, SipUri, bare_host, parse_decimal
from proxy.sip.message import Request, Response
from proxy.sip.transaction import Address, ClientTransaction, ServerTransaction, response_to

if TYPE_CHECKING:
    from proxy.b2bua.failover import Failovers
    from proxy.b2bua.keepalive import Keepalive
    from proxy.b2bua.routing import Failover, Router

log = logging.getLogger("sipura.b2bua")

DEFAULT_EXPIRES = 3600
MAX_EXPIRES = 3600
"""The longest registration the proxy grants itself (a phone asking more gets this)."""


@dataclass(frozen=True, slots=True)
class Requested:
    """One Contact of a REGISTER: a binding to add, refresh or remove (``*``: all)."""

    value: str
    contact: NameAddr | None
    """None for ``*``."""
    expires: int

    @property
    def key(self) -> str:
        assert self.contact is not None
        return binding_key(self.contact.uri)


@dataclass(slots=True)
class RegisterRelay:
    """Client-transaction context: a REGISTER relayed upstream on behalf of a phone."""

    server_tx: ServerTransaction
    aor: str
    line: LineConfig | None
    requested: list[Requested]
    flow: Address
    call_id: str
    """The phone's REGISTER Call-ID."""
    sent: dict[str, str] = field(default_factory=dict)
    """Binding key -> the URI the proxy registered upstream for it."""
    failover: Failover | None = None
    """The registrar targets still to try if this one fails (503, 408, timeout)."""


class Registrar:
    """The bindings of the inside phones, and the REGISTER relay toward the outside."""

    def __init__(self, config: Config, sides: SipSides, identity: LineIdentity) -> None:
        self.config = config
        self.sides = sides
        self.identity = identity
        self.bindings: Bindings = identity.bindings
        self.router: Router | None = None
        """Set once the router exists (it reads the bindings; the relay resolves)."""
        self.keepalive: Keepalive | None = None
        """Set once keep-alives exist (a NAT'd binding is probed over its flow)."""
        self.failovers: Failovers | None = None
        """Set with the router: re-sends a REGISTER whose registrar failed."""
        self._upstream: OrderedDict[str, tuple[str, int, str]] = OrderedDict()
        """Phone REGISTER Call-ID -> the upstream registration's (Call-ID, CSeq, From
        tag); least recently used first, bounded, pruned with the bindings."""
        self._log: LogLimiter = sides.noise
        self.on_flow: Callable[[Address, bool], None] | None = None
        """Set by the I/O edge: a binding's stream connection must be kept open however
        long it is idle (True), or may be closed again (False)."""
        self._held: Counter[Address] = Counter()

    def targets(self, aor: str, now: float) -> list[Binding]:
        """The live contacts of ``aor`` (a line's user key, or a relayed user)."""
        return self.bindings.live(aor, now)

    # --- REGISTER from a phone --------------------------------------------------------

    def on_register(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        if side is not Side.INSIDE:
            raise Reject(405, "Method Not Allowed", [("Allow", ALLOW.replace(", REGISTER", ""))])
        try:
            user = request.to.sip_uri().user
        except SipHeaderError as exc:
            raise Reject(400, "Bad Request") from exc
        if not user:
            raise Reject(404, "Not Found")
        aor = digits(user)
        line = self.config.line_for_user(aor)
        if line is None and self.config.inside.unknown_users == "reject":
            raise self.identity.refuse_unknown(tx.source, user, "REGISTER", now)
        requested = self._requested(request)
        registrars = self.config.outside.registrar_uris
        if registrars:
            return self._relay(tx, request, aor, line, requested, registrars, now)
        if line is not None and not self.identity.may_register(line, tx.source, now):
            raise self.identity.refuse(line, tx.source, "REGISTER", now)
        self._apply(aor, requested, tx.source, request.call_id, {}, now)
        return self.sides.respond(side, tx, 200, "OK", now, to_tag=new_tag(),
                                  extra=self._contacts(aor, now))  # fmt: skip

    def _requested(self, request: Request) -> list[Requested]:
        """The REGISTER's Contacts with the expiry each asks for (its ``expires``
        parameter, else the Expires header, else 3600; at most 3600 here)."""
        header = _seconds(request.get("expires"))
        found: list[Requested] = []
        for value in request.get_all("contact"):
            if value.strip() == "*":
                if header != 0 or len(request.get_all("contact")) != 1:
                    raise Reject(400, "Bad Request", [("Warning", '399 - "* needs Expires: 0"')])
                return [Requested(value, None, 0)]
            try:
                contact = NameAddr.parse(value)
                SipUri.parse(contact.uri)
            except SipHeaderError as exc:
                raise Reject(400, "Bad Request") from exc
            asked = _seconds(contact.param("expires"))
            expires = asked if asked is not None else header
            expires = DEFAULT_EXPIRES if expires is None else expires
            found.append(Requested(value, contact, expires))
        return found

    def _apply(
        self, aor: str, requested: list[Requested], flow: Address, call_id: str,
        granted: dict[str, int], now: float,
    ) -> None:  # fmt: skip
        """Store, refresh or remove the bindings (``granted``: the upstream's expiry per
        binding key, which wins over what was asked). Refuses as a whole when the AOR
        would hold more contacts than allowed."""
        adding = {r.key for r in requested if r.contact is not None and r.expires}
        new = [key for key in adding if self.bindings.get(aor, key) is None]
        if new and len(self.targets(aor, now)) + len(new) > self.bindings.max_per_aor:
            raise self._full(aor, flow, f"{self.bindings.max_per_aor} contacts", now)
        for item in requested:
            if item.contact is None:
                for gone in self.bindings.remove_all(aor):
                    self._forgotten(gone)
                continue
            expires = granted.get(item.key, min(item.expires, MAX_EXPIRES))
            if expires <= 0:
                removed = self.bindings.remove(aor, item.key)
                if removed is not None:
                    self._forgotten(removed)
                continue
            self._store(aor, item, flow, call_id, expires, now)

    def _store(
        self, aor: str, item: Requested, flow: Address, call_id: str, expires: int, now: float
    ) -> None:
        assert item.contact is not None
        key = item.key
        binding = Binding(
            aor=aor, key=key, contact=item.contact.uri, flow=flow, expires_at=now + expires,
            nat=behind_nat(item.contact.uri, flow), register_call_id=call_id,
            token=binding_token(aor, key), registered_at=now,
        )  # fmt: skip
        old = self.bindings.get(aor, key)
        if old is not None:
            binding.upstream = old.upstream
        try:
            self.bindings.put(binding)
        except BindingsFull as exc:
            raise self._full(aor, flow, str(exc), now) from exc
        self._hold(binding.flow, True)
        if old is not None:
            self._hold(old.flow, False)
        self.sides.stats.registrations += 1
        if old is None:
            log.info("registered %s: %s from %s:%s/%s%s (expires %d s)", aor, binding.contact,
                     flow.host, flow.port, flow.transport, ", behind NAT" if binding.nat else "",
                     expires)  # fmt: skip
        if self.keepalive is not None:
            self.keepalive.track(binding, now)

    def _full(self, aor: str, flow: Address, why: str, now: float) -> Reject:
        where = f"{flow.host}:{flow.port}"
        self._log.log(logging.WARNING, "bindings_full", where, now,
                      "REGISTER for %s from %s refused: %s", aor, where, why)  # fmt: skip
        return Reject(503, "Too Many Registered Contacts", [("Retry-After", "60")])

    def _contacts(self, aor: str, now: float) -> list[tuple[str, str]]:
        """RFC 3261 §10.3 step 8: the 200 lists every current binding with the expiry
        granted to it."""
        return [
            ("Contact", f"<{binding.contact}>;expires={binding.expires_in(now)}")
            for binding in self.targets(aor, now)
        ]

    def forget(self, binding: Binding, why: str) -> None:
        """Drop a binding the proxy found dead (it stopped answering keep-alives)."""
        gone = self.bindings.remove(binding.aor, binding.key)
        if gone is not None:
            log.warning("registration of %s dropped: %s (%s)", binding.aor, binding.contact, why)
            self._forgotten(gone)

    def expire(self, now: float) -> None:
        for binding in self.bindings.expire(now):
            log.info("registration of %s expired: %s", binding.aor, binding.contact)
            self._forgotten(binding)

    def _forgotten(self, binding: Binding) -> None:
        """A binding is gone: its keep-alive and, once no binding uses it, the upstream
        registration ids of its phone's REGISTER Call-ID go with it."""
        if self.keepalive is not None:
            self.keepalive.untrack(binding)
        self._hold(binding.flow, False)
        self._prune(binding.aor, binding.register_call_id)

    def _hold(self, flow: Address, held: bool) -> None:
        """Count the bindings on a stream connection; tell the edge on 0 <-> 1, so it
        keeps the connection open however long it is idle while a binding lives on it
        (RFC 5626: inbound calls go down the connection the phone registered on)."""
        if not flow.reliable or flow.conn is None:
            return
        self._held[flow] += 1 if held else -1
        count = self._held[flow]
        if count <= 0:
            del self._held[flow]
        if self.on_flow is not None and count == (1 if held else 0):
            self.on_flow(flow, held)

    def _prune(self, aor: str, call_id: str) -> None:
        """Forget a phone registration's upstream ids once no binding of its AOR uses
        them (a REGISTER Call-ID belongs to one AOR: no scan of other AORs)."""
        if call_id in self._upstream and not any(
            b.register_call_id == call_id for b in self.bindings.of(aor)
        ):
            del self._upstream[call_id]

    # --- relayed upstream -------------------------------------------------------------

    def _relay(
        self, tx: ServerTransaction, request: Request, aor: str, line: LineConfig | None,
        requested: list[Requested], registrars: tuple[str, ...], now: float,
    ) -> list[Outbound]:  # fmt: skip
        assert self.router is not None
        route = self.router.plan(registrars, (request.uri,) * len(registrars), line, now)
        dest = route.dest
        # One upstream registration (Call-ID, From tag, CSeq space) per phone registration.
        host = self.sides.advertised(Side.OUTSIDE)[0]
        call_id, cseq, from_tag = self._upstream.pop(
            request.call_id, (new_call_id(host), 0, new_tag())
        )
        cseq += 1
        self._upstream[request.call_id] = (call_id, cseq, from_tag)
        while len(self._upstream) > self.config.limits.max_aors:
            self._upstream.popitem(last=False)
        outgoing = Request(method="REGISTER", uri=request.uri)
        outgoing.add("Via", self.sides.via(Side.OUTSIDE, dest.transport))
        max_forwards = forwarded_max_forwards(request, self.config.sip.max_forwards)
        outgoing.add("Max-Forwards", str(max_forwards))
        outgoing.add("From", str(request.from_.with_param("tag", from_tag)))
        outgoing.add("To", str(request.to.without_param("tag")))
        outgoing.add("Call-ID", call_id)
        outgoing.add("CSeq", f"{cseq} REGISTER")
        relay = RegisterRelay(tx, aor, line, requested, tx.source, request.call_id,
                              failover=route.failover)  # fmt: skip
        self._relay_contacts(outgoing, relay, dest.transport, request)
        copy_end_to_end(request, outgoing)
        outgoing.body = request.body
        self.sides.advertise(Side.OUTSIDE, outgoing)
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
            host = self.sides.advertised(Side.OUTSIDE)[0]
            ids = self._upstream.get(relay.call_id, (new_call_id(host), 0, new_tag()))
            call_id, cseq, from_tag = ids
            cseq += 1
            self._upstream[relay.call_id] = (call_id, cseq, from_tag)
            via = self.sides.via(Side.OUTSIDE, target.transport)
            request = retargeted(tx.request, tx.request.uri, via, cseq, None)
            _, out = self.sides.send_request(Side.OUTSIDE, request, target, now, relay)
            return out

        return self.failovers.next(relay.failover, tx.dest, why, now, resend, "REGISTER")

    def _relay_contacts(
        self, outgoing: Request, relay: RegisterRelay, transport: str, request: Request
    ) -> None:
        """The proxy's own Contact for each of the phone's: user and a per-binding token
        in the URI, the phone's header parameters (``expires``, ``+sip.instance``...)."""
        user = None
        with contextlib.suppress(SipHeaderError):
            user = request.to.sip_uri().user
        for item in relay.requested:
            if item.contact is None:
                outgoing.add("Contact", "*")
                continue
            ours = NameAddr.parse(self.sides.contact(Side.OUTSIDE, transport, user or "sipura"))
            uri = SipUri.parse(ours.uri).with_param(
                BINDING_PARAM, binding_token(relay.aor, item.key)
            )
            ours = ours.with_uri(str(uri))
            for name, pvalue in item.contact.params:
                ours = ours.with_param(name, pvalue)
            outgoing.add("Contact", str(ours))
            relay.sent[item.key] = ours.uri

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
            granted = granted_expires(relay, response)
            try:
                self._apply(relay.aor, relay.requested, relay.flow, relay.call_id, granted, now)
            except Reject as rejection:
                return self.sides.respond(Side.INSIDE, stx, rejection.status, rejection.reason,
                                          now, to_tag=new_tag(), extra=rejection.extra)  # fmt: skip
            for binding in self.targets(relay.aor, now):
                sent = relay.sent.get(binding.key)
                if sent is not None:
                    binding.upstream = sent
            for name, value in self._contacts(relay.aor, now):
                relayed.add(name, value)
        elif response.status not in (401, 407):  # refused for good: forget its ids
            self._prune(relay.aor, relay.call_id)
        copy_end_to_end(response, relayed)
        relayed.body = response.body
        return self.sides.send_response(Side.INSIDE, stx, relayed, now)

    def on_timeout(self, relay: RegisterRelay, tx: ClientTransaction, now: float) -> list[Outbound]:
        retried = self._failed(relay, tx, "timeout", now)
        if retried is not None:
            return retried
        return self.sides.respond(Side.INSIDE, relay.server_tx, 408, "Request Timeout", now)


def _seconds(text: str | None) -> int | None:
    """A delta-seconds value (the one ASCII-only rule, ``parse_decimal``); None when
    absent or malformed (``Expires: ²``)."""
    if text is None:
        return None
    try:
        return parse_decimal(text, what="Expires")
    except SipHeaderError:
        return None


def granted_expires(relay: RegisterRelay, response: Response) -> dict[str, int]:
    """What the registrar's 2xx granted each binding the proxy registered, by key.

    RFC 3261 §10.3: the 2xx lists every current binding. Ours listed: its ``expires``
    (else the response's Expires, else what was asked). Ours not listed while others are:
    gone (0). Nothing listed (a lax registrar): the response's Expires, else what was
    asked.
    """
    listed: list[NameAddr] = []
    for value in response.get_all("contact"):
        with contextlib.suppress(SipHeaderError):
            listed.append(NameAddr.parse(value))
    header = _seconds(response.get("expires"))
    granted: dict[str, int] = {}
    for item in relay.requested:
        if item.contact is None:
            continue
        sent = relay.sent.get(item.key)
        match = next((c for c in listed if sent is not None and _same_uri(c.uri, sent)), None)
        if match is not None:
            listed_expires = _seconds(match.param("expires"))
            granted[item.key] = (
                listed_expires if listed_expires is not None else (header or item.expires)
            )
        elif listed:
            granted[item.key] = 0
        else:
            granted[item.key] = header if header is not None else item.expires
    return granted


def _same_uri(a: str, b: str) -> bool:
    try:
        ua, ub = SipUri.parse(a), SipUri.parse(b)
    except SipHeaderError:
        return a == b
    same = (ua.user, bare_host(ua.host).lower(), ua.port or 5060) == (
        ub.user, bare_host(ub.host).lower(), ub.port or 5060
    )  # fmt: skip
    return same and ua.param(BINDING_PARAM) == ub.param(BINDING_PARAM)
