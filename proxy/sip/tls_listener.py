"""Accepting SIP over TLS: the listening socket, the handshakes, and why one failed.

``loop.create_server(ssl=...)`` would do the handshakes too, but there a failed one
(plaintext or garbage sent to the TLS port, a client that rejects the proxy's
certificate, a client that never finishes) is an ``OSError`` that asyncio and uvloop
report only in debug mode: an operator would never learn why a trunk cannot connect.
Nor can the handshake be started on an accepted plain transport (``loop.start_tls``):
uvloop starts reading once ``connection_made`` returns, even if it paused, so the
ClientHello may be read before the TLS layer is there. So the listener accepts sockets
itself (``loop.sock_accept``) and runs each handshake with
``loop.connect_accepted_socket(..., ssl=...)``, which raises what went wrong: each
failure is handed to ``on_failure(remote, why)`` (one rate-limited log line and a count,
in :class:`proxy.sip.transport.SipTransport`) and the listener goes on. At most
:data:`MAX_HANDSHAKES` handshakes run at once; a connection beyond that is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable

from proxy.ratelimit import LogLimiter

log = logging.getLogger("sipura.transport")

MAX_HANDSHAKES = 256
"""Incoming TLS handshakes in progress per listener."""
BACKLOG = 512
ACCEPT_RETRY_S = 0.1
"""Pause after accept() itself failed (EMFILE, ENFILE): the connection waits in the
backlog instead of the loop spinning."""

Remote = tuple[str, int]


class TlsListener:
    """One TLS listening socket; ``protocol_for(remote)`` makes the protocol of a
    connection whose handshake succeeded (its ``connection_made`` gets the TLS
    transport)."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, handshake_timeout_s: float,
        protocol_for: Callable[[Remote], asyncio.Protocol],
        on_failure: Callable[[Remote, str], None],
    ) -> None:  # fmt: skip
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s
        self.protocol_for = protocol_for
        self.on_failure = on_failure
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.socket.setblocking(False)
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._notes = LogLimiter(log)

    @property
    def address(self) -> Remote:
        host, port = self.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def in_progress(self) -> int:
        """Handshakes running now (at most :data:`MAX_HANDSHAKES`)."""
        return len(self._handshakes)

    def start(self) -> None:
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self.socket)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                self._notes.log(
                    logging.WARNING,
                    "accept",
                    str(exc.errno),
                    loop.time(),
                    "TLS listener %s:%s: accept failed: %s",
                    *self.address,
                    exc,
                )
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            remote = (str(peer[0]), int(peer[1]))
            if len(self._handshakes) >= MAX_HANDSHAKES:
                sock.close()
                self.on_failure(remote, f"more than {MAX_HANDSHAKES} handshakes at once")
                continue
            task = loop.create_task(self._handshake(sock, remote))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, remote: Remote) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: self.protocol_for(remote), sock, ssl=self.context,
                ssl_handshake_timeout=self.handshake_timeout_s,
            )  # fmt: skip
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # whatever the peer sent: a log line, never the listener
            sock.close()
            self.on_failure(remote, handshake_failure(exc))

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        with contextlib.suppress(OSError):
            self.socket.close()


def handshake_failure(exc: BaseException) -> str:
    """Why an incoming handshake failed, as one short phrase: the ssl reason ("wrong
    version number" for plaintext, "tlsv1 alert unknown ca" when the client rejects the
    certificate), a timeout, or the client leaving."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, TimeoutError) or "taking longer than" in str(exc):
        return "timed out"  # asyncio and uvloop: ConnectionAbortedError("... taking longer")
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "closed by the client"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
