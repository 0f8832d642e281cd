"""Attended transfer across the B2BUA: ``Replaces`` names a dialog on one leg only.

Each leg of a bridged call is its own dialog (Call-ID, tags), so a ``Replaces`` written
by a UA on one side names the proxy's dialog *on that side*. Passed through unchanged it
names nothing the far party knows, and the transfer fails. So (decision 47):

* a REFER whose Refer-To embeds ``Replaces`` naming a call the proxy bridges (found by
  Call-ID and the proxy's own tag on the side the REFER came from, the peer's tag
  checked too) is relayed with the Replaces naming that call's dialog on the other
  side: its Call-ID, ``to-tag`` = the far party's tag, ``from-tag`` = the proxy's;
* an INVITE with a ``Replaces`` header naming a bridged call is rewritten the same way
  on its outgoing leg, and sent to the device of that dialog (not forked), so the far
  UA replaces the right call; once the new call is answered the replaced call is hung
  up on both legs (BYE with a Reason, ports released);
* a Replaces naming no known dialog passes unchanged (it may be for a dialog beyond the
  proxy), except that an INVITE naming a Call-ID of the proxy's own making that matches
  nothing gets 481 (RFC 3891 §3).

The new call is an ordinary call: routed, anchored and secured (x-sipura on the outside
leg) like any other.
"""

from __future__ import annotations

import logging
import re

from proxy.b2bua.calls import CallTable
from proxy.b2bua.legs import Call, Leg
from proxy.b2bua.messages import Reject
from proxy.b2bua.routing import Route
from proxy.b2bua.sides import SipSides
from proxy.media.engine import Side
from proxy.ratelimit import LogLimiter
from proxy.sip.headers import SipHeaderError
from proxy.sip.message import Request
from proxy.sip.replaces import Replaces, refer_to_replaces, with_refer_to_replaces

log = logging.getLogger("sipura.b2bua")

_OWN_CALL_ID = re.compile(r"[0-9a-f]{24}@(.+)")
"""How :func:`proxy.b2bua.legs.new_call_id` spells the Call-IDs the proxy makes."""


class Transfers:
    def __init__(self, sides: SipSides, calls: CallTable) -> None:
        self.sides = sides
        self.calls = calls
        self.mapped = 0
        """Replaces rewritten (REFER or INVITE), for /status."""
        self._log: LogLimiter = sides.noise

    def bridged(self, side: Side, replaces: Replaces) -> tuple[Call, Leg] | None:
        """The call whose leg on ``side`` is the dialog ``replaces`` names (the proxy is
        the UA receiving it: its tag is the to-tag)."""
        found = self.calls.find(side, replaces.call_id, replaces.to_tag)
        if found is None or found[1].remote_tag != replaces.from_tag:
            return None
        call, leg = found
        if leg is not call.a and leg is not call.b:
            return None
        return found

    @staticmethod
    def beyond(call: Call, leg: Leg, replaces: Replaces) -> Replaces | None:
        """The same dialog as named on the call's other leg (None: it has no peer tag
        yet)."""
        other = call.other(leg)
        if other.remote_tag is None:
            return None
        return replaces.naming(other.call_id, other.remote_tag, other.local_tag)

    def ours(self, side: Side, call_id: str) -> bool:
        match = _OWN_CALL_ID.fullmatch(call_id)
        return match is not None and match.group(1) == self.sides.advertised(side)[0]

    # --- REFER ------------------------------------------------------------------------

    def refer_to(self, side: Side, call: Call, request: Request) -> str | None:
        """The Refer-To to relay for a REFER from ``side`` (None: unchanged)."""
        value = request.get("refer-to")
        if value is None:
            return None
        try:
            replaces = refer_to_replaces(value)
        except SipHeaderError as exc:
            log.info("call %d: REFER with an unusable Replaces passed as is: %s", call.id, exc)
            return None
        if replaces is None:
            return None
        found = self.bridged(side, replaces)
        mapped = self.beyond(*found, replaces) if found is not None else None
        if found is None or mapped is None:
            log.info("call %d: REFER names dialog %s the proxy does not bridge: passed as is",
                     call.id, replaces.call_id)  # fmt: skip
            return None
        self.mapped += 1
        log.info("call %d: REFER with Replaces for call %d: now names %s", call.id,
                 found[0].id, mapped.call_id)  # fmt: skip
        return with_refer_to_replaces(value, mapped)

    # --- INVITE with Replaces ---------------------------------------------------------

    def replacing(self, side: Side, request: Request, now: float = 0.0) -> tuple[Call, str] | None:
        """For an INVITE from ``side``: the call it replaces and the Replaces value for
        the outgoing leg; None when it replaces nothing the proxy bridges. Raises 481
        when it names a Call-ID of the proxy's own that matches no dialog."""
        value = request.get("replaces")
        if value is None:
            return None
        try:
            replaces = Replaces.parse(value)
        except SipHeaderError as exc:
            why = f"{side.value}: INVITE refused (400): bad Replaces: %s"
            self._log.log(logging.INFO, "bad_replaces", side.value, now, why, exc)
            raise Reject(400, "Bad Request", [("Warning", f'399 - "bad Replaces: {exc}"')]) from exc
        found = self.bridged(side, replaces)
        mapped = self.beyond(*found, replaces) if found is not None else None
        if found is None or mapped is None:
            if self.ours(side, replaces.call_id):
                self._log.log(logging.INFO, "replaces_481", side.value, now,
                              "%s: INVITE refused (481): Replaces names call %s of ours, "
                              "which has no such dialog", side.value, replaces.call_id)  # fmt: skip
                raise Reject(481, "Call/Transaction Does Not Exist")
            return None
        self.mapped += 1
        return found[0], str(mapped)

    @staticmethod
    def route(replaced: Call, side: Side, route: Route) -> Route:
        """The replacing call goes to the device of the replaced dialog when that is a
        phone of ours (never forked: only that device can replace the call)."""
        leg = replaced.leg_on(side)
        if side is not Side.INSIDE or leg.remote_target is None or leg.dest is None:
            return route
        return Route(leg.remote_target, leg.dest, route.line)

    def completed(self, call: Call) -> Call | None:
        """The new call was answered: the call it replaces, to hang up (once)."""
        replaced, call.replaces = call.replaces, None
        if replaced is None or replaced.id not in self.calls.calls:
            return None
        log.info("call %d replaced by call %d: hanging it up", replaced.id, call.id)
        return replaced
