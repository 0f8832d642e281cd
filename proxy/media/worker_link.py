"""The signalling process's end of one media worker: its process, its channel, its ports.

A :class:`WorkerSlot` is one worker position of the :class:`~proxy.media.worker_pool.
WorkerPool`: a fixed slice of the port range, the worker process currently serving it
(a replacement takes the same slot), and the non-blocking channel to it
(:mod:`proxy.media.channel`). It knows how to move bytes and file descriptors; what the
messages mean is the pool's business (:attr:`WorkerSlot.on_message`), and so is what a
failure means (:attr:`WorkerSlot.on_failure`).

The messages of one loop iteration go as one datagram (one wake-up of the worker per SIP
message handled, not one per command), and :meth:`WorkerSlot.flush` sends them at once
when the server is about to transmit the SIP they belong to. Sends never block: a
datagram the channel will not take yet waits in a bounded queue, and a worker whose
queue overflows is stuck: a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.media import channel as ch
from proxy.media.ports import PortAllocator

if TYPE_CHECKING:
    from proxy.media.worker_pool import WorkerSession

__all__ = ["BATCH", "MAX_QUEUE", "WorkerSlot", "reap"]

BATCH = 64
"""Messages per batch at most (a batch stays far below :data:`channel.MAX_MESSAGE`)."""
MAX_QUEUE = 10_000
"""Batches waiting for a worker that does not read: beyond, it is stuck (killed)."""
READS_PER_WAKEUP = 256
"""Datagrams read from a worker per readiness callback, then the loop runs others."""


class WorkerSlot:
    """One worker slot: its slice of ports, its process and channel, its sessions."""

    def __init__(self, index: int, port_min: int, port_max: int) -> None:
        self.index = index
        self.port_min = port_min
        self.port_max = port_max
        self.ports = PortAllocator(port_min, port_max)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.alive = False
        self.sessions: dict[int, WorkerSession] = {}
        """Allocated and not released."""
        self.ports_of: dict[int, list[int]] = {}
        """RTP ports per session, until the worker reports its sockets closed."""
        self.closing: dict[int, WorkerSession] = {}
        """Released, until the worker reports its sockets closed (with its final
        counters)."""
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
        self.on_message: Callable[[WorkerSlot, ch.ChannelMessage], bool] = lambda w, m: False
        """A report from the worker; True when the B2BUA should look at its calls soon."""
        self.on_failure: Callable[[WorkerSlot, str, float], None] = lambda w, r, g: None
        """The channel failed (reason, seconds to wait for the process to exit)."""
        self.on_wakeup: Callable[[], object] | None = None

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

    def connect(
        self, proc: subprocess.Popen[bytes], sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        """A new worker process serves this slot through ``sock``: its slice is all free."""
        sock.setblocking(False)
        self.proc, self.sock, self.loop = proc, sock, loop
        self.alive = True
        self.ports = PortAllocator(self.port_min, self.port_max)
        loop.add_reader(sock.fileno(), self._readable)

    def disconnect(self) -> None:
        """Close the channel and drop whatever was waiting to be sent (with its sockets)."""
        sock, self.sock = self.sock, None
        if sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(sock.fileno())
                if self.writing:
                    self.loop.remove_writer(sock.fileno())
            sock.close()
        self.writing = False
        for held_sock in self.pending_fds:
            held_sock.close()
        self.pending, self.pending_fds = [], []
        while self.queue:
            for held in self.queue.popleft()[1]:
                held.close()

    # --- sending ----------------------------------------------------------------------

    def send(self, message: ch.ChannelMessage, held: list[socket.socket] | None = None) -> None:
        """Queue ``message`` (and the sockets it hands over): the messages of one loop
        iteration leave together, in order, as one batch at its end. Raises
        :class:`~proxy.media.channel.ChannelError` for a value the channel cannot carry
        (nothing is queued then)."""
        if not self.alive or self.sock is None:
            for sock in held or ():
                sock.close()
            return
        try:
            data = ch.encode(message)
        except ch.ChannelError:
            for sock in held or ():
                sock.close()
            raise
        self.pending.append(data)
        if held:
            self.pending_fds += held
        if len(self.pending) >= BATCH or len(self.pending_fds) > ch.MAX_FDS - 8:
            self.flush()
        elif not self.flushing:
            self.flushing = True
            if self.loop is None:
                self.flush()
            else:
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what is queued for this loop iteration now, as one datagram."""
        self.flushing = False
        if not self.pending:
            return
        data = ch.batch(self.pending) if len(self.pending) > 1 else self.pending[0]
        held, self.pending, self.pending_fds = self.pending_fds, [], []
        if not self.alive or self.sock is None:
            for sock in held:
                sock.close()
            return
        if not self.queue:
            try:
                if held:
                    socket.send_fds(self.sock, [data], [s.fileno() for s in held])
                else:
                    self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                for sock in held:
                    sock.close()
                self.on_failure(self, f"channel error: {exc}", 0.0)
                return
            else:
                for sock in held:
                    sock.close()
                return
        if len(self.queue) >= MAX_QUEUE:
            for sock in held:
                sock.close()
            self.on_failure(self, f"stuck ({len(self.queue)} messages unread)", 0.0)
            return
        self.queue.append((data, held))
        if not self.writing and self.loop is not None:
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while self.queue:
            data, held = self.queue[0]
            try:
                if held:
                    socket.send_fds(sock, [data], [s.fileno() for s in held])
                else:
                    sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.on_failure(self, f"channel error: {exc}", 0.0)
                return
            self.queue.popleft()
            for held_sock in held:
                held_sock.close()
        if self.loop is not None:
            self.loop.remove_writer(sock.fileno())
        self.writing = False

    # --- receiving --------------------------------------------------------------------

    def _readable(self) -> None:
        wake = False
        try:
            for _ in range(READS_PER_WAKEUP):
                sock = self.sock
                if sock is None:
                    return
                try:
                    data = sock.recv(ch.MAX_MESSAGE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self.on_failure(self, f"channel error: {exc}", 0.0)
                    return
                if not data:
                    self.on_failure(self, "channel closed", 0.1)
                    return
                try:
                    messages = ch.decode_all(data)
                except ch.ChannelError as exc:
                    self.on_failure(self, f"bad message: {exc}", 0.0)
                    return
                for message in messages:
                    wake = self.on_message(self, message) or wake
                    if not self.alive:
                        return
        finally:
            if wake and self.on_wakeup is not None:
                self.on_wakeup()


def reap(proc: subprocess.Popen[bytes] | None, *, grace_s: float) -> str:
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
