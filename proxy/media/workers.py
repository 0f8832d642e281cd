"""The multi-process media engine: relays in worker processes, one per core by default.

:class:`WorkerEngine` implements the same synchronous ``MediaEngine`` interface as the
in-process :class:`~proxy.media.relay.RelayEngine`, so the sans-IO B2BUA core does not
know which one it drives. Each worker process (:mod:`proxy.media.worker`) owns a slice
of the port range and runs a ``RelayEngine`` on its own event loop and core; the
per-packet path is exactly the in-process one.

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

Every other session method is a fire-and-forget message to the owning worker (keys
as key material plus an id that keeps identity, addresses, tones as ToneScript,
``now`` on the system-wide monotonic clock). ``stats()`` answers from the latest
counters the worker pushed (every 100 ms for sessions that changed, at once on a
session's first inbound packet per side); ``on_srtp_authenticated`` keeps the callback
here and the worker reports the event once. :attr:`WorkerEngine.on_wakeup` is called
when a report may let the B2BUA act (first packets), like the SRTP callback does.

The messages of one loop iteration go as one datagram (one wake-up of the worker per
SIP message handled, not one per command), and :meth:`WorkerEngine.flush` sends them
before the server transmits the SIP they belong to: a worker learns a peer's address
before that peer can have been told where to send.

Assignment: the live worker with the fewest sessions (then the most free ports); a
worker whose slice cannot hold the session is skipped. Sends never block: the channel
is non-blocking with a bounded queue, and a worker whose queue overflows is stuck and
treated as dead. A dead worker (end-of-file or an error on its channel, an
undecodable message, a stuck queue) is killed if need be, reaped and logged with its
pid and exit status; its sessions are reported through :attr:`WorkerEngine.on_lost`
(the server hangs their calls up with a BYE and a Reason on both legs), and a
replacement starts on the same slice, at once the first time and with a growing delay
(up to 30 s) while replacements keep dying young. With no worker alive, allocation
raises :class:`PortsExhausted`: new calls get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.media import channel as ch
from proxy.media.engine import MediaEngine, Side, SrtpCallback, StreamStats
from proxy.media.ports import PortAllocator, PortsExhausted
from proxy.media.relay import COUNTERS, bind_pair, check_remote, stats_from
from proxy.media.srtp import SrtpContext
from proxy.media.tones import Tone

__all__ = ["MIN_PAIRS_PER_WORKER", "WorkerEngine", "WorkerSession", "split_range"]

log = logging.getLogger("sipura.media.workers")

MIN_PAIRS_PER_WORKER = 4
"""RTP/RTCP pairs a worker's slice must hold (two single-stream calls)."""
BATCH = 64
"""Messages per batch at most (a batch stays far below :data:`channel.MAX_MESSAGE`)."""
MAX_QUEUE = 10_000
"""Batches waiting for a worker that does not read: beyond, it is stuck (killed)."""
YOUNG_S = 10.0
"""A replacement that dies sooner than this counts toward the restart back-off."""
MAX_BACKOFF_S = 30.0
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


class _Worker:
    """One worker slot: its slice of ports, its process and channel, its sessions."""

    def __init__(self, index: int, port_min: int, port_max: int) -> None:
        self.index = index
        self.port_min = port_min
        self.port_max = port_max
        self.ports = PortAllocator(port_min, port_max)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.alive = False
        self.sessions: dict[int, WorkerSession] = {}
        """Allocated and not released."""
        self.ports_of: dict[int, list[int]] = {}
        """RTP ports per session, until the worker reports its sockets closed."""
        self.queue: deque[tuple[bytes, list[socket.socket]]] = deque()
        """Datagrams the channel would not take yet (the worker is behind)."""
        self.writing = False
        self.pending: list[bytes] = []
        """Messages of this loop iteration, sent as one batch at its end."""
        self.pending_fds: list[socket.socket] = []
        self.flushing = False
        self.restarts = 0
        self.young_deaths = 0
        self.started_at = 0.0
        self.restart: asyncio.TimerHandle | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.proc.pid if self.proc is not None else None,
            "alive": self.alive,
            "sessions": len(self.sessions),
            "port_min": self.port_min,
            "port_max": self.port_max,
            "restarts": self.restarts,
            "ports_free": self.ports.available,
        }


class WorkerEngine:
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
    ) -> None:
        self._ips: dict[Side, tuple[str, socket.AddressFamily]] = {}
        for side, ip in ((Side.INSIDE, inside_ip), (Side.OUTSIDE, outside_ip)):
            address = ipaddress.ip_address(ip)
            if address.is_unspecified:
                raise ValueError(f"{side} media address must be a real address, not {ip}")
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            self._ips[side] = (str(address), family)
        self._workers = [
            _Worker(index, lo, hi)
            for index, (lo, hi) in enumerate(split_range(port_min, port_max, workers))
        ]
        self._log = (log_level, log_format)
        self.clock = clock
        self._sids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.on_lost: Callable[[list[WorkerSession]], object] | None = None
        """Called (from the loop, never re-entrantly) with the live sessions of a worker
        that died: they relay nothing any more."""
        self.on_wakeup: Callable[[], object] | None = None
        """Called when counters arrive that may let the B2BUA act (a first packet)."""

    def __repr__(self) -> str:
        alive = sum(w.alive for w in self._workers)
        return f"WorkerEngine({alive}/{len(self._workers)} workers, {self.sessions} sessions)"

    # --- status -----------------------------------------------------------------------

    @property
    def sessions(self) -> int:
        return sum(len(w.sessions) for w in self._workers)

    @property
    def pooled(self) -> int:
        return 0

    def pooled_ports(self) -> list[int]:
        return []

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, alive, sessions, port_min, port_max, restarts,
        ports_free (RTP/RTCP pairs of its slice not in use)."""
        return [w.describe() for w in self._workers]

    # --- processes --------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers (they take commands at once: the channel buffers them)."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        for worker in self._workers:
            self._spawn(worker)

    def _spawn(self, w: _Worker) -> None:
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
                sys.executable, "-m", "proxy.media.worker", "--fd", str(child.fileno()),
                "--index", str(w.index), "--inside-ip", inside, "--outside-ip", outside,
                "--port-min", str(w.port_min), "--port-max", str(w.port_max),
                "--log-level", self._log[0], "--log-format", self._log[1],
            ]  # fmt: skip
            path = os.environ.get("PYTHONPATH")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, path]))}
            w.proc = subprocess.Popen(
                command, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env
            )
        except OSError as exc:
            parent.close()
            log.error("media worker %d: cannot start: %s", w.index, exc)
            self._schedule_restart(w)
            return
        finally:
            child.close()
        parent.setblocking(False)
        w.sock = parent
        w.alive = True
        w.started_at = self.clock()
        w.ports = PortAllocator(w.port_min, w.port_max)
        self._loop.add_reader(parent.fileno(), self._readable, w)
        log.info("media worker %d started: pid %d, ports %d-%d", w.index, w.proc.pid,
                 w.port_min, w.port_max)  # fmt: skip

    def _schedule_restart(self, w: _Worker) -> None:
        if self._closing or self._loop is None or w.restart is not None:
            return
        if self.clock() - w.started_at < YOUNG_S:
            w.young_deaths += 1
        else:
            w.young_deaths = 0
        delay = 0.0 if w.young_deaths <= 1 else min(MAX_BACKOFF_S, 0.5 * 2**w.young_deaths)
        if delay:
            log.warning("media worker %d: restarting in %.1f s", w.index, delay)
        w.restarts += 1
        w.restart = self._loop.call_later(delay, self._spawn, w)

    def _fail(self, w: _Worker, reason: str, grace_s: float = 0.0) -> None:
        """``w`` is dead or broken: kill and reap it, free its slice, report its
        sessions (soon, not from inside whatever call noticed), start a replacement."""
        if not w.alive:
            return
        w.alive = False
        self._disconnect(w)
        status = _reap(w.proc, grace_s=grace_s)
        lost = list(w.sessions.values())
        for session in lost:
            session._dead = True
        w.sessions.clear()
        w.ports_of.clear()
        w.ports = PortAllocator(w.port_min, w.port_max)
        pid = w.proc.pid if w.proc is not None else 0
        log.error("media worker %d (pid %d) died: %s, exit status %s; %d sessions lost",
                  w.index, pid, reason, status, len(lost))  # fmt: skip
        if self._loop is not None and lost and self.on_lost is not None:
            self._loop.call_soon(self.on_lost, lost)
        self._schedule_restart(w)

    def _disconnect(self, w: _Worker) -> None:
        sock, w.sock = w.sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
                if w.writing:
                    self._loop.remove_writer(sock.fileno())
            sock.close()
        w.writing = False
        for held_sock in w.pending_fds:
            held_sock.close()
        w.pending, w.pending_fds = [], []
        while w.queue:
            for held in w.queue.popleft()[1]:
                held.close()

    def close_now(self) -> None:
        """Stop every worker: the channel closes, each worker releases its sessions and
        exits; one still running after 2 s is killed. Blocks until they are reaped."""
        self._closing = True
        for w in self._workers:
            if w.restart is not None:
                w.restart.cancel()
                w.restart = None
            for session in w.sessions.values():
                session._dead = True
            w.sessions.clear()
            w.alive = False
            self._disconnect(w)
        for w in self._workers:
            _reap(w.proc, grace_s=2.0)

    async def close(self) -> None:
        self._closing = True
        procs = [w.proc for w in self._workers if w.alive and w.proc is not None]
        self.close_now_channels()
        deadline = self.clock() + 2.0
        while any(p.poll() is None for p in procs) and self.clock() < deadline:
            await asyncio.sleep(0.02)
        self.close_now()

    def close_now_channels(self) -> None:
        for w in self._workers:
            if w.alive:
                w.alive = False
                self._disconnect(w)

    # --- the channel ------------------------------------------------------------------

    def _send(
        self, w: _Worker, message: ch.Message, held: list[socket.socket] | None = None
    ) -> None:
        """Queue ``message`` (and the sockets it hands over) for ``w``: the messages of
        one loop iteration leave together, in order, as one batch at its end."""
        if not w.alive or w.sock is None:
            for sock in held or ():
                sock.close()
            return
        w.pending.append(ch.encode(message))
        if held:
            w.pending_fds += held
        if len(w.pending) >= BATCH or len(w.pending_fds) > ch.MAX_FDS - 8:
            self._flush(w)
        elif not w.flushing:
            w.flushing = True
            if self._loop is None:
                self._flush(w)
            else:
                self._loop.call_soon(self._flush, w)

    def flush(self) -> None:
        """Send the queued commands now. The server calls it before it transmits what
        the B2BUA answered, so a worker hears of a new peer address before the SIP
        message that lets the peer send media does (instead of at the end of the loop
        iteration): fewer early packets dropped as ``wrong_source``."""
        for w in self._workers:
            if w.pending:
                self._flush(w)

    def _flush(self, w: _Worker) -> None:
        w.flushing = False
        if not w.pending:
            return
        data = ch.batch(w.pending) if len(w.pending) > 1 else w.pending[0]
        held, w.pending, w.pending_fds = w.pending_fds, [], []
        if not w.alive or w.sock is None:
            for sock in held:
                sock.close()
            return
        if not w.queue:
            try:
                if held:
                    socket.send_fds(w.sock, [data], [s.fileno() for s in held])
                else:
                    w.sock.send(data)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                for sock in held:
                    sock.close()
                self._fail(w, f"channel error: {exc}")
                return
            else:
                for sock in held:
                    sock.close()
                return
        if len(w.queue) >= MAX_QUEUE:
            for sock in held:
                sock.close()
            self._fail(w, f"stuck ({len(w.queue)} messages unread)")
            return
        w.queue.append((data, held))
        if not w.writing and self._loop is not None:
            w.writing = True
            self._loop.add_writer(w.sock.fileno(), self._writable, w)

    def _writable(self, w: _Worker) -> None:
        sock = w.sock
        if sock is None:
            return
        while w.queue:
            data, held = w.queue[0]
            try:
                if held:
                    socket.send_fds(sock, [data], [s.fileno() for s in held])
                else:
                    sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(w, f"channel error: {exc}")
                return
            w.queue.popleft()
            for held_sock in held:
                held_sock.close()
        if self._loop is not None:
            self._loop.remove_writer(sock.fileno())
        w.writing = False

    def _readable(self, w: _Worker) -> None:
        wake = False
        try:
            for _ in range(256):
                sock = w.sock
                if sock is None:
                    return
                try:
                    data = sock.recv(ch.MAX_MESSAGE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._fail(w, f"channel error: {exc}")
                    return
                if not data:
                    self._fail(w, "channel closed", grace_s=0.1)
                    return
                try:
                    messages = ch.decode_all(data)
                except ch.ChannelError as exc:
                    self._fail(w, f"bad message: {exc}")
                    return
                for message in messages:
                    wake = self._event(w, message) or wake
                    if not w.alive:
                        return
        finally:
            if wake and self.on_wakeup is not None:
                self.on_wakeup()

    def _event(self, w: _Worker, message: ch.Message) -> bool:
        """Apply one report; True when the B2BUA should look at its calls soon."""
        if isinstance(message, ch.Stats):
            wake = False
            for sid, counters in message.sessions:
                session = w.sessions.get(sid)
                if session is not None:
                    wake = session._update(counters) or wake
            return wake
        if isinstance(message, ch.Authenticated):
            session = w.sessions.get(message.sid)
            if session is not None:
                session._authenticated(message.side, message.token)
        elif isinstance(message, ch.Closed):
            for port in w.ports_of.pop(message.sid, ()):
                w.ports.release(port)
        else:
            self._fail(w, f"unexpected {type(message).__name__} from the worker")
        return False

    # --- sessions ---------------------------------------------------------------------

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
            session = WorkerSession(self, w, sid, call_id, streams, local)
            w.sessions[sid] = session
            w.ports_of[sid] = ports
            self._send(w, ch.Allocate(sid, call_id, streams), held)
            if not w.alive:  # the send failed: that worker is gone
                continue
            return session
        raise PortsExhausted("no media worker has port pairs left for this session")

    def _bind(
        self, w: _Worker, streams: int
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

    def _release(self, session: WorkerSession) -> None:
        w = session._worker
        if w.sessions.pop(session._sid, None) is not None:
            self._send(w, ch.Release(session._sid))


def _reap(proc: subprocess.Popen[bytes] | None, *, grace_s: float) -> str:
    """Wait ``grace_s`` for ``proc`` to exit, then kill it; its exit status as text."""
    if proc is None:
        return "not started"
    try:
        code = proc.wait(timeout=grace_s) if grace_s else proc.poll()
    except subprocess.TimeoutExpired:
        code = None
    if code is None:
        with contextlib.suppress(OSError):
            proc.kill()
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "still running"
    return f"killed by signal {-code}" if code < 0 else str(code)


_INSIDE_PACKETS = COUNTERS.index("packets_in")


class WorkerSession:
    """One call's media in a worker process (implements ``MediaSession``)."""

    __slots__ = (
        "_call_id",
        "_callbacks",
        "_counters",
        "_dead",
        "_engine",
        "_keys",
        "_local",
        "_next",
        "_released",
        "_rx",
        "_sid",
        "_streams",
        "_worker",
    )

    def __init__(
        self,
        engine: WorkerEngine,
        worker: _Worker,
        sid: int,
        call_id: str,
        streams: int,
        local: dict[Side, list[tuple[str, int]]],
    ) -> None:
        self._engine = engine
        self._worker = worker
        self._sid = sid
        self._call_id = call_id
        self._streams = streams
        self._local = local
        self._counters: tuple[int, ...] = ()
        self._keys: dict[int, tuple[int, SrtpContext]] = {}
        """id(context) -> (key id, context): the context is kept so its id stays its own."""
        self._rx: dict[Side, int] = {Side.INSIDE: 0, Side.OUTSIDE: 0}
        """The key id each side's packets are tried with first (0: none)."""
        self._callbacks: dict[Side, tuple[int, SrtpCallback]] = {}
        self._next = itertools.count(1)
        self._released = False
        self._dead = False
        """Its worker died: commands go nowhere, counters stay as last reported."""

    def __repr__(self) -> str:
        state = "released" if self._released else "dead" if self._dead else "live"
        return (
            f"WorkerSession({self._call_id!r}, streams={self._streams}, "
            f"worker {self._worker.index}, {state})"
        )

    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def streams(self) -> int:
        return self._streams

    @property
    def worker_index(self) -> int:
        return self._worker.index

    def local(self, side: Side, index: int) -> tuple[str, int]:
        if index < 0:
            raise IndexError(f"no stream {index}")
        return self._local[Side(side)][index]

    def _send(self, message: ch.Message) -> None:
        if not self._released and not self._dead:
            self._engine._send(self._worker, message)

    def set_remote(
        self,
        side: Side,
        index: int,
        ip: str,
        rtp_port: int,
        rtcp_port: int,
        rtcp_mux: bool = False,
    ) -> None:
        address = check_remote(self.local(side, index)[0], ip, rtp_port, rtcp_port)
        self._send(ch.SetRemote(self._sid, Side(side).value, index, str(address), rtp_port,
                                rtcp_port, bool(rtcp_mux)))  # fmt: skip

    def _kid(self, context: SrtpContext) -> int:
        entry = self._keys.get(id(context))
        if entry is None:
            entry = self._keys[id(context)] = (next(self._next), context)
        return entry[0]

    def _new_key(self, side: Side, kid: int) -> None:
        if self._rx[side] != kid:
            self._callbacks.pop(side, None)
            self._rx[side] = kid

    def set_srtp(self, side: Side, context: SrtpContext | None, srtcp: bool = True) -> None:
        if context is None:
            self.clear_srtp(side)
            return
        side = Side(side)
        kid = self._kid(context)
        self._new_key(side, kid)
        self._send(ch.SetSrtp(self._sid, side.value, kid, context.master_key,
                              context.master_salt, bool(srtcp)))  # fmt: skip

    def accept_srtp(self, side: Side, context: SrtpContext, srtcp: bool = False) -> None:
        side = Side(side)
        kid = self._kid(context)
        self._new_key(side, kid)
        self._send(ch.AcceptSrtp(self._sid, side.value, kid, context.master_key,
                                 context.master_salt, bool(srtcp)))  # fmt: skip

    def switch_srtp(
        self,
        side: Side,
        context: SrtpContext,
        grace_s: float,
        now: float | None = None,
        srtcp: bool = False,
    ) -> None:
        if not 0 <= grace_s < float("inf"):
            raise ValueError(f"grace_s must be a finite number >= 0, not {grace_s}")
        side = Side(side)
        kid = self._kid(context)
        self._new_key(side, kid)
        when = self._engine.clock() if now is None else now
        self._send(ch.SwitchSrtp(self._sid, side.value, kid, context.master_key,
                                 context.master_salt, float(grace_s), float(when),
                                 bool(srtcp)))  # fmt: skip

    def on_srtp_authenticated(self, side: Side, callback: SrtpCallback) -> None:
        side = Side(side)
        if not self._rx[side]:
            raise ValueError(f"no SRTP key to authenticate on the {side} side")
        token = next(self._next)
        self._callbacks[side] = (token, callback)
        self._send(ch.WatchAuth(self._sid, side.value, token))

    def _authenticated(self, side: str, token: int) -> None:
        entry = self._callbacks.get(Side(side))
        if entry is None or entry[0] != token:
            return  # the key changed since: that callback was forgotten
        del self._callbacks[Side(side)]
        try:
            entry[1]()
        except Exception:  # once per key at most: a log line is affordable
            log.exception("%s: SRTP-authenticated callback for the %s side failed", self, side)

    def clear_srtp(self, side: Side) -> None:
        side = Side(side)
        self._new_key(side, 0)
        self._send(ch.ClearSrtp(self._sid, side.value))

    def set_tx_ssrc(self, side: Side, ssrc: int | None) -> None:
        self._send(ch.SetTxSsrc(self._sid, Side(side).value, ssrc))

    def play_tone(self, side: Side, index: int, tone: Tone | None) -> None:
        self.local(side, index)  # IndexError for a stream that does not exist
        text = None if tone is None else str(tone)
        self._send(ch.PlayTone(self._sid, Side(side).value, index, text))

    def _update(self, counters: tuple[int, ...]) -> bool:
        """New counters from the worker; True if a side of stream 0 saw its first packet."""
        old = self._counters
        self._counters = counters
        width = len(COUNTERS)
        for base in (0, self._streams * width):
            at = base + _INSIDE_PACKETS
            before = old[at] if len(old) > at else 0
            after = counters[at] if len(counters) > at else 0
            if before == 0 and after > 0:
                return True
        return False

    def stats(self) -> dict[Side, list[StreamStats]]:
        return stats_from(self._counters, self._streams)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._dead:
            self._engine._release(self)


if TYPE_CHECKING:

    def _conforms(engine: WorkerEngine) -> MediaEngine:
        return engine
