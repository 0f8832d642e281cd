"""The multi-process media engine: relays in worker processes, one per core by default.

:class:`WorkerPool` implements the same ``MediaEngine`` interface as the in-process
:class:`~proxy.media.relay.RelayEngine`, so the sans-IO B2BUA core does not know which
one it drives. Each worker process (:mod:`proxy.media.worker_process`) owns a slice of
the port range and runs a ``RelayEngine`` on its own event loop and core; the
per-packet path is exactly the in-process one. This module decides (which worker gets
a session, what a command or a report means, when a worker is dead);
:mod:`proxy.media.worker_link` moves the bytes.

Allocation stays synchronous with the ports known at once: this process binds the
session's RTP/RTCP sockets itself, from the chosen worker's slice (a ``PortAllocator``
per slice, skipping ports another process holds, as the relay does), hands them to the
worker with the ``Allocate`` message (SCM_RIGHTS) and closes its own copies. A port
goes back to the slice's allocator only when the worker reports the session's sockets
closed, or when the worker dies (the kernel closes its sockets: the whole slice is free).
The socket pool of the in-process engine is not used here: a pooled pair lives in a
worker, and knowing synchronously which ports a worker still has pooled would need
another round of bookkeeping for a saving (~12 % of set-up CPU) that the workers
already pay for several times over.

A media command (:meth:`WorkerPool.apply`) is checked here as the relay would check it
(so the core learns of a bad one at once), then sent as-is to the owning worker,
fire-and-forget; the worker's relay applies it with its own table. ``stats()`` answers
from the latest counters the worker pushed (every 100 ms for sessions that changed, at
once on a session's first inbound packet per side), so they may miss a released
session's last 100 ms: its final counters come with the worker's ``Closed`` and leave
as :class:`~proxy.media.commands.MediaReleased` (:attr:`WorkerPool.reports_final`;
the last reported ones for a session whose worker died). A fired ``WatchSrtp`` comes back as
an :class:`~proxy.media.channel.Authenticated` report and leaves through
:attr:`WorkerPool.on_event` as :class:`~proxy.media.commands.SrtpAuthenticated`, unless
a later watch or key overtook it. A session's first packet per side (stream 0) leaves
as :class:`~proxy.media.commands.MediaFlowing` (:attr:`WorkerPool.reports_flowing`),
and :attr:`WorkerPool.on_wakeup` is called as well. :meth:`WorkerPool.flush` sends the queued
commands before the server transmits the SIP they belong to: a worker learns a peer's
address before that peer can have been told where to send.

Assignment: the live worker with the fewest sessions (then the most free ports); a
worker whose slice cannot hold the session is skipped. A dead worker (end-of-file or an
error on its channel, an undecodable message, a stuck queue) is killed if need be,
reaped and logged with its pid and exit status; its sessions are reported as
:class:`~proxy.media.commands.SessionsLost` (the core hangs their calls up with a BYE
and a Reason on both legs), and a replacement starts on the same slice, at once the
first time and with a growing delay (up to 30 s) while replacements keep dying young;
a worker that cannot even be started (the interpreter not executable, no descriptors
left) counts as dying young too, and is logged once a minute with a count. With no
worker alive, allocation raises :class:`PortsExhausted`: new calls get 503 with
Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from proxy.media import channel as ch
from proxy.media.commands import (
    MediaCommand,
    MediaEvent,
    MediaFlowing,
    MediaReleased,
    Release,
    SessionsLost,
    SrtpAuthenticated,
)
from proxy.media.engine import MediaEngine, Side
from proxy.media.packet_path import resolve
from proxy.media.ports import PortAllocator, PortsExhausted
from proxy.media.relay_pool import bind_pair, media_addresses
from proxy.media.worker_link import WorkerSlot, reap
from proxy.media.worker_session import CHECKS, WorkerSession
from proxy.ratelimit import LogLimiter

__all__ = ["MIN_PAIRS_PER_WORKER", "WorkerPool", "WorkerSession", "split_range"]

log = logging.getLogger("sipura.media.workers")

MIN_PAIRS_PER_WORKER = 4
"""RTP/RTCP pairs a worker's slice must hold (two single-stream calls)."""
YOUNG_S = 10.0
"""A replacement that dies sooner than this counts toward the restart back-off."""
MAX_BACKOFF_S = 30.0
START_FAILURE_LOG_S = 60.0
"""At most one "cannot start" line per worker slot in this long (with the count)."""
WORKER_MODULE: Final = "proxy.media.worker_process"
"""What a worker runs: ``python -m`` this."""
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def split_range(port_min: int, port_max: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` slices of consecutive even-aligned pairs covering the range:
    ``(first RTP port, last RTCP port)`` each. Slices are cut in units of two pairs (a
    single-stream call when both legs share an address), as evenly as possible, and an
    odd pair goes to the last slice, so splitting wastes no call's worth of ports."""
    first = port_min + (port_min & 1)
    pairs = len(range(first, port_max, 2))
    units = pairs // 2
    if workers < 1 or units < workers:
        raise ValueError(f"{pairs} port pairs cannot be split among {workers} workers")
    slices = []
    start = 0
    for index in range(workers):
        count = 2 * (units // workers + (1 if index < units % workers else 0))
        if index == workers - 1:
            count = pairs - start
        slices.append((first + 2 * start, first + 2 * (start + count) - 1))
        start += count
    return slices


class WorkerPool:
    """``MediaEngine`` over ``workers`` processes, each owning an even share of
    ``port_min..port_max``. :meth:`start` (inside the running loop) spawns them."""

    def __init__(
        self,
        inside_ip: str,
        outside_ip: str,
        port_min: int,
        port_max: int,
        workers: int,
        *,
        log_level: str = "info",
        log_format: str = "text",
        clock: Callable[[], float] = time.monotonic,
        fast_path: str = "auto",
    ) -> None:
        self._ips = media_addresses(inside_ip, outside_ip)
        self._workers = [
            WorkerSlot(index, lo, hi)
            for index, (lo, hi) in enumerate(split_range(port_min, port_max, workers))
        ]
        for w in self._workers:
            w.on_message = self._report
            w.on_failure = self._fail
            w.on_wakeup = self._wakeup
        self._log = (log_level, log_format)
        self.packet_path = resolve(fast_path)
        """The packet path every worker runs (``[media] fast_path`` resolved here, so a
        compiled path that cannot run is refused before any worker starts)."""
        self.clock = clock
        self._noise = LogLimiter(log, interval_s=START_FAILURE_LOG_S)
        self._failed_starts: dict[int, int] = {}
        """Per worker slot: spawns that failed since its last successful start."""
        self._sids = itertools.count(1)
        self._live: dict[int, WorkerSession] = {}
        """Every allocated, not released, not lost session, by id."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.on_event: Callable[[MediaEvent], None] | None = None
        """See :attr:`MediaEngine.on_event`: called from the loop (a channel reader or a
        callback), never re-entrantly."""
        self.on_wakeup: Callable[[], object] | None = None
        """Called when counters arrive that may let the B2BUA act (a first packet)."""
        self.reports_flowing = True
        """Every session's first packet per side is a ``MediaFlowing`` event."""
        self.reports_final = True
        """Every released session's final counters are a ``MediaReleased`` event: the
        worker's, sent with ``Closed``; the last reported, if the worker died first."""
        self._lost: dict[int, WorkerSession] = {}
        """Sessions lost with their worker and not released yet: their release is
        answered at once with their last counters."""

    def __repr__(self) -> str:
        alive = sum(w.alive for w in self._workers)
        return f"WorkerPool({alive}/{len(self._workers)} workers, {self.sessions} sessions)"

    # --- status -----------------------------------------------------------------------

    @property
    def sessions(self) -> int:
        return len(self._live)

    @property
    def pooled(self) -> int:
        return 0

    def pooled_ports(self) -> list[int]:
        return []

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, alive, sessions, port_min, port_max, restarts,
        ports_free (RTP/RTCP pairs of its slice not in use), packet_path."""
        return [{**w.describe(), "packet_path": self.packet_path} for w in self._workers]

    # --- processes --------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers (they take commands at once: the channel buffers them)."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        for worker in self._workers:
            self._spawn(worker)

    def _spawn(self, w: WorkerSlot) -> None:
        w.restart = None
        if self._closing or self._loop is None:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for sock in (parent, child):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            inside, outside = self._ips[Side.INSIDE][0], self._ips[Side.OUTSIDE][0]
            command = [
                sys.executable, "-m", WORKER_MODULE, "--fd", str(child.fileno()),
                "--index", str(w.index), "--inside-ip", inside, "--outside-ip", outside,
                "--port-min", str(w.port_min), "--port-max", str(w.port_max),
                "--log-level", self._log[0], "--log-format", self._log[1],
                "--packet-path", self.packet_path,
            ]  # fmt: skip
            path = os.environ.get("PYTHONPATH")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, path]))}
            proc = subprocess.Popen(
                command, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env
            )
        except OSError as exc:
            parent.close()
            # A spawn that fails (EACCES on the interpreter, EMFILE, ENOMEM) is a death
            # at age 0: the same back-off, and one log line per minute with a count.
            w.started_at = self.clock()
            self._failed_starts[w.index] = self._failed_starts.get(w.index, 0) + 1
            delay = self._schedule_restart(w, quiet=True)
            self._noise.log(logging.ERROR, "media worker start failure", str(w.index),
                            self.clock(), "media worker %d: cannot start: %s; retrying in "
                            "%.1f s", w.index, exc, delay)  # fmt: skip
            return
        finally:
            child.close()
        w.connect(proc, parent, self._loop)
        w.started_at = self.clock()
        failed = self._failed_starts.pop(w.index, 0)
        log.info("media worker %d started: pid %d, ports %d-%d%s", w.index, proc.pid,
                 w.port_min, w.port_max,
                 f" (after {failed} failed attempts)" if failed else "")  # fmt: skip

    def _schedule_restart(self, w: WorkerSlot, *, quiet: bool = False) -> float:
        """Start a replacement for ``w``: at once after a long life, else after a delay
        doubling with each young death (2, 4, 8... up to 30 s). Returns the delay."""
        if self._closing or self._loop is None or w.restart is not None:
            return 0.0
        if self.clock() - w.started_at < YOUNG_S:
            w.young_deaths += 1
        else:
            w.young_deaths = 0
        delay = 0.0 if w.young_deaths <= 1 else min(MAX_BACKOFF_S, 0.5 * 2**w.young_deaths)
        if delay and not quiet:
            log.warning("media worker %d: restarting in %.1f s", w.index, delay)
        w.restarts += 1
        w.restart = self._loop.call_later(delay, self._spawn, w)
        return delay

    def _fail(self, w: WorkerSlot, reason: str, grace_s: float = 0.0) -> None:
        """``w`` is dead or broken: kill and reap it, free its slice, report its
        sessions (soon, not from inside whatever call noticed), start a replacement."""
        if not w.alive:
            return
        w.alive = False
        w.disconnect()
        status = reap(w.proc, grace_s=grace_s)
        lost = self._drop_sessions(w)
        self._lost.update((session.id, session) for session in lost)
        self._finals_soon(w.closing.values())
        w.closing.clear()
        w.ports_of.clear()
        w.ports = PortAllocator(w.port_min, w.port_max)
        pid = w.proc.pid if w.proc is not None else 0
        log.error("media worker %d (pid %d) died: %s, exit status %s; %d sessions lost",
                  w.index, pid, reason, status, len(lost))  # fmt: skip
        if self._loop is not None and lost:
            event = SessionsLost(tuple(session.id for session in lost), reason)
            self._loop.call_soon(self._emit, event)
        self._schedule_restart(w)

    def _drop_sessions(self, w: WorkerSlot) -> list[WorkerSession]:
        """``w``'s sessions relay nothing any more: commands for them go nowhere, their
        counters stay as last reported."""
        lost = list(w.sessions.values())
        for session in lost:
            session.dead = True
            self._live.pop(session.id, None)
        w.sessions.clear()
        return lost

    def _finals_soon(self, sessions: Iterable[WorkerSession]) -> None:
        """The ``MediaReleased`` of released sessions whose worker will not report them:
        their last reported counters, on a later loop iteration (never from inside the
        core's own call into the engine)."""
        if self._loop is None:
            return
        for session in sessions:
            self._loop.call_soon(self._emit, MediaReleased(session.id, session.stats()))

    def close_now(self) -> None:
        """Stop every worker: the channel closes, each worker releases its sessions and
        exits; one still running after 2 s is killed. Blocks until they are reaped."""
        self._closing = True
        for w in self._workers:
            if w.restart is not None:
                w.restart.cancel()
                w.restart = None
            self._drop_sessions(w)
            w.alive = False
            w.disconnect()
        for w in self._workers:
            reap(w.proc, grace_s=2.0)

    async def close(self) -> None:
        self._closing = True
        procs = [w.proc for w in self._workers if w.alive and w.proc is not None]
        for w in self._workers:
            if w.alive:
                w.alive = False
                w.disconnect()
        deadline = self.clock() + 2.0
        while any(p.poll() is None for p in procs) and self.clock() < deadline:
            await asyncio.sleep(0.02)
        self.close_now()

    # --- reports and events -----------------------------------------------------------

    def flush(self) -> None:
        """Send the queued commands now. The server calls it before it transmits what
        the B2BUA answered, so a worker hears of a new peer address before the SIP
        message that lets the peer send media does (instead of at the end of the loop
        iteration): fewer early packets dropped as ``wrong_source``."""
        for w in self._workers:
            if w.pending:
                w.flush()

    def _report(self, w: WorkerSlot, message: ch.ChannelMessage) -> bool:
        """One report from ``w``; True when the B2BUA should look at its calls soon."""
        handler = _REPORTS.get(type(message))
        if handler is None:
            self._fail(w, f"unexpected {type(message).__name__} from the worker")
            return False
        return handler(self, w, message)

    def _stats(self, w: WorkerSlot, message: ch.Stats) -> bool:
        wake = False
        for sid, counters in message.sessions:
            session = w.sessions.get(sid)
            if session is not None:
                for side in session.update(counters):
                    wake = True
                    self._emit(MediaFlowing(sid, side))
        return wake

    def _authenticated(self, w: WorkerSlot, message: ch.Authenticated) -> bool:
        session = w.sessions.get(message.session)
        if session is not None and session.fired(message.side, message.watch):
            self._emit(SrtpAuthenticated(session.id, message.side))
        return False

    def _closed(self, w: WorkerSlot, message: ch.Closed) -> bool:
        for port in w.ports_of.pop(message.session, ()):
            w.ports.release(port)
        session = w.closing.pop(message.session, None)
        if session is not None:
            if message.counters:
                session.update(message.counters)
            self._emit(MediaReleased(session.id, session.stats()))
        return False

    def _emit(self, event: MediaEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("media event handler failed on %s", event)

    def _wakeup(self) -> None:
        if self.on_wakeup is not None:
            self.on_wakeup()

    # --- sessions and commands --------------------------------------------------------

    def allocate(self, call_id: str, streams: int) -> WorkerSession:
        if streams < 1:
            raise ValueError(f"a session needs at least one stream, not {streams}")
        if 4 * streams > ch.MAX_FDS:
            raise PortsExhausted(f"{streams} streams: more sockets than one message carries")
        live = [w for w in self._workers if w.alive]
        if not live:
            raise PortsExhausted("no media worker is running")
        live.sort(key=lambda w: (len(w.sessions), -w.ports.available))
        for w in live:
            if w.ports.available < 2 * streams:
                continue
            try:
                held, ports, local = self._bind(w, streams)
            except PortsExhausted:
                continue
            sid = next(self._sids)
            session = WorkerSession(w, sid, call_id, streams, local)
            w.sessions[sid] = session
            w.ports_of[sid] = ports
            w.send(ch.Allocate(sid, call_id, streams), held)
            if not w.alive:  # the send failed: that worker is gone
                continue
            self._live[sid] = session
            return session
        raise PortsExhausted("no media worker has port pairs left for this session")

    def _bind(
        self, w: WorkerSlot, streams: int
    ) -> tuple[list[socket.socket], list[int], dict[Side, list[tuple[str, int]]]]:
        held: list[socket.socket] = []
        ports: list[int] = []
        local: dict[Side, list[tuple[str, int]]] = {Side.INSIDE: [], Side.OUTSIDE: []}
        try:
            for _ in range(streams):
                for side, (ip, family) in self._ips.items():
                    port, rtp, rtcp = bind_pair(w.ports, ip, family)
                    held += (rtp, rtcp)
                    ports.append(port)
                    local[side].append((ip, port))
        except (PortsExhausted, OSError) as exc:
            for sock in held:
                sock.close()
            for port in ports:
                w.ports.release(port)
            if isinstance(exc, PortsExhausted):
                raise
            raise PortsExhausted(f"cannot bind media ports: {exc}") from exc
        return held, ports, local

    def apply(self, command: MediaCommand) -> None:
        """See :meth:`MediaEngine.apply`: checked here by the table
        :data:`~proxy.media.worker_session.CHECKS` (the relay's own refusals, at once),
        then sent to the session's worker as it is."""
        session = self._live.get(command.session)
        if session is None:
            if type(command) is Release and (lost := self._lost.pop(command.session, None)):
                self._finals_soon([lost])  # its worker died: the last counters are final
            return  # released, lost with its worker, or never allocated
        CHECKS[type(command)](session, command)
        if type(command) is Release:
            self._live.pop(session.id, None)
            session.worker.sessions.pop(session.id, None)
            session.worker.closing[session.id] = session  # final counters with Closed
        session.worker.send(command)


_REPORTS: Final[dict[type, Callable[[WorkerPool, WorkerSlot, Any], bool]]] = {
    ch.Stats: WorkerPool._stats,
    ch.Authenticated: WorkerPool._authenticated,
    ch.Closed: WorkerPool._closed,
}
"""What :meth:`WorkerPool._report` does with each report of a worker."""


if TYPE_CHECKING:

    def _conforms(engine: WorkerPool) -> MediaEngine:
        return engine
