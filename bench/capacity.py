#!/usr/bin/env python3
"""Capacity of sipura-proxy: CPU per packet next to rtpengine, simultaneous secured calls
side by side with rtpengine, secured call set-ups per second. The figures the README
quotes (see bench/README.md).

Usage (from the repo root; works from a checkout without installing)::

    python bench/capacity.py                 # full run (several minutes), table
    python bench/capacity.py --quick --json  # ~45 s smoke run, one JSON object
    python bench/capacity.py --full --out bench/results   # + capacity.json / capacity.png

Everything runs on 127.0.0.1 against real ``sipura-proxy run`` processes. The outside
peer is this bench's own remote SPA (``benchua.RemoteSpa``: SIP UA + x-sipura callee);
the inside phones are ``benchua.Phones``; the media comes from C load generators
(``rtpgen.c`` closed loop, ``capgen.c`` paced two-way with per-packet latency), built
with gcc into a cache directory on first use, else a Python fallback (``pygen.py``).

1. CPU per packet (closed loop, same harness, cases interleaved, medians): a minimal
   Python uvloop forwarder, the proxy's plain relay, its RTP->SRTP relay (secured calls
   set up through SIP) and rtpengine userspace doing RTP/AVP -> RTP/SAVP (when
   /usr/bin/rtpengine exists). CPU from /proc/PID/stat of the relaying processes (the
   proxy's media workers from /status, else the proxy), sampled while nothing is in
   flight; relaying process pinned to CPU 1, generator and bench to CPU 0.
2. Capacity: N secured G.711 calls, 50 packets/s each way at real pacing, N increasing
   until loss > 0.1 % or added p99 > 5 ms (added = minus a zero-proxy baseline at the
   same N through loopback). Each step runs twice, side by side: through the proxy, then
   through rtpengine userspace bridging N RTP <-> SDES-SRTP calls (its SRTP checked on
   samples), same generator, window, latency method and CPU reading (``paced``).
3. Call set-up: secured and plain calls/s through one proxy (closed loop, a window of
   calls in flight; a secured call counts once the proxy has sent the phone the ``$``
   caller ID, i.e. stage 2 completed and the leg is SRTP, and the call was hung up).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))  # this checkout's proxy and testkit (tests' and benches')
sys.path.insert(0, str(BENCH_DIR))

import benchua as ua  # noqa: E402
from cap_callsetup import call_rate  # noqa: E402
from cap_common import BenchError  # noqa: E402
from cap_gens import GEN_NICE, generators  # noqa: E402
from cap_paced import capacity  # noqa: E402
from cap_perpacket import per_packet, run_forwarder  # noqa: E402
from cap_proxy import Harness, ProxyProc, config_knows_workers  # noqa: E402
from cap_report import machine, plot, print_table, summarize  # noqa: E402
from cap_rtpengine import Rtpengine, rtpengine_binary  # noqa: E402

from testkit.ports import free_port_range  # noqa: E402

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "pp_runs": 1,
        "pp_warmup": 0.5,
        "pp_duration": 2.0,
        "pp_calls": 8,
        "steps": [100],
        "cap_warmup": 0.5,
        "cap_duration": 2.0,
        "base_duration": 1.0,
        "cps_calls": 60,
        "cps_window": 30,
        "retries": 0,
        "quiet_wait": 2.0,
    },
    "full": {
        "pp_runs": 3,
        "pp_warmup": 1.0,
        "pp_duration": 6.0,
        "pp_calls": 16,
        "steps": [100, 250, 400, 500, 600, 700, 800, 1000, 1250, 1500],
        "cap_warmup": 2.0,
        "cap_duration": 10.0,
        "base_duration": 4.0,
        "cps_calls": 1500,
        "cps_window": 300,
        "retries": 2,
        "quiet_wait": 20.0,
    },
}


def media_range(calls: int) -> tuple[int, int]:
    """Free consecutive ports for ``calls`` calls: two RTP/RTCP pairs each, and spare."""
    try:
        return free_port_range(max(4 * calls + 64, 400))
    except RuntimeError as exc:  # other processes hold ports all over the block range
        raise BenchError(f"media ports for {calls} calls: {exc}") from None


def wants_paced_rtpengine(args: argparse.Namespace) -> bool:
    return not (args.no_rtpengine or args.skip_capacity) and rtpengine_binary() is not None


def paced_rtpengine(
    workdir: Path, cap: ProxyProc, ports: tuple[int, int] | None
) -> Rtpengine | None:
    """The rtpengine of the side-by-side steps: as many worker threads as the capacity
    proxy has media workers (1 when it relays in-process), not pinned (neither is the
    proxy), a free port range of its own (taken with the proxy's, before the small ones
    cut the block range into pieces)."""
    if ports is None:
        return None
    threads = len(cap.worker_info(cap.status())) or 1
    return Rtpengine(workdir, None, name="rtpengine-paced", ports=ports, threads=threads)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    prof = dict(PROFILES["quick" if args.quick else "full"])
    cache = Path(args.cache or Path(tempfile.gettempdir()) / "sipura-bench-cache")
    gens = generators(cache, args.gen == "py", args.gen_nice)
    report: dict[str, Any] = {
        "machine": machine(),
        "profile": "quick" if args.quick else "full",
        "generator": gens.kind,
        "notes": [],
    }
    if "fallback" in gens.kind:
        report["notes"].append(
            "Python load generator (no C compiler, or --gen py): figures are not comparable"
        )
    workdir = Path(tempfile.mkdtemp(prefix="sipura-capacity-"))
    pki = ua.BenchPki(workdir)
    harness = Harness(pki)
    proxies: list[ProxyProc] = []
    rtpe: Rtpengine | None = None
    t_start = time.monotonic()
    try:
        steps = args.steps or prof["steps"]
        # the large port ranges first (the capacity proxy's, the side-by-side rtpengine's)
        cap_ports = media_range(max(steps))
        rtpe_ports = media_range(max(steps)) if wants_paced_rtpengine(args) else None
        # per-packet proxy: one media worker (pinned like rtpengine); capacity proxy: default
        pp = ProxyProc(
            "pp", workdir, pki, harness.spa_port, media_range(prof["pp_calls"] * 2), workers=1
        )
        cap = ProxyProc("cap", workdir, pki, harness.spa_port, cap_ports, workers=args.workers)
        for proxy in (pp, cap):
            proxy.supports_workers = config_knows_workers()
            proxies.append(proxy)
            proxy.start()
        await harness.start(pp)
        report["proxy"] = {
            "per_packet_workers_config": 1,
            "per_packet_workers": pp.worker_info(pp.status()),
            "capacity_workers_config": args.workers if args.workers is not None else "default",
            "capacity_workers": cap.worker_info(cap.status()),
        }
        if not args.skip_per_packet:
            report["per_packet"] = await per_packet(args, prof, gens, harness, pp, workdir)
        pp.stop()
        await harness.use(cap)
        rtpe = paced_rtpengine(workdir, cap, rtpe_ports)
        if rtpe is None and not args.skip_capacity:
            report["notes"].append("no rtpengine (not installed, --no-rtpengine): no side by side")
        if not args.skip_capacity:
            report["capacity"] = await capacity(args, prof, gens, harness, cap, workdir, rtpe)
        if rtpe is not None:
            rtpe.stop()
        if not args.skip_cps:
            report["call_setup"] = {
                "secured": await call_rate(prof, harness, cap, True),
                "plain": await call_rate(prof, harness, cap, False),
            }
    finally:
        harness.close()
        if rtpe is not None:
            rtpe.stop()
        for proxy in proxies:
            proxy.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            report["workdir"] = str(workdir)
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return summarize(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run (< 60 s)")
    ap.add_argument("--full", action="store_true", help="the full run (default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", help="directory for capacity.json and capacity.png")
    ap.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",")],
        help="capacity steps, e.g. 100,500,1000",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="[media] workers of the capacity proxy (default: the proxy's)",
    )
    ap.add_argument("--gen", choices=["auto", "py"], default="auto")
    ap.add_argument(
        "--gen-nice",
        type=int,
        default=GEN_NICE,
        help="nice increment of the paced generator (default %(default)s; root)",
    )
    ap.add_argument("--cache", help="where the C generators are built")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--no-rtpengine", action="store_true")
    ap.add_argument("--skip-per-packet", action="store_true")
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--skip-cps", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--dest", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "forward":
        run_forwarder(args.dest)
        return 0
    factory = None
    if importlib.util.find_spec("uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            report = runner.run(run_all(args))
    except BenchError as exc:
        print(f"capacity: {exc}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "capacity.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        note = plot(report, out / "capacity.png")
        if note:
            report["notes"].append(note)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
