"""A relay leg's counters as one flat tuple, and back to :class:`StreamStats`.

A media worker process reports every session's counters to the signalling process every
100 ms (:mod:`proxy.media.worker_process`); a flat tuple of ints read in one C call
(``operator.attrgetter``) is the cheapest thing to take, encode and compare. The
signalling process turns it back into the ``stats()`` the in-process relay gives.
"""

from __future__ import annotations

import operator
from typing import cast

from proxy.media.engine import DROP_REASONS, Side, StreamStats

__all__ = ["COUNTERS", "counters_of", "stats_from"]

COUNTERS: tuple[str, ...] = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "rtcp_packets_in",
    "rtcp_packets_out",
    "packets_encrypted",
    "packets_decrypted",
    "plain_accepted",
    "plain_after_grace",
    "tone_packets",
    "tone_skipped",
    "relatched",
    "grace_ssrc",
    "grace_seq",
    *DROP_REASONS,
)
"""A leg's counters (attributes of :class:`proxy.media.relay_leg.RelayLeg`) as a flat
tuple: :meth:`RelaySession.counters <proxy.media.relay_session.RelaySession.counters>`
per leg, in this order."""

_PLAIN = len(COUNTERS) - len(DROP_REASONS)

counters_of = operator.attrgetter(*COUNTERS)
"""A leg's counters as a tuple, in one C call."""


def stats_from(counters: tuple[int, ...], streams: int) -> dict[Side, list[StreamStats]]:
    """``RelaySession.stats()`` rebuilt from ``RelaySession.counters()`` (a worker's
    report): ``streams`` inside legs, then as many outside legs; all zero where the
    report is short (none yet)."""
    width = len(COUNTERS)
    result: dict[Side, list[StreamStats]] = {}
    pos = 0
    for side in (Side.INSIDE, Side.OUTSIDE):
        legs: list[StreamStats] = []
        for _ in range(streams):
            row = counters[pos : pos + width]
            pos += width
            if len(row) < width:
                row = (0,) * width
            stats = dict(zip(COUNTERS[:_PLAIN], row[:_PLAIN], strict=True))
            stats["drops"] = dict(zip(DROP_REASONS, row[_PLAIN:], strict=True))  # type: ignore[assignment]
            legs.append(cast(StreamStats, stats))
        result[side] = legs
    return result
