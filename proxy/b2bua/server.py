"""`sipura-proxy run`: the asyncio process that owns sockets and timers.

The B2BUA core is sans-IO; this module is the thin edge around it: two
:class:`SipTransport` (inside, outside), the media engine, one timer handle re-armed at
the core's next deadline, and signal handling. ``now`` for the core is the event loop's
monotonic clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

from proxy.admin.exporter import Snapshot
from proxy.admin.http import AdminHttp
from proxy.admin.routes import build_routes, load_token, warn_if_exposed
from proxy.b2bua.config import Config, load_config
from proxy.b2bua.core import B2BUA, Outbound
from proxy.b2bua.identity import open_lines
from proxy.b2bua.lifecycle import Lifecycle
from proxy.b2bua.line_keys import Security, load_security
from proxy.b2bua.reload import plan_reload
from proxy.b2bua.resolver import DnsResolver, families_for
from proxy.b2bua.routing import ResolveQuery
from proxy.b2bua.secure import SecureState
from proxy.b2bua.tls_keys import load_tls
from proxy.errors import UsageError
from proxy.logsetup import configure_logging, set_level
from proxy.media.commands import MediaEvent
from proxy.media.engine import Side
from proxy.media.relay import RelayEngine
from proxy.media.worker_pool import WorkerPool
from proxy.metrics import MediaTotals
from proxy.runtime import (
    descriptor_limit,
    install_fast_loop,
    raise_descriptor_limit,
    start_heap_trimming,
    tune_gc,
)
from proxy.sip.connections import TcpLimits, auto_max_connections
from proxy.sip.headers import MEMOS
from proxy.sip.memo import forget_all as forget_memos
from proxy.sip.message import CANONICAL_MEMO
from proxy.sip.transaction import Address
from proxy.sip.transport import SipTransport, TlsSettings, TransportLimits
from proxy.xsipura.trust import CHECKED_MCS

log = logging.getLogger("sipura.server")

TIMER_GRID_S = 0.01
"""The core's timers fire on a 10 ms grid (finer if ``[sip] t1_ms`` is under 100 ms: a
tenth of T1). Every call leaves a trail of transaction timers (retransmission, K, J, L;
x-sipura's start): one wake-up and poll of the whole core each, ~4 per plain and ~6 per
secured call. With the default timers the shortest is the 100 ms x-sipura media check
(T1 is 500 ms), so firing up to 10 ms late changes no outcome, and lets the timers of
calls set up together share a wake-up (decisions.md §61)."""


class ProxyServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        workers = config.media.worker_count()
        self.media: RelayEngine | WorkerPool
        if workers:
            self.media = WorkerPool(
                port_min=config.media.port_min,
                port_max=config.media.port_max,
                inside_ip=config.inside.media_ip,
                outside_ip=config.outside.media_ip,
                workers=workers,
                log_level=config.log.level,
                log_format=config.log.format,
                fast_path=config.media.fast_path,
            )
        else:
            self.media = RelayEngine(
                port_min=config.media.port_min,
                port_max=config.media.port_max,
                inside_ip=config.inside.media_ip,
                outside_ip=config.outside.media_ip,
                fast_path=config.media.fast_path,
            )
        self.security = load_security(config)
        _log_security(config, self.security)
        self.admin_token = load_token(config)
        self.tls = load_tls(config)
        for warning in self.tls.warnings:
            log.warning("%s: %s", config.source, warning)
        self.resolver = DnsResolver(
            self._resolved, config.dns, config.sip.transports,
            families_for(config.outside.listen_host),
        )  # fmt: skip
        self.core = B2BUA(config, self.media, self.security, resolver=self.resolver)
        self.media.on_event = self._media_event_soon
        limits = transport_limits(config)
        self.transports = {
            side: SipTransport(
                side.value,
                cfg.listen_host,
                cfg.listen_port,
                lambda data, source, side=side: self._on_message(side, data, source),  # type: ignore[misc]
                TlsSettings(
                    cfg.tls_listen, self.tls.server, self.tls.client, config.tls.handshake_timeout_s
                ),
                lambda dest, side=side: self._transport_failed(side, dest),  # type: ignore[misc]
                limits=limits,
            )
            for side, cfg in ((Side.INSIDE, config.inside), (Side.OUTSIDE, config.outside))
        }
        self.core.registrar.on_flow = self._hold_flow
        self._timer: asyncio.Handle | None = None
        self._arm_scheduled = False
        self._grid = min(TIMER_GRID_S, config.sip.t1_s / 10)
        self._closed = False
        self._timer_at: float | None = None
        """The deadline ``_timer`` was armed for: uvloop's ``call_at`` with a time already
        past returns a plain Handle, which has no ``when()``."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admin: AdminHttp | None = None
        self.admin_address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(self.media, WorkerPool):
            self.media.start()
        for transport in self.transports.values():
            await transport.start(self.config.sip.transports)
        admin = self.config.admin
        if admin.listen_host is not None and admin.listen_port is not None:
            self._admin = AdminHttp(build_routes(self), self.admin_token)
            self.admin_address = await self._admin.start(admin.listen_host, admin.listen_port)
            warn_if_exposed(self.config, self.admin_token)
        log.info(
            "listening: inside %s:%s, outside %s:%s (%s); TLS inside %s, outside %s; "
            "media ports %d-%d",
            self.config.inside.listen_host, self.config.inside.listen_port,
            self.config.outside.listen_host, self.config.outside.listen_port,
            "+".join(self.config.sip.transports), self.config.inside.tls_listen or "-",
            self.config.outside.tls_listen or "-", self.config.media.port_min,
            self.config.media.port_max,
        )  # fmt: skip

    def close(self) -> None:
        self.resolver.close()
        for transport in self.transports.values():
            transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True  # nothing re-arms the timer any more
        if self._admin is not None:
            self._admin.close()
        self.core.media_closing(self._now())
        self.media.close_now()

    def _on_message(self, side: Side, data: bytes, source: Address) -> None:
        assert self._loop is not None
        try:
            out = self.core.receive(side, data, source, self._loop.time())
        except Exception:  # a bug must cost one message, never the process
            log.exception("%s: internal error handling a message from %s", side.value, source)
            return
        self._send(out)

    def _transport_failed(self, side: Side, dest: Address) -> None:
        """No connection to ``dest``: the transactions waiting on it fail (over) now."""
        assert self._loop is not None
        try:
            out = self.core.transport_failed(side, dest, self._loop.time())
        except Exception:
            log.exception("internal error handling a transport failure toward %s", dest)
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
        if out and isinstance(self.media, WorkerPool):
            self.media.flush()  # media commands first: see WorkerPool.flush
        for item in out:
            self.transports[item.side].send(item.data, item.dest)
        self._arm_soon()

    def _arm_soon(self) -> None:
        """Re-arm the timer once the messages of this loop iteration are handled: under
        load the transport hands over many datagrams per wake-up, and the core's next
        deadline is only needed after the last of them."""
        if not self._arm_scheduled and self._loop is not None:
            self._arm_scheduled = True
            self._loop.call_soon(self._arm_now)

    def _arm_now(self) -> None:
        self._arm_scheduled = False
        if not self._closed:
            self._arm()

    def _arm(self) -> None:
        """One timer, at the core's next deadline rounded up to the grid (:data:`TIMER_GRID_S`)."""
        assert self._loop is not None
        deadline = self.core.next_deadline()
        grid = self._grid
        when = None if deadline is None else math.ceil(deadline / grid) * grid
        if self._timer is not None:
            armed = self._timer_at
            if when is not None and armed is not None and abs(armed - when) < grid / 2:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._loop.call_at(when, self._fire)
            self._timer_at = when

    def _hold_flow(self, flow: Address, held: bool) -> None:
        """The registrar keeps (or lets go of) a phone's connection: bindings are only
        ever made on the inside."""
        self.transports[Side.INSIDE].hold_flow(flow, held)

    def _media_event_soon(self, event: MediaEvent) -> None:
        """The media engine reports an event (media flowing, SRTP authenticated, sessions
        lost): a call waiting for the phone's RTP hears of its first packet here, instead
        of polling or of a poll of the whole core per first packet. Called
        from inside a packet handler or a channel reader: the core gets it on the next
        loop iteration, not from in there."""
        if self._loop is not None:
            self._loop.call_soon(self._media_event, event)

    def _media_event(self, event: MediaEvent) -> None:
        assert self._loop is not None
        try:
            out = self.core.on_media_event(event, self._loop.time())
        except Exception:
            log.exception("internal error handling a media event (%s)", type(event).__name__)
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
        now = self._now()
        registrations = self.core.registrations(now)
        return {
            "calls": self.core.active_calls(now),
            "draining": self.core.draining,
            "drain": self.core.drain.describe(self._now()),
            "stats": {
                "calls_total": stats.calls_total,
                "calls_answered": stats.calls_answered,
                "calls_failed": stats.calls_failed,
                "bad_messages": stats.bad_messages,
                "registrations": stats.registrations,
                "responses": stats.responses,
                "secured": stats.secured,
                "clear_reasons": stats.clear_reasons,
                **self.core.features(),
            },
            "bindings": registrations.pop("bindings"),
            "registrations": registrations,
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
                "workers": self.media.workers(),
                "packet_path": self.media.packet_path,
            },
            "lines_mc_expired": sorted(self.security.expired),
            "xsipura": {"mc_cache": CHECKED_MCS.snapshot()},
        }

    # --- lifecycle ------------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def begin_drain(self) -> None:
        """Stop taking calls: new INVITEs, OPTIONS and REGISTERs get 503 (a dispatcher in
        front fails over) and ``/health`` turns 503; calls in progress go on."""
        self.core.start_drain(self._now())

    def hang_up_all(self) -> None:
        """End every call now (the end of a drain): BYE on both legs with
        ``Reason: SIP;cause=503;text="proxy shutting down"``, ringing calls cancelled."""
        if self._loop is None:
            return
        try:
            out = self.core.hang_up_all(self._loop.time())
        except Exception:
            log.exception("internal error hanging up the calls left")
            return
        self._send(out)

    # --- admin endpoint -----------------------------------------------------------------

    def health(self) -> str | None:
        if self.core.draining:
            return "draining"
        if isinstance(self.media, WorkerPool) and not any(w["alive"] for w in self.media.workers()):
            return "no live media worker"
        return None

    def metrics_snapshot(self) -> Snapshot:
        core = self.core
        active = {"yes": 0, "no": 0}
        live = MediaTotals()
        for call in core.calls.values():
            secure = call.security is not None and call.security.state is SecureState.SECURE
            active["yes" if secure else "no"] += 1
            if call.media is not None:
                live.add(call.media.session.stats())
        if isinstance(self.media, WorkerPool):
            workers = self.media.workers()
            ports_free = sum(int(w["ports_free"]) for w in workers)
            alive = sum(1 for w in workers if w["alive"])
            restarts = sum(int(w["restarts"]) for w in workers)
        else:
            ports_free, alive, restarts = self.media.ports.available + self.media.pooled, 0, 0
        user_ids = {line.user_key: line.user_id for line in self.config.lines}
        m = core.stats.metrics
        return Snapshot(
            calls_active=active,
            calls_total=m.calls_by_direction,
            secure_calls_total=m.secure_by_role,
            clear_calls_total=core.stats.clear_reasons,
            handshake_seconds=m.handshake_seconds,
            media=m.media_released.plus(live),
            media_ports_free=ports_free,
            media_workers_alive=alive,
            media_worker_restarts=restarts,
            sip_responses=core.stats.responses,
            line_mc_expiry={
                user_ids.get(key, key): when.timestamp()
                for key, when in self.security.mc_expiry().items()
            },
            sip_transports={
                side.value: transport.counters() for side, transport in self.transports.items()
            },
        )

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration file; apply what new calls use (proxy/b2bua/reload.py).

        An invalid file changes nothing: its error is logged and returned."""
        source = self.config.source
        try:
            new = load_config(source)
            security = load_security(new)
            token = load_token(new)
        except UsageError as exc:
            log.error("reload rejected, running configuration kept: %s", exc)
            return False, f"rejected: {exc}"
        plan = plan_reload(self.config, new)
        self.config = plan.config
        self.security = security
        self.admin_token = token
        self.core.reload(plan.config, security)
        if self._admin is not None:
            self._admin.token = token
        set_level(plan.config.log.level)
        _log_security(plan.config, security)
        if plan.restart_needed:
            log.warning("reload: %s changed; takes effect only after a restart",
                        ", ".join(plan.restart_needed))  # fmt: skip
        summary = (
            f"reloaded {source}: {len(plan.config.lines)} lines, {len(security.lines)} secure; "
            f"changed: {', '.join(plan.changed) or 'nothing'}"
        )
        log.info("%s", summary)
        return True, summary


def _log_security(config: Config, security: Security) -> None:
    for warning in (*security.warnings, *open_lines(config)):
        log.warning("%s: %s", config.source, warning)
    for error in security.errors:
        log.warning("%s", error)


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
    start_heap_trimming(release=forget_memos)
    try:
        await Lifecycle(server).run(ready)
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
