"""Process set-up shared by the signalling process and the media workers.

Both run an event loop that must not pause: the signalling process at hundreds of calls
per second, a worker for every packet it relays. So both take uvloop when it is there
and keep the garbage collector out of the way.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import resource
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "descriptor_limit",
    "install_fast_loop",
    "raise_descriptor_limit",
    "start_heap_trimming",
    "tune_gc",
]

log = logging.getLogger("sipura")


def install_fast_loop() -> str:
    """uvloop when installed (see docs/decisions.md §1), else the stdlib loop, with a warning."""
    try:
        import uvloop
    except ImportError:
        log.warning(
            "uvloop is not installed (it is a dependency where it builds): "
            "the stdlib event loop costs ~6x more CPU per packet"
        )
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def tune_gc() -> None:
    """Fewer, shorter collections.

    In the signalling process, at hundreds of calls/s a full collection of a large heap
    paused the process for 170-280 ms, long enough for UDP buffers to overflow
    (bench/sip_cps.sh). In a media worker every relayed packet allocates an address
    tuple, which counts toward a generation-0 collection; at the default thresholds the
    older generations, which hold every session's objects, were collected often enough
    to show in the added-latency tail (bench/capacity.py). Objects alive at start-up are
    moved out of the collector's way."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 100)


def raise_descriptor_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard one; returns the soft limit in force.

    Every TCP connection and media socket is a descriptor, and the soft limit many
    systems start a service with (1,024) is far below what the hard limit allows: the
    difference is free capacity. ``RLIM_INFINITY`` as the hard limit is capped at 1 << 20
    (the kernel's ``nr_open`` default), which ``setrlimit`` accepts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, wanted, exc)
    return descriptor_limit()


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` (what this process may open), infinity as 1 << 20."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


HEAP_TRIM_INTERVAL_S = 10.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc: nothing to do)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


FULL_COLLECTION_SLACK = 20 * 1024 * 1024
"""Resident memory this far above its low point calls for a full collection, when the
interpreter's live objects are back near their low point (the memory is pinned, not
in use)."""
LIVE_BLOCKS_SLACK = 150_000
"""Live allocator blocks (``sys.getallocatedblocks``) above their low point still
counted as "back near it": the free lists and the full memo tables (~13,000 parsed
header values) alone hold on the order of 100,000; 900 calls up hold several times
more."""
SETTLED_BLOCKS = 10_000
"""Live blocks changing less than this between two trims: the burst's objects are gone
(a collection earlier, while they were still being freed, would only see the free lists
filled again afterwards)."""
FULL_COLLECTION_EVERY_S = 60.0


def _resident() -> int | None:
    """This process's resident set in bytes (Linux), else None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class _HeapReturner:
    """Gives freed memory back after a burst (see :func:`start_heap_trimming`)."""

    def __init__(
        self, trim: Callable[[int], int], release: Callable[[], None] | None = None
    ) -> None:
        self.trim = trim
        self.release = release
        self.floor = _resident() or 0
        """The lowest resident size seen."""
        self.blocks_floor = sys.getallocatedblocks()
        """The fewest live allocator blocks seen."""
        self.blocks_before = self.blocks_floor
        self.last_full = float("-inf")

    def run(self, now: float) -> None:
        resident = _resident()
        blocks = sys.getallocatedblocks()
        self.blocks_floor = min(self.blocks_floor, blocks)
        settled = abs(blocks - self.blocks_before) < SETTLED_BLOCKS  # nothing being freed
        self.blocks_before = blocks
        if (
            resident is not None
            and resident - self.floor > FULL_COLLECTION_SLACK
            and blocks - self.blocks_floor < LIVE_BLOCKS_SLACK
            and settled
            and now - self.last_full >= FULL_COLLECTION_EVERY_S
        ):
            if self.release is not None:
                self.release()
            gc.collect()  # the oldest generation: it also empties the free lists
            self.last_full = now
        self.trim(0)
        after = _resident()
        if after is not None:
            self.floor = min(self.floor, after)


def start_heap_trimming(
    interval_s: float = HEAP_TRIM_INTERVAL_S, release: Callable[[], None] | None = None
) -> bool:
    """Give freed memory back to the system after a burst (glibc only).

    Two things kept a flood's memory after it was freed. glibc keeps freed ``malloc``
    pages (Python hands it every object over 512 bytes) when a few small objects pin
    them: ``malloc_trim(0)`` returns every free page wherever it is, in well under a
    millisecond, so it runs every ``interval_s``. And the interpreter's free lists (up
    to 2,000 spare tuples of each small size...) are filled at the end of a burst from
    objects allocated all through it, each pinning a 256 KB allocator arena that is
    otherwise empty: 5,000 new registrations left the SIP process 40 MB above idle,
    and only a full collection empties those lists (nothing else needs one: the
    collector is tuned for rare full collections, :func:`tune_gc`). So when resident
    memory stands 20 MB or more above its low point while the live objects are back
    near theirs and steady (the memory is pinned, not in use), a trim runs ``release``
    (caches whose entries the burst filled: they pin pages too) and a full collection
    first, at most once a minute: 90.5 -> 64.7 MB in that case (idle: 51.5). Never
    while the memory is in use: a full collection
    with 900 calls up took 72 ms. Returns False without ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    loop = asyncio.get_running_loop()
    returner = _HeapReturner(trim, release)

    def run() -> None:
        returner.run(loop.time())
        loop.call_later(interval_s, run)

    loop.call_later(interval_s, run)
    return True
