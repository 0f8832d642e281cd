"""A small, bounded HTTP/1.1 server for the admin endpoint: h11 for the protocol, asyncio
streams for the sockets (docs/decisions.md, "Admin endpoint").

h11 (sans-IO, the python-hyper project's HTTP/1.1 state machine) does the parsing and
framing that a hand-written reader gets wrong: request-line and header syntax (400),
oversized heads (431), keep-alive and ``Connection: close``, HEAD responses without a
body, pipelining. This module adds what an endpoint reachable from a network needs and
h11 leaves to the caller, every one of them bounded:

* concurrent connections (``max_connections``; beyond, a 503 and close);
* the size of a request head (``max_request_bytes``, h11's incomplete-event cap) and its
  header count (``max_headers``, 431), and of a body (``max_body_bytes``, 413);
* time: a request must arrive whole within ``request_timeout_s`` of its first byte (a
  slowloris trickle is cut off there, however steady), a keep-alive connection may idle
  ``idle_timeout_s`` between requests, and a client that does not read its response
  within ``request_timeout_s`` is dropped;
* routing: unknown path 404, known path with another method 405 with ``Allow`` (GET
  implies HEAD), and when a token is configured every route not marked ``public`` needs
  ``Authorization: Bearer <token>`` (401 otherwise; constant-time comparison).

Handlers are plain synchronous functions returning a :class:`Reply`: they read the
proxy's state on the event loop thread, so nothing is shared across threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

import h11

from proxy.ratelimit import LogLimiter

__all__ = ["AdminHttp", "HttpLimits", "Reply", "Route"]

log = logging.getLogger("sipura.admin")

_BUSY: Final = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def text(status: int, body: str) -> Reply:
    return Reply(status, body.encode())


@dataclass(frozen=True, slots=True)
class Route:
    """``methods``: what the path accepts (``GET`` implies ``HEAD``); ``public``: served
    without the token (``/health``, which load balancers and container runtimes poll)."""

    methods: frozenset[str]
    handler: Callable[[], Reply]
    public: bool = False

    def allows(self, method: str) -> bool:
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)

    @property
    def allow_header(self) -> str:
        extra = {"HEAD"} if "GET" in self.methods else set()
        return ", ".join(sorted(self.methods | extra))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_request_bytes: int = 8192
    max_headers: int = 32
    max_body_bytes: int = 1024
    request_timeout_s: float = 5.0
    idle_timeout_s: float = 30.0
    max_connections: int = 32


@dataclass(slots=True)
class _Request:
    method: str = ""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0
    deadline: float | None = None
    """When the whole request must be in (set by its first byte)."""
    head_bytes: int = 0
    """Bytes received before the head was complete."""


class _Refuse(Exception):
    """Answer this status and close the connection."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class AdminHttp:
    """Serves ``routes`` (by exact path) on one TCP listener."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        token: str | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.routes = dict(routes)
        self._token = token.encode() if token else None
        self.limits = limits or HttpLimits()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.refused = 0
        """Connections turned away at the ``max_connections`` cap."""
        self._noise = LogLimiter(log, interval_s=60.0, max_keys=256)

    @property
    def token(self) -> str | None:
        return self._token.decode() if self._token else None

    @token.setter
    def token(self, value: str | None) -> None:
        """A reload may rotate the token; open connections use it from the next request."""
        self._token = value.encode() if value else None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free one)."""
        self._server = await asyncio.start_server(
            self._client, host, port, limit=self.limits.max_request_bytes
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # its reader sees end-of-file: the handler returns

    # --- routing (no I/O) -------------------------------------------------------------

    def respond(self, method: str, path: str, headers: Mapping[str, str]) -> Reply:
        """The reply to one request: routing, the token, the handler."""
        route = self.routes.get(path)
        if route is None:
            return text(404, "not found\n")
        if not route.public and self._token is not None and not self._authorized(headers):
            return Reply(401, b"unauthorized\n", headers=(("WWW-Authenticate", "Bearer"),))
        if not route.allows(method):
            return Reply(405, b"method not allowed\n", headers=(("Allow", route.allow_header),))
        try:
            return route.handler()
        except Exception:  # a bug in a handler costs one request, never the endpoint
            log.exception("admin: %s %s failed", method, path)
            return text(500, "internal error\n")

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        assert self._token is not None
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = credentials.strip().encode("latin-1", "replace")
        # compare_digest on the whole value even on a scheme mismatch: no early exit.
        same = hmac.compare_digest(given, self._token)
        return same and scheme.lower() == "bearer"

    # --- the connection ---------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            peer = _peer(writer)
            loop = asyncio.get_running_loop()
            self._noise.log(logging.WARNING, "admin_busy", peer, loop.time(),
                            "admin: %d connections open; refused one from %s",
                            self.connections, peer)  # fmt: skip
            with contextlib.suppress(OSError, TimeoutError):
                writer.write(_BUSY)
                # Take what the client sent (briefly): closing with unread input would
                # reset the connection before it reads the 503.
                await asyncio.wait_for(reader.read(self.limits.max_request_bytes), 0.1)
            writer.close()
            return
        self.connections += 1
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The loop is shutting down: this task is a connection's top level, nobody
            # awaits it, and asyncio would log the cancellation as an error.
            pass
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_request_bytes)
        while True:
            try:
                request = await self._read_request(conn, reader)
            except _Refuse as refusal:
                await self._send(conn, writer, "GET", text(refusal.status, _phrase(refusal.status)),
                                 close=True)  # fmt: skip
                return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(conn, writer, "GET", text(status, _phrase(status)), close=True)
                return
            if request is None:
                return  # the client closed, or idled out between requests
            reply = self.respond(request.method, request.path, request.headers)
            await self._send(conn, writer, request.method, reply, close=False)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> _Request | None:
        """One whole request, or None when the connection ends cleanly or idles out."""
        loop = asyncio.get_running_loop()
        request = _Request()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._more(conn, reader, request, loop)
                if data is None:
                    return None
                conn.receive_data(data)
                continue
            handler = _EVENTS.get(type(event))
            if handler is not None:
                finished, result = handler(self.limits, request, event)
                if finished:
                    return result
            if request.deadline is None:
                request.deadline = loop.time() + self.limits.request_timeout_s

    async def _more(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        request: _Request,
        loop: asyncio.AbstractEventLoop,
    ) -> bytes | None:
        """The next bytes of a request. Between requests the wait is the idle timeout
        (None: idled out); once a request has begun, it must be whole by its deadline
        (408), and its head within the size bound (431)."""
        limits = self.limits
        if request.deadline is None and not conn.trailing_data[0]:
            try:
                data = await asyncio.wait_for(reader.read(4096), limits.idle_timeout_s)
            except TimeoutError:
                return None
            request.deadline = loop.time() + limits.request_timeout_s
        else:
            if request.deadline is None:
                request.deadline = loop.time() + limits.request_timeout_s
            remaining = request.deadline - loop.time()
            if remaining <= 0:
                raise _Refuse(408)
            try:
                data = await asyncio.wait_for(reader.read(4096), remaining)
            except TimeoutError:
                raise _Refuse(408) from None
        if not request.method:
            # h11 caps only a head still incomplete in its buffer, not one that
            # arrives whole in one read: count the bytes before the head is complete.
            request.head_bytes += len(data)
            if request.head_bytes > limits.max_request_bytes + 4096:
                raise _Refuse(431)
        return data

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        method: str,
        reply: Reply,
        *,
        close: bool,
    ) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        phrase = HTTPStatus(reply.status).phrase.encode()
        data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        if method != "HEAD" and reply.body:
            data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.limits.request_timeout_s)


def _phrase(status: int) -> str:
    return HTTPStatus(status).phrase.lower() + "\n"


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


_Step = tuple[bool, _Request | None]
"""What one h11 event means for the request being read: (finished, the request or None)."""
_GOING_ON: _Step = (False, None)


def _on_head(limits: HttpLimits, request: _Request, event: h11.Request) -> _Step:
    size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
    if len(event.headers) > limits.max_headers or size > limits.max_request_bytes:
        raise _Refuse(431)
    request.method = event.method.decode("ascii", "replace").upper()
    request.path = event.target.decode("ascii", "replace").split("?", 1)[0]
    request.headers = {
        name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers
    }
    return _GOING_ON


def _on_body(limits: HttpLimits, request: _Request, event: h11.Data) -> _Step:
    request.body_bytes += len(event.data)
    if request.body_bytes > limits.max_body_bytes:
        raise _Refuse(413)
    return _GOING_ON


_EVENTS: dict[type, Callable[[HttpLimits, _Request, Any], _Step]] = {
    h11.Request: _on_head,
    h11.Data: _on_body,
    h11.EndOfMessage: lambda limits, request, event: (True, request),
    h11.ConnectionClosed: lambda limits, request, event: (True, None),
}
"""What each h11 event does to the request being read (others are ignored)."""
