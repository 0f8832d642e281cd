"""A small authoritative DNS server for tests, built on dnspython: a zone in a dict,
answered over UDP on a free loopback port. Records are dnspython text forms, e.g.
``{("_sip._udp.pbx.test", "SRV"): ["10 50 5070 a.pbx.test."], ("a.pbx.test", "A"):
["127.0.0.1"]}``; every answer carries ``ttl``. ``queries`` lists what was asked."""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = Mapping[tuple[str, str], Sequence[str]]


class DnsServer:
    def __init__(self, zone: Zone, *, ttl: int = 60, host: str = "127.0.0.1") -> None:
        self.zone = {(name.rstrip(".").lower(), kind.upper()): list(v) for (name, kind), v in
                     zone.items()}  # fmt: skip
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self.silent = False
        """True: receive and drop every query (a server that does not answer)."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def server(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # garbage in a test: ignore it
                continue
            if self.silent:
                continue
            self._sock.sendto(self.answer(query).to_wire(), peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        kind = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, kind))
        values = self.zone.get((name, kind))
        if values:
            rrset = dns.rrset.from_text_list(
                question.name, self.ttl, dns.rdataclass.IN, question.rdtype, values
            )
            response.answer.append(rrset)
        elif not any(known == name for known, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response
