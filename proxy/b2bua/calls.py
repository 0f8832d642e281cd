"""The calls the proxy bridges: the table that finds them, and their timers.

A message finds its call through the leg it belongs to: ``(side, Call-ID, local tag)``
is unique per leg because both tags of a dialog the proxy takes part in include one of
its own. Per-call deadlines (the x-sipura handshake's, the RTP-timeout check) live on a
heap with lazy deletion, as the transaction layer's do (decision 16): the cost of a
message must not grow with the number of calls, so nothing here ever scans them all.
"""

from __future__ import annotations

import logging
from enum import Enum

from proxy.b2bua.deadlines import Deadlines
from proxy.b2bua.legs import Call, CallState, Leg
from proxy.b2bua.stats import Stats
from proxy.media.engine import MediaSession, Side, StreamStats

SessionStats = dict[Side, list[StreamStats]]

log = logging.getLogger("sipura.b2bua")


class CallTimer(Enum):
    """What a call deadline is for; each call has at most one armed per kind."""

    SECURITY = "security"
    """The x-sipura machine's own deadline (start delay, media check, timeouts, grace)."""
    RTP_TIMEOUT = "rtp_timeout"
    """Look whether the call's media counters moved (``[media] rtp_timeout_s``)."""
    TIMER_C = "timer_c"
    """RFC 3261 §16.6 Timer C: the INVITE got no final answer in ``[sip] timer_c_s``."""
    SESSION_EXPIRES = "session_expires"
    """RFC 4028: the negotiated session interval ran out without a refresh."""


class CallTable:
    """Every live call, indexed by its legs, with its armed deadlines."""

    def __init__(self, stats: Stats | None = None, *, reports_final: bool = False) -> None:
        self.stats = stats if stats is not None else Stats()
        self.reports_final = reports_final
        """The media engine reports a released session's final counters later
        (:attr:`MediaEngine.reports_final <proxy.media.engine.MediaEngine.reports_final>`):
        the totals and the summary line wait for them (:meth:`media_released`)."""
        self.calls: dict[int, Call] = {}
        self.ended: list[Call] = []
        """Calls dropped since :meth:`take_ended` last ran (their end is stamped then)."""
        self.ready: list[Call] = []
        """Ended calls whose summary line can be written (their media counters final),
        since :meth:`take_ready` last ran."""
        self._releasing: dict[int, tuple[Call, MediaSession, bool]] = {}
        """Released media sessions whose final counters are awaited: their call, the
        session, whether it is the call's main one (the summary's)."""
        self._awaited: dict[int, int] = {}
        """Per call id: its sessions in :attr:`_releasing`."""
        self._summary_due: dict[int, Call] = {}
        """Ended calls whose summary waits for :attr:`_awaited` to reach none."""
        self._legs: dict[tuple[Side, str, str], tuple[Call, Leg]] = {}
        self._deadlines: Deadlines[tuple[int, CallTimer]] = Deadlines()
        self._media: dict[int, Call] = {}
        """Calls by the id of their media sessions: what media events name."""

    def __len__(self) -> int:
        return len(self.calls)

    # --- the table --------------------------------------------------------------------

    def add(self, call: Call) -> None:
        self.calls[call.id] = call
        for leg in call.all_legs():
            self.index(call, leg)

    def index(self, call: Call, leg: Leg) -> None:
        """Make ``leg`` findable by the messages of its dialog (a fork's branch too)."""
        self._legs[(leg.side, leg.call_id, leg.local_tag)] = (call, leg)

    def unindex(self, leg: Leg) -> None:
        self._legs.pop((leg.side, leg.call_id, leg.local_tag), None)

    def find(self, side: Side, call_id: str, local_tag: str) -> tuple[Call, Leg] | None:
        return self._legs.get((side, call_id, local_tag))

    def media_allocated(self, call: Call, session_id: int) -> None:
        """One of ``call``'s media sessions is ``session_id`` (:meth:`by_media`)."""
        self._media[session_id] = call

    def by_media(self, session_id: int) -> Call | None:
        """The live call one of whose media sessions is ``session_id``, if any."""
        return self._media.get(session_id)

    def indexed(self) -> list[tuple[Call, Leg]]:
        """Every (call, leg) pair in the index (for invariant checks)."""
        return list(self._legs.values())

    def drop(self, call: Call) -> None:
        """Forget ``call`` and give its media back (idempotent). Its media's last
        counters join the totals; a call that was in the table waits in :attr:`ended`
        for its summary."""
        for leg in call.all_legs():
            self.unindex(leg)
        listed = self.calls.pop(call.id, None) is not None
        if listed:
            self.ended.append(call)
        for kind in CallTimer:
            self._deadlines.arm((call.id, kind), None)
        if call.media is not None:
            media, call.media = call.media, None
            for session in media.sessions:
                self._media.pop(session.id, None)
                main = session is media.session  # else a fax stream's: totals only
                if self.reports_final:
                    self._releasing[session.id] = (call, session, main)
                    self._awaited[call.id] = self._awaited.get(call.id, 0) + 1
                else:
                    self._session_final(call, session.stats(), main)
            media.release()
        if not listed:
            return
        if call.id in self._awaited:
            self._summary_due[call.id] = call
        else:
            self.ready.append(call)

    def _session_final(self, call: Call, stats: SessionStats, main: bool) -> None:
        """One released session's final counters: into the totals, and into the summary
        if it is the call's ``main`` session."""
        self.stats.media_released(stats)
        if main:
            call.media_final = stats

    def media_released(self, session_id: int, stats: SessionStats) -> None:
        """The engine's final counters of a released session: the totals take them, and
        the call's summary is ready once its last session's are in."""
        entry = self._releasing.pop(session_id, None)
        if entry is None:
            return
        call, _session, main = entry
        self._session_final(call, stats, main)
        left = self._awaited.pop(call.id) - 1
        if left:
            self._awaited[call.id] = left
        elif (due := self._summary_due.pop(call.id, None)) is not None:
            self.ready.append(due)

    def flush_released(self) -> None:
        """The engine is going away: the sessions still awaited take their last reported
        counters, and their calls' summaries are ready (shutdown)."""
        for session_id, (_call, session, _main) in list(self._releasing.items()):
            self.media_released(session_id, session.stats())

    @property
    def releasing(self) -> int:
        """Released media sessions whose final counters are awaited (``/status``)."""
        return len(self._releasing)

    def take_ready(self) -> list[Call]:
        """The calls whose summary line can be written now."""
        ready, self.ready = self.ready, []
        return ready

    def take_ended(self) -> list[Call]:
        """The calls dropped since the last call (at most one event's worth)."""
        ended, self.ended = self.ended, []
        return ended

    def finish(self, call: Call) -> None:
        """The call is over: drop it once, and say so."""
        if call.state is CallState.TERMINATED:
            return
        call.state = CallState.TERMINATED
        self.drop(call)

    # --- deadlines --------------------------------------------------------------------

    def arm(self, call: Call, kind: CallTimer, when: float | None) -> None:
        """Set (or with None, clear) ``call``'s deadline of ``kind``."""
        self._deadlines.arm((call.id, kind), when)

    def deadline(self, call: Call, kind: CallTimer) -> float | None:
        return self._deadlines.get((call.id, kind))

    def next_deadline(self) -> float | None:
        return self._deadlines.next_deadline()

    def due(self, now: float) -> list[tuple[Call, CallTimer]]:
        """Pop every deadline at or before ``now`` (each disarmed as it is returned)."""
        fired: list[tuple[Call, CallTimer]] = []
        for call_id, kind in self._deadlines.due(now):
            call = self.calls.get(call_id)
            if call is not None:
                fired.append((call, kind))
        return fired
