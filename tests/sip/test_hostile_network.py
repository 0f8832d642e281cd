"""The SIP-layer floods of the hostile-network run, against a real ``sipura-proxy run``.

Each test starts the proxy as a process on 127.0.0.1 (free ports, a UDP sink as its
upstream), replays one attack, bounded in count and time, and checks what the proxy
shows in ``/status`` and its log, and that it still answers. The figures (RSS, CPU per
segment, latency) are measured by ``bench/flood.py``; the bounds here are wide.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testkit.ports import HOST, media_range
from testkit.processes import processes
from testkit.proxy import LocalProxy, dump_logs_on_failure

MB = 1024 * 1024


@dataclass
class RunningProxy:
    """A :class:`~testkit.proxy.LocalProxy` and what these tests read of its process."""

    proxy: LocalProxy

    @property
    def inside(self) -> int:
        return self.proxy.inside

    @property
    def pid(self) -> int:
        return self.proxy.pid

    def status(self) -> dict[str, Any]:
        return self.proxy.status()

    def log(self) -> str:
        return self.proxy.log_text()

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@contextlib.contextmanager
def running_proxy(
    tmp_path: Path, sip: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
    soft_nofile: int | None = None,
) -> Iterator[RunningProxy]:  # fmt: skip
    """A proxy whose upstream is a UDP socket that never answers; ``soft_nofile``: the
    soft descriptor limit it starts with (it inherits this process's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink, processes() as procs:
        sink.bind((HOST, 0))
        proxy = LocalProxy("hostile", tmp_path, media=media_range(8))
        proxy.write_config(upstream=sink.getsockname()[1], log_level="info",
                           media={"workers": 0}, sip=sip or {}, limits=limits or {})  # fmt: skip
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            if soft_nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, hard))
            proxy.start(procs)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with dump_logs_on_failure(proxy):
            proxy.wait_up()
            yield RunningProxy(proxy)
            assert proxy.alive(), f"the proxy died:\n{proxy.log_text()}"


def options(port: int, *, pad: int = 0, where: str = "", tag: str | None = None) -> bytes:
    branch = secrets.token_hex(8)
    tag = tag or branch[:8]
    body = b"b" * pad if where == "body" else b""
    extra = f"X-Pad: {'x' * pad}\r\n" if where == "header" else ""
    display = f'"{secrets.token_hex(8)}{"d" * pad}" ' if where == "from" else ""
    return (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:9;branch=z9hG4bK{branch};rport\r\nMax-Forwards: 70\r\n"
        f"From: {display}<sip:probe@{HOST}>;tag={tag}\r\nTo: <sip:{HOST}:{port}>\r\n"
        f"Call-ID: {branch}@{HOST}\r\nCSeq: 1 OPTIONS\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def exchange(sock: socket.socket, port: int, data: bytes, timeout: float = 3.0) -> bytes:
    sock.settimeout(timeout)
    sock.sendto(data, (HOST, port))
    while True:
        reply = sock.recv(65535)
        if not reply.startswith(b"SIP/2.0 1"):
            return reply


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        yield sock


def test_big_requests_are_not_kept_for_the_transaction_lifetime(
    tmp_path: Path, udp: socket.socket
) -> None:
    """Regression: each 64 KB request was kept whole for 32 s (680 MB at 300/s)."""
    with running_proxy(tmp_path) as proxy:
        before = proxy.rss()
        for index in range(600):
            where = ("body", "header")[index % 2]
            reply = exchange(udp, proxy.inside, options(proxy.inside, pad=60_000, where=where))
            assert reply.startswith(b"SIP/2.0 200 OK")
        layer = proxy.status()["sip"]["transactions"]["inside"]
        assert layer["server"] >= 600  # all alive still (timer J: 32 s)...
        assert layer["retained_bytes"] < 600 * 5000  # ...but none keeps its 60 KB
        assert proxy.rss() - before < 20 * MB  # kept whole, they were 36 MB


def test_unique_huge_header_values_do_not_fill_the_caches(
    tmp_path: Path, udp: socket.socket
) -> None:
    """Regression: 2,100 datagrams with unique 30 KB values pinned 252 MB of caches."""
    with running_proxy(tmp_path) as proxy:
        for _ in range(300):
            reply = exchange(udp, proxy.inside, options(proxy.inside, pad=30_000, where="from"))
            assert reply.startswith(b"SIP/2.0 200 OK")
        caches = proxy.status()["sip"]["caches"]
        assert set(caches) >= {"uri", "name_addr", "via", "cseq", "header_names"}
        assert all(cache["text_chars"] <= cache["entries"] * 256 for cache in caches.values())
        assert caches["name_addr"]["text_chars"] < 300 * 1000


def test_message_cap_413_and_a_spent_transaction_budget_still_answers(
    tmp_path: Path, udp: socket.socket
) -> None:
    with running_proxy(tmp_path, sip={"max_message_bytes": 4000}) as proxy:
        reply = exchange(udp, proxy.inside, options(proxy.inside, pad=5000, where="body"))
        assert reply.startswith(b"SIP/2.0 413 Request Entity Too Large")
        assert exchange(udp, proxy.inside, options(proxy.inside)).startswith(b"SIP/2.0 200")
        transports = proxy.status()["sip"]["transports"]
        assert transports["inside"]["too_large"] == {"udp": 1}
        assert "exceeds max_message_bytes (4000)" in proxy.log()


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(2)
    sock.connect((HOST, port))
    return sock


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_tcp_connection_limits_and_timeouts(tmp_path: Path, udp: socket.socket) -> None:
    """Regression: idle, partial and slow connections were never closed; 1,100 idle
    connections took every descriptor with nothing logged. Also: the soft descriptor
    limit is raised to the hard one at start."""
    sip = {"tcp_message_timeout_s": 2, "tcp_idle_timeout_s": 3}
    limits = {"max_tcp_connections": 8, "max_tcp_connections_per_source": 5}
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with running_proxy(tmp_path, sip, limits, soft_nofile=256) as proxy:
        limits_text = Path(f"/proc/{proxy.pid}/limits").read_text()
        soft = next(line for line in limits_text.splitlines() if line.startswith("Max open"))
        assert soft.split()[3] == str(hard)
        idle_fds = proxy.fds()
        same = [connect_from(HOST, proxy.inside) for _ in range(7)]
        others = [connect_from(f"127.0.0.{2 + i}", proxy.inside) for i in range(4)]
        assert [closed_by_peer(s, 0.05) for s in same] == [False] * 5 + [True] * 2
        assert [closed_by_peer(s, 0.05) for s in others] == [False] * 3 + [True]
        assert exchange(udp, proxy.inside, options(proxy.inside)).startswith(b"SIP/2.0 200")
        # One connection sends a message then idles; one trickles a header byte by byte.
        talker, slow = others[0], same[0]
        talker.sendall(options(proxy.inside).replace(b"UDP", b"TCP"))
        assert talker.recv(65535).startswith(b"SIP/2.0 200")
        slow.sendall(b"OPTIONS sip:x SIP/2.0\r\nX-Slow: ")
        for _ in range(25):
            with contextlib.suppress(OSError):
                slow.send(b"a")
            time.sleep(0.1)
        assert closed_by_peer(slow, 0.5)  # the message did not complete within 2 s
        assert closed_by_peer(others[1], 0.5)  # silent since accepted: closed at 2 s
        assert not closed_by_peer(talker, 0.05)  # idle, but not for 3 s yet
        assert closed_by_peer(talker, 3.0)
        status = proxy.status()["sip"]["transports"]["inside"]["tcp"]
        assert status["refused"] == {
            "max_tcp_connections_per_source": 2,
            "max_tcp_connections": 1,
        }
        assert status["closed"]["idle_timeout"] == 1
        assert status["closed"]["message_timeout"] == 7
        assert status["connections"] == 0
        for sock in same + others:
            sock.close()
        deadline = time.monotonic() + 5
        while proxy.fds() > idle_fds and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.fds() <= idle_fds
        log = proxy.log()
        assert log.count("refused: max_tcp_connections_per_source (5) reached") == 1
        assert "refused: max_tcp_connections (8) reached" in log
        assert "closed: message_timeout" in log and "closed: idle_timeout" in log


def test_runtime_raises_the_descriptor_limit_and_trims_the_heap() -> None:
    import asyncio

    from proxy.runtime import descriptor_limit, raise_descriptor_limit, start_heap_trimming

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_descriptor_limit() == descriptor_limit() == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    async def trimming() -> bool:
        started = start_heap_trimming(0.01)
        await asyncio.sleep(0.05)  # a few rounds run without error
        return started

    assert asyncio.run(trimming()) is True  # glibc: malloc_trim is there


def test_heap_returner_collects_fully_only_for_pinned_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full collection (it empties the interpreter's free lists, whose spare objects
    pinned a flood's arenas) runs only when resident memory stands 20 MB above its low
    point while the live objects are back near theirs, at most once a minute; a trim
    runs every time."""
    from proxy import runtime

    resident, blocks = [100 * MB], [200_000]
    collections: list[int] = []
    trims: list[int] = []
    monkeypatch.setattr(runtime, "_resident", lambda: resident[0])
    monkeypatch.setattr(runtime.sys, "getallocatedblocks", lambda: blocks[0])
    monkeypatch.setattr(runtime.gc, "collect", lambda: collections.append(1) or 0)
    released: list[int] = []
    returner = runtime._HeapReturner(lambda pad: trims.append(pad) or 1,
                                     lambda: released.append(1))  # fmt: skip
    resident[0], blocks[0] = 160 * MB, 600_000  # a flood: the memory is in use
    returner.run(10.0)
    assert collections == []
    blocks[0] = 235_000  # over: objects being freed...
    returner.run(15.0)
    assert collections == []
    blocks[0] = 230_000  # ...and freed, the pages still held
    returner.run(20.0)
    assert len(collections) == 1
    returner.run(30.0)
    assert len(collections) == 1  # at most once a minute
    returner.run(80.0)
    assert len(collections) == 2
    resident[0] = 105 * MB  # back near the low point: nothing to do
    returner.run(200.0)
    assert len(collections) == 2 and len(trims) == 6
    assert len(released) == 2  # caches emptied before each full collection
