"""Call deadlines that end calls: Timer C, RFC 4028 session timers, held-call media.

* Timer C (RFC 3261 §16.6, ``[sip] timer_c_s``): an INVITE that rings without a final
  answer is given up: CANCEL toward the callee, 408 to the caller, ports freed. Armed
  when the INVITE goes out and re-armed by every provisional response, as §16.6 says.
* Session timers (RFC 4028): the ``Session-Expires`` negotiation passes end to end
  untouched (the UAs refresh); the proxy only watches. Every 2xx to an INVITE or UPDATE
  in the call states the interval in force (no ``Session-Expires``: none); when no
  refresh has succeeded for a whole interval, the session is dead and both legs get a
  BYE with ``Reason: SIP;cause=408;text="session timer expired"``. The refresher
  refreshes at half the interval, so the whole interval leaves it every chance.

Each is one :class:`~proxy.b2bua.calls.CallTimer` deadline per call on the call table's
heap, never a scan.
"""

from __future__ import annotations

import logging

from proxy.b2bua.calls import CallTable, CallTimer
from proxy.b2bua.config import Config
from proxy.b2bua.legs import Call, CallState
from proxy.b2bua.sides import Outbound
from proxy.b2bua.teardown import Teardown
from proxy.sip.message import Response

log = logging.getLogger("sipura.b2bua")

SESSION_EXPIRED = "session timer expired"
MAX_SESSION_INTERVAL = 86400.0
"""A longer Session-Expires is enforced as this (a day)."""


def session_expires(response: Response) -> float:
    """The delta-seconds of ``Session-Expires`` (or its compact ``x``); 0 when absent or
    malformed (then no session timer is in force)."""
    value = response.get("session-expires")
    if value is None:
        return 0.0
    number = value.split(";", 1)[0].strip()
    if not number or len(number) > 10 or not (number.isascii() and number.isdigit()):
        return 0.0
    return min(float(int(number)), MAX_SESSION_INTERVAL)


class CallTimers:
    def __init__(self, config: Config, calls: CallTable, teardown: Teardown) -> None:
        self.config = config
        self.calls = calls
        self.teardown = teardown
        self.timer_c_fired = 0
        self.sessions_expired = 0

    # --- Timer C ----------------------------------------------------------------------

    def ringing(self, call: Call, now: float) -> None:
        """The INVITE went out, or a provisional answer came: (re)start Timer C."""
        timer_c = self.config.sip.timer_c_s
        if timer_c and call.ringing:
            self.calls.arm(call, CallTimer.TIMER_C, now + timer_c)

    def answered(self, call: Call) -> None:
        self.calls.arm(call, CallTimer.TIMER_C, None)

    def on_timer_c(self, call: Call, now: float) -> list[Outbound]:
        if not call.ringing or call.cancelled:
            return []
        self.timer_c_fired += 1
        call.end("proxy", "Timer C: no final answer")
        log.info("call %d: no final answer in %d s (Timer C): cancelling", call.id,
                 self.config.sip.timer_c_s)  # fmt: skip
        return self.teardown.cancel_call(call, now, 408, "Request Timeout")

    # --- RFC 4028 ---------------------------------------------------------------------

    def refreshed(self, call: Call, response: Response, now: float) -> None:
        """A 2xx to an INVITE or UPDATE of the call: the session interval now in force
        starts again from ``now`` (none if the 2xx states none)."""
        interval = session_expires(response)
        call.session_interval = interval
        self.calls.arm(call, CallTimer.SESSION_EXPIRES, now + interval if interval else None)

    def on_session_expired(self, call: Call, now: float) -> list[Outbound]:
        if call.state is not CallState.CONFIRMED and call.state is not CallState.ANSWERED:
            return []
        self.sessions_expired += 1
        log.warning("call %d: no session refresh in %d s; hanging up", call.id,
                    call.session_interval)  # fmt: skip
        return self.teardown.hang_up(call, now, SESSION_EXPIRED, cause=408)

    def describe(self, call: Call) -> dict[str, object] | None:
        deadline = self.calls.deadline(call, CallTimer.SESSION_EXPIRES)
        if deadline is None:
            return None
        return {"interval_s": call.session_interval, "expires_at": round(deadline, 3)}
