"""``tshark`` on the loopback interface: a capture into a pcapng file, read back after.

Started as a :class:`testkit.processes.Processes` member (its own session: stopping it
also stops its ``dumpcap`` child); reading runs ``tshark -r`` with a timeout.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from testkit.processes import Processes, run, wait_for


class Capture:
    """``tshark -i lo -f BPF -w FILE``; its output in ``FILE.log``."""

    def __init__(self, file: Path, bpf: str) -> None:
        self.file = file
        self.bpf = bpf
        self.log = file.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, procs: Processes) -> None:
        """Start capturing; :meth:`wait_ready` before the traffic that must be seen."""
        self.proc = procs.start(["tshark", "-i", "lo", "-f", self.bpf, "-w", str(self.file)],
                                self.log)  # fmt: skip

    def wait_ready(self, timeout: float = 15.0) -> None:
        def capturing() -> bool:
            assert self.proc is not None
            text = self.log.read_text(errors="replace")
            assert self.proc.poll() is None, f"tshark exited: {text}"
            return "Capturing on" in text

        wait_for(capturing, timeout, "tshark to capture")
        time.sleep(0.3)  # "Capturing on" is printed just before the capture really runs

    def stop(self) -> None:
        if self.proc is not None:
            time.sleep(0.3)  # let the last packets reach the file
            Processes.stop(self.proc, timeout=10)

    def read(self, *args: str, decode: Sequence[str] = (), check: bool = True) -> str:
        """``tshark -r FILE -n`` with ``-d`` decode-as rules ("udp.port==P,rtp") and
        ``args``; its standard output. ``check``: AssertionError if tshark fails."""
        argv = ["tshark", "-r", str(self.file), "-n"]
        for rule in decode:
            argv += ["-d", rule]
        result = run([*argv, *args], timeout=60)
        assert not check or result.returncode == 0, result.stderr
        return result.stdout

    def fields(
        self, display: str, *names: str, decode: Sequence[str] = (), check: bool = True
    ) -> list[list[str]]:
        """One row per packet matching the display filter (all if empty): the values of
        the fields ``names``, first occurrence each."""
        args = ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
        if display:
            args += ["-Y", display]
        for name in names:
            args += ["-e", name]
        text = self.read(*args, decode=decode, check=check)
        return [line.split("\t") for line in text.splitlines() if line.strip()]
