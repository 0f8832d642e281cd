"""The B2BUA engine: two SIP sides, calls bridged between them, sans-IO.

:class:`B2BUA` is fed datagrams/stream messages with the side and address they came
from and the current time; it returns :class:`Outbound` messages (side + bytes +
destination) and says, through :meth:`next_deadline`, when :meth:`poll` must run next.
Sockets, name lookups and timers live in the I/O edge (:mod:`proxy.b2bua.server`),
media ports behind a :class:`~proxy.media.engine.MediaEngine`. That split is what lets
the whole call model be tested in memory with a fake clock (decision 10).

This module only composes the parts and dispatches to them, by table:

* transaction events (:mod:`proxy.sip.transaction`) by event type;
* new requests by method: calls (:mod:`proxy.b2bua.invite`), registrations
  (:mod:`proxy.b2bua.registrar`), OPTIONS and one-shot relays
  (:mod:`proxy.b2bua.out_of_dialog`); requests in a dialog to
  :mod:`proxy.b2bua.dialogs`;
* responses and timeouts by the client transaction's context type (answers to INVITEs
  in :mod:`proxy.b2bua.answers`, keep-alives in :mod:`proxy.b2bua.keepalive`, dialogs
  a call does not keep in :mod:`proxy.b2bua.forking`);
* call deadlines by kind (x-sipura in :mod:`proxy.b2bua.secure_leg`, RTP timeout in
  :mod:`proxy.b2bua.media_watch`, Timer C and session timers in
  :mod:`proxy.b2bua.session_timer`); registrations and keep-alives have their own.

What passes through unchanged is everything the B2BUA does not own
(:mod:`proxy.b2bua.messages`, decision 11).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from proxy.b2bua.answers import InviteAnswers
from proxy.b2bua.bindings import Bindings
from proxy.b2bua.call_summary import log_ended
from proxy.b2bua.calls import CallTable, CallTimer
from proxy.b2bua.config import Config
from proxy.b2bua.dialogs import Dialogs
from proxy.b2bua.drain import SHUTDOWN_CAUSE, SHUTDOWN_REASON, Drain
from proxy.b2bua.fax import FaxPolicy
from proxy.b2bua.forking import EndedDialog, Forking
from proxy.b2bua.identity import LineIdentity
from proxy.b2bua.invite import CallSetup
from proxy.b2bua.keepalive import Keepalive, KeepaliveProbe
from proxy.b2bua.legs import Call, OwnRequest, RelayedRequest, new_tag
from proxy.b2bua.line_keys import Security
from proxy.b2bua.media_watch import MediaWatch
from proxy.b2bua.messages import (
    ALLOW,
    ONE_SHOT_METHODS,
    Reject,
    check_addresses,
    max_forwards,
    unsupported_requirements,
)
from proxy.b2bua.out_of_dialog import OneShot, OutOfDialog
from proxy.b2bua.registrar import RegisterRelay, Registrar
from proxy.b2bua.routing import Lookups, ResolveQuery, Resolver, Router, Unresolved
from proxy.b2bua.sdes_leg import SdesLegs
from proxy.b2bua.secure_leg import SecureLegs
from proxy.b2bua.session_timer import CallTimers
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.stats import Stats
from proxy.b2bua.status import describe_bindings, describe_call
from proxy.b2bua.teardown import Teardown
from proxy.b2bua.transfer import Transfers
from proxy.logsetup import bind_call
from proxy.media.commands import (
    MediaEvent,
    MediaFlowing,
    MediaReleased,
    SessionsLost,
    SrtpAuthenticated,
)
from proxy.media.engine import MediaEngine, Side
from proxy.sip.headers import SipHeaderError
from proxy.sip.message import Request, SipParseError, parse_message
from proxy.sip.stateless import stateless_response
from proxy.sip.transaction import (
    AckReceived,
    Address,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    StrayResponse,
    TransactionLayer,
    TransactionTimeout,
)

log = logging.getLogger("sipura.b2bua")

Handler = Callable[..., list[Outbound]]


class B2BUA:
    """Both SIP sides of the proxy and every call bridged between them."""

    def __init__(
        self,
        config: Config,
        media: MediaEngine,
        security: Security | None = None,
        utc_now: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        resolver: Resolver,
    ) -> None:
        self.config = config
        self.media = media
        self.security = security
        self.utc_now = utc_now
        """Wall clock for MC expiry only (injected: the core reads no clock itself)."""
        self.stats = Stats()
        self.sides = SipSides(config, self.stats)
        self.table = CallTable(self.stats, reports_final=media.reports_final)
        limits = config.limits
        bindings = Bindings(limits.max_bindings_per_aor, limits.max_aors)
        self.identity = LineIdentity(bindings, self.sides.noise)
        self.registrar = Registrar(config, self.sides, self.identity)
        self.lookups = Lookups(resolver)
        self.router = Router(config, self.registrar, self.lookups, config.sip.transports)
        self.registrar.router = self.router
        self.keepalive = Keepalive(self.sides, self.registrar, config.inside.keepalive_s)
        self.registrar.keepalive = self.keepalive
        self.teardown = Teardown(self.sides, self.table)
        self.secure = SecureLegs(self.sides, self.table, self.teardown, security, utc_now, media)
        self.watch = MediaWatch(config, self.table, self.teardown)
        self.forking = Forking(self.sides, self.table, self.router, self.teardown)
        self.transfers = Transfers(self.sides, self.table)
        self.timers = CallTimers(config, self.table, self.teardown)
        self.fax = FaxPolicy(config.xsipura, self.stats, self.sides.noise)
        self.sdes = SdesLegs(config)
        self.dialogs = Dialogs(self.sides, self.table, self.router, self.teardown, self.secure,
                               self.watch, self.sdes, self.forking, self.transfers,
                               self.timers, self.fax)  # fmt: skip
        self.setup = CallSetup(config, self.sides, self.table, self.router, media,
                               self.dialogs, self.secure, self.sdes, self.transfers,
                               self.timers)  # fmt: skip
        self.answers = InviteAnswers(self.sides, self.table, self.router, self.teardown,
                                     self.dialogs, self.forking, self.transfers, self.timers,
                                     self.setup)  # fmt: skip
        self.dialogs.setup = self.setup
        self.dialogs.answers = self.answers
        self.registrar.failovers = self.setup.failovers
        self.out_of_dialog = OutOfDialog(self.sides, self.router)
        self.drain = Drain(self.sides, self.table, self.teardown)
        self._events: dict[type, Handler] = {
            RequestReceived: self._on_request_event,
            AckReceived: self._on_ack,
            ResponseReceived: self._on_response,
            StrayResponse: lambda side, e, now: self.dialogs.on_stray(side, e.response),
            TransactionTimeout: self._on_timeout,
        }
        self._new_requests: dict[str, Handler] = {
            "INVITE": self.setup.on_invite,
            "OPTIONS": lambda side, tx, request, now: self.out_of_dialog.options(side, tx, now),
            "REGISTER": self.registrar.on_register,
            **{method: self.out_of_dialog.relay for method in ONE_SHOT_METHODS},
        }
        self._responses: dict[type, Handler] = {
            RelayedRequest: self.dialogs.on_response,
            OwnRequest: self.secure.on_own_response,
            RegisterRelay: self.registrar.on_response,
            OneShot: self.out_of_dialog.on_response,
            KeepaliveProbe: self.keepalive.on_response,
            EndedDialog: self.forking.on_ended_response,
        }
        self._timeouts: dict[type, Handler] = {
            RelayedRequest: self.dialogs.on_timeout,
            OwnRequest: self.secure.on_own_timeout,
            RegisterRelay: self.registrar.on_timeout,
            OneShot: self.out_of_dialog.on_timeout,
            KeepaliveProbe: self.keepalive.on_timeout,
            EndedDialog: self.forking.on_ended_timeout,
        }
        self._server_timeouts: dict[type, Handler] = {
            Call: self.setup.on_server_timeout,
        }
        self._call_timers: dict[CallTimer, Handler] = {
            CallTimer.SECURITY: self.secure.on_timer,
            CallTimer.RTP_TIMEOUT: self.watch.on_timer,
            CallTimer.TIMER_C: self.timers.on_timer_c,
            CallTimer.SESSION_EXPIRES: self.timers.on_session_expired,
        }
        self._media_events: dict[type[MediaEvent], Handler] = {
            MediaFlowing: self.secure.on_media_flowing,
            SrtpAuthenticated: self.secure.on_srtp_authenticated,
            SessionsLost: self.watch.on_sessions_lost,
            MediaReleased: self._on_media_released,
        }

    # --- state the edge and the operator read -----------------------------------------

    @property
    def calls(self) -> dict[int, Call]:
        return self.table.calls

    @property
    def bindings(self) -> Bindings:
        return self.registrar.bindings

    @property
    def layers(self) -> dict[Side, TransactionLayer]:
        return self.sides.layers

    def active_calls(self, now: float | None = None) -> list[dict[str, object]]:
        """Every call as ``calls`` and ``/status`` show it (``now``: the core's clock,
        for the deadlines shown as seconds from now)."""
        return [describe_call(call, self.table, now) for call in self.calls.values()]

    def registrations(self, now: float) -> dict[str, object]:
        """Bindings per address-of-record, and the keep-alive and identity counters."""
        return {
            "bindings": describe_bindings(self.bindings, now),
            "keepalive": {"tracked": len(self.keepalive), "sent": self.keepalive.sent,
                          "dropped": self.keepalive.dropped},
            "identity_refusals": self.identity.refusals,
        }  # fmt: skip

    def features(self) -> dict[str, object]:
        """Counters of the field-telephony features (forks, transfers, timers, fax)."""
        return {
            "dialogs_ended": self.forking.ended_dialogs,
            "replaces_mapped": self.transfers.mapped,
            "timer_c_fired": self.timers.timer_c_fired,
            "sessions_expired": self.timers.sessions_expired,
            "media_final_awaited": self.table.releasing,
            "fax_clear": self.stats.fax_clear,
            "fax_refused": self.stats.fax_refused,
        }

    def reload(self, config: Config, security: Security | None) -> None:
        """A new configuration for new calls; calls up keep the line and legs they have.

        Transaction timers and listen addresses are the edge's to restart; everything a
        new request reads (lines, routes, limits, x-sipura settings and keys) switches now.
        """
        self.config = config
        self.security = security
        self.sides.config = config
        self.sdes.config = config
        self.sides.configs = {Side.INSIDE: config.inside, Side.OUTSIDE: config.outside}
        self.registrar.config = config
        self.router.config = config
        self.router.transports = tuple(config.sip.transports)
        self.setup.config = config
        self.watch.config = config
        self.secure.security = security
        self.timers.config = config
        self.fax.settings = config.xsipura
        self.keepalive.interval_s = config.inside.keepalive_s
        self.bindings.max_per_aor = config.limits.max_bindings_per_aor
        self.bindings.max_aors = config.limits.max_aors

    # --- input ------------------------------------------------------------------------

    def receive(self, side: Side, data: bytes, source: Address, now: float) -> list[Outbound]:
        """One message from the network. Never raises for bad input."""
        try:
            message = parse_message(
                data, stream=source.reliable, max_size=self.config.sip.max_message_bytes
            )
            check_addresses(message)
        except SipParseError as exc:
            self.stats.bad_messages += 1
            self.sides.noise.log(logging.INFO, "malformed_message", source.host, now,
                                 "%s: dropped malformed message from %s:%s: %s", side.value,
                                 source.host, source.port, exc)  # fmt: skip
            reply = stateless_response(data, exc.status, str(exc))
            if reply is None:
                return []
            self.stats.count_response(exc.status)
            return [Outbound(side, reply, source)]
        try:
            events, transmits = self.sides.layers[side].receive(message, source, now)
            out = self.sides.wrap(side, transmits)
            for event in events:
                out += self._events[type(event)](side, event, now)
        except (SipParseError, SipHeaderError) as exc:
            self.stats.bad_messages += 1
            self.sides.noise.log(logging.INFO, "unusable_message", source.host, now,
                                 "%s: cannot process message from %s: %s", side.value,
                                 source.host, exc)  # fmt: skip
            out = []
        self._calls_ended(now)
        return out

    def poll(self, now: float) -> list[Outbound]:
        """Run everything due at ``now``: transaction timers, call deadlines, lookups
        the edge never answered."""
        out: list[Outbound] = []
        for side, layer in self.sides.layers.items():
            events, transmits = layer.poll(now)
            out += self.sides.wrap(side, transmits)
            for event in events:
                out += self._events[type(event)](side, event, now)
        for call, kind in self.table.due(now):
            with bind_call(call.fields()):
                out += self._call_timers[kind](call, now)
        for work in self.lookups.expire(now):
            out += work(now)
        self.registrar.expire(now)
        out += self.keepalive.poll(now)
        self.sides.noise.flush(now)
        self._calls_ended(now)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must run next (None: only on input). Cost independent of
        the number of calls: every source keeps its deadlines on a heap."""
        deadlines = [
            d
            for d in (
                self.sides.layers[Side.INSIDE].next_deadline(),
                self.sides.layers[Side.OUTSIDE].next_deadline(),
                self.table.next_deadline(),
                self.lookups.next_deadline(),
                self.bindings.next_deadline(),
                self.keepalive.next_deadline(),
                self.sides.noise.limiter.next_expiry(),
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def resolved(
        self, query: ResolveQuery, targets: Sequence[Address], ttl_s: float, now: float
    ) -> list[Outbound]:
        """The edge's answer to a name lookup the core asked for (no targets: failed);
        the requests that waited for it are handled now."""
        out: list[Outbound] = []
        for work in self.lookups.answer(query, targets, ttl_s, now):
            out += work(now)
        self._calls_ended(now)
        return out

    def transport_failed(self, side: Side, dest: Address, now: float) -> list[Outbound]:
        """The edge could not connect to ``dest`` (TCP refused, TLS handshake or
        certificate check failed): what waited on it times out now (and fails over)."""
        out: list[Outbound] = []
        for event in self.sides.layers[side].fail_transport(dest, now):
            out += self._events[type(event)](side, event, now)
        return out

    def on_media_event(self, event: MediaEvent, now: float) -> list[Outbound]:
        """What the media engine reported (SRTP authenticated, sessions lost), handed
        over by the I/O edge on a loop iteration of its own, never from inside a call
        into the engine."""
        out = self._media_events[type(event)](event, now)
        self._calls_ended(now)
        return out

    # --- draining (SIGTERM) -----------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.drain.active

    def start_drain(self, now: float, drain_s: float | None = None) -> None:
        """Stop taking new calls (INVITE, OPTIONS, REGISTER outside a dialog get 503 with
        Retry-After; :mod:`proxy.b2bua.drain`); calls in progress go on. ``drain_s``
        (default ``[run] drain_s``) is when :meth:`hang_up_all` is due."""
        limit = self.config.run.drain_s if drain_s is None else drain_s
        if self.drain.start(now, limit):
            log.info("draining: %d calls in progress; new calls, OPTIONS and REGISTER get 503 "
                     "for the next %d s", len(self.table), limit)  # fmt: skip

    def hang_up_all(
        self, now: float, reason: str = SHUTDOWN_REASON, cause: int = SHUTDOWN_CAUSE
    ) -> list[Outbound]:
        """End every call: BYE on both legs with ``Reason: SIP;cause=<cause>;text=
        "<reason>"``, ringing calls cancelled. The calls leave the table as their BYEs
        (or the callee's answer to the CANCEL) are answered or time out."""
        out = self.drain.hang_up_all(now, reason, cause)
        self._calls_ended(now)
        return out

    def _on_media_released(self, event: MediaReleased, now: float) -> list[Outbound]:
        """A released session's final counters (an engine in other processes): the
        totals take them, and the call's summary line follows in :meth:`_calls_ended`."""
        self.table.media_released(event.session, event.stats)
        return []

    def media_closing(self, now: float) -> None:
        """The media engine is about to close (shutdown): the calls whose final media
        counters have not come yet are summed and summarized with the last reported."""
        self.table.flush_released()
        self._calls_ended(now)

    def _calls_ended(self, now: float) -> None:
        """Stamp the end of each call that ended while handling one input, and write the
        summary line of each whose media counters are final (at once with the in-process
        relay; when the engine's ``MediaReleased`` came, with workers)."""
        table = self.table
        if table.ended:
            for call in table.take_ended():
                call.ended_at = now
        if table.ready:
            log_ended(table.take_ready(), now)

    # --- dispatch ---------------------------------------------------------------------

    def _on_request_event(self, side: Side, event: RequestReceived, now: float) -> list[Outbound]:
        tx = event.tx
        request = event.request
        try:
            return self._on_request(side, tx, request, now)
        except Reject as rejection:
            if rejection.cause:
                self.sides.refusal(rejection.status, rejection.cause, tx.source, now,
                                   f"{request.method} {request.uri} from {tx.source.host}:"
                                   f"{tx.source.port}")  # fmt: skip
            return self.sides.respond(side, tx, rejection.status, rejection.reason, now,
                                      to_tag=new_tag(), extra=rejection.extra)  # fmt: skip
        except (SipHeaderError, SipParseError) as exc:
            # A header the handlers read turned out malformed (``Expires: ²``): the
            # request is answered, never left to leak its transaction.
            self.stats.bad_messages += 1
            log.info("%s: bad %s from %s:%s: %s", side.value, request.method, tx.source.host,
                     tx.source.port, exc)  # fmt: skip
            return self.sides.respond(side, tx, 400, "Bad Request", now, to_tag=new_tag())
        except Unresolved as pending:

            def again(now: float) -> list[Outbound]:
                return self._on_request_event(side, event, now)

            if self.lookups.park(pending.query, again):
                return []
            self.sides.refusal(503, "name lookups backlog", tx.source, now,
                               f"{request.method} {request.uri}: too many requests already "
                               f"wait for {pending.query}")  # fmt: skip
            return self.sides.respond(side, tx, 503, "Service Unavailable", now,
                                      to_tag=new_tag(), extra=[("Retry-After", "5")])  # fmt: skip

    def _on_request(
        self, side: Side, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        method = request.method
        if method == "CANCEL":
            return self.dialogs.on_cancel(side, tx, request, now)
        to_tag = request.to.tag
        if not to_tag:  # a new call, probe or registration: refused while draining
            self.drain.refuse_new(method, tx.source, now)
        if max_forwards(request) == 0:
            if method == "OPTIONS":
                return self.out_of_dialog.options(side, tx, now)
            raise Reject(483, "Too Many Hops")  # in a dialog too: it cannot be relayed
        if to_tag:
            found = self.table.find(side, request.call_id, to_tag)
            if found is None:
                raise Reject(481, "Call/Transaction Does Not Exist")
            with bind_call(found[0].fields()):
                return self.dialogs.on_request(side, tx, request, found[0], found[1], now)
        if method != "INVITE" and (unsupported := unsupported_requirements(request)):
            raise Reject(420, "Bad Extension", [("Unsupported", ", ".join(unsupported))])
        handler = self._new_requests.get(method)
        if handler is None:
            raise Reject(501, "Not Implemented", [("Allow", ALLOW)])
        return handler(side, tx, request, now)

    def _on_ack(self, side: Side, event: AckReceived, now: float) -> list[Outbound]:
        request = event.request
        found = self.table.find(side, request.call_id, request.to.tag or "")
        if found is None:
            return []
        with bind_call(found[0].fields()):
            return self.dialogs.on_ack(side, request, event.source, now)

    def _on_response(self, side: Side, event: ResponseReceived, now: float) -> list[Outbound]:
        context: Any = event.tx.context
        handler = self._responses.get(type(context))
        if handler is None:
            return []
        call: Call | None = getattr(context, "call", None)
        if call is None:
            return handler(context, event.tx, event.response, now)
        with bind_call(call.fields()):
            return handler(context, event.tx, event.response, now)

    def _on_timeout(self, side: Side, event: TransactionTimeout, now: float) -> list[Outbound]:
        context: Any = event.tx.context
        table = self._server_timeouts if isinstance(event.tx, ServerTransaction) else self._timeouts
        handler = table.get(type(context))
        if handler is None:
            return []
        call: Call | None = context if type(context) is Call else getattr(context, "call", None)
        if call is None:
            return handler(context, event.tx, now)
        with bind_call(call.fields()):
            return handler(context, event.tx, now)


__all__ = ["B2BUA", "Outbound"]
