"""Keyed deadlines on a heap with lazy deletion: the one timer structure of the core.

Calls, registrations and keep-alives each have a few deadlines that are armed, moved and
cleared far more often than they fire. A heap of ``(when, seq, key)`` with a dict of
the deadline each key currently has gives O(log n) arming, O(1) clearing (the heap
entry goes stale and is skipped) and a ``next_deadline`` that never looks at keys that
are not due: the cost of a message must not grow with the number of calls or bindings
(decision 16), so nothing here ever scans them all.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """At most one deadline per key."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._armed: dict[K, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._armed)

    def __contains__(self, key: K) -> bool:
        return key in self._armed

    def get(self, key: K) -> float | None:
        return self._armed.get(key)

    def arm(self, key: K, when: float | None) -> None:
        """Set (or with None, clear) the deadline of ``key``."""
        if when is None:
            self._armed.pop(key, None)
            return
        if self._armed.get(key) == when:
            return
        self._armed[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        if len(self._heap) > 4 * len(self._armed) + 64:
            self._compact()

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._armed.get(key) == when:
                return when
            heapq.heappop(heap)  # stale: re-armed or cleared
        return None

    def due(self, now: float) -> list[K]:
        """Pop every deadline at or before ``now`` (each cleared as it is returned)."""
        fired: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._armed.get(key) != when:
                continue
            del self._armed[key]
            fired.append(key)
        return fired

    def _compact(self) -> None:
        """Rebuild the heap from the live deadlines: keys re-armed many times (a call's
        media check) must not leave a heap that grows without bound."""
        self._heap = [(when, next(self._seq), key) for key, when in self._armed.items()]
        heapq.heapify(self._heap)
