"""The asyncio edge for SIP: UDP, TCP and TLS listeners and connections for one side.

Nothing here understands SIP beyond stream framing (:func:`frame_stream`): every
complete message is handed to ``on_message(data, Address)``, and
:meth:`SipTransport.send` delivers bytes to an :class:`Address`, reusing the connection
a peer opened to us (responses and in-dialog requests follow the connection, as phones
behind NAT need: the flow a phone registered over carries calls to it, RFC 5626 style)
or opening one, reused per destination after that.

TLS (RFC 3261 §26, RFC 5630) is a stream like TCP, with the same framing: asyncio's
``ssl`` layer sits under the same protocol class. Outgoing TLS checks the server's
certificate against the :attr:`Address.name` the core resolved (the URI's host, RFC
5922); a handshake that fails or does not finish within the handshake timeout is one
rate-limited log line and a transport failure reported to the core
(``on_failure``), which fails the transactions waiting on it (and so fails over).
Incoming TLS is accepted by :class:`~proxy.sip.tls_listener.TlsListener`, so that a
failed incoming handshake is one rate-limited log line (reason and source) and a count
(:attr:`SipTransport.tls_handshakes_failed`), not silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Callable
from collections.abc import Callable as Callback
from dataclasses import dataclass
from typing import cast

from proxy.ratelimit import LogLimiter
from proxy.sip.message import SipParseError, frame_stream
from proxy.sip.pingpong import PING, PONG, take_pings
from proxy.sip.tls_listener import TlsListener
from proxy.sip.transaction import Address

log = logging.getLogger("sipura.transport")

OnMessage = Callable[[bytes, Address], None]
SOCKET_BUFFER = 4 * 1024 * 1024
"""UDP socket buffer asked for (the kernel caps it at net.core.rmem_max/wmem_max)."""
MAX_PENDING_CONNECT = 64
"""Messages queued per TCP connection being opened; beyond that they are dropped."""

_conn_ids = itertools.count(1)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_message: OnMessage) -> None:
        self._on_message = on_message

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        host, port = str(addr[0]), int(addr[1])
        if data.strip(b"\r\n\x00 ") == b"":
            return  # RFC 5626 keep-alive (CRLF) or NAT pinhole ping
        self._on_message(data, Address(host, port, "udp"))

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)  # ICMP unreachable from a gone peer: not fatal


class _Tcp(asyncio.Protocol):
    """One TCP (or TLS) connection, accepted or opened, framed by Content-Length."""

    def __init__(
        self, owner: SipTransport, remote: tuple[str, int] | None = None, kind: str = "tcp"
    ) -> None:
        self._owner = owner
        self.kind = kind
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.id = next(_conn_ids)
        self.remote = remote or ("", 0)
        self.pending: list[bytes] = []
        self.ready = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not necessarily an asyncio.Transport subclass: uvloop's
        # TCPTransport is not one, so an isinstance() check here kills every connection.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote = (str(peer[0]), int(peer[1]))
        self._owner.register(self)
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()
        self.ready.set()

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        while True:
            pings = take_pings(self._buffer)  # RFC 5626 keep-alive: a CRLF answers each
            if pings and self.transport is not None:
                self.transport.write(PONG * pings)
            if self._buffer and PING.startswith(self._buffer):
                return  # maybe part of a ping: wait for the rest before framing drops it
            try:
                message = frame_stream(self._buffer)
            except SipParseError as exc:
                log.info("TCP %s:%s: framing lost (%s); closing", *self.remote, exc)
                if self.transport is not None:
                    self.transport.close()
                return
            if message is None:
                return
            self._owner.on_message(message, Address(*self.remote, self.kind, self.id))

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.unregister(self)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            if len(self.pending) < MAX_PENDING_CONNECT:
                self.pending.append(data)
            return
        self.transport.write(data)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS for one side: where to listen (None: no listener), the contexts
    (:mod:`proxy.b2bua.tls_keys`) and the handshake timeout."""

    listen: tuple[str, int] | None
    server: ssl.SSLContext | None
    client: ssl.SSLContext | None
    handshake_timeout_s: float = 5.0


class SipTransport:
    """UDP + TCP (+ TLS) for one listen address."""

    def __init__(
        self, name: str, host: str, port: int, on_message: OnMessage,
        tls: TlsSettings | None = None, on_failure: Callback[[Address], None] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.host = host
        self.port = port
        self.on_message = on_message
        self.tls = tls
        self.on_failure = on_failure
        """Told when a connection to a destination could not be opened (connect or TLS
        handshake failed): the core fails what waits on it."""
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tls_listener: TlsListener | None = None
        self._by_id: dict[int, _Tcp] = {}
        self._by_remote: dict[tuple[str, int, str], _Tcp] = {}
        self._notes = LogLimiter(log)
        self.tls_failures = 0
        """Outgoing TLS connections that could not be opened."""
        self.tls_handshakes_failed = 0
        """Incoming TLS connections whose handshake failed or timed out."""

    async def start(self, transports: tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()
        if "udp" in transports:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self.on_message), local_addr=(self.host, self.port)
            )
            sock = self._udp.get_extra_info("socket")
            if sock is not None:
                # A burst of responses (or a pause of the process) must not overflow the
                # kernel's default ~208 KiB buffer: a lost 200 costs a whole call.
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        if "tcp" in transports:
            self._server = await loop.create_server(
                lambda: _Tcp(self), self.host, self.port, reuse_address=True
            )
        tls = self.tls
        if "tls" in transports and tls is not None and tls.listen and tls.server is not None:
            self._tls_listener = TlsListener(
                tls.listen[0], tls.listen[1], tls.server, tls.handshake_timeout_s,
                lambda remote: _Tcp(self, remote, kind="tls"), self._handshake_failed,
            )  # fmt: skip
            self._tls_listener.start()

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """Where the TLS listener listens (the port, when ``tls_listen`` asked for 0)."""
        return None if self._tls_listener is None else self._tls_listener.address

    def _handshake_failed(self, remote: tuple[str, int], why: str) -> None:
        self.tls_handshakes_failed += 1
        now = asyncio.get_running_loop().time()
        self._notes.log(logging.WARNING, why, remote[0], now,
                        "%s: TLS handshake from %s:%s failed: %s", self.name, *remote,
                        why)  # fmt: skip

    def register(self, conn: _Tcp) -> None:
        self._by_id[conn.id] = conn
        self._by_remote[(*conn.remote, conn.kind)] = conn

    def unregister(self, conn: _Tcp) -> None:
        self._by_id.pop(conn.id, None)
        key = (*conn.remote, conn.kind)
        if self._by_remote.get(key) is conn:
            del self._by_remote[key]

    def send(self, data: bytes, dest: Address) -> None:
        if dest.transport == "udp":
            if self._udp is not None:
                self._udp.sendto(data, (dest.host, dest.port))
            return
        conn = self._by_id.get(dest.conn) if dest.conn is not None else None
        if conn is None:
            conn = self._by_remote.get((dest.host, dest.port, dest.transport))
        if conn is None:
            conn = self._connect(dest)
            if conn is None:
                return
        conn.write(data)

    def _connect(self, dest: Address) -> _Tcp | None:
        kind = dest.transport
        if kind == "tls" and (self.tls is None or self.tls.client is None):
            self._failed(dest, "no TLS client context")
            return None
        conn = _Tcp(self, (dest.host, dest.port), kind=kind)
        key = (dest.host, dest.port, kind)
        self._by_remote[key] = conn

        async def open_connection() -> None:
            loop = asyncio.get_running_loop()
            try:
                if kind == "tls":
                    assert self.tls is not None
                    await loop.create_connection(
                        lambda: conn, dest.host, dest.port, ssl=self.tls.client,
                        server_hostname=dest.name or dest.host,
                        ssl_handshake_timeout=self.tls.handshake_timeout_s,
                    )  # fmt: skip
                else:
                    await loop.create_connection(lambda: conn, dest.host, dest.port)
            except (OSError, ssl.SSLError, ssl.CertificateError, TimeoutError) as exc:
                if self._by_remote.get(key) is conn:
                    del self._by_remote[key]
                self._failed(dest, _why(exc))

        task = asyncio.get_running_loop().create_task(open_connection())
        _background.add(task)
        task.add_done_callback(_background.discard)
        return conn

    def _failed(self, dest: Address, why: str) -> None:
        """One rate-limited line per destination and reason; the core hears of it."""
        if dest.transport == "tls":
            self.tls_failures += 1
        now = asyncio.get_running_loop().time()
        self._notes.log(logging.WARNING, why, f"{dest.host}:{dest.port}", now,
                        "%s: %s connection to %s:%s (%s) failed: %s", self.name,
                        dest.transport.upper(), dest.host, dest.port, dest.name or dest.host,
                        why)  # fmt: skip
        if self.on_failure is not None:
            self.on_failure(dest)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        for conn in list(self._by_id.values()):
            if conn.transport is not None:
                conn.transport.close()


def _why(exc: BaseException) -> str:
    """A failure as one short phrase (an ssl error's reason, the OS's text)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason.lower().replace('_', ' ')}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


_background: set[asyncio.Task[None]] = set()
