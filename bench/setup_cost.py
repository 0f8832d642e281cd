#!/usr/bin/env python3
"""SIP-process CPU per call set-up, secured and plain, for one or more source trees.

A closed loop of whole calls through a real ``sipura-proxy run`` (INVITE, ACK, for a
secured call x-sipura stage 2 with the bench's remote SPA and the ``$`` caller-ID
UPDATE to the phone, then BYE), a window of calls in flight, as ``bench/capacity.py``
step 3 does. Reported per tree and kind: calls/s and CPU per call of the SIP process
(utime+stime from ``/proc/PID/stat``) and of the media workers.

To compare two versions of the proxy on one box in the same minutes, give each tree:
one proxy per tree runs from that tree's ``proxy`` package, the bench's user agents
are this checkout's, and the trees' measurements are interleaved round by round
(order alternating), so background load hits both alike::

    git worktree add /tmp/before main
    python bench/setup_cost.py --tree /tmp/before --tree . --rounds 3

``--py-spy DIR`` records the SIP process of the first tree during its first secured
run (``py-spy record``: speedscope JSON and a collapsed-stack file) and prints the
functions that take the most of it. Progress on stderr, the table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]

import benchua as ua  # noqa: E402
from calldriver import CallDriver  # noqa: E402

from proxy.demo.loopback import ProxyProcess  # noqa: E402
from testkit.machine import cpu_ticks, describe  # noqa: E402
from testkit.ports import free_port_range  # noqa: E402
from testkit.processes import child_env  # noqa: E402
from testkit.proxy import LocalProxy  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PHONE_SSRC = 0x50000000


def log(msg: str) -> None:
    print(f"[setup_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class TreeProxy:
    """A proxy running from ``tree``'s code, with its own bench agents."""

    tree: Path
    name: str
    workdir: Path
    pki: ua.BenchPki
    workers: int | None
    calls: int
    driver: CallDriver = field(init=False)
    local: LocalProxy = field(init=False)
    results: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def __post_init__(self) -> None:
        self.driver = CallDriver(self.pki)
        # two RTP/RTCP pairs per call in flight, with room for ports not yet given back
        self.local = LocalProxy(self.name, self.workdir,
                                media=free_port_range(max(400, 8 * self.calls)))  # fmt: skip

    async def start(self) -> None:
        line = {
            "user_id": ua.LINE_USER,
            "mini_certificate": f"@{self.pki.line_mc}",
            "srtp_private_key": f"@{self.pki.line_key}",
            "secure_by_default": True,
            "allowed_sources": [ua.HOST],  # the bench's phones call from any port
        }
        self.local.write_config(
            upstream=self.driver.spa_port, log_level="warning", lines=[line],
            inside={"unknown_users": "relay"}, media={"workers": self.workers},
            sip={"transports": ["udp"]},
            xsipura={"trusted_ca": [str(self.pki.ca_pub)], "tone": False},
        )  # fmt: skip
        # Started by hand rather than LocalProxy.start: the code is this tree's.
        self.local.process = ProxyProcess.start(
            self.local.config_path, self.local.log_path, self.local.admin, cwd=self.tree,
            env=child_env(PYTHONPATH=str(self.tree)),
        )  # fmt: skip
        want = self.workers
        self.local.wait_up(20, ready=lambda s: want == 0 or s["media"].get("workers"))
        await self.driver.start(self.local.inside)

    def worker_pids(self) -> list[int]:
        workers = self.local.status()["media"].get("workers") or []
        return [int(w["pid"]) for w in workers if w.get("alive") and w.get("pid")]

    def stop(self) -> None:
        self.driver.close()
        self.local.stop()


async def run_calls(
    proxy: TreeProxy, secure: bool, total: int, window: int, rate: float = 0.0
) -> dict[str, float]:
    """``total`` calls, at most ``window`` at a time; with ``rate``, started at that
    many per second (open loop: the CPU per call does not depend on how fast the box
    lets the calls go), else each as soon as the window has room (closed loop)."""
    sem = asyncio.Semaphore(window)
    failures: list[str] = []
    done = 0
    driver = proxy.driver

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            pair = await driver.place(secure, PHONE_SSRC + i)
            if isinstance(pair, str):
                failures.append(pair)
                return
            if await driver.hang_up(pair):
                done += 1
            else:
                failures.append("BYE not answered")

    async def paced() -> None:
        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for i in range(total):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)

    sip_pid, workers = proxy.local.pid, proxy.worker_pids()
    sip0, work0 = cpu_ticks(sip_pid), sum(cpu_ticks(p) for p in workers)
    bench0, t0 = time.process_time(), time.perf_counter()
    if rate > 0:
        await paced()
    else:
        await asyncio.gather(*(one(i) for i in range(total)))
    wall = time.perf_counter() - t0
    sip_s = (cpu_ticks(sip_pid) - sip0) / CLK_TCK
    work_s = (sum(cpu_ticks(p) for p in workers) - work0) / CLK_TCK
    per = max(1, done)
    if failures:
        log(f"{proxy.name}: {len(failures)} failed: {sorted(set(failures))[:3]}")
    return {
        "completed": done,
        "failed": len(failures),
        "calls_per_s": done / wall,
        "sip_ms_per_call": sip_s * 1e3 / per,
        "workers_ms_per_call": work_s * 1e3 / per,
        "sip_cores": sip_s / wall,
        "bench_cores": (time.process_time() - bench0) / wall,
    }


def py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        log("py-spy not found (pip install py-spy): no profile")
        return None
    out.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--rate", "500", "--nonblocking",
            "--duration", str(int(seconds) + 1), "--format", "raw",
            "--output", str(out / "sip-process.collapsed")]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_collapsed(path: Path, top: int = 25) -> str:
    """Self and inclusive share per function of a py-spy collapsed-stack file."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  for f in stack.split(";")]  # fmt: skip
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "(no samples)"
    rows = [f"{'incl %':>7} {'self %':>7}  function"]
    for name, n in inclusive.most_common(top):
        rows.append(f"{100 * n / total:>7.1f} {100 * own[name] / total:>7.1f}  {name}")
    rows.append(f"  self time, top {top}:")
    for name, n in own.most_common(top):
        rows.append(f"{100 * inclusive[name] / total:>7.1f} {100 * n / total:>7.1f}  {name}")
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    trees = [Path(t).resolve() for t in (args.tree or [str(REPO_ROOT)])]
    for tree in trees:
        if not (tree / "proxy" / "__init__.py").exists():
            print(f"setup_cost: {tree} is not a sipura-proxy checkout", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="sipura-setup-cost-"))
    pki = ua.BenchPki(workdir)
    proxies = [
        TreeProxy(tree, f"t{i}", workdir, pki, args.workers, args.window)
        for i, tree in enumerate(trees)
    ]
    kinds = [k for k in args.kinds.split(",") if k]
    try:
        for proxy in proxies:
            await proxy.start()
            await run_calls(proxy, True, min(50, args.calls), args.window)  # warm-up
            await run_calls(proxy, False, min(50, args.calls), args.window)
        for rnd in range(args.rounds):
            order = proxies if rnd % 2 == 0 else proxies[::-1]
            for proxy in order:
                for kind in kinds:
                    spy = None
                    if args.py_spy and rnd == 0 and proxy is proxies[0] and kind == "secured":
                        spy = py_spy(proxy.local.pid, Path(args.py_spy), args.calls / 150)
                        await asyncio.sleep(0.5)
                    result = await run_calls(proxy, kind == "secured", args.calls, args.window,
                                             args.rate)  # fmt: skip
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(10)
                    proxy.results[kind].append(result)
                    log(f"round {rnd + 1} {proxy.tree} {kind}: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))  # fmt: skip
                    await asyncio.sleep(0.5)
    finally:
        for proxy in proxies:
            proxy.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    pacing = f"{args.rate:g} calls/s offered" if args.rate > 0 else "closed loop"
    print(f"# {describe()}; {args.calls} calls per run, {pacing}, window {args.window}, "
          f"{args.rounds} rounds interleaved, medians (min-max)")  # fmt: skip
    print(f"{'tree':<28} {'kind':<8} {'calls/s':>15} {'SIP ms/call':>18} "
          f"{'workers ms/call':>16} {'failed':>6}")  # fmt: skip
    failed = 0
    for proxy in proxies:
        for kind in kinds:
            rows = proxy.results[kind]
            failed += sum(int(r["failed"]) for r in rows)

            def cell(key: str, fmt: str, rows: list[dict[str, float]] = rows) -> str:
                values = [r[key] for r in rows]
                return (f"{statistics.median(values):{fmt}} "
                        f"({min(values):{fmt}}-{max(values):{fmt}})")  # fmt: skip

            print(f"{str(proxy.tree)[-28:]:<28} {kind:<8} {cell('calls_per_s', '.0f'):>15} "
                  f"{cell('sip_ms_per_call', '.2f'):>18} "
                  f"{statistics.median(r['workers_ms_per_call'] for r in rows):>16.2f} "
                  f"{sum(int(r['failed']) for r in rows):>6}")  # fmt: skip
    collapsed = Path(args.py_spy or "/nonexistent") / "sip-process.collapsed"
    if args.py_spy and collapsed.exists():
        print(f"\n# py-spy, SIP process of {trees[0]}, secured calls ({collapsed})")
        print(summarize_collapsed(collapsed))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="a checkout to run the proxy from "
                        "(repeat to compare; default: this one)")  # fmt: skip
    parser.add_argument("--calls", type=int, default=1500, help="calls per run")
    parser.add_argument("--window", type=int, default=300, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=150.0,
                        help="calls started per second (0: closed loop, as fast as the "
                        "window allows)")  # fmt: skip
    parser.add_argument("--kinds", default="secured,plain")
    parser.add_argument("--workers", type=int, default=None, help="[media] workers")
    parser.add_argument("--py-spy", metavar="DIR", help="profile the first tree's SIP process")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    if args.calls < 1 or args.window < 1 or args.rounds < 1:
        print("setup_cost: --calls, --window and --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
