"""What a bench ran on: one line for its output, and a process's CPU time.

Every bench prints the machine it ran on (the box is shared and noisy, so a figure is
only read next to its machine and load), and most read CPU time from ``/proc``: one
definition here instead of a copy per script.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "cpu_ticks", "describe", "proc_ticks"]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe() -> str:
    """One line: CPU model and count, kernel, Python, and the load when it was asked."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"load {load:.2f}")  # fmt: skip


def proc_ticks(pid: int | str = "self") -> int:
    """utime + stime of process ``pid`` (all its threads), in clock ticks; raises
    ``OSError`` once it is gone."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def cpu_ticks(pid: int) -> int:
    """:func:`proc_ticks`, 0 once the process is gone (a bench sums what is left)."""
    try:
        return proc_ticks(pid)
    except (OSError, ValueError):
        return 0
