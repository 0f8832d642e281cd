"""Admin endpoint HTTP server candidates, side by side (docs/decisions.md, "Admin endpoint").

Each candidate serves ``GET /health`` -> ``ok`` on 127.0.0.1 in this process; the probes
are raw sockets. Candidates: the hand-written HTTP/1.0 reader the proxy had
(``readline`` + split), aiohttp's low-level ``web.Server``, and ``proxy.admin.http``
(h11 + asyncio). Printed per candidate: HEAD has no body, three requests on one
keep-alive connection, a 64 KiB header, a slowloris trickle (one byte per 100 ms:
seconds until the server hangs up, capped at 12 s), 300 idle connections held open
(how many the server kept), requests/s for one keep-alive client, and import cost.

    python bench/admin_http.py
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

Start = Callable[[], Awaitable[tuple[int, Callable[[], None]]]]


async def hand_written() -> tuple[int, Callable[[], None]]:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            path = request.decode("latin-1").split(" ")[1] if request.count(b" ") >= 2 else "/"
            body = b"ok" if path == "/health" else json.dumps({"path": path}).encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (OSError, TimeoutError, IndexError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], server.close


async def aiohttp_lowlevel() -> tuple[int, Callable[[], None]]:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path != "/health":
            return web.Response(status=404, text="not found")
        return web.Response(text="ok")

    server = web.Server(handler)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0)
    return listener.sockets[0].getsockname()[1], listener.close


async def h11_ours() -> tuple[int, Callable[[], None]]:
    from proxy.admin.http import AdminHttp, Reply, Route

    server = AdminHttp({"/health": Route(frozenset({"GET"}), lambda: Reply(200, b"ok"), True)})
    _, port = await server.start("127.0.0.1", 0)
    return port, server.close


async def _get(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return out


async def probe_head(port: int) -> str:
    out = await _get(port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return "no body" if out.endswith(b"\r\n\r\n") else f"body sent ({out[-10:]!r})"


async def probe_keepalive(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    served = 0
    try:
        for _ in range(3):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            served += 1
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()
    return f"{served}/3"


async def probe_big_header(port: int) -> str:
    out = await _get(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 65536 + b"\r\n\r\n")
    return out.split(b"\r\n", 1)[0].decode(errors="replace") or "(no answer)"


async def probe_slowloris(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    payload = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-S: " + b"a" * 1000
    try:
        for byte in payload:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(100), 0.1)
            except TimeoutError:
                if time.monotonic() - started > 12:
                    return "held > 12 s"
                continue
            return f"closed after {time.monotonic() - started:.1f} s ({data[:12]!r})"
    except ConnectionError:
        return f"reset after {time.monotonic() - started:.1f} s"
    finally:
        writer.close()
    return "held"


async def probe_idle_connections(port: int, count: int = 300) -> str:
    held = []
    for _ in range(count):
        held.append(await asyncio.open_connection("127.0.0.1", port))
    await asyncio.sleep(0.5)
    open_ = 0
    for reader, writer in held:
        try:
            data = await asyncio.wait_for(reader.read(100), 0.002)
            open_ += 0 if (data == b"" or data.startswith(b"HTTP/1.1 503")) else 1
        except TimeoutError:
            open_ += 1
        writer.close()
    return f"{open_}/{count} kept open"


async def probe_rate(port: int, n: int = 2000) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    done = 0
    try:
        for _ in range(n):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            done += 1
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, IndexError):
        writer.close()
        return "no keep-alive: n/a"
    writer.close()
    return f"{done / (time.perf_counter() - start):,.0f} req/s"


def import_cost(module: str) -> str:
    """Wall time of the import and resident memory it adds, in a fresh interpreter."""
    code = (
        "import os, time\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        f"r0 = rss(); t = time.perf_counter(); import {module}\n"
        "print(round((time.perf_counter() - t) * 1000), round((rss() - r0) / 2**20, 1))"
    )
    ms, mib = subprocess.check_output([sys.executable, "-c", code], text=True).split()
    return f"import {ms} ms, +{mib} MiB"


async def main() -> None:
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    candidates: list[tuple[str, Start, str]] = [
        ("hand-written HTTP/1.0", hand_written, "asyncio"),
        ("aiohttp low-level Server", aiohttp_lowlevel, "aiohttp.web"),
        ("h11 + asyncio (proxy.admin.http)", h11_ours, "proxy.admin.http"),
    ]
    for name, start, module in candidates:
        port, close = await start()
        print(f"\n{name}  [{import_cost(module)}]")
        for label, probe in (
            ("HEAD", probe_head),
            ("keep-alive", probe_keepalive),
            ("64 KiB header", probe_big_header),
            ("slowloris", probe_slowloris),
            ("300 idle connections", probe_idle_connections),
            ("one client", probe_rate),
        ):
            print(f"  {label:<22} {await probe(port)}")
        close()


if __name__ == "__main__":
    asyncio.run(main())
