"""A media worker process: the in-process relay (:mod:`proxy.media.relay`) driven over a
channel (:mod:`proxy.media.channel`) by the signalling process.

Started by :class:`proxy.media.worker_pool.WorkerPool` as
``python -m proxy.media.worker_process --fd N ...`` with one end of a SOCK_SEQPACKET
socketpair as fd N. It runs one :class:`RelayEngine` on uvloop (the stdlib loop with a
warning when uvloop is missing), builds sessions from the sockets that arrive with
``Allocate`` (under the session id the pool chose), and hands every media command to
the relay's own :meth:`RelayEngine.apply`, as it came; the per-packet path is the
relay's own, untouched.

What goes back: ``Closed`` when a released session's sockets are all closed (its ports
may be handed out again) with the session's final counters, ``Authenticated`` once per
fired ``WatchSrtp``, and ``Stats``: every :data:`FLUSH_S` the counters of the sessions
whose counters changed (a tenth of the sessions every tenth of the period, so no report
holds the packets up for long), and, checked every :data:`FIRST_PACKET_S`, at once for a
session whose stream 0 just received its first packet on a side, because the B2BUA
starts x-sipura only after the phone's first RTP and call set-up must not wait for the
next periodic flush. Watching for that on a short timer over the not-yet-flowing
sessions only keeps it off the per-packet path.

The worker exits when the channel reaches end-of-file (the signalling process is gone or
let it go) and on a message it cannot decode (logged: it is then out of step with the
signalling process, which sees the exit and tears its calls down). SIGINT is ignored: a
Ctrl-C in the terminal reaches the whole process group, and the signalling process
decides when its workers stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from proxy.logsetup import configure_logging
from proxy.media import channel as ch
from proxy.media.commands import (
    COMMAND_TYPES,
    MediaEvent,
    Release,
    SrtpAuthenticated,
    WatchSrtp,
)
from proxy.media.engine import Side
from proxy.media.relay import RelayEngine, RelaySession
from proxy.media.relay_leg import flush_noise
from proxy.runtime import install_fast_loop, tune_gc

log = logging.getLogger("sipura.media.worker")

FLUSH_S = 0.1
"""Period of the counter reports."""
FLUSH_PARTS = 10
"""Reports per period, each for its share of the sessions (:meth:`WorkerProcess._flush_loop`)."""
FIRST_PACKET_S = 0.01
"""Period of the check for sessions whose first packet arrived (while there are any)."""
STATS_BATCH = 100
"""Sessions per Stats message at most (12 bytes each besides their counters)."""
STATS_INTS = 7000
"""Counters per Stats message at most: at 8 bytes each a message stays under
:data:`channel.MAX_MESSAGE`, however many streams the sessions have (a leg has 26
counters; a session with four streams, 208)."""
BATCH = 32
"""Reports per batch at most; a batch also stays under :data:`channel.MAX_MESSAGE`."""
MAX_QUEUE = 100_000
"""Messages waiting for the signalling process to read them: beyond, it is stuck."""


class WorkerProcess:
    """The worker's side of the channel around its :class:`RelayEngine`."""

    def __init__(self, sock: socket.socket, engine: RelayEngine, index: int) -> None:
        self.sock = sock
        self.engine = engine
        self.index = index
        self.sessions: dict[int, RelaySession] = {}
        """Allocated here and not released, by id."""
        self.watches: dict[tuple[int, Side], int] = {}
        """Per session and side: the WatchSrtp commands received (see ch.Authenticated)."""
        self.last: dict[int, bytes] = {}
        """Per session: the counters last reported (packed, as :class:`ch.Stats` has them)."""
        self.fresh: dict[int, tuple[int, int]] = {}
        """Sessions with a side of stream 0 that has not received yet: inbound counts
        last seen."""
        self.queue: deque[bytes] = deque()
        self.writing = False
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.flushing = False
        self.done: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.status = 0
        """Exit status: 1 when the channel failed or carried something undecodable."""
        self.handlers: dict[type, Callable[[Any], None]] = {
            **dict.fromkeys(COMMAND_TYPES, engine.apply),
            WatchSrtp: self._watch,
            Release: self._release,
        }
        """What to do with each message from the signalling process, but ``Allocate``
        (which comes with sockets): a media command goes to the relay as it is."""
        engine.on_closed = self._closed
        engine.on_event = self._event
        engine.path.before_packets = self._readable  # commands before the packets after them

    async def run(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        loop.add_reader(self.sock.fileno(), self._readable)
        flush = loop.create_task(self._flush_loop())
        first = loop.create_task(self._first_packet_loop())
        try:
            await self.done
        finally:
            flush.cancel()
            first.cancel()
            loop.remove_reader(self.sock.fileno())
            self.engine.close_now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.close(), 2)
            if self.writing:
                loop.remove_writer(self.sock.fileno())
            self.sock.close()

    def stop(self, status: int = 0) -> None:
        self.status = self.status or status
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # --- receiving --------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(256):  # then let packets through
            try:
                data, fds, flags, _addr = socket.recv_fds(self.sock, ch.MAX_MESSAGE, ch.MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("worker %d: channel error: %s; exiting", self.index, exc)
                self.stop(1)
                return
            if not data:
                for fd in fds:
                    socket.close(fd)
                log.info("worker %d: the signalling process closed the channel", self.index)
                self.stop()
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ch.ChannelError("truncated message")
                messages = ch.decode_all(data)
                wanted = sum(4 * m.streams for m in messages if type(m) is ch.Allocate)
                if wanted != len(fds):
                    raise ch.ChannelError(f"{len(fds)} sockets for {wanted}")
            except ch.ChannelError as exc:
                for fd in fds:
                    socket.close(fd)
                log.error("worker %d: bad message from the signalling process (%s); exiting",
                          self.index, exc)  # fmt: skip
                self.stop(1)
                return
            for message in messages:
                try:
                    if isinstance(message, ch.Allocate):
                        mine, fds = fds[: 4 * message.streams], fds[4 * message.streams :]
                        self._allocate(message, mine)
                    else:
                        self.handlers.get(type(message), self._unexpected)(message)
                except (ValueError, IndexError, KeyError) as exc:
                    log.error("worker %d: cannot apply %s: %s", self.index,
                              type(message).__name__, exc)  # fmt: skip

    def _allocate(self, message: ch.Allocate, fds: list[int]) -> None:
        sockets = [socket.socket(fileno=fd) for fd in fds]
        sid = message.session
        if sid in self.sessions or len(sockets) != 4 * message.streams:
            for sock in sockets:
                sock.close()
            raise ValueError(f"session {sid}: {len(fds)} sockets, or a duplicate")
        pairs = [(sockets[i], sockets[i + 1]) for i in range(0, len(sockets), 2)]
        session = self.engine.allocate(message.call_id, message.streams, pairs, session_id=sid)
        self.sessions[sid] = session
        self.fresh[sid] = (0, 0)

    def _watch(self, command: WatchSrtp) -> None:
        if command.session in self.sessions:
            key = (command.session, Side(command.side))
            self.watches[key] = self.watches.get(key, 0) + 1
        self.engine.apply(command)

    def _release(self, command: Release) -> None:
        sid = command.session
        if self.sessions.pop(sid, None) is None:
            return  # released before, or never allocated here
        self.last.pop(sid, None)
        self.fresh.pop(sid, None)
        for side in Side:
            self.watches.pop((sid, side), None)
        self.engine.apply(command)

    def _unexpected(self, message: ch.ChannelMessage) -> None:
        log.error("worker %d: unexpected %s from the signalling process", self.index,
                  type(message).__name__)  # fmt: skip

    def _event(self, event: MediaEvent) -> None:
        """The relay reports an event (from a packet handler, once per watch at most)."""
        if isinstance(event, SrtpAuthenticated):
            sid, side = event.session, event.side
            self._flush_one(sid)  # the counters that go with it first
            self.send(ch.Authenticated(sid, side, self.watches.get((sid, side), 0)))

    def _closed(self, session: RelaySession) -> None:
        """Its sockets are closed: nothing more is counted, the counters are final."""
        self.send(ch.Closed(session.id, session.packed_counters()))

    # --- sending ----------------------------------------------------------------------

    def send(self, message: ch.ChannelMessage) -> None:
        """Queue a report: the reports of one loop iteration leave as one batch."""
        if self.done is None or self.done.done():
            return  # stopping: nobody is listening any more
        data = ch.encode(message)
        if data[:1] == ch.STATS_TAG:  # a counter report: alone, after what is pending
            self._flush_pending()
            self._transmit(data)
            return
        if self.pending_size + len(data) > ch.MAX_MESSAGE - 64:
            self._flush_pending()  # what is pending goes first, as one datagram
        self.pending.append(data)
        self.pending_size += len(data) + 1
        if len(self.pending) >= BATCH:
            self._flush_pending()
        elif not self.flushing and self.loop is not None:
            self.flushing = True
            self.loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self.flushing = False
        if not self.pending or self.done is None or self.done.done():
            return
        pending, self.pending, self.pending_size = self.pending, [], 0
        self._transmit(ch.batch(pending) if len(pending) > 1 else pending[0])

    def _transmit(self, data: bytes) -> None:
        """Send one datagram now, or queue it behind those the channel has not taken."""
        if self.done is None or self.done.done():
            return
        if not self.queue:
            try:
                self.sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                log.error("worker %d: cannot report: %s; exiting", self.index, exc)
                self.stop()
                return
        if len(self.queue) >= MAX_QUEUE:
            log.error("worker %d: the signalling process reads nothing; exiting", self.index)
            self.stop()
            return
        self.queue.append(data)
        if not self.writing and self.loop is not None:
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        queue = self.queue
        while queue:
            try:
                self.sock.send(queue[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stop()
                return
            queue.popleft()
        if self.loop is not None:
            self.loop.remove_writer(self.sock.fileno())
        self.writing = False

    def _flush_one(self, sid: int) -> None:
        session = self.sessions.get(sid)
        if session is None:
            return
        counters = session.packed_counters()
        if self.last.get(sid) != counters:
            self.last[sid] = counters
            self.send(ch.Stats(((sid, counters),)))

    def flush(self, part: int = 0, parts: int = 1) -> None:
        """Report the counters that changed, of the sessions in ``part`` of ``parts``
        (in allocation order; all of them by default)."""
        sessions = self.sessions
        count = len(sessions)
        start, end = count * part // parts, count * (part + 1) // parts
        if start == end:
            return
        batch: list[tuple[int, bytes]] = []
        ints = 0
        last = self.last
        for sid in itertools.islice(sessions, start, end):
            counters = sessions[sid].packed_counters()
            if last.get(sid) != counters:
                last[sid] = counters
                width = len(counters) // 8
                if batch and ints + width > STATS_INTS:
                    self.send(ch.Stats(tuple(batch)))
                    batch, ints = [], 0
                batch.append((sid, counters))
                ints += width
                if len(batch) >= STATS_BATCH:
                    self.send(ch.Stats(tuple(batch)))
                    batch, ints = [], 0
        if batch:
            self.send(ch.Stats(tuple(batch)))

    async def _flush_loop(self) -> None:
        """Every session's counters every FLUSH_S, a tenth of the sessions at a time: the
        report of 250 sessions costs ~1.5 ms of this loop, and packets arriving meanwhile
        wait; ten pauses of 0.15 ms keep that out of the latency tail."""
        part = 0
        while True:
            await asyncio.sleep(FLUSH_S / FLUSH_PARTS)
            self.flush(part, FLUSH_PARTS)
            part = (part + 1) % FLUSH_PARTS
            if part == 0:
                flush_noise(self.engine.clock())  # the held-back wrong-source counts

    async def _first_packet_loop(self) -> None:
        while True:
            await asyncio.sleep(FIRST_PACKET_S)
            fresh = self.fresh
            for sid, seen in list(fresh.items()):
                session = self.sessions.get(sid)
                if session is None:
                    del fresh[sid]
                    continue
                now = session.inbound()
                if now == seen:
                    continue
                if (now[0] > 0) != (seen[0] > 0) or (now[1] > 0) != (seen[1] > 0):
                    self._flush_one(sid)
                if now[0] and now[1]:
                    del fresh[sid]
                else:
                    fresh[sid] = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.media.worker_process")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--inside-ip", required=True)
    parser.add_argument("--outside-ip", required=True)
    parser.add_argument("--port-min", type=int, required=True)
    parser.add_argument("--port-max", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--packet-path", choices=("fast", "python"), default="python")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(args.log_level, args.log_format)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(False)
    tune_gc()
    loop_name = install_fast_loop()

    async def serve() -> int:
        engine = RelayEngine(args.inside_ip, args.outside_ip, args.port_min, args.port_max,
                             pool_pairs=0,
                             fast_path="on" if args.packet_path == "fast" else "off")  # fmt: skip
        worker = WorkerProcess(sock, engine, args.index)
        await worker.run()
        return worker.status

    log.debug("media worker %d starting (%s event loop, %s packet path)", args.index, loop_name,
              args.packet_path)  # fmt: skip
    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
