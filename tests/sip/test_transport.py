"""The asyncio SIP transport over real loopback sockets, on the stdlib loop and uvloop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator

import pytest

from proxy.sip.transaction import Address
from proxy.sip.transport import SipTransport

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])

OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKtransport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\n"
    b"To: <sip:b@127.0.0.1>\r\n"
    b"Call-ID: transport-test\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)


@pytest.fixture(params=LOOPS)
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    factory = asyncio.new_event_loop
    if request.param == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as r:
        yield r


def test_tcp_accept_receive_and_answer_on_the_same_connection(runner: asyncio.Runner) -> None:
    """Regression: uvloop's TCPTransport is no asyncio.Transport subclass, and an
    isinstance() assertion in connection_made killed every TCP connection under uvloop."""

    async def scenario() -> None:
        got: list[tuple[bytes, Address]] = []
        transport = SipTransport("inside", "127.0.0.1", 0, lambda d, a: got.append((d, a)))
        await transport.start(("tcp",))
        try:
            assert transport._server is not None
            port = transport._server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(OPTIONS)
            await writer.drain()
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert [data for data, _ in got] == [OPTIONS]
            source = got[0][1]
            assert source.transport == "tcp" and source.conn is not None
            transport.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", source)
            reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert reply.startswith(b"SIP/2.0 200 OK")
            writer.close()
        finally:
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 10))


def test_take_pings() -> None:
    from proxy.sip.pingpong import take_pings

    buffer = bytearray(b"\r\n\r\n\r\n\r\nINVITE")
    assert take_pings(buffer) == 2 and buffer == bytearray(b"INVITE")
    half = bytearray(b"\r\n")
    assert take_pings(half) == 0 and half == bytearray(b"\r\n")


def test_tcp_keepalive_ping_gets_a_pong(runner: asyncio.Runner) -> None:
    """RFC 5626 §4.4.1: CRLF CRLF between messages is answered with one CRLF, also when
    the ping arrives in two reads or right after a message."""

    async def scenario() -> None:
        got: list[bytes] = []
        transport = SipTransport("inside", "127.0.0.1", 0, lambda d, a: got.append(d))
        await transport.start(("tcp",))
        try:
            assert transport._server is not None
            port = transport._server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
            writer.write(b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"\r\n" + OPTIONS + b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\r\n\r\n"
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [OPTIONS]
            writer.close()
        finally:
            transport.close()

    runner.run(asyncio.wait_for(scenario(), 10))
