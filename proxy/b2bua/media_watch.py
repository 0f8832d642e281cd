"""Supervising calls' media: silent calls, and calls whose relay died.

A phone that dies mid-call sends no BYE; its call would hold ports forever. With
``[media] rtp_timeout_s`` (default 60 s, like rtpengine's ``timeout``) a confirmed call
whose media counters stopped moving for that long is hung up on both legs; a call on
hold (its last SDP from either side sendonly, inactive or 0.0.0.0: no media is owed)
gets ``[media] rtp_timeout_onhold_s`` (default an hour) instead. The check runs on a
per-call deadline (armed when the dialog is confirmed, re-armed each time the counters
moved or an SDP crossed), never on a scan of every call. A media worker process that
dies takes its calls' audio with it: those calls end cleanly (BYE with a Reason, or
CANCEL while ringing) instead of going silent.
"""

from __future__ import annotations

import logging

from proxy.b2bua.calls import CallTable, CallTimer
from proxy.b2bua.config import Config
from proxy.b2bua.legs import Call, CallState
from proxy.b2bua.sides import Outbound
from proxy.b2bua.teardown import Teardown
from proxy.logsetup import bind_call
from proxy.media.commands import SessionsLost

log = logging.getLogger("sipura.b2bua")


class MediaWatch:
    def __init__(self, config: Config, calls: CallTable, teardown: Teardown) -> None:
        self.config = config
        self.calls = calls
        self.teardown = teardown

    def timeout(self, call: Call) -> float:
        """The silence allowed now: the on-hold one while the call is on hold."""
        media = self.config.media
        held = call.media is not None and call.media.on_hold
        return media.rtp_timeout_onhold_s if held else media.rtp_timeout_s

    def on_confirmed(self, call: Call, now: float) -> None:
        timeout = self.timeout(call)
        if call.media is not None and call.media_packets < 0:
            call.media_packets = call.media.packets_in()  # the count silence is measured from
        if timeout:
            self.calls.arm(call, CallTimer.RTP_TIMEOUT, now + timeout)

    def on_sdp(self, call: Call, now: float) -> None:
        """An SDP crossed the call (hold or resume): the allowed silence may have
        changed; the check runs again at the new deadline."""
        if call.state is CallState.CONFIRMED:
            call.media_seen_at = max(call.media_seen_at, now)
            self.on_confirmed(call, now)

    def on_timer(self, call: Call, now: float) -> list[Outbound]:
        """The call's RTP-timeout check is due: hang up if its media did not move."""
        timeout = self.timeout(call)
        if not timeout or call.state is not CallState.CONFIRMED:
            return []
        if call.media is not None:
            packets = call.media.packets_in()
            if packets != call.media_packets:
                call.media_packets = packets
                call.media_seen_at = now
        if call.media is None or now < call.media_seen_at + timeout:
            self.calls.arm(call, CallTimer.RTP_TIMEOUT, max(call.media_seen_at, now) + timeout)
            return []
        held = " (on hold)" if call.media.on_hold else ""
        log.warning("call %d: no RTP for %d s%s; hanging up", call.id, timeout, held)
        return self.teardown.hang_up(call, now, "RTP timeout")

    def on_sessions_lost(self, event: SessionsLost, now: float) -> list[Outbound]:
        """The engine lost these sessions (a media worker process died): their calls
        cannot carry audio any more, so they end cleanly instead of going silent. An
        answered call gets a BYE with a Reason on both legs (it finishes when they are
        answered or time out); one still ringing is cancelled toward the callee and
        answered 487 toward the caller. Calls on other sessions are not touched."""
        out: list[Outbound] = []
        seen: set[int] = set()
        for session_id in event.sessions:
            call = self.calls.by_media(session_id)
            if call is None or call.id in seen:  # (a call may have several sessions)
                continue
            seen.add(call.id)
            with bind_call(call.fields()):
                log.warning("call %d: its media relay process died; hanging up", call.id)
                out += self.teardown.hang_up(call, now, "media relay failed")
        return out
