"""One line per call when it ends: what an operator greps for first.

The first words, ``call N ended (METHOD)``, say how the outside leg was secured
(``x-sipura``, ``sdes`` or ``clear``). Then duration and talk time, the secure state
(method, role, or why it stayed clear), the media counters of each leg (packets each
way and drops by reason, summed over the call's streams) and who ended it: the
``phone`` (inside), the ``far end`` (outside) or the ``proxy`` itself, with how or why
(``BYE``, ``CANCEL``, ``486 Busy Here``, ``RTP timeout``, ``proxy shutting down``...).
The text line reads on its own; in JSON the same facts are the ``summary`` object
beside the call's ``call``, ``call_id`` and ``line`` fields (:mod:`proxy.logsetup`), so
a log pipeline needs no parsing of the message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.b2bua.legs import Call
from proxy.b2bua.sdes_leg import CLEAR, SDES, method_of
from proxy.b2bua.secure import SecureState
from proxy.media.engine import Side, StreamStats
from proxy.metrics import direction_label

__all__ = ["log_ended", "secure_summary", "summarize"]

log = logging.getLogger("sipura.calls")


def secure_summary(call: Call) -> dict[str, Any]:
    """``method`` (``x-sipura``, ``sdes`` or ``clear``, as
    :func:`~proxy.b2bua.sdes_leg.method_of` says), ``state`` and ``reason`` of the
    outside leg's security; ``role`` when the proxy played an x-sipura one."""
    method = method_of(call)
    if method == SDES:
        return {"method": SDES, "state": "secure", "reason": None}
    security = call.security
    if security is None:
        return {"method": CLEAR, "state": "clear", "reason": "not requested"}
    state = security.state
    reason = security.reason.value if security.reason is not None else None
    if method == CLEAR and state is not SecureState.CLEAR:
        reason = f"not secured ({state.value})"
    return {"method": method, "state": state.value, "reason": reason,
            "role": security.role.value}  # fmt: skip


def _leg_media(streams: Iterable[StreamStats]) -> dict[str, Any]:
    packets_in = packets_out = 0
    drops: dict[str, int] = {}
    for stream in streams:
        packets_in += int(stream["packets_in"])
        packets_out += int(stream["packets_out"])
        for reason, count in stream["drops"].items():
            if count:
                drops[reason] = drops.get(reason, 0) + count
    return {"packets_in": packets_in, "packets_out": packets_out, "drops": drops}


def media_summary(stats: Mapping[Side, Iterable[StreamStats]] | None) -> dict[str, Any]:
    """Per side: packets in and out, drops by reason (only those that happened)."""
    empty: list[StreamStats] = []
    return {side.value: _leg_media((stats or {}).get(side, empty)) for side in Side}


def summarize(call: Call, now: float) -> dict[str, Any]:
    """The summary of a call that ended at ``call.ended_at`` (else ``now``), its media
    released and its counters final."""
    now = call.ended_at if call.ended_at is not None else now
    talk = now - call.answered_at if call.answered_at is not None else 0.0
    return {
        "direction": direction_label(call.direction),
        "duration_s": round(max(0.0, now - call.created), 3),
        "talk_s": round(max(0.0, talk), 3),
        "answered": call.answered_at is not None,
        "secure": secure_summary(call),
        "media": media_summary(call.media_final),
        "ended_by": call.ended_by or "proxy",
        "end_reason": call.end_reason or "ended",
    }


def _text(summary: Mapping[str, Any]) -> str:
    secure = summary["secure"]
    if secure["method"] == CLEAR:
        security = f"clear ({secure['reason']})"
    elif "role" in secure:
        security = f"secure {secure['method']} ({secure['role']})"
    else:
        security = f"secure {secure['method']}"
    media = []
    for side, leg in summary["media"].items():
        drops = ",".join(f"{k}={v}" for k, v in sorted(leg["drops"].items())) or "0"
        media.append(f"{side} in {leg['packets_in']} out {leg['packets_out']} drops {drops}")
    head = (
        f"{summary['direction']}, {summary['duration_s']:.1f} s (talk {summary['talk_s']:.1f} s), "
        f"{security}; ended by {summary['ended_by']} ({summary['end_reason']})"
    )
    return "; ".join([head, *media])


def log_ended(calls: Iterable[Call], now: float) -> None:
    """The end-of-call line of each call, with its log fields and its summary."""
    if not log.isEnabledFor(logging.INFO):
        return
    for call in calls:
        summary = summarize(call, now)
        log.info("call %d ended (%s): %s", call.id, summary["secure"]["method"], _text(summary),
                 extra={**call.fields(), "summary": summary})  # fmt: skip
