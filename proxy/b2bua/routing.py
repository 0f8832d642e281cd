"""Where a request goes: the next hop of a new call, a leg's destination, name lookups.

Routing is configuration plus bindings: a phone's call goes to ``[outside] upstream``
(or to its own Request-URI when there is none), a call from outside goes to the line's
registered contact or its static ``contact``. Host names in URIs are resolved by the I/O
edge, never here (the core is sans-IO, decision 10): :class:`Lookups` caches answers
with their TTL, and a name it does not know yet raises :class:`Unresolved` after asking
the edge's :class:`Resolver`; the core parks the work that needed it and runs it again
when :meth:`Lookups.answer` delivers the targets (or the failure).

A resolved name is an ordered list of targets (RFC 3263: NAPTR, SRV priority and
weight, then every address), and ``upstream`` may be a list of URIs: a request that
starts something toward them carries a :class:`Failover` plan, and when a target answers
503 or 408, times out or cannot be reached, :meth:`Router.next_target` gives the next
target of that URI, then the first of the next URI (RFC 3263 §4.3). A target that failed
is held down for ``[outside] failover_hold_down_s``: while other targets remain, new
requests skip it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from typing import TYPE_CHECKING, Protocol

from proxy.b2bua.bindings import BINDING_PARAM
from proxy.b2bua.config import Config, LineConfig
from proxy.b2bua.legs import Leg
from proxy.b2bua.messages import Reject, digits
from proxy.media.engine import Side
from proxy.sip.headers import NameAddr, SipHeaderError, SipUri, bare_host, ip_literal, is_decimal
from proxy.sip.message import Request
from proxy.sip.transaction import Address

if TYPE_CHECKING:
    from proxy.b2bua.registrar import Registrar
    from proxy.b2bua.sides import Outbound

MAX_CACHED = 4096
"""Names (with port and transport) whose answer is kept; least recently used go first."""
MAX_PENDING = 256
"""Names being looked up at once; a request needing one more gets 503."""
MAX_PARKED = 64
"""Requests waiting on one name; more get 503 (a flood must not queue without bound)."""
LOOKUP_TIMEOUT_S = 10.0
"""A lookup the edge has not answered by then counts as failed."""
FAILURE_TTL_S = 30.0
"""How long a failed lookup is remembered (so a flood does not re-ask every time)."""


MAX_HELD_DOWN = 1024
"""Failed targets remembered for the hold-down; the oldest are forgotten first."""


@dataclass(frozen=True, slots=True)
class ResolveQuery:
    """A host name to turn into targets, with what the URI said about port and transport
    (RFC 3263 uses SRV only when the URI names no port; NAPTR only when it names no
    transport either: ``transport`` None)."""

    host: str
    port: int | None
    transport: str | None


class Resolver(Protocol):
    """The I/O edge's name resolution: asynchronous, answered through the core's
    ``resolved`` with the targets in the order to try, or none when the name failed."""

    def request(self, query: ResolveQuery) -> None: ...


class Unresolved(Exception):
    """The work at hand needs ``query`` answered first (the edge has been asked)."""

    def __init__(self, query: ResolveQuery) -> None:
        super().__init__(query.host)
        self.query = query


Parked = Callable[[float], "list[Outbound]"]
"""Work that waited for a name: run again with the current time once it is answered."""


@dataclass(slots=True)
class _Pending:
    asked_at: float
    parked: list[Parked] = field(default_factory=list)


class Lookups:
    """Answers to name queries (bounded, with TTL) and the work parked on open ones."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._cache: OrderedDict[ResolveQuery, tuple[tuple[Address, ...], float]] = OrderedDict()
        self._pending: dict[ResolveQuery, _Pending] = {}

    def targets(self, query: ResolveQuery, now: float) -> tuple[Address, ...]:
        """The cached targets (empty: the name failed); :class:`Unresolved` if unknown."""
        cached = self._cache.get(query)
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(query)
            return cached[0]
        if cached is not None:
            del self._cache[query]
        if query not in self._pending:
            if len(self._pending) >= MAX_PENDING:
                raise Reject(503, "Service Unavailable", [("Retry-After", "5")])
            self._pending[query] = _Pending(now)
            self.resolver.request(query)
        raise Unresolved(query)

    def park(self, query: ResolveQuery, work: Parked) -> bool:
        """Run ``work`` when ``query`` is answered; False when too much already waits."""
        pending = self._pending.get(query)
        if pending is None or len(pending.parked) >= MAX_PARKED:
            return False
        pending.parked.append(work)
        return True

    def answer(
        self, query: ResolveQuery, targets: Sequence[Address], ttl_s: float, now: float
    ) -> list[Parked]:
        """Store the edge's answer; returns the work to run again now."""
        ttl = ttl_s if targets else min(ttl_s, FAILURE_TTL_S)
        self._cache[query] = (tuple(targets), now + max(ttl, 0.0))
        self._cache.move_to_end(query)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        pending = self._pending.pop(query, None)
        return pending.parked if pending is not None else []

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(p.asked_at for p in self._pending.values()) + LOOKUP_TIMEOUT_S

    def expire(self, now: float) -> list[Parked]:
        """Fail the lookups the edge never answered; returns their parked work."""
        late = [q for q, p in self._pending.items() if p.asked_at + LOOKUP_TIMEOUT_S <= now]
        work: list[Parked] = []
        for query in late:
            work += self.answer(query, (), FAILURE_TTL_S, now)
        return work

    @property
    def pending(self) -> int:
        return len(self._pending)


@dataclass(slots=True)
class Failover:
    """What a request that starts something (an INVITE, a relayed REGISTER) may try next:
    the URIs in order (``upstream`` / ``registrar``), with the Request-URI to use toward
    each, and the targets already tried."""

    uris: tuple[str, ...]
    ruris: tuple[str, ...]
    tried: list[Address] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    """One place a request goes: its Request-URI and the address it is sent to."""

    ruri: str
    dest: Address


@dataclass(frozen=True, slots=True)
class Route:
    """Where a new call or out-of-dialog request goes, and for which line. ``forks``:
    further targets an INVITE goes to in parallel (the other registered devices)."""

    ruri: str
    dest: Address
    line: LineConfig | None
    failover: Failover | None = None
    forks: tuple[Target, ...] = ()


class Router:
    """The next hop of requests that start something, and of each leg's requests."""

    def __init__(
        self, config: Config, registrar: Registrar, lookups: Lookups, transports: Sequence[str]
    ) -> None:
        self.config = config
        self.registrar = registrar
        self.identity = registrar.identity
        self.identity.resolve = lambda uri, now: self.resolve(uri, None, now)
        self.lookups = lookups
        self.transports = tuple(transports)
        self._held_down: OrderedDict[tuple[str, int, str], float] = OrderedDict()

    def route(self, side: Side, request: Request, source: Address, now: float) -> Route:
        """A new request from ``side``: where it goes. Raises :class:`Reject`."""
        if side is Side.INSIDE:
            return self._outbound(request, source, now)
        return self._inbound(request, now)

    def _outbound(self, request: Request, source: Address, now: float) -> Route:
        """From a phone: to ``[outside] upstream`` (in order, failing over), else to its
        own Request-URI."""
        line = self.caller_line(request, source, now)
        if line is None and self.config.inside.unknown_users == "reject":
            user = request.from_.uri
            raise self.identity.refuse_unknown(source, user, request.method, now)
        upstreams = self.config.outside.upstream_uris
        if upstreams:
            ruris = tuple(self.retarget(request.uri, upstream) for upstream in upstreams)
            return self.plan(upstreams, ruris, line, now)
        return Route(request.uri, self.resolve(request.uri, None, now), line)

    def _inbound(self, request: Request, now: float) -> Route:
        """From outside: to every registered device of the user (the one a ``;bnd=``
        Request-URI names, if any), else to the line's static contact."""
        try:
            uri = SipUri.parse(request.uri)
        except SipHeaderError as exc:
            raise Reject(416, "Unsupported URI Scheme") from exc
        aor = digits(uri.user) if uri.user else ""
        line = self.config.line_for_user(aor) if aor else None
        if line is None and (not aor or self.config.inside.unknown_users == "reject"):
            raise Reject(404, "Not Found")
        bindings = self.registrar.targets(aor, now)
        token = uri.param(BINDING_PARAM)
        chosen = [b for b in bindings if b.token == token] if token else []
        targets = [Target(b.target, b.flow) for b in chosen or bindings]
        if not targets and line is not None and line.contact:
            targets = [Target(line.contact, self.resolve(line.contact, None, now))]
        if not targets:
            if line is None:
                raise Reject(404, "Not Found")
            raise Reject(480, "Temporarily Unavailable")
        first = targets[-1]  # the most recent registration leads
        return Route(first.ruri, first.dest, line, forks=tuple(reversed(targets[:-1])))

    def retarget(self, ruri: str, upstream: str) -> str:
        """A phone that uses the proxy as its server dials ``user@<proxy inside>``: the
        upstream would not recognise itself in that URI, so its host:port becomes the
        upstream's. Any other Request-URI (``user@pbx.example``) passes unchanged, which
        keeps the phone's digest credentials valid upstream."""
        try:
            uri = SipUri.parse(ruri)
            target = SipUri.parse(upstream)
        except SipHeaderError:
            return ruri
        inside = self.config.inside
        ours = {inside.advertised, (inside.listen_host, inside.listen_port)}
        if (bare_host(uri.host), uri.port or uri.default_port) not in ours:
            return ruri
        return str(
            dataclasses_replace(uri, scheme=target.scheme, host=target.host, port=target.port)
        )

    def caller_line(self, request: Request, source: Address, now: float) -> LineConfig | None:
        """The line a request from the inside claims (From), when it comes from that
        line's phone (:mod:`proxy.b2bua.identity`; any other source gets 403); else the
        line whose phone it came from (a registered flow or the static contact: an
        ``allowed_sources`` entry may use a line, it does not make every request from
        there the line's), else None (an unknown user)."""
        try:
            user = request.from_.sip_uri().user
        except SipHeaderError:
            user = None
        if user and is_decimal(digits(user)):
            line = self.config.line_for_user(digits(user))
            if line is not None:
                if not self.identity.is_phone(line, source, now):
                    raise self.identity.refuse(line, source, request.method, now)
                return line
        for binding in self.registrar.bindings.at_flow(source.host, source.port):
            line = self.config.line_for_user(binding.aor)
            if line is not None and binding.expires_at > now:
                return line
        for line in self.config.lines:
            if line.contact:
                with contextlib.suppress(Unresolved):
                    if self.identity.static_contact(line, source, now):
                        return line
        return None

    # --- targets, failover, hold-down -------------------------------------------------

    def plan(
        self, uris: tuple[str, ...], ruris: tuple[str, ...], line: LineConfig | None, now: float
    ) -> Route:
        """The first usable target of ``uris`` (tried in order), with the plan for the rest.
        A URI whose name failed is skipped when another follows; raises what
        :meth:`resolve` raises for the last one."""
        failover = Failover(uris, ruris)
        found = self.next_target(failover, now)
        if found is None:
            self.resolve(uris[-1], None, now)  # raises the last URI's reason
            raise Reject(503, "Service Unavailable", [("Retry-After", "5")])
        return Route(found[0], found[1], line, failover)

    def next_target(self, failover: Failover, now: float) -> tuple[str, Address] | None:
        """The next target to try (Request-URI, address), marked tried; None when every
        URI's targets are used up. URIs in order, each one's targets in RFC 3263 order,
        but targets held down only once no other is left. Raises :class:`Unresolved`
        when a URI's name is not known yet."""
        for allow_held in (False, True):
            for index, uri in enumerate(failover.uris):
                try:
                    targets = self.targets(uri, None, now)
                except Reject:
                    continue  # a name that failed: the next URI
                for target in targets:
                    if target in failover.tried:
                        continue
                    if allow_held or not self.held_down(target, now):
                        failover.tried.append(target)
                        return failover.ruris[index], target
        return None

    def failed(self, target: Address, now: float) -> None:
        """``target`` answered 503/408, timed out or was unreachable: hold it down."""
        hold = self.config.outside.failover_hold_down_s
        if hold <= 0:
            return
        key = (target.host, target.port, target.transport)
        self._held_down[key] = now + hold
        self._held_down.move_to_end(key)
        while len(self._held_down) > MAX_HELD_DOWN:
            self._held_down.popitem(last=False)

    def held_down(self, target: Address, now: float) -> bool:
        key = (target.host, target.port, target.transport)
        until = self._held_down.get(key)
        if until is None:
            return False
        if until <= now:
            del self._held_down[key]
            return False
        return True

    def held_down_count(self, now: float) -> int:
        return sum(1 for until in self._held_down.values() if until > now)

    def resolve(self, uri_text: str, transport_hint: str | None, now: float) -> Address:
        """A SIP URI -> the address to send to: the first target not held down (else
        the first). IP literals as they are; names through :class:`Lookups` (raises
        :class:`Unresolved` the first time, :class:`Reject` 502 for a name that failed)."""
        targets = self.targets(uri_text, transport_hint, now)
        for target in targets:
            if not self.held_down(target, now):
                return target
        return targets[0]

    def targets(self, uri_text: str, transport_hint: str | None, now: float) -> tuple[Address, ...]:
        """Every target of a SIP URI in the order to try (RFC 3263), on transports the
        proxy runs. TLS targets carry the URI's host name to check the certificate
        against (RFC 5922)."""
        try:
            uri = SipUri.parse(uri_text)
        except SipHeaderError as exc:
            raise Reject(416, "Unsupported URI Scheme") from exc
        host = bare_host(uri.param("maddr") or uri.host)
        secure = uri.scheme.lower() == "sips"
        transport = self._transport(uri, transport_hint, secure)
        parsed = ip_literal(host)
        literal = None if parsed is None else parsed[1]
        if literal is not None:
            chosen = self._supported(transport or ("tls" if secure else "udp"))
            port = uri.port or (5061 if chosen == "tls" else 5060)
            name = literal if chosen == "tls" else None
            return (Address(literal, port, chosen, name=name),)
        if transport is None and uri.port is not None:
            transport = "udp"  # RFC 3263 §4.1: a port and no transport: UDP
        query = ResolveQuery(host, uri.port, transport)
        found = self.lookups.targets(query, now)
        usable = tuple(
            Address(t.host, t.port, t.transport, name=host if t.transport == "tls" else None)
            for t in found
            if t.transport in self.transports and (not secure or t.transport == "tls")
        )
        if not usable:
            raise Reject(502, "Bad Gateway", [("Warning", f'399 - "cannot resolve {host}"')])
        return usable

    def _transport(self, uri: SipUri, hint: str | None, secure: bool) -> str | None:
        """The transport a URI asks for (None: RFC 3263 decides); sips means TLS."""
        named = uri.param("transport") or hint
        transport = named.lower() if named else ("tls" if secure else None)
        if secure and transport == "tcp":
            transport = "tls"  # RFC 5630 §3.1.3: sips over TCP means TLS
        return None if transport is None else self._supported(transport)

    def _supported(self, transport: str) -> str:
        if transport not in self.transports:
            raise Reject(503, "Service Unavailable", [("Warning", f'399 - "no {transport}"')])
        return transport

    def leg_dest(self, leg: Leg, now: float) -> Address | None:
        """Where requests on ``leg`` go now: the phone's flow on the inside (NAT, TCP
        reuse), else the first Route or the remote target. A name not known yet keeps the
        current destination until the answer is in."""
        if leg.side is Side.INSIDE and leg.flow is not None:
            return leg.flow
        target = leg.route_set[0] if leg.route_set else leg.remote_target
        if target is None:
            return leg.dest
        try:
            uri = NameAddr.parse(target).uri if target.startswith("<") or " " in target else target
            transport = leg.dest.transport if leg.dest else None
            return self.resolve(uri, transport, now)
        except Unresolved as pending:

            def again(now: float) -> list[Outbound]:
                leg.dest = self.leg_dest(leg, now)
                return []

            self.lookups.park(pending.query, again)
            return leg.dest or leg.flow  # meanwhile: where its messages came from
        except (SipHeaderError, Reject):
            return leg.dest
