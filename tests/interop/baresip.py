"""Helpers for the baresip interop tests: real SIP phones talking through a real proxy.

Everything runs on 127.0.0.1 with ports found free by binding them, in directories under
the test's ``tmp_path``. Every process started here is started by
:class:`testkit.processes.Processes`, which waits for it with a timeout and kills it (by
its own PID) at teardown; the proxy is a :class:`testkit.proxy.LocalProxy`.

What is used, and why:

* ``baresip`` (Debian ``baresip-core``, 1.0.0) headless: a config dir per UA (``-f``),
  ``net_interface 127.0.0.1`` (else eth0's address goes into SDP), ``aufile`` plays an
  8 kHz mono WAV made here, ``aubridge,nil`` is the null sound card, ``sndfile`` dumps
  what the UA encoded / decoded to ``rec/dump-*-{enc,dec}.wav``, ``menu`` gives
  ``-e "/dial URI"`` and auto-answer, ``-t N`` hangs up (BYE) and quits after N s.
* ``tshark`` on ``lo`` with a capture filter for the proxy's ports; the proxy's RTP
  ports are decoded as RTP with ``-d udp.port==P,rtp``.
* ``sox FILE -n stat``: "Rough frequency" of a recording (1 kHz sent -> ~974 Hz).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import struct
import subprocess
import wave
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testkit.capture
from testkit.ports import udp_bound
from testkit.processes import Processes, wait_for

TOOLS = ("baresip", "tshark", "sox")
MODULE_PATH = "/usr/lib/baresip/modules"
LOOPBACK = "127.0.0.1"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


# --- audio ---------------------------------------------------------------------------


def write_tone(path: Path, hz: float, seconds: float = 10.0, rate: int = 8000) -> Path:
    """An 8 kHz mono 16-bit WAV of a sine tone (what ``aufile`` plays as is)."""
    frames = b"".join(
        struct.pack("<h", int(16000 * math.sin(2 * math.pi * hz * n / rate)))
        for n in range(int(rate * seconds))
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return path


def sox_stat(path: Path) -> dict[str, float]:
    """``sox FILE -n stat`` as a dict: "Rough frequency", "RMS amplitude", "Length (seconds)"."""
    result = subprocess.run(
        ["sox", str(path), "-n", "stat"], capture_output=True, text=True, timeout=30, check=False
    )
    stats: dict[str, float] = {}
    for line in result.stderr.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            with contextlib.suppress(ValueError):
                stats[" ".join(name.split())] = float(value.strip())
    return stats


# --- baresip -------------------------------------------------------------------------


@dataclass
class Baresip:
    """One headless baresip UA with its own config directory."""

    name: str
    dir: Path
    sip_port: int
    rtp_ports: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def configure(
        cls, base: Path, name: str, *, sip_port: int, rtp_ports: tuple[int, int], wav: Path,
        account: str, extra: Sequence[tuple[str, str]] = (),
    ) -> Baresip:  # fmt: skip
        """Write ``base/name/{config,accounts,contacts}``; ``account`` is the accounts line,
        ``extra`` more config lines (``("module", "srtp.so")``, ``("sip_cafile", ...)``)."""
        path = base / name
        (path / "rec").mkdir(parents=True)
        lines = [
            ("poll_method", "epoll"),
            ("net_interface", LOOPBACK),
            ("dns_server", f"{LOOPBACK}:53"),
            ("sip_listen", f"{LOOPBACK}:{sip_port}"),
            ("call_local_timeout", "30"),
            ("call_max_calls", "4"),
            ("audio_path", "/usr/share/baresip"),
            ("audio_player", "aubridge,nil"),
            ("audio_alert", "aubridge,nil"),
            ("audio_source", f"aufile,{wav}"),
            ("rtp_ports", f"{rtp_ports[0]}-{rtp_ports[1]}"),
            ("rtcp_mux", "no"),
            ("jitter_buffer_delay", "5-10"),
            ("rtp_stats", "no"),
            ("module_path", MODULE_PATH),
            ("module", "g711.so"),
            ("module", "aufile.so"),
            ("module", "aubridge.so"),
            ("module", "sndfile.so"),
            ("module_tmp", "uuid.so"),
            ("module_tmp", "account.so"),
            ("module_app", "menu.so"),
            ("snd_path", str(path / "rec")),
            ("ringback_disabled", "yes"),
            ("statmode_default", "off"),
            *extra,
        ]
        (path / "config").write_text("".join(f"{k}\t\t{v}\n" for k, v in lines))
        (path / "accounts").write_text(account + "\n")
        (path / "contacts").write_text("")
        return cls(name, path, sip_port, rtp_ports)

    @property
    def log(self) -> Path:
        return self.dir / "baresip.log"

    def start(self, procs: Processes, *args: str) -> subprocess.Popen[bytes]:
        argv = ["baresip", "-4", "-f", str(self.dir), *args]
        self.proc = procs.start(argv, self.log)
        wait_for(lambda: udp_bound(self.sip_port) or self.proc.poll() is not None, 10,
                 f"{self.name} to listen on {self.sip_port}")  # fmt: skip
        assert self.proc.poll() is None, f"{self.name} exited: {self.log_text()}"
        return self.proc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def recordings(self, kind: str = "dec") -> list[Path]:
        """What baresip decoded from the network (``dec``) or encoded to it (``enc``)."""
        return sorted((self.dir / "rec").glob(f"dump-*-{kind}.wav"))

    def heard(self) -> dict[str, float]:
        """sox stats of the last recording of what this UA heard."""
        files = self.recordings("dec")
        assert files, f"{self.name} recorded nothing: {sorted((self.dir / 'rec').iterdir())}"
        return sox_stat(files[-1])


# --- tshark --------------------------------------------------------------------------


class Capture(testkit.capture.Capture):
    """tshark on ``lo`` into a pcapng file, with a BPF port filter, read as RTP and SIP."""

    def start(self, procs: Processes) -> None:
        super().start(procs)
        self.wait_ready()

    def rtp_counts(self, decode: Sequence[str]) -> Counter[tuple[int, int]]:
        """RTP packets per (source port, destination port)."""
        counts: Counter[tuple[int, int]] = Counter()
        rows = self.fields("rtp", "udp.srcport", "udp.dstport", decode=decode, check=False)
        for src, dst in rows:
            counts[(int(src), int(dst))] += 1
        return counts

    def rtp_streams(self, decode: Sequence[str]) -> list[dict[str, Any]]:
        """``-z rtp,streams``: one dict per stream (ports, payload, packets, lost)."""
        text = self.read("-q", "-z", "rtp,streams", decode=decode, check=False)
        streams = []
        pattern = re.compile(
            r"^\s*[\d.]+\s+[\d.]+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(0x[0-9A-Fa-f]+)"
            r"\s+(\S+)\s+(\d+)\s+(-?\d+)"
        )
        for line in text.splitlines():
            if m := pattern.match(line):
                streams.append({
                    "src": (m[1], int(m[2])), "dst": (m[3], int(m[4])), "ssrc": m[5],
                    "payload": m[6], "packets": int(m[7]), "lost": int(m[8]),
                })  # fmt: skip
        return streams

    def udp_packets(self) -> list[tuple[float, int, int]]:
        """Every UDP datagram: (time, source port, destination port)."""
        rows = self.fields("udp", "frame.time_relative", "udp.srcport", "udp.dstport", check=False)
        return [(float(t), int(s), int(d)) for t, s, d in rows]

    def sip_messages(self, sip_ports: Sequence[int]) -> list[list[str]]:
        """Every SIP message: time, source/destination port, method, status, CSeq method."""
        decode = [f"udp.port=={port},sip" for port in sip_ports]
        return self.fields("sip", "frame.time_relative", "udp.srcport", "udp.dstport",
                           "sip.Method", "sip.Status-Code", "sip.CSeq.method",
                           decode=decode, check=False)  # fmt: skip


def in_range(port: int, span: tuple[int, int]) -> bool:
    return span[0] <= port <= span[1]


def count_between(
    counts: Counter[tuple[int, int]], src: tuple[int, int], dst: tuple[int, int]
) -> int:
    """Packets from a port in ``src`` to a port in ``dst`` (both inclusive ranges)."""
    return sum(n for (s, d), n in counts.items() if in_range(s, src) and in_range(d, dst))
