"""The asyncio edge for SIP: UDP, TCP and TLS listeners and connections for one side.

Nothing here understands SIP beyond framing: every complete message is handed to
``on_message(data, Address)``, and :meth:`SipTransport.send` delivers bytes to an
:class:`Address`, reusing the connection a peer opened to us (responses and in-dialog
requests follow the connection, as phones behind NAT need: the flow a phone registered
over carries calls to it, RFC 5626 style) or opening one, reused per destination after
that.

TLS (RFC 3261 §26, RFC 5630) is a stream like TCP, with the same framing and the same
limits: asyncio's ``ssl`` layer sits under the same protocol class. Outgoing TLS checks
the server's certificate against the :attr:`Address.name` the core resolved (the URI's
host, RFC 5922); a handshake that fails or does not finish within the handshake timeout
is one rate-limited log line and a transport failure reported to the core
(``on_failure``), which fails the transactions waiting on it (and so fails over).
Incoming TLS is accepted by :class:`~proxy.sip.tls_listener.TlsListener`, so that a
failed incoming handshake is one rate-limited log line (reason and source) and a count
(:attr:`SipTransport.tls_handshakes_failed`), not silence.

What may come in is bounded by sans-IO parts driven from here: the size of a message
(``[sip] max_message_bytes``: a larger datagram, or a stream message whose
Content-Length goes past it, is answered 413 when it can be and never reaches the
core), TCP framing in linear time (:class:`~proxy.sip.framing.StreamFramer`), and the
number, age and silence of TCP connections (:class:`~proxy.sip.connections.
ConnectionTable`, swept once a second). Every refusal is logged, rate-limited per
reason and source, and counted in :meth:`SipTransport.snapshot` (``/status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from proxy.metrics import TransportCounters
from proxy.ratelimit import LogLimiter
from proxy.sip.connections import Closing, ConnectionTable, Refusal, TcpLimits
from proxy.sip.framing import Oversized, StreamFramer
from proxy.sip.message import MAX_MESSAGE, SipParseError
from proxy.sip.pingpong import PONG
from proxy.sip.stateless import stateless_response
from proxy.sip.tls_listener import TlsListener
from proxy.sip.transaction import Address

log = logging.getLogger("sipura.transport")

OnMessage = Callable[[bytes, Address], None]
SOCKET_BUFFER = 4 * 1024 * 1024
"""UDP socket buffer asked for (the kernel caps it at net.core.rmem_max/wmem_max)."""
MAX_PENDING_CONNECT = 64
"""Messages queued per TCP connection being opened; beyond that they are dropped."""
MESSAGE_TRANSPORTS = ("udp", "tcp", "tls")
"""The transports a message can arrive over (the ``transport`` label of ``/metrics``)."""
SWEEP_INTERVAL_S = 1.0
"""How often TCP connections are checked against their timeouts."""

_conn_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """What one listener accepts (``[sip] max_message_bytes``, the TCP limits)."""

    max_message: int = MAX_MESSAGE
    tcp: TcpLimits = field(default_factory=TcpLimits)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        host, port = str(addr[0]), int(addr[1])
        if len(data) > self._owner.limits.max_message:
            self._owner.too_large(data, Address(host, port, "udp"), len(data))
            return
        if data.strip(b"\r\n\x00 ") == b"":
            return  # RFC 5626 keep-alive (CRLF) or NAT pinhole ping
        self._owner.on_message(data, Address(host, port, "udp"))

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)  # ICMP unreachable from a gone peer: not fatal


class _Tcp(asyncio.Protocol):
    """One TCP (or TLS) connection, accepted or opened, framed by Content-Length."""

    def __init__(
        self, owner: SipTransport, remote: tuple[str, int] | None = None, *,
        inbound: bool = True, kind: str = "tcp",
    ) -> None:  # fmt: skip
        self._owner = owner
        self.kind = kind
        self._framer = StreamFramer(owner.limits.max_message)
        self.transport: asyncio.Transport | None = None
        self.id = next(_conn_ids)
        self.remote = remote or ("", 0)
        self.inbound = inbound
        self.pending: list[bytes] = []
        self.ready = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not necessarily an asyncio.Transport subclass: uvloop's
        # TCPTransport is not one, so an isinstance() check here kills every connection.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote = (str(peer[0]), int(peer[1]))
        if not self._owner.register(self):
            self.transport.abort()
            return
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()
        self.ready.set()

    def data_received(self, data: bytes) -> None:
        owner = self._owner
        try:
            frames = self._framer.feed(data)
        except SipParseError as exc:
            owner.framing_lost(self, exc)
            return
        pongs = self._framer.take_pings()  # RFC 5626 keep-alive: a CRLF answers each
        if pongs and self.transport is not None:
            self.transport.write(PONG * pongs)
        address = Address(*self.remote, self.kind, self.id)
        for frame in frames:
            if isinstance(frame, Oversized):
                owner.too_large(frame.head, address, frame.size, self)
            else:
                owner.on_message(frame, address)
        owner.table.received(self.id, owner.now(), self._framer.pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.unregister(self)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            if len(self.pending) < MAX_PENDING_CONNECT:
                self.pending.append(data)
            return
        self.transport.write(data)
        self._owner.table.sent(self.id, self._owner.now())

    def close(self) -> None:
        """Close at once: a slow or hostile peer must not keep the descriptor while a
        graceful close waits for it to read."""
        if self.transport is not None:
            self.transport.abort()


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
        tls: TlsSettings | None = None, on_failure: Callable[[Address], None] | None = None,
        *, limits: TransportLimits | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.host = host
        self.port = port
        self.on_message = on_message
        self.tls = tls
        self.on_failure = on_failure
        """Told when a connection to a destination could not be opened (connect or TLS
        handshake failed): the core fails what waits on it."""
        self.tls_failures = 0
        """Outgoing TLS connections that could not be opened."""
        self.tls_handshakes_failed = 0
        """Incoming TLS connections whose handshake failed or timed out."""
        self.limits = limits or TransportLimits()
        self.table = ConnectionTable(self.limits.tcp)
        self.too_large_count: Counter[str] = Counter()
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tls_listener: TlsListener | None = None
        self._by_id: dict[int, _Tcp] = {}
        self._by_remote: dict[tuple[str, int, str], _Tcp] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._notes = LogLimiter(log)

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    async def start(self, transports: tuple[str, ...]) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if "udp" in transports:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, self.port)
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
        self._sweeper = loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """Where the TLS listener listens (the port, when ``tls_listen`` asked for 0)."""
        return None if self._tls_listener is None else self._tls_listener.address

    def _handshake_failed(self, remote: tuple[str, int], why: str) -> None:
        self.tls_handshakes_failed += 1
        now = self.now()
        self._notes.log(logging.WARNING, why, remote[0], now,
                        "%s: TLS handshake from %s:%s failed: %s", self.name, *remote,
                        why)  # fmt: skip

    # --- connections ----------------------------------------------------------------

    def register(self, conn: _Tcp) -> bool:
        """A connection is up; False when a limit refuses it (the caller closes it)."""
        if conn.inbound:
            refusal = self.table.admit(conn.id, conn.remote[0], self.now())
            if refusal is not None:
                limits = self.limits.tcp
                cap = (limits.max_connections if refusal is Refusal.MAX_CONNECTIONS
                       else limits.max_per_source)  # fmt: skip
                self._note(refusal.value, conn.remote[0],
                           "%s: %s connection from %s:%s refused: %s (%d) reached",
                           self.name, conn.kind.upper(), *conn.remote, refusal.value,
                           cap)  # fmt: skip
                return False
        self._by_id[conn.id] = conn
        self._by_remote[(*conn.remote, conn.kind)] = conn
        return True

    def unregister(self, conn: _Tcp) -> None:
        self.table.remove(conn.id)
        self._by_id.pop(conn.id, None)
        key = (*conn.remote, conn.kind)
        if self._by_remote.get(key) is conn:
            del self._by_remote[key]

    def hold_flow(self, flow: Address, held: bool) -> bool:
        """Keep (or stop keeping) the TCP connection of ``flow`` open however long it is
        idle: the core holds a registration's flow while the binding lives. False when
        ``flow`` is not a live TCP connection of this listener."""
        if flow.conn is None or flow.conn not in self._by_id:
            return False
        return self.table.hold(flow.conn, held)

    def framing_lost(self, conn: _Tcp, exc: SipParseError) -> None:
        self._note("framing_lost", conn.remote[0], "%s: %s %s:%s: framing lost (%s); closing",
                   self.name, conn.kind.upper(), *conn.remote, exc)  # fmt: skip
        conn.close()

    def too_large(self, data: bytes, source: Address, size: int, conn: _Tcp | None = None) -> None:
        """A message past ``max_message_bytes``: 413 if it is an answerable request."""
        self.too_large_count[source.transport] += 1
        self._note("message_too_large", source.host,
                   "%s: %s message of %d bytes from %s:%s exceeds max_message_bytes (%d)",
                   self.name, source.transport.upper(), size, source.host, source.port,
                   self.limits.max_message)  # fmt: skip
        reply = stateless_response(data, 413, f"larger than {self.limits.max_message} bytes")
        if reply is None:
            return
        if conn is not None:
            conn.write(reply)
        elif self._udp is not None:
            self._udp.sendto(reply, (source.host, source.port))

    def _sweep(self) -> None:
        now = self.now()
        for conn_id, reason in self.table.expired(now):
            conn = self._by_id.get(conn_id)
            if conn is None:
                self.table.remove(conn_id)
                continue
            self._note(reason.value, conn.remote[0], "%s: %s %s:%s closed: %s",
                       self.name, conn.kind.upper(), *conn.remote, reason.value)  # fmt: skip
            conn.close()
        self._notes.flush(now)
        if self._loop is not None:
            self._sweeper = self._loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _note(self, reason: str, source: str, msg: str, *args: object) -> None:
        self._notes.log(logging.WARNING, reason, source, self.now(), msg, *args)

    # --- sending --------------------------------------------------------------------

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
        conn = _Tcp(self, (dest.host, dest.port), inbound=False, kind=kind)
        refusal = self.table.admit(conn.id, dest.host, self.now(), inbound=False)
        if refusal is not None:
            self._note(f"{refusal.value}_opened", dest.host,
                       "%s: %s connect to %s:%s refused: %s (%d) connections opened",
                       self.name, kind.upper(), dest.host, dest.port, refusal.value,
                       self.limits.tcp.max_connections)  # fmt: skip
            if self.on_failure is not None:
                self.on_failure(dest)
            return None
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
                self.table.remove(conn.id)
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
        self._note(why, f"{dest.host}:{dest.port}", "%s: %s connection to %s:%s (%s) failed: %s",
                   self.name, dest.transport.upper(), dest.host, dest.port,
                   dest.name or dest.host, why)  # fmt: skip
        if self.on_failure is not None:
            self.on_failure(dest)

    # --- state ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """What ``/status`` shows of this listener."""
        return {
            "tcp": self.table.snapshot(),
            "too_large": dict(self.too_large_count),
            "tls_failures": self.tls_failures,
            "tls_handshakes_failed": self.tls_handshakes_failed,
            "tls_handshakes_in_progress": (
                0 if self._tls_listener is None else self._tls_listener.in_progress
            ),
        }

    def counters(self) -> TransportCounters:
        """What ``/metrics`` reports of this listener: the refusals and failures the
        snapshot counts, each reason and transport present from the start."""
        stats = self.table.stats
        return TransportCounters(
            connections_refused={r.value: stats.refused[r.value] for r in Refusal},
            connections_closed={c.value: stats.closed[c.value] for c in Closing},
            messages_too_large={t: self.too_large_count[t] for t in MESSAGE_TRANSPORTS},
            tls_handshakes_failed=self.tls_handshakes_failed,
            tls_connect_failures=self.tls_failures,
        )

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        for conn in list(self._by_id.values()):
            conn.close()


_background: set[asyncio.Task[None]] = set()


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
