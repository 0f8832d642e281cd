"""SIP over TLS gets the bounds SIP over TCP has, on real loopback sockets, on the stdlib
loop and uvloop: the message size cap (413, the connection goes on), the connection caps
(total and per source, shared with TCP), the message and idle timeouts, and a flood of
clients that never start their handshake (at most ``MAX_HANDSHAKES`` at once, each one
timed out, the listener still serving a good client afterwards)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.sip import tls_listener
from proxy.sip import transport as transport_module
from proxy.sip.transaction import Address
from proxy.sip.transport import SipTransport, TlsSettings, TransportLimits
from testkit.ports import HOST, free_port
from tests.sip.test_transport import BIG_OPTIONS, OPTIONS, closed_by_peer, runner, small_limits
from tests.sip.test_transport_tls import client_context, wait_until
from tests.x509ca import TestCa

__all__ = ["runner"]  # the fixture (both loops), used by name

TLS_OPTIONS = OPTIONS.replace(b"SIP/2.0/TCP", b"SIP/2.0/TLS")
TLS_BIG_OPTIONS = BIG_OPTIONS.replace(b"SIP/2.0/TCP", b"SIP/2.0/TLS")


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    """The proxy's server context (a certificate for 127.0.0.1) and a client context
    that trusts it."""
    ca = TestCa(tmp_path)
    issued = ca.issue("proxy", ips=(HOST,))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(issued.certificate, issued.key)
    yield server, client_context(ca.pem)


@pytest.fixture
def fast_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "SWEEP_INTERVAL_S", 0.05)


Got = list[tuple[bytes, Address]]


async def started(
    server: ssl.SSLContext, limits: TransportLimits, *, handshake_timeout_s: float = 5.0,
    transports: tuple[str, ...] = ("tls",),
) -> tuple[SipTransport, Got, int]:  # fmt: skip
    """A transport listening for TLS (and ``transports``) on free ports; its TLS port."""
    got: Got = []
    settings = TlsSettings((HOST, free_port()), server, None, handshake_timeout_s)
    transport = SipTransport("inside", HOST, free_port(), lambda d, a: got.append((d, a)),
                             settings, limits=limits)  # fmt: skip
    await transport.start(transports)
    assert transport.tls_address is not None
    return transport, got, transport.tls_address[1]


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def tls_from(source: str, port: int, client: ssl.SSLContext) -> Stream:
    """A TLS connection from ``source`` (another loopback address: another host) whose
    handshake has completed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    return await asyncio.open_connection(sock=sock, ssl=client, server_hostname=HOST)


async def tls_closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """The server closed the TLS connection (EOF, reset, or a TLS error) within
    ``timeout``; False when it is still open then."""
    try:
        return await asyncio.wait_for(reader.read(65536), timeout) == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def close_all(streams: list[Stream]) -> None:
    for _, writer in streams:
        with contextlib.suppress(Exception):
            writer.close()


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sipura.transport" and text in r.getMessage()]  # fmt: skip


def test_oversized_tls_message_answered_413_and_the_connection_goes_on(
    runner: asyncio.Runner, pki: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server, client = pki
    caplog.set_level(logging.WARNING, "sipura.transport")

    async def scenario() -> None:
        transport, got, port = await started(server, small_limits())
        try:
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=client, server_hostname=HOST
            )
            writer.write(TLS_BIG_OPTIONS[:1000])  # the head: Content-Length 5000 > 2000
            await writer.drain()
            reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert reply.startswith(b"SIP/2.0 413 ")
            assert b"Call-ID: transport-test" in reply
            writer.write(TLS_BIG_OPTIONS[1000:] + TLS_OPTIONS)  # its body skipped, then one more
            await writer.drain()
            await wait_until(lambda: bool(got))
            assert [data for data, _ in got] == [TLS_OPTIONS]
            assert got[0][1].transport == "tls"
            assert transport.snapshot()["too_large"] == {"tls": 1}
            writer.close()
        finally:
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 20))
    assert len(lines(caplog, "TLS message of 5")) == 1
    assert "exceeds max_message_bytes (2000)" in lines(caplog, "TLS message of")[0]


def test_tls_header_section_past_the_cap_closes_the_connection(
    runner: asyncio.Runner, pki: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:  # fmt: skip
    """As over TCP: a head that never ends within max_message_bytes cannot be framed
    nor answered; the connection is closed and nothing reaches the core."""
    server, client = pki

    async def scenario() -> None:
        transport, got, port = await started(server, small_limits())
        try:
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=client, server_hostname=HOST
            )
            writer.write(b"OPTIONS sip:x SIP/2.0\r\nX-Long: " + b"a" * 3000)
            await writer.drain()
            assert await tls_closed(reader, 5)
            assert got == []
            writer.close()
        finally:
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 20))


def test_tls_connections_count_against_the_tcp_caps_with_one_log_line(
    runner: asyncio.Runner, pki: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """max_tcp_connections_per_source (3) and max_tcp_connections (6) over TLS, and one
    table for TCP and TLS: a plain TCP connection from a source whose share TLS took is
    refused too."""
    server, client = pki
    caplog.set_level(logging.WARNING, "sipura.transport")

    async def scenario() -> None:
        transport, _, port = await started(server, small_limits(), transports=("tcp", "tls"))
        same: list[Stream] = []
        others: list[Stream] = []
        try:
            for _ in range(5):  # one source: three pass, two are closed at once
                same.append(await tls_from(HOST, port, client))
            closed = [await tls_closed(reader, 0.3) for reader, _ in same]
            assert closed == [False, False, False, True, True]
            assert transport._server is not None
            tcp_port = transport._server.sockets[0].getsockname()[1]
            plain = await asyncio.open_connection(HOST, tcp_port)  # same source, over TCP
            assert await closed_by_peer(plain[0], 3.0)
            plain[1].close()
            for index in range(5):  # three more sources: the total cap (6) stops the 4th
                others.append(await tls_from(f"127.0.0.{2 + index}", port, client))
            closed = [await tls_closed(reader, 0.3) for reader, _ in others]
            assert closed == [False, False, False, True, True]
            snap = transport.snapshot()["tcp"]
            assert isinstance(snap, dict)
            assert snap["accepted"] == 6
            assert snap["refused"] == {
                "max_tcp_connections_per_source": 3,
                "max_tcp_connections": 2,
            }
            assert transport.tls_handshakes_failed == 0  # refused after a good handshake
            # The ones admitted still carry SIP.
            same[0][1].write(TLS_OPTIONS)
            await same[0][1].drain()
        finally:
            close_all(same + others)
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 30))
    refused = lines(caplog, "refused")
    per_source = [m for m in refused if "max_tcp_connections_per_source (3)" in m]
    assert len(per_source) == 1, refused  # rate-limited per reason and source
    assert per_source[0].startswith(f"inside: TLS connection from {HOST}:")
    assert len([m for m in refused if "max_tcp_connections (6)" in m]) == 2  # two sources


@pytest.mark.usefixtures("fast_sweep")
def test_stalled_and_idle_tls_connections_are_closed(
    runner: asyncio.Runner, pki: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server, client = pki
    caplog.set_level(logging.WARNING, "sipura.transport")

    async def scenario() -> None:
        limits = small_limits(message_timeout_s=0.5, idle_timeout_s=2.0, max_per_source=10)
        transport, got, port = await started(server, limits)
        streams: list[Stream] = []
        try:
            half = await tls_from(HOST, port, client)
            idle = await tls_from(HOST, port, client)
            silent = await tls_from(HOST, port, client)
            streams += [half, idle, silent]
            idle[1].write(TLS_OPTIONS)
            half[1].write(TLS_OPTIONS[:40])  # half a message, then nothing
            await wait_until(lambda: len(got) == 1)
            assert await tls_closed(half[0], 5.0)
            assert await tls_closed(silent[0], 5.0)
            assert not await tls_closed(idle[0], 0.05)
            assert await tls_closed(idle[0], 5.0)
            snap = transport.snapshot()["tcp"]
            assert isinstance(snap, dict)
            assert snap["closed"] == {"message_timeout": 2, "idle_timeout": 1}
            await wait_until(lambda: len(transport.table) == 0)
        finally:
            close_all(streams)
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 30))
    assert len(lines(caplog, "closed: message_timeout")) == 1  # one source: rate-limited
    assert lines(caplog, "closed: idle_timeout")[0].startswith(f"inside: TLS {HOST}:")


FLOOD = 300
"""Clients that connect to the TLS port and never send a ClientHello: more than
:data:`~proxy.sip.tls_listener.MAX_HANDSHAKES`."""


def test_a_flood_of_silent_tls_clients_is_bounded_and_the_listener_goes_on(
    runner: asyncio.Runner, pki: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server, client = pki
    cap = tls_listener.MAX_HANDSHAKES
    caplog.set_level(logging.WARNING, "sipura.transport")

    async def scenario() -> None:
        transport, got, port = await started(server, small_limits(), handshake_timeout_s=2.0)
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        in_progress = handshakes_in_progress(transport)
        try:
            peak = 0
            for _ in range(FLOOD):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                socks.append(sock)
                await loop.sock_connect(sock, (HOST, port))
                peak = max(peak, in_progress())
            refused = FLOOD - cap  # closed at once: no room for their handshake
            await wait_until(lambda: transport.tls_handshakes_failed >= refused)
            peak = max(peak, in_progress())
            assert peak <= cap
            assert in_progress() > 0 or transport.tls_handshakes_failed > refused
            # Every one of them is closed: at once, or when its handshake timed out.
            closed = await asyncio.gather(*(eof(loop, sock, 10.0) for sock in socks))
            assert all(closed), closed.count(False)
            await wait_until(lambda: transport.tls_handshakes_failed == FLOOD, 10.0)
            assert in_progress() == 0
            # The listener still serves a good client.
            _, writer = await asyncio.open_connection(HOST, port, ssl=client, server_hostname=HOST)
            writer.write(TLS_OPTIONS)
            await writer.drain()
            await wait_until(lambda: bool(got))
            assert [data for data, _ in got] == [TLS_OPTIONS]
            writer.close()
            assert transport.tls_handshakes_failed == FLOOD
        finally:
            for sock in socks:
                sock.close()
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 60))
    failed = lines(caplog, "TLS handshake from")
    assert len([m for m in failed if m.endswith(f"more than {cap} handshakes at once")]) == 1
    assert len([m for m in failed if m.endswith("timed out")]) == 1  # one source


def handshakes_in_progress(transport: SipTransport) -> Callable[[], int]:
    def read() -> int:
        value = transport.snapshot()["tls_handshakes_in_progress"]
        assert isinstance(value, int)
        return value

    return read


async def eof(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bool:
    """The server closed ``sock`` (EOF or reset) within ``timeout``."""
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 1), timeout) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True
