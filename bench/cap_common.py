"""What every part of the capacity bench shares: limits, constants, /proc readings, the
one-line error and the progress log (see bench/README.md, ``capacity.py``)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import loop_forward as lf

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
PKT_LEN = 172
SRTP_LEN = 182
RTPGEN_SSRC = 0x1234AB00
PHONE_SSRC = 0x50000000
BASE_PEER_SSRC = 0x60000000
LOSS_LIMIT_PCT = 0.1
P99_LIMIT_MS = 5.0
FOREIGN_MAX = 0.15
"""Cores of other load (besides proxy, generator, bench) above which a failed step is
re-measured; loopback softirq work that is not charged to a process counts here too."""


class BenchError(RuntimeError):
    """A bad state the bench reports in one line (proxy did not start, ...)."""


def log(msg: str) -> None:
    print(f"[capacity] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def proc_ticks(pid: int) -> int:
    try:
        return lf.proc_ticks(pid)
    except (OSError, ValueError):
        return 0


_CGROUP_USAGE = (
    Path("/sys/fs/cgroup/cpuacct/cpuacct.usage"),  # cgroup v1: ns
    Path("/sys/fs/cgroup/cpu.stat"),  # cgroup v2: usage_usec
)


def proc_sys_ticks(pid: int) -> int:
    """stime (kernel time) of a process, clock ticks."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return int(data[data.rindex(b")") + 2 :].split()[12])
    except (OSError, ValueError, IndexError):
        return 0


def box_busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the machine, same unit. The cgroup counters are exact;
    /proc/stat is tick-sampled and under-counts short bursts in a tickless VM (as
    bench/sip_cps.sh notes)."""
    now_ns = time.monotonic_ns()
    try:
        v1 = _CGROUP_USAGE[0]
        if v1.exists():
            return int(v1.read_text()), now_ns * NCPU
        for line in _CGROUP_USAGE[1].read_text().splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) * 1000, now_ns * NCPU
    except (OSError, ValueError):
        pass
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def wait_quiet(max_busy_cores: float, max_wait: float) -> float:
    """Wait (bounded) until the machine is mostly idle; the busy cores last seen."""
    end = time.monotonic() + max_wait
    while True:
        b0, t0 = box_busy_jiffies()
        time.sleep(1.0)
        b1, t1 = box_busy_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0) * NCPU
        if busy <= max_busy_cores or time.monotonic() >= end:
            return busy


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def drain(sock: socket.socket) -> int:
    sock.setblocking(False)
    n = 0
    with contextlib.suppress(BlockingIOError, OSError):
        while True:
            sock.recv(4096)
            n += 1
    return n
