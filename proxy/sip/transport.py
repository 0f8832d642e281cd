"""The asyncio edge for SIP: UDP and TCP listeners and connections for one side.

Nothing here understands SIP beyond TCP framing (:func:`frame_stream`): every complete
message is handed to ``on_message(data, Address)``, and :meth:`SipTransport.send`
delivers bytes to an :class:`Address`, reusing the TCP connection a peer opened to us
(responses and in-dialog requests follow the connection, as phones behind NAT need) or
opening one. TLS is a later step: it plugs in as one more ``transport`` value here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable
from typing import cast

from proxy.sip.message import SipParseError, frame_stream
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
    """One TCP connection, accepted or opened, framed by Content-Length."""

    def __init__(self, owner: SipTransport, remote: tuple[str, int] | None = None) -> None:
        self._owner = owner
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
            try:
                message = frame_stream(self._buffer)
            except SipParseError as exc:
                log.info("TCP %s:%s: framing lost (%s); closing", *self.remote, exc)
                if self.transport is not None:
                    self.transport.close()
                return
            if message is None:
                return
            self._owner.on_message(message, Address(*self.remote, "tcp", self.id))

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.unregister(self)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            if len(self.pending) < MAX_PENDING_CONNECT:
                self.pending.append(data)
            return
        self.transport.write(data)


class SipTransport:
    """UDP + TCP for one listen address."""

    def __init__(self, name: str, host: str, port: int, on_message: OnMessage) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.on_message = on_message
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._by_id: dict[int, _Tcp] = {}
        self._by_remote: dict[tuple[str, int], _Tcp] = {}

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

    def register(self, conn: _Tcp) -> None:
        self._by_id[conn.id] = conn
        self._by_remote[conn.remote] = conn

    def unregister(self, conn: _Tcp) -> None:
        self._by_id.pop(conn.id, None)
        if self._by_remote.get(conn.remote) is conn:
            del self._by_remote[conn.remote]

    def send(self, data: bytes, dest: Address) -> None:
        if dest.transport == "udp":
            if self._udp is not None:
                self._udp.sendto(data, (dest.host, dest.port))
            return
        conn = self._by_id.get(dest.conn) if dest.conn is not None else None
        if conn is None:
            conn = self._by_remote.get((dest.host, dest.port))
        if conn is None:
            conn = self._connect(dest)
        conn.write(data)

    def _connect(self, dest: Address) -> _Tcp:
        conn = _Tcp(self, (dest.host, dest.port))
        self._by_remote[(dest.host, dest.port)] = conn

        async def open_connection() -> None:
            loop = asyncio.get_running_loop()
            try:
                await loop.create_connection(lambda: conn, dest.host, dest.port)
            except OSError as exc:
                log.info(
                    "%s: TCP connect to %s:%s failed: %s", self.name, dest.host, dest.port, exc
                )
                if self._by_remote.get((dest.host, dest.port)) is conn:
                    del self._by_remote[(dest.host, dest.port)]

        task = asyncio.get_running_loop().create_task(open_connection())
        _background.add(task)
        task.add_done_callback(_background.discard)
        return conn

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self._by_id.values()):
            if conn.transport is not None:
                conn.transport.close()


_background: set[asyncio.Task[None]] = set()
