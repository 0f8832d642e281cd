"""SIP over TLS and RFC 3263 against real peers on 127.0.0.1: a TLS upstream whose
certificate comes from a test CA (and one whose certificate names another host), and
SRV failover against a local DNS server. Each peer is a real socket server: a TLS UAS
built on the standard library's ``ssl``, UDP UASes, and a dnspython DNS server."""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import HOST, ProxyFactory, status_of
from dnsserver import DnsServer
from x509ca import TestCa


def invite(port: int) -> bytes:
    branch = "z9hG4bK" + uuid.uuid4().hex
    return (
        f"INVITE sip:18005550199@{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:9;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:100@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:18005550199@{HOST}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@{HOST}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:100@{HOST}:9>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def final_for(port: int, timeout: float) -> tuple[int, float]:
    """A phone's INVITE to the proxy's inside: the final status and how long it took."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        start = time.monotonic()
        sock.sendto(invite(port), (HOST, port))
        while (left := start + timeout - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(65535)
            except TimeoutError:
                break
            if status_of(reply) >= 200:
                return status_of(reply), time.monotonic() - start
    return 0, timeout


def answer(request: bytes, status: int, reason: str) -> bytes:
    head = request.split(b"\r\n\r\n", 1)[0].decode()
    keep = [
        line for line in head.split("\r\n")[1:]
        if line.split(":", 1)[0].lower() in ("via", "from", "call-id", "cseq")
    ]  # fmt: skip
    to = next(line for line in head.split("\r\n") if line.lower().startswith("to:"))
    lines = [f"SIP/2.0 {status} {reason}", *keep, f"{to};tag=uas1", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class TlsUas:
    """Accepts TLS, reads one SIP request per connection read, answers ``status``."""

    def __init__(self, context: ssl.SSLContext, status: int = 486) -> None:
        self.context = context
        self.status = status
        self.requests: list[bytes] = []
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
                conn.settimeout(5)
                data = conn.recv(65535)
                while data:
                    self.requests.append(data)
                    if data.startswith(b"INVITE"):
                        conn.sendall(answer(data, self.status, "Busy Here"))
                    data = conn.recv(65535)
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def tls_tables(ca: TestCa, dns: DnsServer) -> dict[str, dict[str, Any]]:
    """Config tables for a proxy that may use TLS upstream, trusting the test CA and
    resolving names through the test's DNS server."""
    return {
        "sip": {"transports": ["udp", "tcp", "tls"]},
        "tls": {"ca": str(ca.pem)},
        "dns": {"servers": [dns.server]},
    }


@pytest.mark.parametrize("right_name", [True, False])
def test_a_tls_upstream_is_checked_against_its_host_name(
    start_proxy: ProxyFactory, tmp_path: Path, right_name: bool
) -> None:
    ca = TestCa(tmp_path)
    issued = ca.issue("pbx", ("pbx.test",) if right_name else ("other.test",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.certificate, issued.key)
    uas = TlsUas(context)
    try:
        with DnsServer({("pbx.test", "A"): [HOST]}) as dns:
            proxy = start_proxy(f"sips:pbx.test:{uas.port}", **tls_tables(ca, dns))
            status, took = final_for(proxy.inside, 15)
            if right_name:
                assert status == 486  # the UAS's answer, over TLS
                assert uas.requests and uas.requests[0].startswith(b"INVITE sips:")
                assert b"SIP/2.0/TLS" in uas.requests[0]
            else:
                assert status in (408, 503), status  # the call fails cleanly
                assert took < 10  # at the failed handshake, not after timer B
                assert uas.requests == []
                assert "certificate rejected" in proxy.log_text()
            assert proxy.alive()
    finally:
        uas.close()


class UdpUas:
    def __init__(self, status: int, reason: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.invites = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(status, reason), daemon=True)
        self._thread.start()

    def _serve(self, status: int, reason: str) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if data.startswith(b"INVITE"):
                self.invites += 1
                self.sock.sendto(answer(data, status, reason), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_srv_targets_fail_over_from_503(start_proxy: ProxyFactory) -> None:
    down, up = UdpUas(503, "Service Unavailable"), UdpUas(486, "Busy Here")
    zone = {
        ("_sip._udp.pbx.test", "SRV"): [
            f"10 0 {down.port} one.pbx.test.", f"20 0 {up.port} two.pbx.test."
        ],
        ("one.pbx.test", "A"): [HOST],
        ("two.pbx.test", "A"): [HOST],
    }  # fmt: skip
    try:
        with DnsServer(zone) as dns:
            dns_table = {"servers": [dns.server]}
            proxy = start_proxy("sip:pbx.test;transport=udp", dns=dns_table)
            status, _ = final_for(proxy.inside, 10)
            assert status == 486  # the second target's answer: the 503 never reached the phone
            assert (down.invites, up.invites) == (1, 1)
            assert ("_sip._udp.pbx.test", "SRV") in dns.queries
            status, _ = final_for(proxy.inside, 10)
            assert status == 486 and down.invites == 1  # held down: straight to the other
    finally:
        down.close()
        up.close()
