"""Name lookups for the call core: the I/O edge's side of :mod:`proxy.b2bua.routing`.

The core never resolves a name itself (it is sans-IO): it asks :meth:`DnsResolver.
request` and goes on with other work; the answer comes back through ``B2BUA.resolved``
once the lookup finishes, with the targets in the order to try and the time to keep
them. :class:`DnsResolver` asks DNS as RFC 3263 says, with dnspython's asyncio resolver
(decision 20): NAPTR when the URI names neither port nor transport, then SRV, then
A/AAAA, keeping the smallest TTL met on the way; which records and in what order is
:mod:`proxy.sip.rfc3263`. ``[dns] servers`` names the servers (default: the system's,
from ``/etc/resolv.conf``); with the system's servers a host name DNS does not know is
also looked up with ``getaddrinfo`` (``/etc/hosts``: ``localhost``, static entries).
A lookup that takes longer than ``[dns] timeout_ms`` counts as failed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from proxy.b2bua.config_transport import DnsConfig
from proxy.b2bua.routing import ResolveQuery
from proxy.sip.rfc3263 import DEFAULT_PORTS, Naptr, Srv, naptr_choices, order_srv, srv_name
from proxy.sip.transaction import Address

log = logging.getLogger("sipura.dns")

FAILURE_TTL_S = 30.0
HOSTS_TTL_S = 300.0
"""``getaddrinfo`` reports no TTL: answers from it are kept this long."""
MAX_TTL_S = 86400.0
MAX_SRV_TARGETS = 16
"""SRV targets resolved per name: a zone that lists more is cut (bounded work)."""

Answer = Callable[[ResolveQuery, list[Address], float], None]
"""Where answers go: (query, targets, ttl seconds)."""


@dataclass(slots=True)
class _Found:
    targets: list[Address] = field(default_factory=list)
    ttl: float = MAX_TTL_S

    def seen(self, ttl: float) -> None:
        self.ttl = min(self.ttl, ttl)


class DnsResolver:
    """RFC 3263 lookups on the event loop; each query a task, answered to the core."""

    def __init__(
        self,
        answer: Answer,
        config: DnsConfig,
        transports: Sequence[str],
        families: Sequence[socket.AddressFamily] = (socket.AF_INET,),
    ) -> None:
        self._answer = answer
        self._timeout_s = config.timeout_s
        self._transports = tuple(transports)
        self._families = tuple(families)
        self._system = not config.servers
        self._dns = dns.asyncresolver.Resolver(configure=self._system)
        if config.servers:
            self._dns.nameservers = [
                dns.nameserver.Do53Nameserver(s.host, s.port) for s in config.servers
            ]
        self._dns.lifetime = config.timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, query: ResolveQuery) -> None:
        task = asyncio.get_running_loop().create_task(self._run(query))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, query: ResolveQuery) -> None:
        try:
            found = await asyncio.wait_for(self.lookup(query), self._timeout_s)
        except TimeoutError:
            found = _Found(ttl=FAILURE_TTL_S)
            log.warning("cannot resolve %s: timed out after %.1f s", query.host, self._timeout_s)
        except Exception:  # a resolver bug must cost one lookup, never the edge
            log.exception("cannot resolve %s", query.host)
            found = _Found(ttl=FAILURE_TTL_S)
        if not found.targets:
            if found.ttl != FAILURE_TTL_S:
                log.warning("cannot resolve %s: no usable records", query.host)
            self._answer(query, [], FAILURE_TTL_S)
            return
        log.info("resolved %s: %s (ttl %d s)", query.host,
                 ", ".join(f"{t.transport}:{t.host}:{t.port}" for t in found.targets),
                 found.ttl)  # fmt: skip
        self._answer(query, found.targets, found.ttl)

    async def lookup(self, query: ResolveQuery) -> _Found:
        """The targets of ``query`` in the order to try (RFC 3263 §4)."""
        found = _Found()
        if query.port is not None:  # a port: no SRV, the host's addresses
            transport = query.transport or "udp"
            await self._addresses(query.host, query.port, transport, found)
            return found
        for transport, name in await self._services(query, found):
            for record in await self._srv(name, found):
                await self._addresses(record.target, record.port, transport, found)
            if found.targets:
                return found
        for transport in (query.transport,) if query.transport else self._transports[:1]:
            await self._addresses(query.host, DEFAULT_PORTS[transport], transport, found)
        return found

    async def _services(self, query: ResolveQuery, found: _Found) -> list[tuple[str, str]]:
        """(transport, SRV name) to try: from NAPTR when the transport is open, else the
        SRV name of the transport the URI named (or of each transport the proxy runs)."""
        if query.transport is not None:
            return [(query.transport, srv_name(query.host, query.transport))]
        answer = await self._query(query.host, "NAPTR")
        if answer is not None:
            found.seen(answer.rrset.ttl if answer.rrset is not None else MAX_TTL_S)
            records = [
                Naptr(r.order, r.preference, r.flags.decode(), r.service.decode(),
                      r.replacement.to_text())
                for r in answer
            ]  # fmt: skip
            choices = naptr_choices(records, self._transports)
            if choices:
                return choices
        return [(t, srv_name(query.host, t)) for t in self._transports]

    async def _srv(self, name: str, found: _Found) -> list[Srv]:
        answer = await self._query(name, "SRV")
        if answer is None:
            return []
        found.seen(answer.rrset.ttl if answer.rrset is not None else MAX_TTL_S)
        records = [Srv(r.priority, r.weight, r.port, r.target.to_text()) for r in answer]
        return order_srv(records)[:MAX_SRV_TARGETS]

    async def _addresses(self, host: str, port: int, transport: str, found: _Found) -> None:
        host = host.rstrip(".")
        added = False
        for family in self._families:
            rdtype = "AAAA" if family == socket.AF_INET6 else "A"
            answer = await self._query(host, rdtype)
            if answer is None:
                continue
            found.seen(answer.rrset.ttl if answer.rrset is not None else MAX_TTL_S)
            for record in answer:
                added |= _add(found, Address(record.address, port, transport))
        if not added and self._system:
            await self._hosts(host, port, transport, found)

    async def _hosts(self, host: str, port: int, transport: str, found: _Found) -> None:
        """``/etc/hosts`` and the rest of the system's name service (no TTL known)."""
        loop = asyncio.get_running_loop()
        for family in self._families:
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            except OSError:
                continue
            for info in infos:
                if _add(found, Address(str(info[4][0]), port, transport)):
                    found.seen(HOSTS_TTL_S)

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        try:
            return await self._dns.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout:
            log.info("DNS %s %s: timed out", rdtype, name)
            return None
        except dns.exception.DNSException as exc:
            log.info("DNS %s %s: %s", rdtype, name, exc)
            return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


def _add(found: _Found, target: Address) -> bool:
    if target in found.targets:
        return False
    found.targets.append(target)
    return True


def families_for(listen_host: str) -> tuple[socket.AddressFamily, ...]:
    """The address families a socket bound to ``listen_host`` can send to: IPv4 for an
    IPv4 address (or a name), IPv6 then IPv4 for ``::`` (dual stack), IPv6 otherwise."""
    if ":" not in listen_host:
        return (socket.AF_INET,)
    if listen_host == "::":
        return (socket.AF_INET6, socket.AF_INET)
    return (socket.AF_INET6,)
