#!/usr/bin/env python3
"""Soak: thousands of whole calls with media through one real proxy, then its resources.

Each call is placed by a bench phone on the proxy's inside, answered by the bench's
remote SPA on the outside (``benchua``), secured with x-sipura (every other call by
default; the rest plain, from a number without a line), carries RTP both ways (a few
seconds of audio at a compressed rate: SRTP on the outside leg of a secured call,
checked at both ends by ``calldriver``), and is hung up by the phone. ``--concurrency``
calls are in flight at a time.

Reported for the SIP process and each media worker: resident memory (RSS) and open file
descriptors at start, after a warm-up, halfway, right after the last call, and after
``--settle`` seconds idle; from ``/status``: calls left, media sessions and ports left
allocated; every call that failed, by reason. Exit status 1 when a call failed, a call,
session or port was left, a process's RSS grew by more than ``--max-growth-mb`` from
halfway to the settled end (a leak: see :func:`judge`) or exceeded ``--max-rss-mb``, its
descriptors grew by more than ``--max-fd-growth`` (warm-up to settled), a worker was
replaced, or the proxy logged an internal error; 2 for a bad argument or a proxy that
does not start.

    python bench/soak.py                      # 5,000 calls, a minute to settle (~5 min)
    python bench/soak.py --quick              # CI smoke run (~20 s): tests/bench runs it
    python bench/soak.py --calls 20000 --concurrency 40 --json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]  # this checkout's proxy and testkit

import benchua as ua  # noqa: E402
from calldriver import CallDriver, MediaResult, Pair  # noqa: E402

from testkit.machine import describe  # noqa: E402
from testkit.ports import free_port_range  # noqa: E402
from testkit.proxy import LocalProxy  # noqa: E402

PHONE_SSRC = 0x50000000
MIN_DELIVERED = 0.8
"""A call whose media delivered less than this share of its packets either way failed."""
INTERNAL_ERRORS = ("Traceback", "internal error")
"""Proxy log text that means a bug was hit (the proxy logs and goes on)."""

PROFILES: dict[str, dict[str, Any]] = {
    "full": {"calls": 5000, "concurrency": 20, "packets": 50, "settle": 60.0},
    "quick": {"calls": 120, "concurrency": 20, "packets": 10, "settle": 3.0},
}


class SoakError(RuntimeError):
    """A bad state the soak reports in one line (the proxy did not start)."""


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Usage:
    """One process at one moment."""

    pid: int
    rss_kib: int
    fds: int


def usage(pid: int) -> Usage | None:
    """RSS (``VmRSS``) and open descriptors of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmRSS:")), 0)  # fmt: skip
    return Usage(pid, rss, fds)


@dataclass
class Snapshot:
    """The proxy's processes and what ``/status`` says is left, at one moment."""

    label: str
    processes: dict[str, Usage | None]
    """``sip`` and ``worker N`` (by slot index)."""
    calls: int
    sessions: int
    ports_free: int
    worker_pids: dict[str, int]


def snapshot(proxy: LocalProxy, label: str) -> Snapshot:
    status = proxy.status()
    workers = [w for w in status["media"].get("workers") or [] if isinstance(w, dict)]
    pids = {f"worker {w['index']}": int(w["pid"]) for w in workers if w.get("pid")}
    processes = {"sip": usage(proxy.pid)}
    processes.update({name: usage(pid) for name, pid in pids.items()})
    return Snapshot(
        label=label,
        processes=processes,
        calls=len(status["calls"]),
        sessions=int(status["media"]["sessions"]),
        ports_free=sum(int(w.get("ports_free", 0)) for w in workers),
        worker_pids=pids,
    )


@dataclass
class Outcome:
    """What the calls did."""

    placed: int = 0
    completed: int = 0
    secured: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    packets_sent: int = 0
    to_phone: int = 0
    to_peer: int = 0
    bad_at_peer: int = 0

    def media(self, result: MediaResult) -> str | None:
        """Add one call's media; why it failed, if it did."""
        self.packets_sent += result.sent
        self.to_phone += result.to_phone
        self.to_peer += result.to_peer
        self.bad_at_peer += result.bad_at_peer
        least = MIN_DELIVERED * result.sent
        if result.bad_at_peer:
            return "media: packets at the far end that did not check"
        if result.to_phone < least or result.to_peer < least:
            return "media: packets lost"
        return None


async def run_calls(driver: CallDriver, args: argparse.Namespace, total: int,
                    outcome: Outcome) -> None:  # fmt: skip
    """``total`` calls, ``args.concurrency`` at a time, each secured or plain in turn."""
    sem = asyncio.Semaphore(args.concurrency)
    every = max(1, round(1 / args.secure_share)) if args.secure_share > 0 else 0

    async def one(i: int) -> None:
        secure = every > 0 and i % every == 0
        async with sem:
            outcome.placed += 1
            placed = await driver.place(secure, PHONE_SSRC + (outcome.placed & 0xFFFFFF))
            if isinstance(placed, str):
                outcome.failures[("secured " if secure else "plain ") + placed] += 1
                return
            pair: Pair = placed
            result = await driver.exchange(pair, args.packets, args.interval)
            media_failure = outcome.media(result)
            answered = await driver.hang_up(pair)
            if media_failure is not None:
                outcome.failures[media_failure] += 1
            elif not answered:
                outcome.failures["BYE not answered"] += 1
            else:
                outcome.completed += 1
                outcome.secured += secure

    await asyncio.gather(*(one(i) for i in range(total)))


def start_proxy(workdir: Path, pki: ua.BenchPki, driver: CallDriver,
                args: argparse.Namespace) -> LocalProxy:  # fmt: skip
    # two RTP/RTCP pairs per call in flight, and room for ports not yet given back
    proxy = LocalProxy("soak", workdir, media=free_port_range(max(400, 16 * args.concurrency)))
    line = {
        "user_id": ua.LINE_USER,
        "mini_certificate": f"@{pki.line_mc}",
        "srtp_private_key": f"@{pki.line_key}",
        "secure_by_default": True,
        "allowed_sources": [ua.HOST],  # the bench's phones call from any port
    }
    proxy.write_config(
        upstream=driver.spa_port, log_level="warning", lines=[line],
        inside={"unknown_users": "relay"}, media={"workers": args.workers},
        sip={"transports": ["udp"]},
        # no tone: the phone's audio is compared byte for byte
        xsipura={"trusted_ca": [str(pki.ca_pub)], "tone": False},
    )  # fmt: skip
    proxy.start()
    try:
        proxy.wait_up(20, ready=lambda s: args.workers == 0 or s["media"].get("workers"))
    except AssertionError as exc:
        proxy.stop()
        raise SoakError(f"soak: the proxy did not start: {str(exc)[-800:]}") from None
    return proxy


def judge(args: argparse.Namespace, warm: Snapshot, half: Snapshot, settled: Snapshot,
          outcome: Outcome, log_text: str) -> list[str]:  # fmt: skip
    """Why the run fails (empty: it passed).

    Memory: what a process holds at the peak of a load (transactions kept for their 32 s,
    the allocator's arenas) stays resident after it (CPython seldom gives memory back),
    so growth is judged from the halfway point, when that peak is reached, to the end:
    a leak keeps growing, a peak does not. The peak itself is held to ``--max-rss-mb``."""
    problems: list[str] = []
    failed = sum(outcome.failures.values())
    if failed > args.max_failed:
        problems.append(f"{failed} calls failed")
    if settled.calls:
        problems.append(f"{settled.calls} calls left")
    if settled.sessions:
        problems.append(f"{settled.sessions} media sessions left")
    if settled.ports_free != warm.ports_free:
        problems.append(f"{warm.ports_free - settled.ports_free} port pairs left allocated")
    if settled.worker_pids != warm.worker_pids:
        problems.append(f"media workers replaced: {warm.worker_pids} -> {settled.worker_pids}")
    for name, before in warm.processes.items():
        middle, after = half.processes.get(name), settled.processes.get(name)
        if before is None or middle is None or after is None:
            problems.append(f"{name}: process gone")
            continue
        growth_mb = (after.rss_kib - middle.rss_kib) / 1024
        if growth_mb > args.max_growth_mb:
            problems.append(f"{name}: RSS grew {growth_mb:.1f} MB in the second half "
                            f"(> {args.max_growth_mb:g})")  # fmt: skip
        peak_mb = max(middle.rss_kib, after.rss_kib) / 1024
        if peak_mb > args.max_rss_mb:
            problems.append(f"{name}: RSS {peak_mb:.0f} MB (> {args.max_rss_mb:g})")
        if after.fds - before.fds > args.max_fd_growth:
            problems.append(f"{name}: {after.fds - before.fds} more open descriptors")
    errors = sum(log_text.count(marker) for marker in INTERNAL_ERRORS)
    if errors:
        problems.append(f"{errors} internal errors in the proxy log")
    return problems


def print_report(report: dict[str, Any]) -> None:
    args = report["args"]
    out = report["outcome"]
    print(f"# {report['machine']}")
    print(f"# {args['calls']} calls ({out['secured']} secured), {args['concurrency']} at a "
          f"time, {args['packets']} RTP packets each way per call every "
          f"{args['interval'] * 1000:g} ms; {report['calls_s']:.0f} s of calls, "
          f"{report['calls_per_s']:.1f} calls/s; settled {args['settle']:g} s")  # fmt: skip
    snaps = report["snapshots"]
    names = list(snaps[0]["processes"])
    print(f"{'process':<10}" + "".join(f"{s['label'] + ' RSS MB':>22}{'fds':>6}" for s in snaps))
    for name in names:
        row = f"{name:<10}"
        for snap in snaps:
            use = snap["processes"].get(name)
            row += (f"{use['rss_kib'] / 1024:>22.1f}{use['fds']:>6}" if use
                    else f"{'gone':>22}{'-':>6}")  # fmt: skip
        print(row)
    last, warm = snaps[-1], snaps[1]
    print(f"left after settling: {last['calls']} calls, {last['sessions']} media sessions, "
          f"{warm['ports_free'] - last['ports_free']} port pairs")  # fmt: skip
    kept = {name: (use["rss_kib"] - warm["processes"][name]["rss_kib"]) / 1024
            for name, use in last["processes"].items()
            if use and warm["processes"].get(name)}  # fmt: skip
    print(
        "RSS kept after settling, against warm: "
        + ", ".join(f"{name} {mb:+.1f} MB" for name, mb in kept.items())
    )
    media = out["packets_sent"]
    if media:
        print(f"media: {media} packets sent each way; delivered to the phones "
              f"{100 * out['to_phone'] / media:.2f} %, to the far end "
              f"{100 * out['to_peer'] / media:.2f} % ({out['bad_at_peer']} that did not "
              "check)")  # fmt: skip
    failures = out["failures"]
    print(f"failed calls: {sum(failures.values())}"
          + "".join(f"\n  {n} x {why}" for why, n in sorted(failures.items())))  # fmt: skip
    verdict = "PASS" if not report["problems"] else "FAIL: " + "; ".join(report["problems"])
    print(verdict)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sipura-soak-"))
    pki = ua.BenchPki(workdir)
    driver = CallDriver(pki)
    proxy = start_proxy(workdir, pki, driver, args)
    snaps: list[Snapshot] = []
    outcome = Outcome()
    try:
        await driver.start(proxy.inside)
        snaps.append(snapshot(proxy, "start"))
        warm_up = Outcome()
        await run_calls(driver, args, args.warm_up, warm_up)
        if warm_up.failures:
            log(f"warm-up failures: {dict(warm_up.failures)}")
        await asyncio.sleep(1.0)  # the warm-up's sessions closed, ports given back
        snaps.append(snapshot(proxy, "warm"))
        log(f"warm: {snaps[-1]}; {args.calls} calls now")
        t0 = time.monotonic()
        half = args.calls // 2
        await run_calls(driver, args, half, outcome)
        snaps.append(snapshot(proxy, "half"))
        await run_calls(driver, args, args.calls - half, outcome)
        calls_s = time.monotonic() - t0
        snaps.append(snapshot(proxy, "after"))
        log(f"after {calls_s:.0f} s: {snaps[-1]}; settling {args.settle:g} s")
        await asyncio.sleep(args.settle)
        snaps.append(snapshot(proxy, "settled"))
    finally:
        driver.close()
        proxy.stop()
        log_text = proxy.log_text()
        if args.keep:
            log(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    problems = judge(args, snaps[1], snaps[2], snaps[-1], outcome, log_text)
    return {
        "machine": describe(),
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "keep")},
        "calls_s": round(calls_s, 1),
        "calls_per_s": round(args.calls / calls_s, 1) if calls_s else 0.0,
        "outcome": {**asdict(outcome), "failures": dict(outcome.failures)},
        "snapshots": [asdict(s) for s in snaps],
        "problems": problems,
        "pass": not problems,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (~20 s)")
    parser.add_argument("--calls", type=int, help="calls (default 5000; --quick 120)")
    parser.add_argument("--concurrency", type=int, help="calls in flight (default 20)")
    parser.add_argument("--packets", type=int, help="RTP packets each way per call (50)")
    parser.add_argument("--interval", type=float, default=0.005,
                        help="seconds between a call's packets (real audio: 0.02)")  # fmt: skip
    parser.add_argument("--secure-share", type=float, default=0.5,
                        help="share of calls secured with x-sipura (0..1)")  # fmt: skip
    parser.add_argument("--settle", type=float, help="idle seconds before the last look (60)")
    parser.add_argument("--warm-up", type=int, default=None,
                        help="calls before the first look (default: concurrency)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="[media] workers")
    parser.add_argument("--max-growth-mb", type=float, default=30.0,
                        help="RSS growth per process allowed from the halfway point to the "
                        "settled end (a leak)")  # fmt: skip
    parser.add_argument("--max-rss-mb", type=float, default=200.0,
                        help="RSS allowed per process at any point")  # fmt: skip
    parser.add_argument("--max-fd-growth", type=int, default=4)
    parser.add_argument("--max-failed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (proxy log)")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warm_up is None:
        args.warm_up = args.concurrency
    if (args.calls < 1 or args.concurrency < 1 or args.packets < 1 or args.settle < 0
            or args.warm_up < 0 or not 0 <= args.secure_share <= 1 or args.interval < 0
            or (args.workers is not None and args.workers < 0)):  # fmt: skip
        parser.error("counts must be >= 1, --settle/--interval >= 0, --secure-share 0..1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        report = runner(soak(args))
    except SoakError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
