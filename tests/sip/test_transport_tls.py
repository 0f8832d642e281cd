"""Incoming TLS that never gets through the handshake, on real loopback sockets, on the
stdlib loop and uvloop: plaintext SIP on the TLS port, garbage, a client that rejects the
proxy's certificate, one that never speaks. Each is one log line (rate-limited per
reason and source) and a count, and the listener goes on serving a good client."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.sip.transaction import Address
from proxy.sip.transport import SipTransport, TlsSettings
from tests.sip.test_transport import OPTIONS, runner
from tests.x509ca import TestCa

__all__ = ["runner"]  # the fixture (both loops), used by name

HOST = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 0.5


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[TestCa, ssl.SSLContext]]:
    """The proxy's CA and its server context (a certificate for 127.0.0.1)."""
    ca = TestCa(tmp_path)
    issued = ca.issue("proxy", ips=(HOST,))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(issued.certificate, issued.key)
    yield ca, server


def client_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    return context


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """The server closed (EOF or reset) without sending SIP."""
    try:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        while data and not data.startswith(b"SIP/2.0"):  # a TLS alert record, then EOF
            data = await asyncio.wait_for(reader.read(65536), timeout)
    except (ConnectionResetError, ssl.SSLError):
        return True
    return data == b""


async def raw_attempt(port: int, payload: bytes) -> bool:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(payload)
    closed = await closed_by_server(reader)
    writer.close()
    return closed


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sipura.transport" and "TLS handshake from" in r.getMessage()]  # fmt: skip


def test_failed_incoming_handshakes_are_one_line_each_and_the_listener_goes_on(
    runner: asyncio.Runner, pki: tuple[TestCa, ssl.SSLContext], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ca, server = pki
    other_ca = TestCa(tmp_path / "other") if (tmp_path / "other").mkdir() is None else None
    assert other_ca is not None
    caplog.set_level(logging.DEBUG, "sipura.transport")

    async def scenario() -> None:
        got: list[tuple[bytes, Address]] = []
        settings = TlsSettings((HOST, 0), server, None, HANDSHAKE_TIMEOUT_S)
        transport = SipTransport("outside", HOST, 0, lambda d, a: got.append((d, a)), settings)
        await transport.start(("udp", "tls"))
        try:
            assert transport.tls_address is not None
            port = transport.tls_address[1]

            # 1. Plaintext SIP to the TLS port (a phone with the wrong transport).
            assert await raw_attempt(port, OPTIONS)
            # 2. Garbage: a TLS record whose ClientHello is nonsense.
            body = b"\x01\x00\x00\x30" + os.urandom(48)
            assert await raw_attempt(port, b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body)
            # 3. A client that does not trust the proxy's certificate.
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection(HOST, port, ssl=client_context(other_ca.pem),
                                              server_hostname=HOST)  # fmt: skip
            # 4. A client that connects and never says anything: the handshake timeout.
            reader, writer = await asyncio.open_connection(HOST, port)
            assert await closed_by_server(reader, HANDSHAKE_TIMEOUT_S + 5)
            writer.close()
            await wait_until(lambda: transport.tls_handshakes_failed == 4)
            lines = failures(caplog)
            assert len(lines) == 4, lines
            assert "wrong version number" in lines[0] or "http request" in lines[0], lines
            assert lines[2].endswith(("tlsv1 alert unknown ca", "closed by the client")), lines
            assert lines[3].endswith("timed out"), lines
            assert all(f"outside: TLS handshake from {HOST}:" in line for line in lines)

            # 5. The same again, many times: counted, not logged again (rate-limited).
            for _ in range(20):
                assert await raw_attempt(port, OPTIONS)
            await wait_until(lambda: transport.tls_handshakes_failed == 24)
            assert len(failures(caplog)) == 4

            # The listener still serves a good client, both ways.
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=client_context(ca.pem), server_hostname=HOST
            )
            writer.write(OPTIONS)
            await writer.drain()
            await wait_until(lambda: bool(got))
            assert [data for data, _ in got] == [OPTIONS]
            source = got[0][1]
            assert source.transport == "tls" and source.conn is not None
            transport.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", source)
            reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert reply.startswith(b"SIP/2.0 200 OK")
            writer.close()
            assert transport.tls_handshakes_failed == 24
        finally:
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 30))


async def wait_until(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)
