"""What ``calls`` and ``/status`` show of the core's state: plain JSON-able values.

Every state the call core keeps must be visible to the operator: a call's forks and the
dialogs it is ending, NAT detected per leg, hold, the RFC 4028 and Timer C deadlines,
a fax let through in the clear; the bindings of every address-of-record with their
expiry and NAT flag. Deadlines are shown as seconds from ``now`` (the core's clock).
"""

from __future__ import annotations

from proxy.b2bua.bindings import Bindings
from proxy.b2bua.calls import CallTable, CallTimer
from proxy.b2bua.legs import Branch, Call
from proxy.b2bua.sdes_leg import method_of


def _left(when: float | None, now: float | None) -> float | None:
    if when is None or now is None:
        return None
    return round(max(0.0, when - now), 3)


def _branch(call: Call, branch: Branch) -> dict[str, object]:
    state = "answered" if branch.leg is call.b and call.answered else "pending"
    if branch.final is not None:
        state = f"failed {branch.final.status}"
    elif branch.cancel_sent:
        state = "cancelled"
    return {"target": branch.leg.remote_target, "call_id": branch.leg.call_id, "state": state}


def describe_call(call: Call, table: CallTable, now: float | None) -> dict[str, object]:
    media = call.media
    return {
        "id": call.id,
        "direction": call.direction,
        "state": call.state.value,
        "a_call_id": call.a.call_id,
        "b_call_id": call.b.call_id,
        "line": call.line.user_id if call.line else None,
        "method": method_of(call),
        "secure": call.security.describe() if call.security else None,
        "sdes": call.sdes.describe() if call.sdes else None,
        "media": media.session.stats() if media else None,
        "forks": [_branch(call, b) for b in call.branches] if call.forked else [],
        "early_dialogs": sorted(call.b.early),
        "dialogs_ending": len(call.ending_dialogs),
        "nat": media.nat_sides() if media else [],
        "latch": media.latch_modes() if media else {},
        "on_hold": media.on_hold if media else False,
        "fax_clear": call.fax_clear,
        "replaces": call.replaces.id if call.replaces else None,
        "session_timer": {
            "interval_s": call.session_interval,
            "expires_in_s": _left(table.deadline(call, CallTimer.SESSION_EXPIRES), now),
        }
        if call.session_interval
        else None,
        "timer_c_in_s": _left(table.deadline(call, CallTimer.TIMER_C), now),
        "rtp_check_in_s": _left(table.deadline(call, CallTimer.RTP_TIMEOUT), now),
    }


def describe_bindings(bindings: Bindings, now: float) -> dict[str, list[dict[str, object]]]:
    shown: dict[str, list[dict[str, object]]] = {}
    for binding in bindings:
        flow = binding.flow
        shown.setdefault(binding.aor, []).append(
            {
                "contact": binding.contact,
                "flow": f"{flow.host}:{flow.port}/{flow.transport}",
                "expires_in_s": binding.expires_in(now),
                "nat": binding.nat,
                "upstream_contact": binding.upstream,
            }
        )
    return shown
