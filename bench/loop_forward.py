#!/usr/bin/env python3
"""CPU cost per packet of a minimal UDP forward loop on different event loops.

The forwarder (one child process per variant) receives datagrams on one socket and sends
each one, unchanged, from a second socket to a fixed destination. A separate generator
process feeds it 172-byte RTP-sized packets (12-byte header + 160-byte payload) over
127.0.0.1 and sinks the forwarded packets.

Load modes:
  * closed loop (default): the generator keeps ``--window`` packets in flight; every packet
    that comes back through the sink is replaced by a new one (sent in bursts).
  * paced (``--rate PPS``): open-loop at a fixed rate in bursts of ``--burst`` packets.

The forwarder measures its own CPU time (``getrusage`` user+sys, cross-checked against
utime+stime from /proc/self/stat) between packet ``warmup`` and packet ``warmup + N``.

Variants: uvloop (DatagramProtocol), asyncio (DatagramProtocol, default selector loop),
trio (``await recv_into`` / ``await send``), blocking (plain blocking sockets), and
asyncio-2k: stdlib asyncio with the (private) transport ``max_size`` lowered from 256 KiB to
2 KiB, to isolate the cost of the 256 KiB ``recvfrom`` buffer allocated per datagram.

Usage:
  python bench/loop_forward.py                        # 200k packets x 3 rounds, table
  python bench/loop_forward.py --packets 50000 --json
  python bench/loop_forward.py --rate 20000           # paced load instead of closed loop
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
VARIANTS = ("uvloop", "asyncio", "asyncio-2k", "trio", "blocking")
NEEDS_PACKAGE = {"uvloop": "uvloop", "trio": "trio"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
RECV_TIMEOUT_S = 0.5

Snap = tuple[float, float, float, int]  # (perf_counter, utime s, stime s, /proc ticks)


# --------------------------------------------------------------------------- helpers


def rtp_packet() -> bytes:
    """12-byte RTP header (V=2, PT=0/PCMU) + 160 bytes of payload = 172 bytes."""
    header = struct.pack("!BBHII", 0x80, 0x00, 1, 160, 0x51505152)
    return header + b"\xff" * 160


def proc_ticks(pid: int | str = "self") -> int:
    """utime + stime in clock ticks from /proc/PID/stat."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def snap() -> Snap:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (time.perf_counter(), ru.ru_utime, ru.ru_stime, proc_ticks())


def pin_cpu(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("uvloop", "trio"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "processor": platform.processor() or "(empty)",
        "cpu_model": model or "(unknown)",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        **versions,
    }


# --------------------------------------------------------------------------- forwarders


def fwd_blocking(
    rx: socket.socket, tx: socket.socket, warmup: int, total: int
) -> tuple[Snap, Snap]:
    buf = bytearray(2048)
    view = memoryview(buf)
    recv_into, send = rx.recv_into, tx.send
    for _ in range(warmup):
        n = recv_into(buf)
        send(view[:n])
    start = snap()
    for _ in range(total - warmup):
        n = recv_into(buf)
        send(view[:n])
    return start, snap()


def fwd_trio(rx: socket.socket, tx: socket.socket, warmup: int, total: int) -> tuple[Snap, Snap]:
    import trio

    async def main() -> tuple[Snap, Snap]:
        trx = trio.socket.from_stdlib_socket(rx)
        ttx = trio.socket.from_stdlib_socket(tx)
        buf = bytearray(2048)
        view = memoryview(buf)
        recv_into, send = trx.recv_into, ttx.send
        for _ in range(warmup):
            n = await recv_into(buf)
            await send(view[:n])
        start = snap()
        for _ in range(total - warmup):
            n = await recv_into(buf)
            await send(view[:n])
        return start, snap()

    return trio.run(main)


class ForwardProtocol(asyncio.DatagramProtocol):
    def __init__(self, warmup: int, total: int, done: asyncio.Future[None]) -> None:
        self.sendto: Callable[[bytes], None] | None = None
        self.warmup = warmup
        self.total = total
        self.done = done
        self.count = 0
        self.start: Snap | None = None
        self.end: Snap | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.sendto(data)  # type: ignore[misc]
        self.count += 1
        if self.count == self.warmup:
            self.start = snap()
        elif self.count == self.total:
            self.end = snap()
            self.done.set_result(None)


def fwd_asyncio_loop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], max_size: int | None = None
) -> Callable[[socket.socket, socket.socket, int, int], tuple[Snap, Snap]]:
    def run(rx: socket.socket, tx: socket.socket, warmup: int, total: int) -> tuple[Snap, Snap]:
        async def main() -> tuple[Snap, Snap]:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            proto = ForwardProtocol(warmup, total, done)
            out, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=tx)
            proto.sendto = out.sendto
            inp, _ = await loop.create_datagram_endpoint(lambda: proto, sock=rx)
            if max_size is not None:
                inp.max_size = max_size  # type: ignore[attr-defined]  # private attr
            await done
            inp.close()
            out.close()
            assert proto.start is not None and proto.end is not None
            return proto.start, proto.end

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main())

    return run


def run_forwarder(args: argparse.Namespace) -> None:
    pin_cpu(args.cpu)
    if args.variant == "uvloop":
        import uvloop

        forward = fwd_asyncio_loop(uvloop.new_event_loop)
    elif args.variant == "asyncio":
        forward = fwd_asyncio_loop(asyncio.new_event_loop)
    elif args.variant == "asyncio-2k":
        forward = fwd_asyncio_loop(asyncio.new_event_loop, max_size=2048)
    elif args.variant == "trio":
        forward = fwd_trio
    else:
        forward = fwd_blocking

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((HOST, 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((HOST, 0))
    tx.connect((HOST, args.dest))
    print(json.dumps({"port": rx.getsockname()[1]}), flush=True)

    start, end = forward(rx, tx, args.warmup, args.warmup + args.packets)
    wall = end[0] - start[0]
    usr = end[1] - start[1]
    sys_ = end[2] - start[2]
    ticks = end[3] - start[3]
    n = args.packets
    result = {
        "variant": args.variant,
        "packets": n,
        "wall_s": wall,
        "cpu_s": usr + sys_,
        "cpu_us_per_pkt": (usr + sys_) * 1e6 / n,
        "usr_us_per_pkt": usr * 1e6 / n,
        "sys_us_per_pkt": sys_ * 1e6 / n,
        "proc_us_per_pkt": ticks * 1e6 / CLK_TCK / n,
        "pps": n / wall,
        "util": (usr + sys_) / wall,
    }
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- generator


def run_generator(args: argparse.Namespace) -> None:
    pin_cpu(args.cpu)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((HOST, 0))
    print(json.dumps({"sink_port": sink.getsockname()[1]}), flush=True)
    fwd_port = json.loads(sys.stdin.readline())["port"]
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect((HOST, fwd_port))
    pkt = rtp_packet()
    buf = bytearray(2048)
    send, recv_into = out.send, sink.recv_into
    dontwait = socket.MSG_DONTWAIT
    try:
        if args.rate:
            interval = args.burst / args.rate
            next_t = time.perf_counter()
            while True:
                for _ in range(args.burst):
                    send(pkt)
                try:
                    while True:
                        recv_into(buf, 0, dontwait)
                except BlockingIOError:
                    pass
                next_t += interval
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        else:
            # Blocking recv with a kernel timeout (no Python-level poll per recv).
            tv = struct.pack("ll", 0, int(RECV_TIMEOUT_S * 1e6))
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            window = args.window
            for _ in range(window):
                send(pkt)
            while True:
                try:
                    recv_into(buf)
                except BlockingIOError:  # SO_RCVTIMEO expired: assume window lost, refill
                    for _ in range(window):
                        send(pkt)
                    continue
                n = 1
                try:
                    while True:
                        recv_into(buf, 0, dontwait)
                        n += 1
                except BlockingIOError:
                    pass
                for _ in range(n):
                    send(pkt)
    except (ConnectionRefusedError, BrokenPipeError, KeyboardInterrupt):
        pass  # forwarder has gone away


# --------------------------------------------------------------------------- driver


def run_variant(variant: str, args: argparse.Namespace, warmup: int) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    gen_cmd = [*me, "--role", "gen", "--window", str(args.window), "--burst", str(args.burst)]
    gen_cmd += ["--rate", str(args.rate)]
    fwd_cmd = [*me, "--role", "fwd", "--variant", variant, "--warmup", str(warmup)]
    fwd_cmd += ["--packets", str(args.packets)]
    if args.pin:
        gen_cmd += ["--cpu", "0"]
        fwd_cmd += ["--cpu", "1"]
    gen = subprocess.Popen(gen_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fwd: subprocess.Popen[str] | None = None
    try:
        assert gen.stdout is not None and gen.stdin is not None
        sink_port = json.loads(gen.stdout.readline())["sink_port"]
        fwd = subprocess.Popen(
            [*fwd_cmd, "--dest", str(sink_port)], stdout=subprocess.PIPE, text=True
        )
        assert fwd.stdout is not None
        port = json.loads(fwd.stdout.readline())["port"]
        gen_ticks0 = proc_ticks(gen.pid)
        gen.stdin.write(json.dumps({"port": port}) + "\n")
        gen.stdin.flush()
        try:
            out, _ = fwd.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": f"timeout after {args.timeout}s"}
        gen_ticks = proc_ticks(gen.pid) - gen_ticks0
        if fwd.returncode != 0 or not out.strip():
            return {"variant": variant, "error": f"forwarder exit code {fwd.returncode}"}
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["gen_us_per_pkt"] = gen_ticks * 1e6 / CLK_TCK / (warmup + args.packets)
        return result
    finally:
        for proc in (fwd, gen):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": "; ".join(r["error"] for r in runs)}
    keys = ("cpu_us_per_pkt", "usr_us_per_pkt", "sys_us_per_pkt", "proc_us_per_pkt")
    keys += ("pps", "util", "gen_us_per_pkt")
    summary = {k: statistics.median(r[k] for r in ok) for k in keys}
    summary["cpu_us_per_pkt_min"] = min(r["cpu_us_per_pkt"] for r in ok)
    summary["runs_ok"] = len(ok)
    return summary


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    c = report["config"]
    print(
        f"machine: {m['cpu_model']} | processor={m['processor']} | cpus={m['cpu_count']} | "
        f"{m['implementation']} {m['python']} | kernel {m['kernel']} | "
        f"loadavg {m['loadavg_at_start']}"
    )
    print(f"packages: uvloop={m['uvloop']} trio={m['trio']}")
    load = f"paced {c['rate']} pps, burst {c['burst']}" if c["rate"] else f"window {c['window']}"
    print(
        f"config: {c['packets']} packets/run (+{c['warmup']} warmup), {c['rounds']} rounds, "
        f"{c['packet_size']}-byte packets, load: {load}, pinned={c['pin']}"
    )
    for name, reason in report["skipped"].items():
        print(f"skipped {name}: {reason}")
    base = report["baseline"]
    hdr = (
        f"{'variant':<10} {'cpu us/pkt':>10} {'min':>6} {'usr':>6} {'sys':>6} {'/proc':>6} "
        f"{'pkt/s':>9} {'fwd cpu%':>8} {'gen us/pkt':>10} {'vs ' + (base or '-'):>10}"
        "  runs (us/pkt)"
    )
    print(hdr)
    print("-" * len(hdr))
    base_cpu = report["results"].get(base, {}).get("summary", {}).get("cpu_us_per_pkt")
    for name, res in report["results"].items():
        s = res["summary"]
        if "error" in s:
            print(f"{name:<10} ERROR: {s['error']}")
            continue
        ratio = f"{s['cpu_us_per_pkt'] / base_cpu:.2f}x" if base_cpu else "-"
        runs = " ".join(f"{r['cpu_us_per_pkt']:.2f}" for r in res["runs"] if "error" not in r)
        print(
            f"{name:<10} {s['cpu_us_per_pkt']:>10.2f} {s['cpu_us_per_pkt_min']:>6.2f} "
            f"{s['usr_us_per_pkt']:>6.2f} {s['sys_us_per_pkt']:>6.2f} {s['proc_us_per_pkt']:>6.2f} "
            f"{s['pps']:>9.0f} {s['util'] * 100:>7.0f}% {s['gen_us_per_pkt']:>10.2f} "
            f"{ratio:>10}  {runs}"
        )
    print(
        "cpu us/pkt = median forwarder user+sys (getrusage) per packet; /proc = same from "
        "utime+stime ticks; fwd cpu% near 100 means the forwarder (not the generator) is the "
        "bottleneck."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--packets", type=int, default=200_000, help="measured packets per run")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--rounds", type=int, default=3, help="runs per variant (interleaved)")
    p.add_argument("--window", type=int, default=64, help="closed loop: packets in flight")
    p.add_argument("--rate", type=int, default=0, help="paced mode: packets/s (0 = closed loop)")
    p.add_argument("--burst", type=int, default=16, help="paced mode: packets per burst")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--pin", action="store_true", help="pin generator to CPU 0, forwarder to 1")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run timeout (s)")
    # internal (child process) options
    p.add_argument("--role", choices=("main", "fwd", "gen"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--dest", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.role == "fwd":
        run_forwarder(args)
        return
    if args.role == "gen":
        run_generator(args)
        return

    warmup = min(20_000, max(1_000, args.packets // 10))
    skipped: dict[str, str] = {}
    variants = []
    for name in (v.strip() for v in args.variants.split(",") if v.strip()):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
        pkg = NEEDS_PACKAGE.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            skipped[name] = f"package {pkg!r} not installed"
            if not args.json:
                print(f"skipping {name}: package {pkg!r} not installed", file=sys.stderr)
            continue
        variants.append(name)

    machine = machine_info()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        k = rnd % max(1, len(variants))
        for v in variants[k:] + variants[:k]:  # rotate order each round
            res = run_variant(v, args, warmup)
            runs[v].append(res)
            if not args.json:
                msg = res.get("error") or f"{res['cpu_us_per_pkt']:.2f} us/pkt"
                print(f"  round {rnd + 1}/{args.rounds} {v:<10} {msg}", file=sys.stderr)

    baseline = "uvloop" if "uvloop" in variants else (variants[0] if variants else None)
    results = {v: {"runs": runs[v], "summary": summarize(runs[v])} for v in variants}
    base_cpu = (
        results.get(baseline, {}).get("summary", {}).get("cpu_us_per_pkt") if baseline else None
    )
    for res in results.values():
        cpu = res["summary"].get("cpu_us_per_pkt")
        res["summary"]["ratio_vs_baseline"] = cpu / base_cpu if cpu and base_cpu else None
    report = {
        "machine": machine,
        "config": {
            "packets": args.packets,
            "warmup": warmup,
            "rounds": args.rounds,
            "packet_size": len(rtp_packet()),
            "window": args.window,
            "rate": args.rate,
            "burst": args.burst,
            "pin": args.pin,
        },
        "skipped": skipped,
        "baseline": baseline,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
