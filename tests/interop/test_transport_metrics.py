"""The SIP transports' refusals on ``/metrics``, against a real running proxy: a TLS
handshake that fails, a TLS connection over the per-source cap, messages past
``max_message_bytes`` over UDP and TLS, a half message that times out over TLS, and a
TLS upstream whose certificate names another host. Each shows as the counter
(``side`` and ``reason``/``transport`` labels) the README names, and matches
``/status`` ``sip.transports``."""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import HOST, ProxyFactory
from dnsserver import DnsServer
from test_operations import scrape
from test_tls_dns import TlsUas, final_for
from x509ca import TestCa

from testkit.ports import free_port

OPTIONS = (
    f"OPTIONS sip:{HOST} SIP/2.0\r\n"
    f"Via: SIP/2.0/TLS {HOST}:9;branch=z9hG4bKmetrics\r\n"
    "Max-Forwards: 70\r\n"
    f"From: <sip:a@{HOST}>;tag=1\r\nTo: <sip:b@{HOST}>\r\n"
    "Call-ID: transport-metrics\r\nCSeq: 1 OPTIONS\r\n"
).encode()


def big_options(size: int) -> bytes:
    return OPTIONS + f"Content-Length: {size}\r\n\r\n".encode() + b"x" * size


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def closed(sock: socket.socket, timeout: float) -> bool:
    """The proxy closed ``sock`` within ``timeout`` (what it sent before is read over)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65535):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True
    return True


def test_transport_refusals_and_tls_failures_on_metrics(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    ca = TestCa(tmp_path)
    ours = ca.issue("proxy", ips=(HOST,))
    theirs = ca.issue("pbx", ("other.test",))  # the upstream is pbx.test: rejected
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(theirs.certificate, theirs.key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(ca.pem))
    tls_port = free_port()
    uas = TlsUas(context)
    try:
        with DnsServer({("pbx.test", "A"): [HOST]}) as dns:
            proxy = start_proxy(
                f"sips:pbx.test:{uas.port}",
                sip={"transports": ["udp", "tcp", "tls"], "max_message_bytes": 2000,
                     "tcp_message_timeout_s": 1},
                tls={"certificate": str(ours.certificate), "private_key": f"@{ours.key}",
                     "ca": str(ca.pem)},
                outside={"tls_listen": f"{HOST}:{tls_port}"},
                limits={"max_tcp_connections_per_source": 1},
                dns={"servers": [dns.server]},
            )  # fmt: skip
            before = scrape(proxy, None)
            for side in ("inside", "outside"):
                for reason in ("max_tcp_connections", "max_tcp_connections_per_source"):
                    key = f'sipura_sip_connections_refused_total{{reason="{reason}",side="{side}"}}'
                    assert before[key] == 0
                for reason in ("idle_timeout", "message_timeout"):
                    key = f'sipura_sip_connections_closed_total{{reason="{reason}",side="{side}"}}'
                    assert before[key] == 0
                for kind in ("udp", "tcp", "tls"):
                    key = f'sipura_sip_messages_too_large_total{{side="{side}",transport="{kind}"}}'
                    assert before[key] == 0
                assert before[f'sipura_sip_tls_handshakes_failed_total{{side="{side}"}}'] == 0
                assert before[f'sipura_sip_tls_connect_failures_total{{side="{side}"}}'] == 0

            # Plaintext to the TLS port: a failed incoming handshake.
            with socket.create_connection((HOST, tls_port), timeout=5) as plain:
                plain.sendall(big_options(0))
                assert closed(plain, 5)
            # One TLS connection from 127.0.0.1 is admitted, a second one refused.
            first = client.wrap_socket(socket.create_connection((HOST, tls_port), timeout=5),
                                       server_hostname=HOST)  # fmt: skip
            second = client.wrap_socket(socket.create_connection((HOST, tls_port), timeout=5),
                                        server_hostname=HOST)  # fmt: skip
            assert closed(second, 5)
            second.close()
            # Too large over TLS (413), then half a message: closed after 1 s.
            first.sendall(big_options(3000))
            first.settimeout(5)
            assert first.recv(65535).startswith(b"SIP/2.0 413 ")
            first.sendall(OPTIONS[:40])
            assert closed(first, 5)
            first.close()
            # Too large over UDP on the inside.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(5)
                udp.sendto(big_options(3000).replace(b"/TLS", b"/UDP"), (HOST, proxy.inside))
                assert udp.recv(65535).startswith(b"SIP/2.0 413 ")
            # A call toward the TLS upstream whose certificate names another host.
            status, _ = final_for(proxy.inside, 15)
            assert status in (408, 503), status
            assert uas.requests == []

            def after() -> dict[str, float]:
                return scrape(proxy, None)

            until(lambda: after()['sipura_sip_tls_connect_failures_total{side="outside"}'] >= 1)
            now = after()
            expected = {
                'sipura_sip_tls_handshakes_failed_total{side="outside"}': 1,
                'sipura_sip_tls_handshakes_failed_total{side="inside"}': 0,
                'sipura_sip_connections_refused_total{reason="max_tcp_connections_per_source",'
                'side="outside"}': 1,
                'sipura_sip_connections_refused_total{reason="max_tcp_connections",'
                'side="outside"}': 0,
                'sipura_sip_connections_closed_total{reason="message_timeout",side="outside"}': 1,
                'sipura_sip_messages_too_large_total{side="outside",transport="tls"}': 1,
                'sipura_sip_messages_too_large_total{side="inside",transport="udp"}': 1,
                'sipura_sip_messages_too_large_total{side="outside",transport="udp"}': 0,
                'sipura_sip_tls_connect_failures_total{side="inside"}': 0,
            }
            assert {key: now[key] for key in expected} == expected
            # The same counts as /status shows.
            transports = proxy.status()["sip"]["transports"]
            outside = transports["outside"]
            assert outside["tls_handshakes_failed"] == 1
            assert outside["tcp"]["refused"] == {"max_tcp_connections_per_source": 1}
            assert outside["too_large"] == {"tls": 1}
            assert (
                outside["tls_failures"]
                == now['sipura_sip_tls_connect_failures_total{side="outside"}']
            )
            assert proxy.alive()
    finally:
        uas.close()
