"""Process set-up shared by the signalling process and the media workers.

Both run an event loop that must not pause: the signalling process at hundreds of calls
per second, a worker for every packet it relays. So both take uvloop when it is there
and keep the garbage collector out of the way.
"""

from __future__ import annotations

import asyncio
import gc
import logging

__all__ = ["install_fast_loop", "tune_gc"]

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
