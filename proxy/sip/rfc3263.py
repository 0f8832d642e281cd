"""RFC 3263 "Locating SIP Servers": which DNS records to ask for, and in what order the
answers are tried. Sans-IO: the records come in as values, the order goes out; the I/O
edge (:mod:`proxy.b2bua.resolver`) does the querying.

* NAPTR (§4.1) only when the URI names neither port nor transport: the services the
  proxy runs (``SIP+D2U``, ``SIP+D2T``, ``SIPS+D2T``), by order then preference, each
  naming the SRV record to ask next (``S`` flag).
* No NAPTR: the SRV records of every transport the proxy runs, in its configured order.
* SRV (RFC 2782): lowest priority first; within a priority, a weighted random order so
  load spreads as the zone's owner asked; ``.`` as the only target means "no service".
* No SRV (or a port in the URI): the host's own addresses on the transport's default
  port (5060, 5061 for TLS).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_PORTS",
    "SERVICES",
    "Naptr",
    "Srv",
    "naptr_choices",
    "order_srv",
    "srv_name",
]

SERVICES: Final = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}
"""NAPTR service field -> the proxy's transport name."""
_SRV_PREFIX: Final = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}
DEFAULT_PORTS: Final = {"udp": 5060, "tcp": 5060, "tls": 5061}


@dataclass(frozen=True, slots=True)
class Naptr:
    order: int
    preference: int
    flags: str
    service: str
    replacement: str


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


def srv_name(host: str, transport: str) -> str:
    """``_sip._udp.example.com`` and friends (``_sips._tcp`` for TLS)."""
    return f"{_SRV_PREFIX[transport]}.{host.rstrip('.')}"


def naptr_choices(records: Iterable[Naptr], transports: Sequence[str]) -> list[tuple[str, str]]:
    """(transport, SRV name) for each usable NAPTR record, best first (§4.1): services
    the proxy runs, ``S`` flag only (the only one SIP uses), lowest order, then
    preference."""
    usable = [
        r
        for r in records
        if r.flags.lower() == "s" and SERVICES.get(r.service.upper()) in transports
    ]
    usable.sort(key=lambda r: (r.order, r.preference))
    return [(SERVICES[r.service.upper()], r.replacement.rstrip(".")) for r in usable]


def order_srv(records: Iterable[Srv], rng: random.Random | None = None) -> list[Srv]:
    """RFC 2782 order: by priority; within one, repeatedly pick at random with the
    records' weights (weight 0 records only get a small chance, as the RFC says)."""
    rng = rng or random.Random()  # load spreading, not security
    remaining = [r for r in records if r.target not in ("", ".")]
    ordered: list[Srv] = []
    for priority in sorted({r.priority for r in remaining}):
        group = sorted((r for r in remaining if r.priority == priority), key=lambda r: r.weight)
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered
