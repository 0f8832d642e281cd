"""The admin HTTP server against raw sockets: routing, auth, HEAD, keep-alive, bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from proxy.admin.http import AdminHttp, HttpLimits, Reply, Route

GET = frozenset({"GET"})
POST = frozenset({"POST"})


def _routes() -> dict[str, Route]:
    return {
        "/health": Route(GET, lambda: Reply(200, b"ok"), public=True),
        "/status": Route(GET, lambda: Reply(200, b"{}", "application/json")),
        "/reload": Route(POST, lambda: Reply(200, b"reloaded\n")),
        "/boom": Route(GET, lambda: 1 / 0),  # type: ignore[arg-type,return-value]
    }


Serve = Callable[..., Awaitable[tuple[AdminHttp, int]]]


def _run(test: Callable[[Serve], Awaitable[None]]) -> Callable[[], None]:
    """Run ``test`` in a fresh loop with a ``serve`` helper; servers closed after."""

    def wrapper() -> None:
        async def main() -> None:
            servers: list[AdminHttp] = []

            async def start(token: str | None = None, **limits: float) -> tuple[AdminHttp, int]:
                server = AdminHttp(_routes(), token, HttpLimits(**limits))  # type: ignore[arg-type]
                _, port = await server.start("127.0.0.1", 0)
                servers.append(server)
                return server, port

            try:
                await test(start)
            finally:
                for server in servers:
                    server.close()

        asyncio.run(main())

    wrapper.__name__ = test.__name__
    return wrapper


async def _exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(1 << 20), timeout)
    finally:
        writer.close()


async def _read_all(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    finally:
        writer.close()
    return out


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@_run
async def test_routes_404_405_head(serve: Serve) -> None:
    _, port = await serve()
    ok = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(ok) == 200 and ok.endswith(b"\r\n\r\nok")
    assert _status(await _exchange(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")) == 404
    wrong = await _exchange(port, b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert _status(wrong) == 405 and b"Allow: GET, HEAD\r\n" in wrong
    assert _status(await _exchange(port, b"GET /reload HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    head = await _read_all(port, b"HEAD /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(head) == 200 and head.endswith(b"\r\n\r\n") and b"Content-Length: 2" in head
    assert _status(await _exchange(port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")) == 500
    # HTTP/1.0 clients (the old `calls` command) still work.
    old = await _read_all(port, b"GET /status HTTP/1.0\r\n\r\n")
    assert _status(old) == 200 and old.endswith(b"{}")


@_run
async def test_keep_alive_serves_several_requests_on_one_connection(serve: Serve) -> None:
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(2) == b"ok"
        # Pipelined: two requests in one segment, two responses in order.
        writer.write(
            b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first = await asyncio.wait_for(reader.readuntil(b"{}"), 5)
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 404")
    finally:
        writer.close()


@_run
async def test_token_guards_everything_but_health(serve: Serve) -> None:
    _, port = await serve(token="s3cret-token")
    req = b"GET /status HTTP/1.1\r\nHost: x\r\n%s\r\n"
    assert _status(await _exchange(port, req % b"")) == 401
    assert _status(await _exchange(port, req % b"Authorization: Bearer wrong\r\n")) == 401
    assert _status(await _exchange(port, req % b"Authorization: Basic s3cret-token\r\n")) == 401
    ok = await _exchange(port, req % b"Authorization: Bearer s3cret-token\r\n")
    assert _status(ok) == 200
    assert _status(await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
    post = b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n%s\r\n"
    assert _status(await _exchange(port, post % b"")) == 401
    assert _status(await _exchange(port, post % b"authorization: bearer s3cret-token\r\n")) == 200


@_run
async def test_malformed_and_oversized_requests(serve: Serve) -> None:
    _, port = await serve(max_request_bytes=2048, max_headers=8, max_body_bytes=16)
    assert _status(await _read_all(port, b"GARBAGE\r\n\r\n")) == 400
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    assert _status(await _read_all(port, big)) == 431
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 9 + b"\r\n"
    assert _status(await _read_all(port, many)) == 431
    body = b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    assert _status(await _read_all(port, body)) == 413


@_run
async def test_slowloris_is_cut_off_at_the_request_timeout(serve: Serve) -> None:
    server, port = await serve(request_timeout_s=0.5, idle_timeout_s=5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    closed_at = None
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
            if reader.at_eof() or writer.is_closing():
                break
            try:
                data = await asyncio.wait_for(reader.read(100), 0.001)
            except TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 408") or not data:
                closed_at = time.monotonic() - started
                break
    finally:
        writer.close()
    assert closed_at is not None and closed_at < 1.5
    assert server.connections == 0


@_run
async def test_idle_keep_alive_connection_is_closed(serve: Serve) -> None:
    server, port = await serve(idle_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(10), 2) == b""  # closed, nothing sent
    finally:
        writer.close()
    await asyncio.sleep(0.05)
    assert server.connections == 0


@_run
async def test_connection_cap(serve: Serve) -> None:
    server, port = await serve(max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.05)
    busy = await _read_all(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _status(busy) == 503 and server.refused == 1
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.05)
    ok = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _status(ok) == 200
