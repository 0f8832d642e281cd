"""What ``GET /metrics`` and ``GET /status`` cost a running proxy with N calls up.

A real ``sipura-proxy run`` (default media workers) on free loopback ports, a SIPp uas
as its upstream and a SIPp uac that sets up N calls and holds them (no RTP: the cost
of a scrape is reading the calls, not relaying). With the calls up, the admin endpoint
is scraped M times in a row; printed per endpoint: wall time per scrape (client side),
the SIP process's CPU per scrape (from ``/proc/PID/stat``, idle CPU subtracted), and
the body size. Then SIGTERM with a short ``drain_s``: how long until the process exits
with N calls hung up (BYE with the shutdown Reason to every leg, answered by SIPp).

    python bench/scrape_cost.py [--calls 500] [--scrapes 50] [--drain-s 2]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # this checkout's proxy and testkit (tests' and benches')

from testkit.machine import describe  # noqa: E402
from testkit.ports import free_port, media_range  # noqa: E402
from testkit.processes import processes, wait_for  # noqa: E402
from testkit.proxy import LocalProxy  # noqa: E402

SCENARIOS = REPO_ROOT / "tests" / "interop" / "scenarios"
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status)
        return body
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--drain-s", type=int, default=2)
    args = parser.parse_args()
    sipp = shutil.which("sipp")
    if sipp is None:
        print("sipp is not installed", file=sys.stderr)
        return 2
    print(f"machine: {describe()}")
    work = Path(tempfile.mkdtemp(prefix="scrape-cost-"))
    uas_port = free_port()
    proxy = LocalProxy("proxy", work, media=media_range(2 * args.calls + 64))
    proxy.write_config(
        upstream=uas_port, log_level="warning", limits={"max_calls": args.calls + 10},
        run={"drain_s": args.drain_s},
    )  # fmt: skip
    common = ["-i", HOST, "-nostdin", "-buff_size", "4194304", "-timeout", "300s"]
    with processes() as procs:
        proxy.run(procs)
        uas = procs.start(
            [sipp, "-sf", str(SCENARIOS / "uas_hung_up.xml"), "-p", str(uas_port),
             "-m", str(args.calls), *common],
            work / "uas.log", cwd=work,
        )  # fmt: skip
        uac = procs.start(
            [sipp, f"{HOST}:{proxy.inside}", "-sf", str(SCENARIOS / "uac_hung_up.xml"),
             "-p", str(free_port()), "-m", str(args.calls), "-l", str(args.calls),
             "-r", "200", *common],
            work / "uac.log", cwd=work,
        )  # fmt: skip
        wait_for(lambda: len(proxy.calls()) >= args.calls, 60, f"{args.calls} calls up")
        time.sleep(1.0)
        pid = proxy.pid
        idle0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(2.0)
        idle_rate = (cpu_s(pid) - idle0) / (time.monotonic() - t0)
        print(f"{args.calls} calls up; SIP process idle CPU {idle_rate * 100:.1f} %")
        for path in ("/metrics", "/status"):
            get(proxy.admin, path)  # warm
            c0, w0 = cpu_s(pid), time.perf_counter()
            size = 0
            for _ in range(args.scrapes):
                size = len(get(proxy.admin, path))
            wall = (time.perf_counter() - w0) / args.scrapes
            cpu = (cpu_s(pid) - c0 - idle_rate * wall * args.scrapes) / args.scrapes
            print(f"GET {path}: {wall * 1000:.1f} ms per scrape (wall), {cpu * 1000:.1f} ms "
                  f"SIP-process CPU, {size / 1024:.0f} KiB")  # fmt: skip
        assert proxy.process is not None
        sent = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        code = proxy.process.wait(timeout=args.drain_s + 60)
        took = time.monotonic() - sent
        print(f"SIGTERM with {args.calls} calls up, drain_s = {args.drain_s}: exit {code} after "
              f"{took:.2f} s ({took - args.drain_s:.2f} s after the drain ran out: BYEs to "
              f"{2 * args.calls} legs and their answers)")  # fmt: skip
        for name, process in (("uac", uac), ("uas", uas)):
            rc = process.wait(timeout=30)
            print(f"SIPp {name} (checks the Reason of every BYE): exit {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
