#!/usr/bin/env python3
"""CPU cost per packet of the media relay (proxy.media.relay), plain and SRTP, next to a
bare forward loop.

Usage (from the repo root; works from a checkout without installing)::

    python bench/relay.py              # 200 000 packets x 3 rounds per variant
    python bench/relay.py --quick      # 30 000 packets x 2 rounds
    python bench/relay.py --packets 50000 --json

Method (the one of ``bench/loop_forward.py``, whose minimal forwarder and helpers this
script reuses): a generator process sends 172-byte RTP packets (12-byte header + 160
bytes of G.711, sequence number and timestamp advancing as a phone's do, so libsrtp's
replay checks see a real stream) over 127.0.0.1 to the forwarder under test, in a closed
loop keeping ``--window`` packets in flight, and sinks what the forwarder sends on. For
``secure-in`` it sends SRTP instead (182 bytes, protected in the generator process,
whose CPU is not the one measured). Each variant runs
in its own child process, which measures its own CPU time (``getrusage`` user + sys,
cross-checked with /proc/self/stat ticks) over the measured packets after a warm-up.
All variants use the same event loop: uvloop when installed, else the stdlib loop
(``--loop`` overrides). Variants, interleaved over the rounds (medians reported):

* ``engine``: a :class:`RelayEngine` session with one stream. The generator is the
  phone: it sends plain RTP to the session's inside RTP port, where it latches; the
  relay forwards it from the outside RTP port to the sink, which is the outside remote
  (a ``SetRemote`` command). This is the full per-packet path of a plain call: source check,
  counters, ``transport.sendto(data, addr)``. The child reads the session's
  ``stats()`` every 2 ms and takes its CPU snapshots at those polls (the polling costs
  well under 1 % of a core).
* ``secure-out``: the same session after a ``SwitchSrtp`` to the outside: plain RTP in on
  the inside, SRTP (AES_CM_128_HMAC_SHA1_80) out on the outside. Adds one
  ``SrtpContext.protect`` per packet.
* ``secure-in``: the reverse: SRTP in on the outside (the generator latches there, as
  an authenticated peer), plain RTP out on the inside. Adds one ``unprotect``.
* ``minimal``: ``loop_forward.py``'s forwarder: a ``DatagramProtocol`` that sends each
  datagram from a second, *connected* socket (``sendto(data)``).
* ``minimal-sendto``: the same with an unconnected second socket and
  ``sendto(data, addr)``, as the relay must do (its peer can change): the fair floor.

It also times, in-process, the mixing of a tone into one 160-byte G.711 payload
(:class:`proxy.media.tones.ToneMixer`), which the relay does only while a tone sounds.

It is a benchmark, not a test: the exit code is 0 whatever the figures are.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import socket
import struct
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loop_forward as lf  # bench/ is sys.path[0] when this file runs as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # this checkout's proxy and testkit (tests' and benches')

from proxy.media.commands import SetRemote, SrtpKeys, SwitchSrtp  # noqa: E402
from proxy.media.engine import Side  # noqa: E402
from proxy.media.relay import RelayEngine  # noqa: E402
from proxy.media.srtp import SrtpContext  # noqa: E402
from proxy.media.tones import PCMU, Tone, ToneMixer  # noqa: E402
from testkit.ports import free_port_range  # noqa: E402

HOST = lf.HOST
VARIANTS = ("engine", "secure-out", "secure-in", "minimal", "minimal-sendto")
ENGINE_VARIANTS = ("engine", "secure-out", "secure-in")
BENCH_KEY = bytes(range(16))
BENCH_SALT = bytes(range(16, 32))
BASELINE = "minimal-sendto"
POLL_S = 0.002
FULL = {"packets": 200_000, "rounds": 3}
QUICK = {"packets": 30_000, "rounds": 2}


def default_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def result(start: lf.Snap, end: lf.Snap, packets: int, variant: str) -> dict[str, Any]:
    wall = end[0] - start[0]
    usr = end[1] - start[1]
    sys_ = end[2] - start[2]
    ticks = end[3] - start[3]
    return {
        "variant": variant,
        "packets": packets,
        "wall_s": wall,
        "cpu_us_per_pkt": (usr + sys_) * 1e6 / packets,
        "usr_us_per_pkt": usr * 1e6 / packets,
        "sys_us_per_pkt": sys_ * 1e6 / packets,
        "proc_us_per_pkt": ticks * 1e6 / lf.CLK_TCK / packets,
        "pps": packets / wall,
        "util": (usr + sys_) / wall,
    }


# --------------------------------------------------------------------------- forwarders


def run_engine(args: argparse.Namespace) -> None:
    """Child: one relay session. ``engine`` and ``secure-out``: generator -> inside,
    outside -> sink; ``secure-in``: generator -> outside (SRTP), inside -> sink."""
    lf.pin_cpu(args.cpu)
    variant = args.role
    src, dst = (
        (Side.OUTSIDE, Side.INSIDE) if variant == "secure-in" else (Side.INSIDE, Side.OUTSIDE)
    )

    async def main() -> dict[str, Any]:
        engine = RelayEngine(HOST, HOST, *free_port_range(200))
        session = engine.allocate("bench", 1)
        sid = session.id
        engine.apply(SetRemote(sid, src, 0, HOST, 9, 10))  # latches on the generator's port
        engine.apply(SetRemote(sid, dst, 0, HOST, args.dest, args.dest + 1))
        if variant != "engine":
            engine.apply(SwitchSrtp(sid, Side.OUTSIDE, SrtpKeys(BENCH_KEY, BENCH_SALT), 2.0))
        print(json.dumps({"port": session.local(src, 0)[1]}), flush=True)

        def relayed() -> int:
            return session.stats()[dst][0]["packets_out"]

        while relayed() < args.warmup:
            await asyncio.sleep(POLL_S)
        count0, start = relayed(), lf.snap()
        while relayed() < count0 + args.packets:
            await asyncio.sleep(POLL_S)
        count1, end = relayed(), lf.snap()
        out = result(start, end, count1 - count0, variant)
        stats = session.stats()
        out["drops"] = {side.value: stats[side][0]["drops"] for side in Side}
        out["srtp"] = {
            "encrypted": stats[Side.OUTSIDE][0]["packets_encrypted"],
            "decrypted": stats[Side.OUTSIDE][0]["packets_decrypted"],
        }
        await engine.close()
        return out

    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        out = runner.run(main())
    print(json.dumps(out), flush=True)


def run_generator(args: argparse.Namespace) -> None:
    """loop_forward's closed-loop generator, with a live sequence number and timestamp,
    and SRTP with ``--srtp``."""
    lf.pin_cpu(args.cpu)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((HOST, 0))
    print(json.dumps({"sink_port": sink.getsockname()[1]}), flush=True)
    fwd_port = json.loads(sys.stdin.readline())["port"]
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect((HOST, fwd_port))
    template = bytearray(lf.rtp_packet())
    protect = SrtpContext(BENCH_KEY, BENCH_SALT).protect if args.srtp else bytes
    pack_into = struct.pack_into
    seq = 0
    send = out.send

    def send_next() -> None:
        nonlocal seq
        seq += 1
        pack_into("!HI", template, 2, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF)
        send(protect(bytes(template)))

    buf = bytearray(2048)
    recv_into = sink.recv_into
    dontwait = socket.MSG_DONTWAIT
    tv = struct.pack("ll", 0, int(lf.RECV_TIMEOUT_S * 1e6))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    window = args.window
    try:
        for _ in range(window):
            send_next()
        while True:
            try:
                recv_into(buf)
            except BlockingIOError:  # SO_RCVTIMEO expired: assume window lost, refill
                for _ in range(window):
                    send_next()
                continue
            n = 1
            try:
                while True:
                    recv_into(buf, 0, dontwait)
                    n += 1
            except BlockingIOError:
                pass
            for _ in range(n):
                send_next()
    except (ConnectionRefusedError, BrokenPipeError, KeyboardInterrupt):
        pass  # forwarder has gone away


def tone_mix_cost() -> dict[str, float]:
    """µs to mix a sounding tone into one 20 ms u-law packet, in-process, best of 5."""
    tone = Tone.parse("480@-19,620@-19;10(10/0/1+2)")
    packet = lf.rtp_packet()
    ToneMixer(tone).mix(packet)  # builds the tables and renders the tone once

    def one() -> None:
        mixer = ToneMixer(tone)
        for _ in range(100):
            mixer.mix(packet)

    number = 20
    best = min(timeit.repeat(one, number=number, repeat=5))
    construct = min(timeit.repeat(lambda: ToneMixer(tone), number=1000, repeat=5)) / 1000
    per_packet = (best / number - construct) / 100
    return {"tone_mix_us_per_pkt": per_packet * 1e6, "payload_type": PCMU}


class SendtoForward(asyncio.DatagramProtocol):
    """loop_forward's ForwardProtocol with an addressed ``sendto`` (unconnected socket)."""

    def __init__(self, warmup: int, total: int, done: asyncio.Future[None]) -> None:
        self.sendto: Callable[[bytes, tuple[str, int]], None] | None = None
        self.dest: tuple[str, int] = (HOST, 0)
        self.warmup = warmup
        self.total = total
        self.done = done
        self.count = 0
        self.start: lf.Snap | None = None
        self.end: lf.Snap | None = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.sendto(data, self.dest)  # type: ignore[misc]
        self.count += 1
        if self.count == self.warmup:
            self.start = lf.snap()
        elif self.count == self.total:
            self.end = lf.snap()
            self.done.set_result(None)


def run_sendto(args: argparse.Namespace) -> None:
    lf.pin_cpu(args.cpu)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((HOST, 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((HOST, 0))
    print(json.dumps({"port": rx.getsockname()[1]}), flush=True)

    async def main() -> tuple[lf.Snap, lf.Snap]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        proto = SendtoForward(args.warmup, args.warmup + args.packets, done)
        out, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=tx)
        proto.sendto = out.sendto
        proto.dest = (HOST, args.dest)
        inp, _ = await loop.create_datagram_endpoint(lambda: proto, sock=rx)
        await done
        inp.close()
        out.close()
        assert proto.start is not None and proto.end is not None
        return proto.start, proto.end

    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        start, end = runner.run(main())
    print(json.dumps(result(start, end, args.packets, "minimal-sendto")), flush=True)


# --------------------------------------------------------------------------- driver


def forwarder_cmd(variant: str, args: argparse.Namespace, warmup: int) -> list[str]:
    common = ["--warmup", str(warmup), "--packets", str(args.packets)]
    if args.pin:
        common += ["--cpu", "1"]
    if variant == "minimal":  # loop_forward's own forwarder, unchanged
        return [sys.executable, lf.__file__, "--role", "fwd", "--variant", args.loop, *common]
    me = str(Path(__file__).resolve())
    return [sys.executable, me, "--role", variant, "--loop", args.loop, *common]


def run_variant(variant: str, args: argparse.Namespace, warmup: int) -> dict[str, Any]:
    me = str(Path(__file__).resolve())
    gen_cmd = [sys.executable, me, "--role", "gen", "--window", str(args.window)]
    if variant == "secure-in":
        gen_cmd.append("--srtp")
    if args.pin:
        gen_cmd += ["--cpu", "0"]
    gen = subprocess.Popen(gen_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fwd: subprocess.Popen[str] | None = None
    try:
        assert gen.stdout is not None and gen.stdin is not None
        sink_port = json.loads(gen.stdout.readline())["sink_port"]
        cmd = [*forwarder_cmd(variant, args, warmup), "--dest", str(sink_port)]
        fwd = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert fwd.stdout is not None
        port = json.loads(fwd.stdout.readline())["port"]
        gen_ticks0 = lf.proc_ticks(gen.pid)
        gen.stdin.write(json.dumps({"port": port}) + "\n")
        gen.stdin.flush()
        try:
            out, _ = fwd.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": f"timeout after {args.timeout}s"}
        gen_ticks = lf.proc_ticks(gen.pid) - gen_ticks0
        if fwd.returncode != 0 or not out.strip():
            return {"variant": variant, "error": f"forwarder exit code {fwd.returncode}"}
        res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        res["variant"] = variant
        res["gen_us_per_pkt"] = gen_ticks * 1e6 / lf.CLK_TCK / (warmup + args.packets)
        return res
    finally:
        for proc in (fwd, gen):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def print_table(report: dict[str, Any]) -> None:
    m, c = report["machine"], report["config"]
    print(
        f"machine: {m['cpu_model']} | cpus={m['cpu_count']} | {m['implementation']} "
        f"{m['python']} | kernel {m['kernel']} | loadavg {m['loadavg_at_start']} | "
        f"uvloop={m['uvloop']}"
    )
    print(
        f"config: loop={c['loop']}, {c['packets']} packets/run (+{c['warmup']} warm-up), "
        f"{c['rounds']} rounds, {c['packet_size']}-byte packets, window {c['window']}, "
        f"pinned={c['pin']}"
    )
    base = report["results"].get(BASELINE, {}).get("summary", {}).get("cpu_us_per_pkt")
    hdr = (
        f"{'variant':<15} {'cpu us/pkt':>10} {'min':>6} {'usr':>6} {'sys':>6} {'/proc':>6} "
        f"{'pkt/s':>9} {'fwd cpu%':>8} {'pkt/s/core':>10} {'vs ' + BASELINE:>18}  runs (us/pkt)"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, res in report["results"].items():
        s = res["summary"]
        if "error" in s:
            print(f"{name:<15} ERROR: {s['error']}")
            continue
        ratio = f"{s['cpu_us_per_pkt'] / base:.2f}x" if base else "-"
        runs = " ".join(f"{r['cpu_us_per_pkt']:.2f}" for r in res["runs"] if "error" not in r)
        print(
            f"{name:<15} {s['cpu_us_per_pkt']:>10.2f} {s['cpu_us_per_pkt_min']:>6.2f} "
            f"{s['usr_us_per_pkt']:>6.2f} {s['sys_us_per_pkt']:>6.2f} "
            f"{s['proc_us_per_pkt']:>6.2f} {s['pps']:>9.0f} {s['util'] * 100:>7.0f}% "
            f"{1e6 / s['cpu_us_per_pkt']:>10.0f} {ratio:>18}  {runs}"
        )
    for variant in ENGINE_VARIANTS:
        runs = [r for r in report["results"].get(variant, {}).get("runs", []) if "drops" in r]
        if runs:
            extra = f", srtp {runs[-1]['srtp']}" if variant != "engine" else ""
            print(f"{variant} drops (last run): {runs[-1]['drops']}{extra}")
    tone = report.get("tone")
    if tone:
        print(
            f"tone mix (in-process, best of 5): {tone['tone_mix_us_per_pkt']:.2f} us per "
            "160-sample u-law packet while a tone sounds"
        )
    print(
        "cpu us/pkt = median forwarder user+sys (getrusage) per packet; /proc = the same "
        "from utime+stime ticks; pkt/s = closed-loop throughput (fwd cpu% near 100 means the "
        "forwarder is the bottleneck, else the generator is); pkt/s/core = 1e6 / cpu us/pkt, "
        "what one core running only the forwarder would relay."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--packets", type=int, help="measured packets per run (default 200000)")
    p.add_argument("--rounds", type=int, help="runs per variant, interleaved (default 3)")
    p.add_argument("--quick", action="store_true", help="30000 packets x 2 rounds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--window", type=int, default=64, help="packets in flight (closed loop)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop())
    p.add_argument("--pin", action="store_true", help="pin generator to CPU 0, forwarder to 1")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run timeout (s)")
    # internal (child process) options
    p.add_argument(
        "--role", choices=("main", "gen", *ENGINE_VARIANTS, "minimal-sendto"), default="main"
    )
    p.add_argument("--srtp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dest", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.role == "gen":
        run_generator(args)
        return
    if args.role in ENGINE_VARIANTS:
        run_engine(args)
        return
    if args.role == "minimal-sendto":
        run_sendto(args)
        return

    preset = QUICK if args.quick else FULL
    args.packets = args.packets or preset["packets"]
    args.rounds = args.rounds or preset["rounds"]
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        p.error("uvloop is not installed")
    warmup = min(20_000, max(1_000, args.packets // 10))

    machine = lf.machine_info()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds):
        k = rnd % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:  # rotate the order each round
            res = run_variant(v, args, warmup)
            runs[v].append(res)
            if not args.json:
                msg = res.get("error") or f"{res['cpu_us_per_pkt']:.2f} us/pkt"
                print(f"  round {rnd + 1}/{args.rounds} {v:<15} {msg}", file=sys.stderr)

    results = {v: {"runs": runs[v], "summary": lf.summarize(runs[v])} for v in VARIANTS}
    base = results[BASELINE]["summary"].get("cpu_us_per_pkt")
    for res in results.values():
        cpu = res["summary"].get("cpu_us_per_pkt")
        res["summary"]["ratio_vs_baseline"] = cpu / base if cpu and base else None
    report = {
        "machine": machine,
        "config": {
            "loop": args.loop,
            "packets": args.packets,
            "warmup": warmup,
            "rounds": args.rounds,
            "packet_size": len(lf.rtp_packet()),
            "window": args.window,
            "pin": args.pin,
            "baseline": BASELINE,
        },
        "results": results,
        "tone": tone_mix_cost(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
