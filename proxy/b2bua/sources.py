"""Network sources a line may be used from: ``ip``, ``ip:port`` or a CIDR network.

A line's identity (its number, and with it its Mini Certificate) belongs to its phone.
The phone is known by where its requests come from; ``[[line]] allowed_sources`` adds
sources an operator vouches for (a phone with a static contact that sends from another
port, a subnet of ATAs). This module is only the value type and its matching rule; who
may use a line is decided in :mod:`proxy.b2bua.identity`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.sip.headers import ip_literal

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Source:
    """A network (a single address is a /32 or /128) and optionally one port."""

    network: IpNetwork
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Source:
        """``192.0.2.7``, ``192.0.2.7:5062``, ``[2001:db8::7]:5062``, ``192.0.2.0/24``.
        Raises ValueError with a one-line reason."""
        value = text.strip()
        port: int | None = None
        if value.startswith("["):
            host, bracket, rest = value[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"expected ip, ip:port or cidr, got {text!r}")
            value, port = host, _port(rest[1:], text) if rest else None
        elif value.count(":") == 1:
            host, _, port_text = value.partition(":")
            value, port = host, _port(port_text, text)
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"expected ip, ip:port or cidr, got {text!r}") from None
        if port is not None and network.num_addresses != 1:
            raise ValueError(f"a port goes with one address, not a network: {text!r}")
        return cls(network, port)

    def matches(self, host: str, port: int) -> bool:
        literal = ip_literal(host)
        if literal is None:
            return False
        address = literal[0]
        if self.port is not None and port != self.port:
            return False
        return address in self.network

    def __str__(self) -> str:
        host = (
            str(self.network.network_address)
            if self.network.num_addresses == 1
            else str(self.network)
        )
        if self.port is None:
            return host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _port(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {whole!r}")
    return int(text)
