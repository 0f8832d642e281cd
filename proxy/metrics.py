"""The proxy's cumulative counters, sans-IO: what ``GET /metrics`` reports.

Plain ints in dataclasses, fed by the B2BUA core as calls start, secure and end (no
clock, no I/O, no Prometheus import: the core stays testable in memory).
:mod:`proxy.admin.exporter` turns them, with the live state read at scrape time, into
Prometheus metric families.

Media counters live in the media engines per session and vanish with the session, so
:class:`MediaTotals` keeps the sum of every released session's last counters: a
scrape reports ``released + live``, which only ever grows.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from proxy.media.engine import DROP_REASONS, Side, StreamStats

__all__ = [
    "HANDSHAKE_BUCKETS",
    "CallMetrics",
    "Histogram",
    "MediaTotals",
    "TransportCounters",
    "direction_label",
]

HANDSHAKE_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Seconds from the first x-sipura message to the switch to SRTP. Over loopback a
handshake takes a few ms plus the ``start_delay_ms`` wait; over a WAN a few RTTs; the
``handshake_timeout_ms`` default (5 s) bounds it."""

_DIRECTIONS: Final = {"inside->outside": "outbound", "outside->inside": "inbound"}


def direction_label(direction: str) -> str:
    """``outbound`` (a phone calls out) or ``inbound`` (a call to a phone)."""
    return _DIRECTIONS.get(direction, direction)


@dataclass(slots=True)
class Histogram:
    """Cumulative histogram with fixed upper bounds (Prometheus ``le`` semantics)."""

    bounds: tuple[float, ...] = HANDSHAKE_BUCKETS
    counts: list[int] = field(default_factory=list)
    """Per bucket, not cumulative; the last one is ``+Inf``."""
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class MediaTotals:
    """Packets relayed by ``(side, direction)`` and drops by reason, summed over sessions."""

    packets: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(s, d): 0 for s in ("inside", "outside") for d in ("in", "out")}
    )
    """Every series exists from the start, at 0: a rate() over a new series needs it."""
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def add(self, stats: Mapping[Side, Iterable[StreamStats]]) -> None:
        """Add one session's counters (as ``MediaSession.stats()`` returns them)."""
        packets = self.packets
        drops = self.drops
        for side, streams in stats.items():
            label = Side(side).value
            for stream in streams:
                for direction, key in (("in", "packets_in"), ("out", "packets_out")):
                    index = (label, direction)
                    packets[index] = packets.get(index, 0) + int(stream[key])  # type: ignore[literal-required]
                for reason, count in stream["drops"].items():
                    drops[reason] = drops.get(reason, 0) + count

    def plus(self, other: MediaTotals) -> MediaTotals:
        total = MediaTotals(dict(self.packets), dict(self.drops))
        for key, count in other.packets.items():
            total.packets[key] = total.packets.get(key, 0) + count
        for reason, count in other.drops.items():
            total.drops[reason] = total.drops.get(reason, 0) + count
        return total


@dataclass(slots=True)
class CallMetrics:
    """Counters the core feeds; all cumulative since start."""

    calls_by_direction: dict[str, int] = field(
        default_factory=lambda: {"outbound": 0, "inbound": 0}
    )
    secure_by_role: dict[str, int] = field(default_factory=lambda: {"caller": 0, "callee": 0})
    handshake_seconds: Histogram = field(default_factory=Histogram)
    media_released: MediaTotals = field(default_factory=MediaTotals)

    def call_started(self, direction: str) -> None:
        label = direction_label(direction)
        self.calls_by_direction[label] = self.calls_by_direction.get(label, 0) + 1

    def call_secured(self, role: str, handshake_s: float | None) -> None:
        self.secure_by_role[role] = self.secure_by_role.get(role, 0) + 1
        if handshake_s is not None and handshake_s >= 0:
            self.handshake_seconds.observe(handshake_s)

    def media_ended(self, stats: Mapping[Side, Iterable[StreamStats]]) -> None:
        self.media_released.add(stats)


@dataclass(frozen=True, slots=True)
class TransportCounters:
    """What one side's SIP transport refused or failed, cumulative since start, every
    label present from the start (at 0). Read at scrape time from
    :meth:`proxy.sip.transport.SipTransport.counters`."""

    connections_refused: Mapping[str, int]
    """TCP and TLS connections refused, by reason (the config key that refused them)."""
    connections_closed: Mapping[str, int]
    """TCP and TLS connections closed by a timeout, by reason."""
    messages_too_large: Mapping[str, int]
    """Messages past ``max_message_bytes``, by transport (``udp``, ``tcp``, ``tls``)."""
    tls_handshakes_failed: int
    """Incoming TLS connections whose handshake failed or timed out."""
    tls_connect_failures: int
    """Outgoing TLS connections that could not be opened (connect or handshake)."""
