"""`sipura-proxy run`: the asyncio process that owns sockets and timers.

The B2BUA core is sans-IO; this module is the thin edge around it: two
:class:`SipTransport` (inside, outside), the media engine, one timer handle re-armed at
the core's next deadline, and signal handling. ``now`` for the core is the event loop's
monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Any

from proxy.b2bua.config import Config
from proxy.b2bua.core import B2BUA, Outbound
from proxy.b2bua.line_keys import load_security
from proxy.b2bua.resolver import SystemResolver
from proxy.b2bua.routing import ResolveQuery
from proxy.logsetup import configure_logging
from proxy.media.engine import Side
from proxy.media.relay import RelayEngine
from proxy.media.workers import WorkerEngine, WorkerSession
from proxy.runtime import (
    descriptor_limit,
    install_fast_loop,
    raise_descriptor_limit,
    start_heap_trimming,
    tune_gc,
)
from proxy.sip.connections import TcpLimits, auto_max_connections
from proxy.sip.headers import MEMOS
from proxy.sip.message import CANONICAL_MEMO
from proxy.sip.transaction import Address
from proxy.sip.transport import SipTransport, TransportLimits

log = logging.getLogger("sipura.server")


class ProxyServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        workers = config.media.worker_count()
        self.media: RelayEngine | WorkerEngine
        if workers:
            self.media = WorkerEngine(
                port_min=config.media.port_min,
                port_max=config.media.port_max,
                inside_ip=config.inside.media_ip,
                outside_ip=config.outside.media_ip,
                workers=workers,
                log_level=config.log.level,
                log_format=config.log.format,
            )
            self.media.on_lost = self._media_lost
            self.media.on_wakeup = self._wake
        else:
            self.media = RelayEngine(
                port_min=config.media.port_min,
                port_max=config.media.port_max,
                inside_ip=config.inside.media_ip,
                outside_ip=config.outside.media_ip,
            )
        self.security = load_security(config)
        for warning in self.security.warnings:
            log.warning("%s: %s", config.source, warning)
        self.resolver = SystemResolver(self._resolved)
        self.core = B2BUA(config, self.media, self.security, resolver=self.resolver)
        self.core.on_wakeup = self._wake
        limits = transport_limits(config)
        self.transports = {
            side: SipTransport(
                side.value,
                cfg.listen_host,
                cfg.listen_port,
                lambda data, source, side=side: self._on_message(side, data, source),  # type: ignore[misc]
                limits,
            )
            for side, cfg in ((Side.INSIDE, config.inside), (Side.OUTSIDE, config.outside))
        }
        self.core.registrar.on_flow = self._hold_flow
        self._timer: asyncio.Handle | None = None
        self._timer_at: float | None = None
        """The deadline ``_timer`` was armed for: uvloop's ``call_at`` with a time already
        past returns a plain Handle, which has no ``when()``."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admin: asyncio.Server | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(self.media, WorkerEngine):
            self.media.start()
        for transport in self.transports.values():
            await transport.start(self.config.sip.transports)
        if self.config.admin.enabled:
            self._admin = await asyncio.start_server(
                self._admin_client, self.config.admin.listen_host, self.config.admin.listen_port
            )
        log.info(
            "listening: inside %s:%s, outside %s:%s (%s); media ports %d-%d",
            self.config.inside.listen_host, self.config.inside.listen_port,
            self.config.outside.listen_host, self.config.outside.listen_port,
            "+".join(self.config.sip.transports), self.config.media.port_min,
            self.config.media.port_max,
        )  # fmt: skip

    def close(self) -> None:
        self.resolver.close()
        for transport in self.transports.values():
            transport.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._admin is not None:
            self._admin.close()
        self.media.close_now()

    def _on_message(self, side: Side, data: bytes, source: Address) -> None:
        assert self._loop is not None
        try:
            out = self.core.receive(side, data, source, self._loop.time())
        except Exception:  # a bug must cost one message, never the process
            log.exception("%s: internal error handling a message from %s", side.value, source)
            return
        self._send(out)

    def _resolved(self, query: ResolveQuery, targets: list[Address], ttl_s: float) -> None:
        """A name lookup the core asked for is done: run what waited for it."""
        assert self._loop is not None
        try:
            out = self.core.resolved(query, targets, ttl_s, self._loop.time())
        except Exception:
            log.exception("internal error handling the lookup of %s", query.host)
            return
        self._send(out)

    def _send(self, out: list[Outbound]) -> None:
        if out and isinstance(self.media, WorkerEngine):
            self.media.flush()  # media commands first: see WorkerEngine.flush
        for item in out:
            self.transports[item.side].send(item.data, item.dest)
        self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        deadline = self.core.next_deadline()
        if self._timer is not None:
            armed = self._timer_at
            if deadline is not None and armed is not None and abs(armed - deadline) < 0.001:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._fire)
            self._timer_at = deadline

    def _hold_flow(self, flow: Address, held: bool) -> None:
        """The registrar keeps (or lets go of) a phone's connection: bindings are only
        ever made on the inside."""
        self.transports[Side.INSIDE].hold_flow(flow, held)

    def _wake(self) -> None:
        """Media reported an event (SRTP authenticated): let the core act on it soon.

        Called from inside a packet handler, so the core is not re-entered here."""
        if self._loop is not None:
            self._loop.call_soon(self._poll)

    def _media_lost(self, sessions: list[WorkerSession]) -> None:
        """A media worker died: hang up the calls whose media it carried."""
        if self._loop is None:
            return
        try:
            out = self.core.media_lost(sessions, self._loop.time())
        except Exception:
            log.exception("internal error hanging up the calls of a lost media worker")
            return
        self._send(out)

    def _fire(self) -> None:
        self._timer = None
        self._poll()

    def _poll(self) -> None:
        assert self._loop is not None
        try:
            out = self.core.poll(self._loop.time())
        except Exception:
            log.exception("internal error in timers")
            out = []
        self._send(out)

    def status(self) -> dict[str, Any]:
        stats = self.core.stats
        return {
            "calls": self.core.active_calls(),
            "stats": {
                "calls_total": stats.calls_total,
                "calls_answered": stats.calls_answered,
                "calls_failed": stats.calls_failed,
                "bad_messages": stats.bad_messages,
                "registrations": stats.registrations,
                "responses": stats.responses,
                "secured": stats.secured,
                "clear_reasons": stats.clear_reasons,
            },
            "bindings": {k: v.contact for k, v in self.core.bindings.items()},
            "registrations_upstream": len(self.core.registrar.upstream),
            "sip": {
                "transactions": {
                    side.value: layer.snapshot() for side, layer in self.core.layers.items()
                },
                "transports": {
                    side.value: transport.snapshot() for side, transport in self.transports.items()
                },
                "caches": {
                    **{name: memo.snapshot() for name, memo in MEMOS.items()},
                    "header_names": CANONICAL_MEMO.snapshot(),
                },
            },
            "media": {
                "sessions": self.media.sessions,
                "pooled_pairs": self.media.pooled,
                "pooled_rtp_ports": self.media.pooled_ports(),
                "workers": self.media.workers() if isinstance(self.media, WorkerEngine) else [],
            },
        }

    async def _admin_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Minimal HTTP/1.0: ``GET /calls`` or ``GET /status`` returns JSON."""
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            path = request.decode("latin-1").split(" ")[1] if request.count(b" ") >= 2 else "/"
            status = self.status()
            body = json.dumps(status["calls"] if path == "/calls" else status, default=str)
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body.encode()
            )
            await writer.drain()
        except (OSError, TimeoutError, IndexError):
            pass
        finally:
            writer.close()


def transport_limits(config: Config) -> TransportLimits:
    """What each SIP listener accepts, from ``[sip]`` and ``[limits]``."""
    limits = config.limits
    max_tcp = limits.max_tcp_connections or auto_max_connections(descriptor_limit())
    return TransportLimits(
        max_message=config.sip.max_message_bytes,
        tcp=TcpLimits(
            max_connections=max_tcp,
            max_per_source=limits.max_tcp_connections_per_source,
            idle_timeout_s=config.sip.tcp_idle_timeout_s,
            message_timeout_s=config.sip.tcp_message_timeout_s,
        ),
    )


def setup_logging(config: Config) -> None:
    configure_logging(config.log.level, config.log.format)


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    server = ProxyServer(config)
    try:
        await server.start()
    except OSError as exc:
        server.close()
        raise RuntimeError(f"cannot listen: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    start_heap_trimming()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        server.close()


def run(config: Config) -> int:
    setup_logging(config)
    tune_gc()
    loop_name = install_fast_loop()
    descriptors = raise_descriptor_limit()
    log.info("sipura-proxy starting (%s event loop, %d descriptors)", loop_name, descriptors)
    try:
        asyncio.run(serve(config))
    except RuntimeError as exc:
        log.error("%s", exc)
        print(f"sipura-proxy: {exc}", file=sys.stderr)
        return 2
    return 0
