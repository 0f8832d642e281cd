"""1. CPU per packet, closed loop, as the rtpengine reference bench measures it: a minimal
uvloop forwarder, the proxy's plain and RTP->SRTP relays, rtpengine userspace RTP->SRTP;
cases interleaved run by run, relaying process pinned to CPU 1 (see bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchua as ua
from cap_common import (
    BENCH_DIR,
    CLK_TCK,
    FOREIGN_MAX,
    HOST,
    NCPU,
    PKT_LEN,
    RTPGEN_SSRC,
    SRTP_LEN,
    BenchError,
    box_busy_jiffies,
    drain,
    log,
    pin,
    proc_ticks,
    wait_quiet,
)
from cap_gens import Gens, run_closed_loop
from cap_proxy import Harness, Pair, ProxyProc
from cap_rtpengine import Rtpengine, rtpengine_binary


@dataclass
class Case:
    name: str
    expect_len: int
    pids: Callable[[], list[int]]
    ports: Callable[[], list[int]]
    tx: socket.socket
    rx: socket.socket
    cleanup: Callable[[], None] = lambda: None


async def per_packet(
    args: argparse.Namespace,
    prof: dict[str, Any],
    gens: Gens,
    harness: Harness,
    proxy: ProxyProc,
    workdir: Path,
) -> dict[str, Any]:
    relay_cpus = {1} if NCPU >= 2 and not args.no_pin else None
    calls = prof["pp_calls"]
    notes: list[str] = []
    cases: list[Case] = []
    closers: list[Callable[[], None]] = []

    # the minimal Python uvloop forwarder (one socket in, sendto() out)
    fwd_rx = ua.udp_socket()
    fwd = subprocess.Popen(
        [
            sys.executable,
            str(BENCH_DIR / "capacity.py"),
            "--role",
            "forward",
            "--dest",
            str(harness.peer_media.getsockname()[1]),
        ],
        pass_fds=(fwd_rx.fileno(),),
        env={**os.environ, "BENCH_FWD_FD": str(fwd_rx.fileno())},
        stdin=subprocess.DEVNULL,
    )
    fwd_port = int(fwd_rx.getsockname()[1])
    fwd_rx.close()
    closers.append(lambda: (fwd.kill(), fwd.wait()))
    pin(fwd.pid, relay_cpus)
    cases.append(
        Case(
            "python_floor",
            PKT_LEN,
            lambda: [fwd.pid],
            lambda: [fwd_port] * calls,
            harness.phone_media,
            harness.peer_media,
        )
    )

    # the proxy: plain and secured calls through SIP, relaying processes pinned
    for pid in proxy.relay_pids():
        pin(pid, relay_cpus)
    pairs: dict[str, list[Pair]] = {}
    for name, secure in (("plain_relay", False), ("srtp_relay", True)):
        made, failed = await harness.place_many(
            calls, secure, calls, RTPGEN_SSRC, lambda _i: 0
        )  # the generator starts every call at seq 0; the kick was 65535
        if failed or len(made) != calls:
            raise BenchError(f"{name}: {len(failed)} of {calls} calls failed: {failed[:3]}")
        pairs[name] = made
        cases.append(
            Case(
                name,
                SRTP_LEN if secure else PKT_LEN,
                proxy.relay_pids,
                (lambda m=made: [p.phone.proxy_media_port or 0 for p in m]),
                harness.phone_media,
                harness.peer_media,
            )
        )
    await asyncio.sleep(0.3)
    drain(harness.peer_media)

    rtpe: Rtpengine | None = None
    if rtpengine_binary() and not args.no_rtpengine:
        rtpe = Rtpengine(workdir, relay_cpus)
        closers.append(rtpe.stop)
        r_tx, r_rx = ua.udp_socket(), ua.udp_socket()
        closers += [r_tx.close, r_rx.close]
        state: dict[str, Any] = {"ids": []}

        def rtpe_ports(e: Rtpengine = rtpe) -> list[int]:  # fresh calls for every run
            for cid in state["ids"]:
                e.delete(cid)
            state["ids"] = [f"cap-{os.getpid()}-{time.time_ns()}-{i}" for i in range(calls)]
            return [
                e.bridge(cid, r_tx.getsockname()[1], r_rx.getsockname()[1]) for cid in state["ids"]
            ]

        cases.append(
            Case("rtpengine_srtp", SRTP_LEN, (lambda e=rtpe: [e.proc.pid]), rtpe_ports, r_tx, r_rx)
        )
    else:
        notes.append("rtpengine not installed (apt-get install rtpengine-daemon): no reference")

    if relay_cpus:
        os.sched_setaffinity(0, {0})  # the bench and the generators it starts
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    try:
        for run in range(prof["pp_runs"]):
            for case in cases:  # interleaved
                res: dict[str, Any] = {}
                # disturbed runs are retried `retries` times; one with packets of an
                # unexpected length once more on top
                for attempt in range(1, prof["retries"] + 3):
                    got = await closed_loop_case(case, prof, gens, relay_cpus)
                    got["run"], got["attempt"] = run + 1, attempt
                    if not res or _better(got, res):
                        res = got  # the least disturbed attempt
                    clean = got["foreign_cores"] <= FOREIGN_MAX and not got["bad_len"]
                    if clean or (attempt > prof["retries"] and not got["bad_len"]):
                        break
                    log(
                        f"per-packet {case.name}: {res['foreign_cores']:.2f} cores of other "
                        "load, retrying"
                    )
                runs[case.name].append(res)
                cpu = res["cpu_us_per_packet"]
                relayed = res["relayed"]
                log(
                    f"per-packet {case.name:<15} run {run + 1}: "
                    f"{cpu if cpu is None else round(cpu, 2)} us/pkt, {res['pps']:.0f} pps, "
                    f"bad len {res['bad_len']}, other load {res['foreign_cores']:.2f} cores, "
                    f"pids {res['pids']}"
                )
                if relayed <= 0 or res["bad_len"]:
                    raise BenchError(
                        f"{case.name}: relayed {relayed} packets, "
                        f"{res['bad_len']} of unexpected length"
                    )
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(range(NCPU)))
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                closer()
        for made in pairs.values():
            await harness.hang_up_all(made)
    medians = {
        name: statistics.median(r["cpu_us_per_packet"] for r in rs) if rs else None
        for name, rs in runs.items()
    }
    return {
        "medians": medians,
        "runs": runs,
        "notes": notes,
        "relay_pinned": bool(relay_cpus),
        "calls": calls,
        "workers": proxy.worker_info(proxy.status()),
    }


def _better(got: dict[str, Any], best: dict[str, Any]) -> bool:
    """Prefer an attempt whose every packet had the expected length (an overloaded
    reference engine can emit others), then the least disturbed one."""
    return (bool(got["bad_len"]), got["foreign_cores"]) < (
        bool(best["bad_len"]),
        best["foreign_cores"],
    )


async def closed_loop_case(
    case: Case, prof: dict[str, Any], gens: Gens, relay_cpus: set[int] | None
) -> dict[str, Any]:
    busy = wait_quiet(0.15, prof["quiet_wait"])
    ports = case.ports()
    pids = case.pids()
    for pid in pids:
        pin(pid, relay_cpus)
    drain(case.rx)

    def sample(gen_pid: int) -> dict[str, Any]:
        return {
            "t": time.perf_counter(),
            "ticks": sum(proc_ticks(p) for p in pids),
            "gen": proc_ticks(gen_pid),
            "me": proc_ticks(os.getpid()),
            "box": box_busy_jiffies(),
        }

    out = await run_closed_loop(
        gens,
        case.tx,
        case.rx,
        ports,
        case.expect_len,
        prof["pp_warmup"],
        prof["pp_duration"],
        sample,
    )
    s0, s1 = out["s0"], out["s1"]
    cpu_s = (s1["ticks"] - s0["ticks"]) / CLK_TCK
    dt = s1["t"] - s0["t"]
    others = (s1["gen"] - s0["gen"] + s1["me"] - s0["me"]) / CLK_TCK
    box = (s1["box"][0] - s0["box"][0]) / max(1, s1["box"][1] - s0["box"][1]) * NCPU
    relayed = out["relayed"]
    return {
        "relayed": relayed,
        "pps": relayed / out["gen_window_s"],
        "cpu_us_per_packet": cpu_s * 1e6 / relayed if relayed else None,
        "relay_cores": cpu_s / out["gen_window_s"],
        "generator_cores": others / dt,
        "foreign_cores": round(max(0.0, box - (cpu_s + others) / dt), 2),
        "bad_len": out.get("badlen", 0),
        "stalls": out.get("stalls", 0),
        "busy_before": round(busy, 2),
        "pids": pids,
    }


def run_forwarder(dest: int) -> None:
    """--role forward: the minimal uvloop forward loop (DatagramProtocol + sendto)."""
    fd = int(os.environ["BENCH_FWD_FD"])
    rx = socket.socket(fileno=fd)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((HOST, 0))
    addr = (HOST, dest)

    class Fwd(asyncio.DatagramProtocol):
        def __init__(self, send: Callable[[bytes, tuple[str, int]], None]) -> None:
            self.send = send

        def datagram_received(self, data: bytes, _addr: tuple[Any, ...]) -> None:
            self.send(data, addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        out, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=tx)
        await loop.create_datagram_endpoint(lambda: Fwd(out.sendto), sock=rx)
        await asyncio.Event().wait()

    factory = None
    if importlib.util.find_spec("uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(main())
