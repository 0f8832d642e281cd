"""Registered contacts: every binding of every address-of-record, each with its expiry.

RFC 3261 §10: an address-of-record (a line's number, or a relayed user's name) may have
several contacts bound at once (a desk phone and a DECT handset of one line), each with
its own expiry; a REGISTER adds, refreshes or removes them one by one. This module is the
store and nothing else: bounded (``[limits] max_bindings_per_aor``, ``max_aors``), with
expiry on a heap (:class:`~proxy.b2bua.deadlines.Deadlines`, never a scan), and indexed
by the flow each contact registered on, which is how the proxy recognises a line's phone
(:mod:`proxy.b2bua.identity`) and reaches it behind NAT. What a REGISTER means is
:mod:`proxy.b2bua.registrar`'s business.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

from proxy.b2bua.deadlines import Deadlines
from proxy.sip.headers import SipHeaderError, SipUri, bare_host
from proxy.sip.transaction import Address

BINDING_PARAM = "bnd"
"""URI parameter the proxy puts in the Contact it registers upstream for each phone
contact: an inbound INVITE to that contact goes to that phone only."""


class BindingsFull(Exception):
    """No room for another binding (per AOR, or AORs in all)."""


@dataclass(slots=True)
class Binding:
    """One registered contact of an address-of-record."""

    aor: str
    key: str
    """The contact's identity (RFC 3261 §10.3 URI comparison, reduced)."""
    contact: str
    """The phone's Contact URI: the Request-URI of calls to it."""
    flow: Address
    """Where its REGISTER came from: requests to it go there (NAT, the TCP connection)."""
    expires_at: float
    nat: bool
    """The contact names another address than the flow: behind NAT."""
    register_call_id: str
    """The phone's REGISTER Call-ID (its upstream registration is kept per Call-ID)."""
    token: str
    """Short id of this binding in the Contact registered upstream (``;bnd=``)."""
    registered_at: float = 0.0
    """When its last REGISTER was accepted."""
    upstream: str | None = None
    """The URI the proxy registered upstream for it (relayed registrations)."""

    def expires_in(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    @property
    def target(self) -> str:
        """The contact as the Request-URI of requests to the phone: without URI headers.

        A REGISTER's Contact may carry them (``<sip:u@h?Route=...>``: RFC 4475
        "regescrt", which a registrar must accept), but a Request-URI may not (RFC 3261
        §19.1.1), and turning them into header fields as §19.1.5 describes would let a
        registration put a Route (or anything else) into every request the proxy sends
        toward it: they are dropped."""
        if "?" not in self.contact:
            return self.contact
        try:
            return str(replace(SipUri.parse(self.contact), headers=""))
        except SipHeaderError:
            return self.contact


def binding_key(uri: str) -> str:
    """What makes two Contact URIs the same binding: scheme, user, host, port, transport
    (RFC 3261 §19.1.4 compares more, but these are what phones vary)."""
    try:
        parsed = SipUri.parse(uri)
    except SipHeaderError:
        return uri.strip()
    host = bare_host(parsed.host).lower()
    port = parsed.port or parsed.default_port
    return f"{parsed.scheme}:{parsed.user or ''}@{host}:{port};{parsed.transport}"


def binding_token(aor: str, key: str) -> str:
    """Stable across refreshes (the upstream registrar must see the same Contact)."""
    return hashlib.sha256(f"{aor}\0{key}".encode()).hexdigest()[:12]


def behind_nat(contact: str, flow: Address) -> bool:
    """The phone wrote an address that is not where its REGISTER came from (RFC 5626's
    motivating case): its private address, or a port its NAT rewrote (UDP)."""
    try:
        uri = SipUri.parse(contact)
    except SipHeaderError:
        return False
    if bare_host(uri.host).lower() != flow.host.lower():
        return True
    return flow.transport == "udp" and (uri.port or uri.default_port) != flow.port


class Bindings:
    """Every live binding, bounded, expiring on a heap."""

    def __init__(self, max_per_aor: int, max_aors: int) -> None:
        self.max_per_aor = max_per_aor
        self.max_aors = max_aors
        self._aors: dict[str, dict[str, Binding]] = {}
        self._expiry: Deadlines[tuple[str, str]] = Deadlines()
        self._flows: dict[tuple[str, int], set[tuple[str, str]]] = {}
        self._tokens: dict[str, tuple[str, str]] = {}

    def __len__(self) -> int:
        return sum(len(found) for found in self._aors.values())

    def __iter__(self) -> Iterator[Binding]:
        for found in self._aors.values():
            yield from found.values()

    def __contains__(self, aor: object) -> bool:
        """``aor`` has at least one binding (expired ones go at their deadline)."""
        return aor in self._aors

    def aors(self) -> list[str]:
        return list(self._aors)

    def of(self, aor: str) -> list[Binding]:
        """Every binding of ``aor``, expired or not (expiry removes them soon)."""
        return list(self._aors.get(aor, {}).values())

    def live(self, aor: str, now: float) -> list[Binding]:
        """The AOR's bindings that have not expired, most recently registered last."""
        return [b for b in self._aors.get(aor, {}).values() if b.expires_at > now]

    def get(self, aor: str, key: str) -> Binding | None:
        return self._aors.get(aor, {}).get(key)

    def by_token(self, token: str) -> Binding | None:
        found = self._tokens.get(token)
        return self.get(*found) if found is not None else None

    def at_flow(self, host: str, port: int) -> list[Binding]:
        """The bindings registered from ``host:port``."""
        keys = self._flows.get((host, port), set())
        return [b for aor, key in keys if (b := self.get(aor, key)) is not None]

    def put(self, binding: Binding) -> None:
        """Add or refresh a binding. Raises :class:`BindingsFull`."""
        found = self._aors.get(binding.aor)
        if found is None:
            if len(self._aors) >= self.max_aors:
                raise BindingsFull(f"{self.max_aors} addresses-of-record registered")
            found = self._aors[binding.aor] = {}
        old = found.get(binding.key)
        if old is None and len(found) >= self.max_per_aor:
            if not found:
                del self._aors[binding.aor]
            raise BindingsFull(f"{self.max_per_aor} contacts registered for {binding.aor}")
        if old is not None:  # re-inserted at the end: the dict keeps registration order
            self._unflow(old)
            del found[binding.key]
        found[binding.key] = binding
        self._flows.setdefault((binding.flow.host, binding.flow.port), set()).add(
            (binding.aor, binding.key)
        )
        self._tokens[binding.token] = (binding.aor, binding.key)
        self._expiry.arm((binding.aor, binding.key), binding.expires_at)

    def remove(self, aor: str, key: str) -> Binding | None:
        found = self._aors.get(aor)
        if found is None:
            return None
        binding = found.pop(key, None)
        if not found:
            del self._aors[aor]
        if binding is not None:
            self._forget(binding)
        return binding

    def remove_all(self, aor: str) -> list[Binding]:
        removed = list(self._aors.pop(aor, {}).values())
        for binding in removed:
            self._forget(binding)
        return removed

    def expire(self, now: float) -> list[Binding]:
        """Remove and return every binding whose expiry has come."""
        gone: list[Binding] = []
        for aor, key in self._expiry.due(now):
            binding = self.remove(aor, key)
            if binding is not None:
                gone.append(binding)
        return gone

    def next_deadline(self) -> float | None:
        return self._expiry.next_deadline()

    def _forget(self, binding: Binding) -> None:
        self._unflow(binding)
        if self._tokens.get(binding.token) == (binding.aor, binding.key):
            del self._tokens[binding.token]
        self._expiry.arm((binding.aor, binding.key), None)

    def _unflow(self, binding: Binding) -> None:
        flow = (binding.flow.host, binding.flow.port)
        keys = self._flows.get(flow)
        if keys is not None:
            keys.discard((binding.aor, binding.key))
            if not keys:
                del self._flows[flow]
