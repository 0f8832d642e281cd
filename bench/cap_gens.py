"""The C load generators of the capacity bench (``rtpgen.c`` closed loop, ``capgen.c``
paced two-way with per-packet latency): built with gcc into a cache directory on first
use, else the pure-Python ``pygen.py``; and the two coroutines that run them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cap_common import BENCH_DIR, RTPGEN_SSRC, BenchError, log

GEN_NICE = -10
"""Default nice increment of the paced generator (``--gen-nice``)."""


def build(name: str, cache: Path) -> Path | None:
    """Compile bench/NAME.c into the cache dir (once per source change); None without gcc."""
    src = BENCH_DIR / f"{name}.c"
    exe = cache / name
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [cc, "-O2", "-o", str(exe), str(src)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        log(f"gcc failed for {src.name}: {result.stderr.strip()[:300]}")
        return None
    return exe


@dataclass
class Gens:
    rtpgen: list[str]
    capgen: list[str]
    kind: str
    nice: int = GEN_NICE
    """Nice increment of the paced generator (``--gen-nice``)."""


def generators(cache: Path, force_py: bool, nice: int = GEN_NICE) -> Gens:
    py = [sys.executable, str(BENCH_DIR / "pygen.py")]
    if not force_py:
        rtpgen, capgen = build("rtpgen", cache), build("capgen", cache)
        if rtpgen and capgen:
            return Gens([str(rtpgen)], [str(capgen)], "C (gcc)", nice)
    return Gens(
        [*py, "rtpgen"],
        [*py, "capgen"],
        "Python fallback (pygen.py: no gcc, or --gen py)",
        nice,
    )


async def run_closed_loop(
    gens: Gens,
    tx: socket.socket,
    rx: socket.socket,
    ports: list[int],
    expect_len: int,
    warmup: float,
    duration: float,
    sample: Callable[[int], dict[str, Any]],
) -> dict[str, Any]:
    """rtpgen: closed loop (window 32) over ``ports``; ``sample`` is called at both quiet
    window edges. Returns packets relayed in the window and the two samples."""
    cmd = [
        *gens.rtpgen,
        str(tx.fileno()),
        str(rx.fileno()),
        "32",
        "0",
        "16",
        str(warmup),
        str(duration),
        str(RTPGEN_SSRC),
        str(expect_len),
        "0",
        "/dev/null",
        *map(str, ports),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(tx.fileno(), rx.fileno())
    )
    assert proc.stdin is not None and proc.stdout is not None
    out: dict[str, Any] = {}
    deadline = warmup + duration + 30
    try:
        async with asyncio.timeout(deadline):
            while line := await proc.stdout.readline():
                w = line.decode().split()
                if not w:
                    continue
                if w[0] == "READY0":
                    out["s0"], out["r0"] = sample(proc.pid), int(w[1])
                elif w[0] == "READY1":
                    out["s1"], out["r1"], out["gen_window_s"] = (
                        sample(proc.pid),
                        int(w[1]),
                        float(w[2]),
                    )
                elif w[0] == "END":
                    out.update({k: int(v) for k, v in (kv.split("=") for kv in w[1:])})
                    break
                else:
                    continue
                if w[0] != "END":
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"closed-loop generator did not finish in {deadline:.0f} s") from None
    if "s1" not in out:
        raise BenchError(f"closed-loop generator failed (rc {proc.returncode}): {out}")
    out["relayed"] = out["r1"] - out["r0"]
    return out


def _generator_priority(nice: int) -> None:
    """The paced generator stands for phones on other machines: it must not wait behind
    the relay for a CPU, or its own scheduling delay shows up as latency. Raise its
    priority when allowed (root); worst_send_lag_ms in each step shows what was left."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)


def parse_end(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


async def run_paced(
    gens: Gens,
    phone: socket.socket,
    peer: socket.socket,
    rows: list[tuple[int, ...]],
    srtp: bytes,
    k: int,
    srtp_len: int,
    warmup: float,
    duration: float,
    keymode: int,
    workdir: Path,
    on_window: Callable[[str, int], None] | None = None,
) -> dict[str, float]:
    callfile = workdir / "calls.txt"
    srtpfile = workdir / "peer.srtp"
    callfile.write_text(
        f"{len(rows)} {k} {srtp_len}\n" + "".join(" ".join(map(str, r)) + "\n" for r in rows)
    )
    srtpfile.write_bytes(srtp)
    cmd = [
        *gens.capgen,
        str(phone.fileno()),
        str(peer.fileno()),
        str(callfile),
        str(srtpfile),
        str(warmup),
        str(duration),
        "50",
        str(keymode),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=subprocess.PIPE,
        pass_fds=(phone.fileno(), peer.fileno()),
        preexec_fn=functools.partial(_generator_priority, gens.nice),
    )
    assert proc.stdout is not None
    end: dict[str, float] | None = None
    deadline = warmup + duration + 30
    try:
        async with asyncio.timeout(deadline):
            while line := await proc.stdout.readline():
                text = line.decode().strip()
                if text in ("WIN0", "WIN1") and on_window is not None:
                    on_window(text, proc.pid)
                elif text.startswith("END"):
                    end = parse_end(text)
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"paced generator did not finish in {deadline:.0f} s") from None
    if end is None:
        raise BenchError(f"paced generator failed (rc {proc.returncode})")
    return end


def step_summary(end: dict[str, float]) -> dict[str, Any]:
    sent = end["up_sent"] + end["down_sent"]
    recv = end["up_recv"] + end["down_recv"]
    return {
        "sent": int(sent),
        "received": int(recv),
        "loss_pct": 100.0 * (sent - recv) / sent if sent else None,
        "p50_ms": end["all_p50_us"] / 1000,
        "p99_ms": end["all_p99_us"] / 1000,
        "up": {k[3:]: end[k] for k in end if k.startswith("up_")},
        "down": {k[5:]: end[k] for k in end if k.startswith("down_")},
        "late_sends": int(end["late_sends"]),
        "worst_send_lag_ms": end["worst_lag_ms"],
    }
