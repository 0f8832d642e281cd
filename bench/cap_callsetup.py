"""3. Call set-up: secured and plain calls per second through one proxy (closed loop, a
window of calls in flight; see bench/README.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cap_common import CLK_TCK, PHONE_SSRC, drain, log, proc_ticks, wait_quiet
from cap_proxy import Harness, ProxyProc


async def call_rate(
    prof: dict[str, Any], harness: Harness, proxy: ProxyProc, secure: bool
) -> dict[str, Any]:
    total, window = prof["cps_calls"], prof["cps_window"]
    sem = asyncio.Semaphore(window)
    failures: list[str] = []
    done = 0
    pids = proxy.all_pids()

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            result = await harness.place(secure, PHONE_SSRC + i, 1000 + i)
            if isinstance(result, str):
                failures.append(result)
                return
            if await harness.hang_up(result):
                done += 1
            else:
                failures.append("BYE not answered")

    wait_quiet(0.2, prof["quiet_wait"])
    ticks0 = sum(proc_ticks(p) for p in pids)
    main0 = proc_ticks(pids[0])
    me0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    wall = time.perf_counter() - t0
    proxy_s = (sum(proc_ticks(p) for p in pids) - ticks0) / CLK_TCK
    main_s = (proc_ticks(pids[0]) - main0) / CLK_TCK
    bench_s = time.process_time() - me0
    drain(harness.phone_media)
    drain(harness.peer_media)
    out = {
        "calls": total,
        "completed": done,
        "failed": len(failures),
        "failures": sorted(set(failures))[:5],
        "window": window,
        "wall_s": round(wall, 2),
        "calls_per_s": round(done / wall, 1),
        "proxy_cores": round(proxy_s / wall, 2),
        "proxy_sip_process_cores": round(main_s / wall, 2),
        "proxy_ms_per_call": round(proxy_s * 1e3 / max(1, done), 3),
        "bench_ua_cores": round(bench_s / wall, 2),
    }
    out["limit"] = (
        "bench UA (its process is CPU-bound)"
        if out["bench_ua_cores"] > 0.9
        else "proxy SIP process (one event loop, CPU-bound)"
        if out["proxy_sip_process_cores"] > 0.85
        else "proxy"
        if out["proxy_cores"] > 0.9
        else "latency-bound (window)"
    )
    log(f"call set-up {'secured' if secure else 'plain'}: {out}")
    return out
