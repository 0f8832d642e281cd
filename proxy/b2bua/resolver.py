"""Name lookups for the call core: the I/O edge's side of :mod:`proxy.b2bua.routing`.

The core never resolves a name itself (it is sans-IO): it asks :meth:`SystemResolver.
request` and goes on with other work; the answer comes back through
``B2BUA.resolved`` once the lookup finishes, with the targets in the order to try.
This resolver asks the system's resolver (``getaddrinfo``) in the event loop's executor,
so a slow DNS server delays only the requests that need that name. ``getaddrinfo``
reports no TTL, so answers are kept for :data:`ANSWER_TTL_S` and failures for
:data:`FAILURE_TTL_S`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from proxy.b2bua.routing import ResolveQuery
from proxy.sip.transaction import Address

log = logging.getLogger("sipura.dns")

ANSWER_TTL_S = 300.0
FAILURE_TTL_S = 30.0
LOOKUP_TIMEOUT_S = 5.0

Answer = Callable[[ResolveQuery, list[Address], float], None]
"""Where answers go: (query, targets, ttl seconds)."""


class SystemResolver:
    def __init__(self, answer: Answer, timeout_s: float = LOOKUP_TIMEOUT_S) -> None:
        self._answer = answer
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, query: ResolveQuery) -> None:
        task = asyncio.get_running_loop().create_task(self._lookup(query))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, query: ResolveQuery) -> None:
        port = query.port or (5061 if query.transport == "tls" else 5060)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(query.host, port, type=socket.SOCK_DGRAM), self._timeout_s
            )
        except (OSError, TimeoutError) as exc:
            log.warning("cannot resolve %s: %s", query.host, exc or "timed out")
            self._answer(query, [], FAILURE_TTL_S)
            return
        targets: list[Address] = []
        for info in infos:
            target = Address(str(info[4][0]), port, query.transport)
            if target not in targets:
                targets.append(target)
        self._answer(query, targets, ANSWER_TTL_S)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
