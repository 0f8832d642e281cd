"""Helpers for the baresip interop tests: real SIP phones talking through a real proxy.

Everything runs on 127.0.0.1 with ports found free by binding them, in directories under
the test's ``tmp_path``. Every process started here is started by :class:`Processes`,
which waits for it with a timeout and kills it (by its own PID) at teardown.

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
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import wave
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("baresip", "tshark", "sox")
MODULE_PATH = "/usr/lib/baresip/modules"
LOOPBACK = "127.0.0.1"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


# --- ports ---------------------------------------------------------------------------


def _port_free(port: int, *, tcp: bool) -> bool:
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp else (socket.SOCK_DGRAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def free_port_block(size: int, *, low: int = 21000, high: int = 32000, tries: int = 200) -> int:
    """The first port of ``size`` consecutive ports (even start) free for UDP and TCP now.

    Below the Linux ephemeral range (32768+), so no outgoing socket takes one meanwhile.
    """
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(low, high - size) & ~1
        if all(_port_free(p, tcp=True) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports in {low}..{high}")


@dataclass
class Ports:
    """Consecutive ports handed out in order from a block verified free."""

    next: int
    end: int

    @classmethod
    def block(cls, size: int = 64) -> Ports:
        base = free_port_block(size)
        return cls(base, base + size)

    def take(self, count: int = 1) -> int:
        """``count`` consecutive ports starting at an even one; returns the first."""
        self.next += self.next & 1
        first = self.next
        self.next += count
        if self.next > self.end:
            raise RuntimeError("port block exhausted")
        return first


# --- processes -----------------------------------------------------------------------


@dataclass
class Processes:
    """Every subprocess of a test: started with output to files, stopped by PID."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], log: Path, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **kwargs,
            )  # fmt: skip
        self.procs.append((name, proc))
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Its own session (start_new_session): the group is it and its children,
                # e.g. tshark's dumpcap.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc, timeout=3.0)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def udp_bound(port: int) -> bool:
    return not _port_free(port, tcp=False)


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
        account: str,
    ) -> Baresip:  # fmt: skip
        """Write ``base/name/{config,accounts,contacts}``; ``account`` is the accounts line."""
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
        self.proc = procs.start(self.name, argv, self.log)
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


# --- the proxy -----------------------------------------------------------------------


@dataclass
class Proxy:
    """``sipura-proxy run`` on loopback with its admin endpoint."""

    dir: Path
    inside_port: int
    outside_port: int
    admin_port: int
    media: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = None

    def write_config(
        self, *, upstream: str | None, lines: Sequence[tuple[str, str | None]],
        allowed: Sequence[str] = (),
    ) -> Path:  # fmt: skip
        """``lines``: (user_id, static contact or None) per ``[[line]]``; ``allowed``:
        the ``allowed_sources`` of every line (a phone that calls without registering)."""
        text = [
            "[inside]",
            f'listen = "{LOOPBACK}:{self.inside_port}"',
            f'media_ip = "{LOOPBACK}"',
            "[outside]",
            f'listen = "{LOOPBACK}:{self.outside_port}"',
            f'media_ip = "{LOOPBACK}"',
        ]
        if upstream:
            text.append(f'upstream = "{upstream}"')
        text += [
            "[media]",
            f"port_min = {self.media[0]}",
            f"port_max = {self.media[1]}",
            "[sip]",
            'transports = ["udp"]',
            "[log]",
            'level = "debug"',
            "[admin]",
            f'listen = "{LOOPBACK}:{self.admin_port}"',
        ]
        for user_id, contact in lines:
            text += ["[[line]]", f'user_id = "{user_id}"']
            if contact:
                text.append(f'contact = "{contact}"')
            if allowed:
                text.append("allowed_sources = [" + ", ".join(f'"{a}"' for a in allowed) + "]")
        path = self.dir / "proxy.toml"
        path.write_text("\n".join(text) + "\n")
        return path

    @property
    def log(self) -> Path:
        return self.dir / "proxy.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, procs: Processes) -> None:
        argv = [sys.executable, "-m", "proxy", "run", "--config", str(self.dir / "proxy.toml")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = procs.start("proxy", argv, self.log, cwd=str(ROOT), env=env)

        def up() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"proxy exited: {self.log_text()}"
            try:
                self.get("/status")
            except OSError:
                return False
            return True

        wait_for(up, 15, "the proxy's admin endpoint")

    def get(self, path: str) -> Any:
        with socket.create_connection((LOOPBACK, self.admin_port), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])


# --- tshark --------------------------------------------------------------------------


@dataclass
class Capture:
    """tshark on ``lo`` into a pcapng file, with a BPF port filter."""

    file: Path
    bpf: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.file.with_suffix(".log")

    def start(self, procs: Processes) -> None:
        argv = ["tshark", "-i", "lo", "-f", self.bpf, "-w", str(self.file), "-q"]
        self.proc = procs.start("tshark", argv, self.log)

        def capturing() -> bool:
            assert self.proc is not None
            text = self.log.read_text(errors="replace")
            assert self.proc.poll() is None, f"tshark exited: {text}"
            return "Capturing on" in text

        wait_for(capturing, 15, "tshark to capture")
        time.sleep(0.3)  # "Capturing on" is printed just before the capture really runs

    def stop(self) -> None:
        if self.proc is not None:
            time.sleep(0.3)  # let the last packets reach the file
            Processes.stop(self.proc, timeout=10)

    def _read(self, decode: Sequence[str], *args: str) -> str:
        """``tshark -r`` with ``-d`` decode-as rules ("udp.port==P,rtp") and ``args``."""
        argv = ["tshark", "-r", str(self.file), "-n"]
        for rule in decode:
            argv += ["-d", rule]
        result = subprocess.run(
            argv + list(args), capture_output=True, text=True, timeout=60, check=False
        )
        return result.stdout

    def fields(self, decode: Sequence[str], display: str, *names: str) -> list[list[str]]:
        """One row per packet matching ``display``: the values of the fields ``names``."""
        args = ["-Y", display, "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
        for name in names:
            args += ["-e", name]
        text = self._read(decode, *args)
        return [line.split("\t") for line in text.splitlines() if line.strip()]

    def rtp_counts(self, decode: Sequence[str]) -> Counter[tuple[int, int]]:
        """RTP packets per (source port, destination port)."""
        counts: Counter[tuple[int, int]] = Counter()
        for src, dst in self.fields(decode, "rtp", "udp.srcport", "udp.dstport"):
            counts[(int(src), int(dst))] += 1
        return counts

    def rtp_streams(self, decode: Sequence[str]) -> list[dict[str, Any]]:
        """``-z rtp,streams``: one dict per stream (ports, payload, packets, lost)."""
        text = self._read(decode, "-q", "-z", "rtp,streams")
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
        rows = self.fields((), "udp", "frame.time_relative", "udp.srcport", "udp.dstport")
        return [(float(t), int(s), int(d)) for t, s, d in rows]

    def sip_messages(self, sip_ports: Sequence[int]) -> list[list[str]]:
        """Every SIP message: time, source/destination port, method, status, CSeq method."""
        decode = [f"udp.port=={port},sip" for port in sip_ports]
        return self.fields(decode, "sip", "frame.time_relative", "udp.srcport",
                           "udp.dstport", "sip.Method", "sip.Status-Code",
                           "sip.CSeq.method")  # fmt: skip


def in_range(port: int, span: tuple[int, int]) -> bool:
    return span[0] <= port <= span[1]


def count_between(
    counts: Counter[tuple[int, int]], src: tuple[int, int], dst: tuple[int, int]
) -> int:
    """Packets from a port in ``src`` to a port in ``dst`` (both inclusive ranges)."""
    return sum(n for (s, d), n in counts.items() if in_range(s, src) and in_range(d, dst))


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()
