"""Who may speak as a line: the line's identity is its phone's, not anyone's on the LAN.

A line's number opens its Mini Certificate: a call from the inside that claims the line
(in From) is placed as that line and verified by the far x-sipura peer as the line's
owner. So the claim is only believed from the line's phone, known by where its requests
come from (decision 44):

* a flow one of its contacts registered on (address and port; a TCP connection by its
  remote port). Where the upstream registrar challenged the REGISTER, that is the flow
  that authenticated: the binding is only stored from the registrar's 2xx;
* its static ``contact`` (address and port, the host resolved by the edge);
* a source listed in ``[[line]] allowed_sources`` (``ip``, ``ip:port``, ``cidr``).

Any other source claiming a line's user is refused with 403, logged once per source and
reason (rate-limited), and never reaches x-sipura. When the proxy itself is the
registrar (no ``[outside] registrar``), nothing authenticates a REGISTER: a line with a
static contact or ``allowed_sources`` only accepts REGISTERs from those sources; a line
with neither accepts them from anywhere, and the proxy warns about it at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy.b2bua.bindings import Bindings
from proxy.b2bua.config import Config, LineConfig
from proxy.b2bua.messages import Reject
from proxy.ratelimit import LogLimiter
from proxy.sip.transaction import Address

log = logging.getLogger("sipura.b2bua")

Resolve = Callable[[str, float], Address]
"""The router's resolver: a static contact's URI -> its address (may raise
:class:`~proxy.b2bua.routing.Unresolved`, which parks the request, or Reject)."""


class LineIdentity:
    """The check, and the rate-limited log of refusals."""

    def __init__(self, bindings: Bindings, noise: LogLimiter) -> None:
        self.bindings = bindings
        self.resolve: Resolve | None = None
        """Set once the router exists."""
        self.refusals = 0
        self._log = noise
        """The core's one limiter for repeated log lines (``SipSides.noise``)."""

    def is_phone(self, line: LineConfig, source: Address, now: float) -> bool:
        """``source`` is one of the line's registered flows, its static contact or an
        allowed source."""
        for binding in self.bindings.live(line.user_key, now):
            flow = binding.flow
            if flow.host == source.host and flow.port == source.port:
                return True
            if flow.conn is not None and flow.conn == source.conn:
                return True
        return self.configured(line, source, now)

    def configured(self, line: LineConfig, source: Address, now: float) -> bool:
        """``source`` is the line's static contact or one of its ``allowed_sources``."""
        if any(allowed.matches(source.host, source.port) for allowed in line.allowed_sources):
            return True
        return self.static_contact(line, source, now)

    def static_contact(self, line: LineConfig, source: Address, now: float) -> bool:
        """``source`` is the line's static contact (address and port)."""
        if not line.contact or self.resolve is None:
            return False
        try:
            contact = self.resolve(line.contact, now)
        except Reject:
            return False
        return (contact.host, contact.port) == (source.host, source.port)

    def may_register(self, line: LineConfig, source: Address, now: float) -> bool:
        """A REGISTER for ``line`` the proxy answers itself: only from the configured
        sources when the line has any (nothing else authenticates it)."""
        if not line.contact and not line.allowed_sources:
            return True
        return self.configured(line, source, now)

    def refuse(self, line: LineConfig, source: Address, what: str, now: float) -> Reject:
        """Log (rate-limited) and return the 403 for a source that is not the line's."""
        self.refusals += 1
        where = f"{source.host}:{source.port}"
        self._log.log(logging.WARNING, f"not_line_phone:{line.user_key}", where, now,
                      "refused %s claiming line %s from %s/%s: not the line's phone "
                      "(registered flow, static contact or allowed_sources)", what,
                      line.user_id, where, source.transport)  # fmt: skip
        return Reject(403, "Forbidden", [("Warning", '399 - "not this line\'s phone"')])

    def refuse_unknown(self, source: Address, user: str, what: str, now: float) -> Reject:
        """Log (rate-limited) and return the 403 for an inside user without a line when
        ``[inside] unknown_users = "reject"``."""
        where = f"{source.host}:{source.port}"
        self._log.log(logging.INFO, "unknown_user", where, now,
                      "refused %s from %s for %r: no [[line]] and inside.unknown_users = "
                      "reject", what, where, user)  # fmt: skip
        return Reject(403, "Forbidden")


def open_lines(config: Config) -> list[str]:
    """Start-up warnings: lines any inside device can register as (the proxy is the
    registrar, and the line names no source to check against)."""
    if config.outside.registrar:
        return []
    return [
        f"line {line.user_id}: any inside device may register as this line "
        "(no [outside] registrar authenticates it; set contact or allowed_sources)"
        for line in config.lines
        if not line.contact and not line.allowed_sources
    ]
