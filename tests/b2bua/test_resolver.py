"""The DNS edge against a real (local, dnspython-based) DNS server: NAPTR -> SRV ->
A, TTLs, ports and transports from the records, failures and timeouts."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnsserver import DnsServer

from proxy.b2bua.config_transport import DnsConfig
from proxy.b2bua.config_transport import DnsServer as Server
from proxy.b2bua.resolver import DnsResolver
from proxy.b2bua.routing import ResolveQuery
from proxy.sip.transaction import Address

ZONE = {
    ("pbx.test", "NAPTR"): [
        '10 10 "s" "SIPS+D2T" "" _sips._tcp.pbx.test.',
        '20 10 "s" "SIP+D2U" "" _sip._udp.pbx.test.',
    ],
    ("_sips._tcp.pbx.test", "SRV"): ["10 0 5061 tls1.pbx.test."],
    ("_sip._udp.pbx.test", "SRV"): ["10 10 5070 a.pbx.test.", "20 10 5072 b.pbx.test."],
    ("_sip._udp.srv-only.test", "SRV"): ["10 10 5090 a.pbx.test."],
    ("a.pbx.test", "A"): ["127.0.0.1"],
    ("b.pbx.test", "A"): ["127.0.0.2"],
    ("tls1.pbx.test", "A"): ["127.0.0.3"],
    ("plain.test", "A"): ["127.0.0.4", "127.0.0.5"],
}


def run(
    server: DnsServer, query: ResolveQuery, transports: tuple[str, ...] = ("udp", "tcp"),
    timeout_s: float = 2.0,
) -> tuple[list[Address], float]:  # fmt: skip
    answers: list[tuple[list[Address], float]] = []

    async def main() -> None:
        config = DnsConfig((Server(*server.address),), timeout_s)
        resolver = DnsResolver(lambda q, t, ttl: answers.append((t, ttl)), config, transports)
        resolver.request(query)
        for _ in range(200):
            if answers:
                return
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert len(answers) == 1
    return answers[0]


def test_naptr_then_srv_then_a_in_order_with_the_smallest_ttl() -> None:
    with DnsServer(ZONE, ttl=42) as server:
        targets, ttl = run(server, ResolveQuery("pbx.test", None, None))
        assert targets == [Address("127.0.0.1", 5070, "udp"), Address("127.0.0.2", 5072, "udp")]
        assert ttl == 42
        assert server.queries[0] == ("pbx.test", "NAPTR")
        targets, _ = run(server, ResolveQuery("pbx.test", None, None), ("udp", "tcp", "tls"))
        assert targets[0] == Address("127.0.0.3", 5061, "tls")  # NAPTR order prefers TLS


def test_srv_without_naptr_and_a_with_a_port() -> None:
    with DnsServer(ZONE) as server:
        targets, _ = run(server, ResolveQuery("srv-only.test", None, None))
        assert targets == [Address("127.0.0.1", 5090, "udp")]
        targets, _ = run(server, ResolveQuery("plain.test", 5099, "tcp"))
        assert set(targets) == {
            Address("127.0.0.4", 5099, "tcp"),
            Address("127.0.0.5", 5099, "tcp"),
        }
        assert ("_sip._tcp.plain.test", "SRV") not in server.queries  # a port: no SRV
        targets, _ = run(server, ResolveQuery("plain.test", None, None))
        assert targets[0].port == 5060 and targets[0].transport == "udp"  # no SRV: defaults


def test_an_unknown_name_and_a_silent_server_fail() -> None:
    with DnsServer(ZONE) as server:
        assert run(server, ResolveQuery("nowhere.test", None, "udp")) == ([], 30.0)
        server.silent = True
        assert run(server, ResolveQuery("pbx.test", None, None), timeout_s=0.3) == ([], 30.0)
