"""What the call core counts, in one place: the ``/status`` counters and the ``/metrics``
totals.

Every part of the core counts through :class:`Stats` when something happens to a call
(started, answered, failed, secured, left in the clear, its media released) or a
response leaves: one method per event, feeding both the plain counters ``/status``
shows and the :class:`~proxy.metrics.CallMetrics` that ``/metrics`` exports. So an event
is counted once for both, at the moment it happens: neither a message nor a scrape ever
scans the calls to reconstruct history (a scrape reads the live calls only for what is
live: calls up, media of calls in progress).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxy.media.engine import Side, StreamStats
from proxy.metrics import CallMetrics

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    """Counters the operator sees in ``/status`` (and, through :attr:`metrics`, in
    ``/metrics``); cumulative since start."""

    calls_total: int = 0
    calls_answered: int = 0
    calls_failed: int = 0
    bad_messages: int = 0
    registrations: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    secured: int = 0
    """Calls whose outside leg became SRTP (x-sipura)."""
    clear_reasons: dict[str, int] = field(default_factory=dict)
    """Why secure attempts ended in the clear, by ClearReason value."""
    fax_clear: int = 0
    """Secured calls whose T.38 fax went through unprotected (``xsipura.t38 = clear``)."""
    fax_refused: int = 0
    """T.38 re-offers refused with 488 on secured calls (``xsipura.t38 = refuse``)."""
    metrics: CallMetrics = field(default_factory=CallMetrics)
    """The Prometheus-only totals: calls by direction, secure calls by role, handshake
    durations, media counters of released sessions."""

    def count_response(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def call_started(self, direction: str) -> None:
        """A new call was admitted (``direction``: ``inside->outside`` or back)."""
        self.calls_total += 1
        self.metrics.call_started(direction)

    def call_secured(self, role: str, handshake_s: float | None) -> None:
        """The outside leg switched to SRTP (not a re-key); ``handshake_s`` from the
        first x-sipura message to the switch."""
        self.secured += 1
        self.metrics.call_secured(role, handshake_s)

    def call_cleared(self, reason: str) -> None:
        """A call that was to be secured stays (or falls back) in the clear."""
        self.clear_reasons[reason] = self.clear_reasons.get(reason, 0) + 1

    def media_released(self, stats: Mapping[Side, Iterable[StreamStats]]) -> None:
        """A call's media session is released: its last counters join the totals, so
        ``sipura_media_packets_total`` never goes back when a call ends."""
        self.metrics.media_ended(stats)
