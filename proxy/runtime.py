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
from collections.abc import Callable

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


def start_heap_trimming(interval_s: float = HEAP_TRIM_INTERVAL_S) -> bool:
    """Give freed heap memory back to the system every ``interval_s`` (glibc only).

    Python hands objects over 512 bytes to ``malloc``; after a flood of large messages
    is freed, glibc keeps the pages (a few small objects allocated meanwhile pin them),
    and the SIP process stayed at 83 MB, 40 MB above idle, long after the flood.
    ``malloc_trim(0)`` returns every free page, wherever it is in the heap, in well
    under a millisecond. Returns False when there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    loop = asyncio.get_running_loop()

    def run() -> None:
        trim(0)
        loop.call_later(interval_s, run)

    loop.call_later(interval_s, run)
    return True
