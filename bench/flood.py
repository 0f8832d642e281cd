"""Floods against a real ``sipura-proxy run``: memory, descriptors, CPU and call latency.

Each scenario starts a fresh proxy (UDP+TCP, in-process media, ``[log] level =
"warning"``) on free loopback ports with the bench's own tiny UAS as its upstream, lets
it settle, floods it, and prints what the SIP process did: resident memory and open
descriptors before / at the peak / at the end, how long after the flood its memory came
back within 30 MB of the idle figure, and the set-up time of probe calls (INVITE ->
200, one per second through the proxy to the UAS) before, during and after the flood.

Scenarios (``--scenarios``, comma separated; all by default):

* ``big``: ``--rate`` requests/s of ~64 KB (OPTIONS, padded in a body or an unknown
  header, every one new) for ``--seconds``;
* ``uniq``: ``--uniq-count`` requests whose From carries a unique ~30 KB display name
  (every header value cache in the path sees a new key);
* ``idle``: ``--idle-count`` TCP connections from ``--idle-sources`` loopback addresses
  (127.0.1.x), opened and left idle for ``--hold`` s; ``idle_spread``: the same from 40
  addresses (the total cap rather than the per-source one);
* ``register``: ``--register-count`` REGISTERs, each a new phone registration (its own
  Call-ID), relayed to the registrar (the bench's UAS grants 30 s);
* ``slow``: ``--slow-count`` TCP connections that each send 60 KB of an unfinished
  header, then one byte per segment every ``--slow-interval`` s for ``--seconds``: the
  proxy's CPU time per segment received.

Everything is bounded in count and time and runs on 127.0.0.0/8; the proxy runs with
``RLIMIT_NOFILE`` = ``--nofile`` (default 1024 soft and hard, the common default that
the issue's idle-connection flood exhausted). Only processes started here are stopped,
by PID. Usage::

    python bench/flood.py                       # every scenario, ~7 min
    python bench/flood.py --scenarios big --rate 300 --seconds 20 --settle 60
    python bench/flood.py --json                # one JSON object on stdout at the end
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's proxy and testkit (tests' and benches')

from proxy.sip.message import Request, SipParseError, parse_message  # noqa: E402
from proxy.sip.transaction import response_to  # noqa: E402
from testkit.machine import describe  # noqa: E402
from testkit.ports import free_port, media_range  # noqa: E402

HOST = "127.0.0.1"
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the process


@dataclass
class Sample:
    at: float
    rss: int
    fds: int
    cpu: float


def sample(pid: int) -> Sample | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            rss = int(statm.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    return Sample(time.monotonic(), rss, fds, cpu)


class Sampler(threading.Thread):
    """Samples the proxy every ``interval`` s until stopped."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[Sample] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            if (s := sample(self.pid)) is not None:
                self.samples.append(s)
            self.stopped.wait(self.interval)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]


@dataclass
class Proxy:
    work: Path
    nofile: tuple[int, int]
    inside: int = field(default_factory=free_port)
    outside: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self, upstream: int, media: tuple[int, int]) -> None:
        config = self.work / "proxy.toml"
        config.write_text(
            f'[inside]\nlisten = "{HOST}:{self.inside}"\nmedia_ip = "{HOST}"\n'
            f'[outside]\nlisten = "{HOST}:{self.outside}"\nmedia_ip = "{HOST}"\n'
            f'upstream = "sip:{HOST}:{upstream}"\nregistrar = "sip:{HOST}:{upstream}"\n'
            f"[media]\nport_min = {media[0]}\nport_max = {media[1]}\nworkers = 0\n"
            f'[admin]\nlisten = "{HOST}:{self.admin}"\n[log]\nlevel = "warning"\n'
        )
        soft, hard = self.nofile

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        with (self.work / "proxy.log").open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=limit,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"flood: the proxy exited at start-up; see {self.work}")
            with contextlib.suppress(OSError, ValueError):
                self.status()
                return
            time.sleep(0.1)
        raise SystemExit("flood: the proxy did not start within 20 s")

    def status(self) -> dict[str, Any]:
        with socket.create_connection((HOST, self.admin), timeout=5) as conn:
            conn.sendall(b"GET /status HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        result: dict[str, Any] = json.loads(data.split(b"\r\n\r\n", 1)[1])
        return result

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


# --------------------------------------------------------------------------- probe calls


class Uas(threading.Thread):
    """The proxy's upstream: 200 to INVITE (with SDP), BYE, OPTIONS, MESSAGE; ACK ignored."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(SipParseError, ValueError):
                message = parse_message(data)
                if isinstance(message, Request) and message.method != "ACK":
                    reply = response_to(message, 200, "OK", to_tag="uas")
                    if message.method == "INVITE":
                        reply.add("Contact", f"<sip:uas@{HOST}:{self.port}>")
                        reply.add("Content-Type", "application/sdp")
                        reply.body = SDP.format(port=40000).encode()
                    self.sock.sendto(reply.serialize(), addr)

    def stop(self) -> None:
        self.stopped.set()
        self.join(2)
        self.sock.close()


def probe_call(proxy_port: int, timeout: float = 8.0) -> float | None:
    """INVITE -> 200 through the proxy (retransmitted at 0.5/1/2/4 s), then ACK and BYE.
    Returns the set-up time in ms, or None when no 200 came within ``timeout``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        call_id, tag = secrets.token_hex(8), secrets.token_hex(4)
        body = SDP.format(port=port + 2)
        head = (
            "Via: SIP/2.0/UDP {h}:{p};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n"
            "From: <sip:14085550000@{h}>;tag={t}\r\nTo: <sip:15550002000@{h}>{tt}\r\n"
            "Call-ID: {c}\r\nCSeq: {n} {m}\r\nContact: <sip:probe@{h}:{p}>\r\n"
        )
        invite_branch = secrets.token_hex(6)
        invite = (
            f"INVITE sip:15550002000@{HOST}:{proxy_port} SIP/2.0\r\n"
            + head.format(h=HOST, p=port, b=invite_branch, t=tag, tt="", c=call_id, n=1, m="INVITE")
            + f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        start = time.monotonic()
        deadline = start + timeout
        resend = start + 0.5
        interval = 0.5
        sock.sendto(invite, (HOST, proxy_port))
        to_header = None
        while (now := time.monotonic()) < deadline:
            sock.settimeout(max(0.01, min(resend, deadline) - now))
            try:
                data = sock.recv(65535)
            except TimeoutError:
                if time.monotonic() >= resend:
                    sock.sendto(invite, (HOST, proxy_port))
                    interval *= 2
                    resend = time.monotonic() + interval
                continue
            if data.startswith(b"SIP/2.0 200") and b" INVITE\r\n" in data:
                to_header = next(
                    line.split(b":", 1)[1].strip().decode()
                    for line in data.split(b"\r\n")
                    if line.lower().startswith((b"to:", b"t:"))
                )
                break
            if data[:9] == b"SIP/2.0 4" or data[:9] == b"SIP/2.0 5":
                return None
        if to_header is None:
            return None
        elapsed = (time.monotonic() - start) * 1000
        tag_part = ";" + to_header.split(";", 1)[1] if ";" in to_header else ""
        for n, method in ((1, "ACK"), (2, "BYE")):
            request = (
                f"{method} sip:15550002000@{HOST}:{proxy_port} SIP/2.0\r\n"
                + head.format(
                    h=HOST,
                    p=port,
                    b=secrets.token_hex(6),
                    t=tag,
                    tt=tag_part,
                    c=call_id,
                    n=n,
                    m=method,
                )
                + "Content-Length: 0\r\n\r\n"
            ).encode()
            sock.sendto(request, (HOST, proxy_port))
        with contextlib.suppress(TimeoutError):
            sock.settimeout(1.0)
            sock.recv(65535)  # the 200 to the BYE
        return elapsed


class Prober(threading.Thread):
    def __init__(self, proxy_port: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.proxy_port = proxy_port
        self.every = every
        self.results: list[tuple[float, float | None]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            at = time.monotonic()
            self.results.append((at, probe_call(self.proxy_port)))
            self.stopped.wait(max(0.0, self.every - (time.monotonic() - at)))

    def between(self, start: float, end: float) -> dict[str, Any]:
        got = [ms for at, ms in self.results if start <= at <= end]
        ok = sorted(ms for ms in got if ms is not None)
        return {
            "calls": len(got),
            "failed": len(got) - len(ok),
            "p50_ms": round(statistics.median(ok), 2) if ok else None,
            "max_ms": round(ok[-1], 2) if ok else None,
        }


# --------------------------------------------------------------------------- floods


def options(port: int, src_port: int, *, pad: int, where: str, unique: str) -> bytes:
    """An OPTIONS of about ``pad`` bytes more than a minimal one, new on every call."""
    branch = secrets.token_hex(8)
    from_display = ""
    body = b""
    extra = ""
    if where == "body":
        body = b"x" * pad
    elif where == "header":
        extra = f"X-Pad: {unique}{'x' * (pad - len(unique))}\r\n"
    elif where == "from":
        from_display = f'"{unique}{"x" * (pad - len(unique))}" '
    head = (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{src_port};branch=z9hG4bK{branch}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: {from_display}<sip:flood@{HOST}>;tag={branch[:8]}\r\n"
        f"To: <sip:{HOST}:{port}>\r\nCall-ID: {branch}@flood\r\nCSeq: 1 OPTIONS\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def udp_flood(port: int, count: int, rate: float, make: Callable[[int, int], bytes]) -> int:
    """Send ``count`` datagrams at ``rate``/s; replies are drained and ignored."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.setblocking(False)
        src = sock.getsockname()[1]
        start = time.monotonic()
        for index in range(count):
            wait = start + index / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(BlockingIOError):
                while sock.recv(65535):
                    pass
            with contextlib.suppress(BlockingIOError, OSError):
                sock.sendto(make(index, src), (HOST, port))
                sent += 1
    return sent


@contextlib.contextmanager
def idle_connections(port: int, count: int, sources: int) -> Iterator[dict[str, int]]:
    """Open ``count`` TCP connections spread over ``sources`` loopback addresses."""
    conns: list[socket.socket] = []
    result = {"opened": 0, "failed": 0}
    try:
        for index in range(count):
            source = f"127.0.1.{1 + index % sources}"
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((source, 0))
                sock.settimeout(2)
                sock.connect((HOST, port))
                conns.append(sock)
                result["opened"] += 1
            except OSError:
                sock.close()
                result["failed"] += 1
        yield result
    finally:
        alive = 0
        for sock in conns:
            sock.setblocking(False)
            try:
                alive += sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1  # nothing to read and not closed: still open
            except OSError:
                pass
            sock.close()
        result["still_open_at_end"] = alive


def slow_flood(port: int, count: int, seconds: float, interval: float) -> dict[str, int]:
    """60 KB of header without its end, then one byte per segment per connection."""
    conns = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), timeout=2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"OPTIONS sip:x SIP/2.0\r\nX-Slow: " + b"a" * 60000)
        conns.append(sock)
    time.sleep(0.5)
    segments = closed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and conns:
        for sock in list(conns):
            try:
                sock.send(b"a")
                segments += 1
            except OSError:
                closed += 1
                conns.remove(sock)
                sock.close()
        time.sleep(interval)
    for sock in conns:
        sock.close()
    return {"segments": segments, "closed_by_proxy": closed}


# --------------------------------------------------------------------------- scenarios


@dataclass
class Options:
    rate: float
    seconds: float
    settle: float
    uniq_count: int
    idle_count: int
    idle_sources: int
    hold: float
    slow_count: int
    slow_interval: float
    register_count: int
    nofile: tuple[int, int]
    keep: bool


def run_scenario(name: str, opts: Options, work: Path) -> dict[str, Any]:
    directory = work / name
    directory.mkdir()
    uas = Uas()
    uas.start()
    proxy = Proxy(directory, opts.nofile)
    proxy.start(uas.port, media_range(100))
    sampler = Sampler(proxy.pid)
    prober = Prober(proxy.inside)
    result: dict[str, Any] = {"scenario": name}
    try:
        sampler.start()
        prober.start()
        time.sleep(3)
        idle = sample(proxy.pid)
        assert idle is not None
        flood_start = time.monotonic()
        result.update(FLOODS[name](proxy, opts, sampler))
        flood_end = time.monotonic()
        during = sampler.between(flood_start, flood_end) or [idle]
        peak = max(during, key=lambda s: s.rss)
        end = sample(proxy.pid) or peak
        back_after = None
        deadline = flood_end + opts.settle
        while time.monotonic() < deadline:
            now = sample(proxy.pid)
            if now is not None and now.rss <= idle.rss + 30 * MB:
                back_after = round(now.at - flood_end, 1)
                break
            time.sleep(0.5)
        time.sleep(2)
        after = sample(proxy.pid) or end
        prober.stopped.set()
        prober.join(10)
        result.update({
            "rss_mb": {"idle": mb(idle.rss), "peak": mb(peak.rss), "end_of_flood": mb(end.rss),
                       "after": mb(after.rss)},
            "fds": {"idle": idle.fds, "peak": max(s.fds for s in during), "after": after.fds},
            "back_within_30mb_after_s": back_after,
            "probe_before": prober.between(0, flood_start),
            "probe_during": prober.between(flood_start, flood_end),
            "probe_after": prober.between(flood_end, time.monotonic()),
            "proxy_alive": proxy.process is not None and proxy.process.poll() is None,
        })  # fmt: skip
        with contextlib.suppress(OSError, ValueError, KeyError):
            status = proxy.status()
            result["status_sip"] = status.get("sip")
    finally:
        sampler.stopped.set()
        prober.stopped.set()
        proxy.stop()
        uas.stop()
    return result


def mb(value: int) -> float:
    return round(value / MB, 1)


def flood_big(proxy: Proxy, opts: Options, sampler: Sampler) -> dict[str, Any]:
    count = int(opts.rate * opts.seconds)
    places = ("body", "header")

    def make(index: int, src: int) -> bytes:
        where = places[index % 2]
        return options(proxy.inside, src, pad=63000, where=where, unique=secrets.token_hex(16))

    sent = udp_flood(proxy.inside, count, opts.rate, make)
    return {"sent": sent, "bytes_each": len(make(0, 1)), "rate": opts.rate}


def flood_uniq(proxy: Proxy, opts: Options, sampler: Sampler) -> dict[str, Any]:
    def make(index: int, src: int) -> bytes:
        return options(proxy.inside, src, pad=30000, where="from", unique=secrets.token_hex(16))

    sent = udp_flood(proxy.inside, opts.uniq_count, opts.rate, make)
    return {"sent": sent, "bytes_each": len(make(0, 1))}


def flood_idle(proxy: Proxy, opts: Options, sampler: Sampler) -> dict[str, Any]:
    with idle_connections(proxy.inside, opts.idle_count, opts.idle_sources) as result:
        time.sleep(opts.hold)
    return {"connections": result, "sources": opts.idle_sources}


def flood_idle_spread(proxy: Proxy, opts: Options, sampler: Sampler) -> dict[str, Any]:
    """The same idle connections from 40 addresses: the total cap, not the per-source one."""
    with idle_connections(proxy.inside, opts.idle_count, 40) as result:
        time.sleep(opts.hold)
    return {"connections": result, "sources": 40}


def register_request(port: int, src_port: int, index: int) -> bytes:
    call_id = secrets.token_hex(12)
    user = f"1555{index % 10_000_000:07d}"
    return (
        f"REGISTER sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{src_port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@{HOST}>;tag={call_id[:8]}\r\n"
        f"To: <sip:{user}@{HOST}>\r\nCall-ID: {call_id}@flood\r\nCSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@{HOST}:{src_port}>\r\nExpires: 30\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def flood_register(proxy: Proxy, opts: Options, sampler: Sampler) -> dict[str, Any]:
    """``--register-count`` REGISTERs, each a new phone registration (Call-ID), relayed to
    the registrar (the bench's UAS accepts them for 30 s)."""
    sent = udp_flood(proxy.inside, opts.register_count, opts.rate,
                     lambda index, src: register_request(proxy.inside, src, index))  # fmt: skip
    time.sleep(1)
    with contextlib.suppress(OSError, ValueError, KeyError):
        return {"sent": sent, "registrations_upstream": proxy.status()["registrations_upstream"]}
    return {"sent": sent}


def flood_slow(proxy: Proxy, opts: Options, sampler: Sampler) -> dict[str, Any]:
    before = sample(proxy.pid)
    result = slow_flood(proxy.inside, opts.slow_count, opts.seconds, opts.slow_interval)
    after = sample(proxy.pid)
    assert before is not None and after is not None
    cpu = after.cpu - before.cpu
    per = cpu / result["segments"] * 1e6 if result["segments"] else None
    return {**result, "cpu_s": round(cpu, 2), "cpu_us_per_segment": per and round(per, 1)}


FLOODS: dict[str, Callable[[Proxy, Options, Sampler], dict[str, Any]]] = {
    "big": flood_big,
    "uniq": flood_uniq,
    "idle": flood_idle,
    "idle_spread": flood_idle_spread,
    "slow": flood_slow,
    "register": flood_register,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(FLOODS))
    parser.add_argument("--rate", type=float, default=300.0, help="datagrams/s (big, uniq)")
    parser.add_argument("--seconds", type=float, default=20.0, help="flood length (big, slow)")
    parser.add_argument("--settle", type=float, default=60.0, help="max wait for memory after")
    parser.add_argument("--uniq-count", type=int, default=2100)
    parser.add_argument("--idle-count", type=int, default=1100)
    parser.add_argument("--idle-sources", type=int, default=1)
    parser.add_argument("--hold", type=float, default=10.0, help="idle connections held (s)")
    parser.add_argument("--slow-count", type=int, default=20)
    parser.add_argument("--slow-interval", type=float, default=0.005)
    parser.add_argument("--register-count", type=int, default=5000)
    parser.add_argument("--nofile", default="1024:1024", help="the proxy's RLIMIT_NOFILE")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in FLOODS]
    if unknown:
        print(f"flood: unknown scenario {unknown[0]!r} (choose from {', '.join(FLOODS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    soft, _, hard = args.nofile.partition(":")
    nofile = (int(soft), int(hard or soft))
    _, own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (own_hard, own_hard))
    opts = Options(
        args.rate,
        args.seconds,
        args.settle,
        args.uniq_count,
        args.idle_count,
        args.idle_sources,
        args.hold,
        args.slow_count,
        args.slow_interval,
        args.register_count,
        nofile,
        args.keep,
    )
    machine = describe()
    log(f"flood: {machine}; proxy RLIMIT_NOFILE {nofile[0]}:{nofile[1]}")
    results = []
    work = Path(tempfile.mkdtemp(prefix="sipura-flood-"))
    try:
        for name in names:
            log(f"flood: {name} ...")
            result = run_scenario(name, opts, work)
            results.append(result)
            log(json.dumps(result))
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            log(f"flood: work dir kept: {work}")
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=1))
    else:
        print_table(machine, results)
    return 0


def print_table(machine: str, results: list[dict[str, Any]]) -> None:
    print(f"# {machine}")
    print("scenario | RSS idle/peak/after MB | back <30MB (s) | fds idle/peak/after | "
          "probe p50/max ms (failed) before, during, after | detail")  # fmt: skip
    for r in results:
        rss, fds = r["rss_mb"], r["fds"]
        probes = ", ".join(
            f"{p['p50_ms']}/{p['max_ms']} ({p['failed']}/{p['calls']})"
            for p in (r["probe_before"], r["probe_during"], r["probe_after"])
        )
        detail = {k: v for k, v in r.items() if k not in (
            "scenario", "rss_mb", "fds", "back_within_30mb_after_s", "probe_before",
            "probe_during", "probe_after")}  # fmt: skip
        print(f"{r['scenario']} | {rss['idle']}/{rss['peak']}/{rss['after']} | "
              f"{r['back_within_30mb_after_s']} | {fds['idle']}/{fds['peak']}/{fds['after']} | "
              f"{probes} | {json.dumps(detail)}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
