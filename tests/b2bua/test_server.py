"""The asyncio edge around the B2BUA core: its timer, on the stdlib loop and uvloop."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Iterator

import pytest

from proxy.b2bua.config import parse_config
from proxy.b2bua.server import TIMER_GRID_S, ProxyServer

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])

CONFIG = """
[inside]
listen = "127.0.0.1:15060"
media_ip = "127.0.0.1"
[outside]
listen = "127.0.0.1:15080"
media_ip = "127.0.0.1"
"""


@pytest.fixture(params=LOOPS)
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    factory = asyncio.new_event_loop
    if request.param == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as r:
        yield r


def test_timer_armed_for_a_deadline_already_past(
    runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: uvloop's call_at() for a time already past returns a plain Handle
    (no when()); re-arming then raised AttributeError out of the message handler, which
    on TCP killed the connection the message came on."""

    async def scenario() -> None:
        server = ProxyServer(parse_config(CONFIG))
        loop = asyncio.get_running_loop()
        server._loop = loop
        deadlines = [loop.time() - 1.0] * 3
        polled: list[float] = []
        monkeypatch.setattr(
            server.core, "next_deadline", lambda: deadlines[0] if deadlines else None
        )

        def poll(now: float) -> list[object]:
            polled.append(now)
            deadlines.clear()
            return []

        monkeypatch.setattr(server.core, "poll", poll)
        try:
            server._arm()
            server._arm()  # the same (past) deadline again: must not touch Handle.when()
            for _ in range(100):
                if polled:
                    break
                await asyncio.sleep(0.01)
            assert len(polled) == 1
        finally:
            server.close()

    runner.run(asyncio.wait_for(scenario(), 10))


def test_timers_of_nearby_deadlines_share_one_wake_up(
    runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge arms its timer once per loop iteration, whatever the number of messages
    handled in it, on a 10 ms grid: deadlines a few ms apart are polled together (the
    poll sees every one of them due), never before the latest of them."""

    async def scenario() -> None:
        server = ProxyServer(parse_config(CONFIG))
        loop = asyncio.get_running_loop()
        server._loop = loop
        grid = TIMER_GRID_S
        base = math.ceil((loop.time() + 0.05) / grid) * grid
        deadlines = [base + 0.001, base + 0.004, base + 0.009]
        asked: list[float | None] = []

        def next_deadline() -> float | None:
            asked.append(deadlines[0] if deadlines else None)
            return deadlines[0] if deadlines else None

        polled: list[float] = []

        def poll(now: float) -> list[object]:
            polled.append(now)
            while deadlines and deadlines[0] <= now:
                deadlines.pop(0)
            return []

        monkeypatch.setattr(server.core, "next_deadline", next_deadline)
        monkeypatch.setattr(server.core, "poll", poll)
        try:
            for _ in range(10):  # ten messages handled in one loop iteration
                server._send([])
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert len(asked) == 1
            for _ in range(100):
                if not deadlines:
                    break
                await asyncio.sleep(0.01)
            assert len(polled) == 1 and polled[0] >= base + 0.009, (polled, base)
            assert deadlines == []
        finally:
            server.close()

    runner.run(asyncio.wait_for(scenario(), 10))
