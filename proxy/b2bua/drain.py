"""Draining: stop taking new work, let the calls in progress finish, then end the rest.

SIGTERM (:mod:`proxy.b2bua.lifecycle`) starts a drain. From then on every request that
would start something new is answered ``503 Service Unavailable`` with a
``Retry-After`` of the time the drain has left: an INVITE outside a dialog (a new call),
OPTIONS (what a dispatcher in front probes with: the 503 takes this instance out of its
rotation, and its failover sends the refused INVITE to another instance) and REGISTER
(a phone's refresh moves to an instance that will still be there). Requests inside a
dialog (re-INVITE, UPDATE, INFO, BYE...) and CANCEL go on, so calls in progress finish
normally. When the drain runs out (``[run] drain_s``, or a second signal), every call
left is hung up: BYE on both legs with ``Reason: SIP;cause=503;text="proxy shutting
down"``; a call still ringing is answered 503 with ``Retry-After`` and the same Reason
toward the caller, and CANCELled with that Reason toward the callee (a CANCEL held back
until the callee's first provisional answer carries it too).

Each refusal is counted (``/status``: ``drain.refused`` by method) and logged once per
(method, source) per interval through the core's shared limiter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Final

from proxy.b2bua.calls import CallTable
from proxy.b2bua.messages import Reject
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.teardown import Teardown, reason_header
from proxy.logsetup import bind_call
from proxy.sip.transaction import Address

__all__ = ["REFUSED_WHILE_DRAINING", "SHUTDOWN_CAUSE", "SHUTDOWN_REASON", "Drain"]

log = logging.getLogger("sipura.b2bua")

REFUSED_WHILE_DRAINING: Final = frozenset({"INVITE", "OPTIONS", "REGISTER"})
"""Out-of-dialog methods answered 503 while draining."""
SHUTDOWN_REASON: Final = "proxy shutting down"
SHUTDOWN_CAUSE: Final = 503
"""The ``Reason`` of the BYEs, CANCELs and 503s that end the calls left when a drain
runs out."""
_HUNG_UP: Final = {
    True: "call %d: ringing at the drain's end: 503 to the caller, CANCEL to the callee (%s)",
    False: "call %d: up at the drain's end: BYE on both legs (%s)",
}
"""The one line per call a drain's end logs, by whether the call was still ringing."""


@dataclass(slots=True)
class Drain:
    """The drain's state (none until :meth:`start`) and what it refused."""

    sides: SipSides
    calls: CallTable
    teardown: Teardown
    started_at: float | None = None
    ends_at: float | None = None
    """When the calls left are hung up (``started_at + drain_s``)."""
    refused: dict[str, int] = field(default_factory=dict)
    """New requests answered 503 since the drain started, by method."""
    calls_at_start: int = 0
    hung_up: int = 0
    """Calls the end of the drain hung up (BYE or CANCEL)."""

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def start(self, now: float, drain_s: float) -> bool:
        """Start draining (False: already draining; the first start's deadline stays)."""
        if self.started_at is not None:
            return False
        self.started_at = now
        self.ends_at = now + drain_s
        self.calls_at_start = len(self.calls)
        return True

    def refuse_new(self, method: str, source: Address, now: float) -> None:
        """Raise the 503 for an out-of-dialog ``method`` that starts something new."""
        if self.started_at is None or method not in REFUSED_WHILE_DRAINING:
            return
        self.refused[method] = self.refused.get(method, 0) + 1
        self.sides.noise.log(logging.INFO, f"{method} refused while draining", source.host, now,
                             "draining: %s from %s:%s answered 503", method, source.host,
                             source.port)  # fmt: skip
        raise Reject(503, "Service Unavailable", [("Retry-After", str(self.retry_after(now)))])

    def retry_after(self, now: float) -> int:
        """Seconds until this process is gone (a restarted one may take the request)."""
        left = (self.ends_at or now) - now
        return max(1, math.ceil(left))

    def hang_up_all(self, now: float, reason: str, cause: int) -> list[Outbound]:
        """End every call now, each with ``Reason: SIP;cause=<cause>;text="<reason>"``:
        BYE on both legs of an answered call; a ringing one answered ``503`` with
        ``Retry-After`` and that Reason toward the caller (as a new INVITE is while
        draining: the caller's side may fail over to another instance) and CANCEL, with
        that Reason, on every branch toward the callee. A call already ending is left to
        finish. One log line per call hung up, and one with the total."""
        out: list[Outbound] = []
        for call in list(self.calls.calls.values()):
            if call.cancelled:
                continue  # already being cancelled: its 487 ends it
            with bind_call(call.fields()):
                ringing = call.ringing
                final = (503, "Service Unavailable", self._final_headers(now, reason, cause))
                sent = self.teardown.hang_up(call, now, reason, cause, final)
                if sent:
                    self.hung_up += 1
                    log.info(_HUNG_UP[ringing], call.id, reason)
            out += sent
        if out:
            log.info("hung up %d calls (%s)", self.hung_up, reason)
        return out

    def _final_headers(self, now: float, reason: str, cause: int) -> list[tuple[str, str]]:
        return [
            ("Retry-After", str(self.retry_after(now))),
            ("Reason", reason_header(cause, reason)),
        ]

    def describe(self, now: float) -> dict[str, object]:
        """The ``/status`` ``drain`` object."""
        if self.started_at is None:
            return {"active": False}
        return {
            "active": True,
            "elapsed_s": round(now - self.started_at, 3),
            "hang_up_in_s": round(max(0.0, (self.ends_at or now) - now), 3),
            "calls_at_start": self.calls_at_start,
            "calls_left": len(self.calls),
            "refused": dict(self.refused),
            "hung_up": self.hung_up,
        }
