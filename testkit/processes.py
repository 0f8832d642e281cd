"""Subprocesses of a test or bench: output to a file, bounded waits, stopped by PID.

Each process starts in its own session, so a stop can take its children with it
(tshark's dumpcap, the proxy's media workers): SIGTERM to the process, then after the
timeout SIGKILL to its process group (:func:`proxy.demo.loopback.stop_process`).
Nothing here kills by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.demo.loopback import stop_process
from testkit import ROOT

STOP_TIMEOUT = 5.0
"""How long a stopping process gets before SIGKILL."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: unbuffered Python output, this checkout's ``proxy``
    first on the import path."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra}


@dataclass
class Processes:
    """Every subprocess of a test (or module): started with output to a log file,
    stopped (in reverse order) by :meth:`stop_all`, each with its own stop signal."""

    procs: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)

    def start(self, argv: Sequence[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("cwd", ROOT)
        kwargs.setdefault("env", child_env())
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **kwargs,
            )  # fmt: skip
        self.procs.append((proc, signal.SIGTERM))
        return proc

    def adopt(self, proc: subprocess.Popen[bytes], stop_signal: int = signal.SIGTERM) -> None:
        """Stop ``proc`` with the others (one started elsewhere, e.g. a proxy, which
        wants SIGINT: SIGTERM makes it drain its calls first)."""
        self.procs.append((proc, stop_signal))

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL to its group after ``timeout``; its exit status."""
        return stop_process(proc, timeout)

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        for proc, stop_signal in reversed(self.procs):
            stop_process(proc, timeout, stop_signal)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def run(argv: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run to completion and collect its output (text); killed after ``timeout``
    (``subprocess.TimeoutExpired``). A non-zero exit is the caller's to judge."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; AssertionError
    naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


async def until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
                ) -> Any:  # fmt: skip
    """:func:`wait_for` inside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(interval)
