"""The asyncio SIP transport over real loopback sockets, on the stdlib loop and uvloop:
framing, the message size cap, TCP connection limits and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import sys
from collections.abc import Iterator

import pytest

from proxy.sip import transport as transport_module
from proxy.sip.connections import TcpLimits
from proxy.sip.transaction import Address
from proxy.sip.transport import SipTransport, TransportLimits

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


# --- limits: message size, TCP connections and timeouts -----------------------------------

BIG_OPTIONS = OPTIONS.replace(b"Content-Length: 0", b"Content-Length: 5000") + b"x" * 5000


def small_limits(**tcp: float) -> TransportLimits:
    fields: dict[str, float] = {
        "max_connections": 6, "max_per_source": 3, "idle_timeout_s": 60.0,
        "message_timeout_s": 60.0,
    }  # fmt: skip
    fields.update(tcp)
    return TransportLimits(max_message=2000, tcp=TcpLimits(**fields))  # type: ignore[arg-type]


async def started(limits: TransportLimits) -> tuple[SipTransport, list[tuple[bytes, Address]]]:
    got: list[tuple[bytes, Address]] = []
    transport = SipTransport(
        "inside", "127.0.0.1", 0, lambda d, a: got.append((d, a)), limits=limits
    )
    await transport.start(("udp", "tcp"))
    return transport, got


def tcp_port(transport: SipTransport) -> int:
    assert transport._server is not None
    return int(transport._server.sockets[0].getsockname()[1])


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(65536), timeout) == b""
    except (ConnectionError, TimeoutError):
        return isinstance(sys.exc_info()[1], ConnectionError)


def test_oversized_udp_request_answered_413_and_not_processed(
    runner: asyncio.Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        transport, got = await started(small_limits())
        assert transport._udp is not None
        port = transport._udp.get_extra_info("sockname")[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(3)
            for _ in range(3):
                sock.sendto(BIG_OPTIONS, ("127.0.0.1", port))
                reply = await asyncio.to_thread(sock.recv, 65535)
                assert reply.startswith(b"SIP/2.0 413 Request Entity Too Large")
                assert b"Call-ID: transport-test" in reply
            sock.sendto(OPTIONS, ("127.0.0.1", port))
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
        transport.close()
        assert [data for data, _ in got] == [OPTIONS]
        assert transport.snapshot()["too_large"] == {"udp": 3}

    with caplog.at_level("WARNING", logger="sipura.transport"):
        runner.run(asyncio.wait_for(scenario(), 10))
    assert len([r for r in caplog.records if "exceeds max_message_bytes" in r.message]) == 1


def test_oversized_tcp_message_answered_413_and_the_connection_goes_on(
    runner: asyncio.Runner,
) -> None:
    async def scenario() -> None:
        transport, got = await started(small_limits())
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(transport))
        writer.write(BIG_OPTIONS[:1000])
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert reply.startswith(b"SIP/2.0 413 ")
        writer.write(BIG_OPTIONS[1000:] + OPTIONS)
        await writer.drain()
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert [data for data, _ in got] == [OPTIONS]
        writer.close()
        transport.close()
        assert transport.snapshot()["too_large"] == {"tcp": 1}

    runner.run(asyncio.wait_for(scenario(), 10))


def test_tcp_per_source_and_total_caps_refuse_with_one_log_line(
    runner: asyncio.Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        transport, _ = await started(small_limits())
        port = tcp_port(transport)
        conns = []
        for _ in range(5):  # one source: three pass, two are closed at once
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        closed = [await closed_by_peer(reader, 0.3) for reader, _ in conns]
        assert closed == [False, False, False, True, True]
        others = []
        for index in range(5):  # another three sources: the total cap (6) stops the 4th
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((f"127.0.0.{2 + index}", 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            others.append(await asyncio.open_connection(sock=sock))
        closed = [await closed_by_peer(reader, 0.3) for reader, _ in others]
        assert closed == [False, False, False, True, True]
        snap = transport.snapshot()["tcp"]
        assert isinstance(snap, dict)
        assert snap["accepted"] == 6
        assert snap["refused"] == {"max_tcp_connections_per_source": 2, "max_tcp_connections": 2}
        for _, writer in conns + others:
            writer.close()
        transport.close()

    with caplog.at_level("WARNING", logger="sipura.transport"):
        runner.run(asyncio.wait_for(scenario(), 20))
    lines = [r.message for r in caplog.records if "refused" in r.message]
    assert len([m for m in lines if "max_tcp_connections_per_source (3)" in m]) == 1
    assert len([m for m in lines if "max_tcp_connections (6)" in m]) == 2  # two sources


@pytest.fixture
def fast_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "SWEEP_INTERVAL_S", 0.05)


@pytest.mark.usefixtures("fast_sweep")
def test_silent_slow_and_idle_connections_are_closed_held_flows_stay(
    runner: asyncio.Runner,
) -> None:
    async def scenario() -> None:
        limits = small_limits(message_timeout_s=0.5, idle_timeout_s=2.0, max_per_source=10)
        transport, got = await started(limits)
        port = tcp_port(transport)
        silent = await asyncio.open_connection("127.0.0.1", port)
        slow = await asyncio.open_connection("127.0.0.1", port)
        idle = await asyncio.open_connection("127.0.0.1", port)
        held = await asyncio.open_connection("127.0.0.1", port)
        for _, writer in (idle, held):
            writer.write(OPTIONS)
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        ports = {a.port: a for _, a in got}
        assert len(got) == 2, got
        held_flow = ports[held[1].get_extra_info("sockname")[1]]
        assert transport.hold_flow(held_flow, True)
        assert not transport.hold_flow(Address("127.0.0.1", 1, "tcp", conn=999_999), True)
        slow[1].write(OPTIONS[:20])
        for _ in range(12):  # a byte every 0.1 s never completes a message in time
            await asyncio.sleep(0.1)
            with contextlib.suppress(RuntimeError, ConnectionError):  # uvloop: once closed
                slow[1].write(b"X")
        assert await closed_by_peer(silent[0], 0.1)
        assert await closed_by_peer(slow[0], 0.1)
        assert not await closed_by_peer(idle[0], 0.1)
        assert await closed_by_peer(idle[0], 2.0)
        assert not await closed_by_peer(held[0], 1.0)
        assert transport.hold_flow(held_flow, False)
        assert await closed_by_peer(held[0], 2.0)
        snap = transport.snapshot()["tcp"]
        assert isinstance(snap, dict)
        assert snap["closed"] == {"message_timeout": 2, "idle_timeout": 2}
        assert snap["connections"] == 0
        transport.close()

    runner.run(asyncio.wait_for(scenario(), 20))
