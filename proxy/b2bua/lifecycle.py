"""The running process's lifecycle: signals, draining, systemd notifications.

* SIGTERM: drain (:meth:`B2BUA.start_drain <proxy.b2bua.core.B2BUA.start_drain>`). The
  proxy stops taking calls (new INVITEs, OPTIONS and REGISTERs get 503, ``/health``
  turns 503, systemd hears ``STOPPING=1``), calls in progress go on, and the process
  exits 0 when the last one ends or after ``[run] drain_s``, when the remaining calls
  are hung up (:meth:`B2BUA.hang_up_all <proxy.b2bua.core.B2BUA.hang_up_all>`: BYE with
  ``Reason: SIP;cause=503;text="proxy shutting down"`` on both legs, ringing calls
  cancelled) and given up to :data:`HANGUP_GRACE_S` for those to be answered.
* A second SIGTERM, or SIGINT at any time, skips the wait: hang up now, exit.
* SIGHUP: reload the configuration file (:meth:`ProxyServer.reload`).
* ``READY=1`` once every socket listens, ``WATCHDOG=1`` every half ``WATCHDOG_USEC``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from proxy.sdnotify import Notifier

if TYPE_CHECKING:
    from proxy.b2bua.server import ProxyServer

__all__ = ["Lifecycle"]

log = logging.getLogger("sipura.server")

POLL_S = 0.1
"""How often a drain looks at the calls left."""
HANGUP_GRACE_S = 2.0
"""After the BYEs of a drain's end, how long the process waits for their calls to end
(answers to the BYEs) before it exits anyway."""


MEDIA_FINAL_WAIT_S = 0.5
"""After the last call ended, how long the process waits for the media workers' final
counters of its sessions (a few ms), for exact totals and summaries; whatever is still
missing then is summed from the last reports."""


class Lifecycle:
    def __init__(self, server: ProxyServer, notifier: Notifier | None = None) -> None:
        self.server = server
        self.notifier = notifier or Notifier()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until drained or interrupted (the server is already started)."""
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.terminate,
            signal.SIGINT: self.interrupt,
            signal.SIGHUP: self.hangup,
        }
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        self.notifier.ready(self._status_line())
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._spawn(self._watchdog(interval))
        if ready is not None:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            for sig in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            for task in self._tasks:
                task.cancel()
            self.notifier.close()

    # --- signals ----------------------------------------------------------------------

    def terminate(self) -> None:
        if self._drain is None:
            self._drain = self._spawn(self._drain_calls())
        else:
            log.info("second SIGTERM: hanging up the remaining calls now")
            self._hurry.set()

    def interrupt(self) -> None:
        log.info("SIGINT: hanging up the remaining calls now")
        self._hurry.set()
        if self._drain is None:
            self._drain = self._spawn(self._drain_calls())

    def hangup(self) -> None:
        log.info("SIGHUP: reloading %s", self.server.config.source)
        self.notifier.reloading("reloading the configuration")
        self.server.reload()
        self.notifier.ready(self._status_line())

    # --- draining ---------------------------------------------------------------------

    async def _drain_calls(self) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        limit = server.config.run.drain_s
        started = loop.time()
        server.begin_drain()
        calls = len(server.core.calls)
        log.info("drain: waiting up to %d s for %d calls to end", limit, calls)
        self.notifier.stopping(f"draining {calls} calls")
        while server.core.calls and not self._hurry.is_set():
            if loop.time() - started >= limit:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), POLL_S)
        left = len(server.core.calls)
        if left:
            log.info("drain: hanging up %d calls still up after %.1f s", left,
                     loop.time() - started)  # fmt: skip
            server.hang_up_all()
            deadline = loop.time() + HANGUP_GRACE_S
            while server.core.calls and loop.time() < deadline:
                await asyncio.sleep(POLL_S)
        deadline = loop.time() + MEDIA_FINAL_WAIT_S
        while server.core.table.releasing and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the workers' final counters of the last calls
        log.info("drained in %.2f s (%d calls hung up); exiting", loop.time() - started, left)
        self._stop.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _status_line(self) -> str:
        config = self.server.config
        return (
            f"listening: inside {config.inside.listen_host}:{config.inside.listen_port}, "
            f"outside {config.outside.listen_host}:{config.outside.listen_port}"
        )
