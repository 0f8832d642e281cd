"""Interop fixtures: the proxy as a real process, SIPp peers, free loopback ports.

Everything runs on 127.0.0.1. Every subprocess is bounded (``timeout=``) and killed at
teardown; the proxy's log (and SIPp's traces) are printed when a test fails. The tests
skip only when ``sipp`` is not installed (CI installs it, see ``.ci/run``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
HOST = "127.0.0.1"
SIPP_TIMEOUT_S = 20
"""SIPp's own global timeout; the subprocess gets a few seconds more before a kill."""

# --------------------------------------------------------------------------- free ports

_taken: set[int] = set()
"""Ports handed out in this session: never give the same one twice."""


def _bindable(port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that is free for both UDP and TCP."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = int(tcp.getsockname()[1])
        if port not in _taken and _bindable(port, socket.SOCK_DGRAM):
            _taken.add(port)
            return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


def free_port_range(count: int) -> tuple[int, int]:
    """``count`` consecutive UDP ports from an even base, below the ephemeral range."""
    for _ in range(500):
        base = random.randrange(20000, 32000, 2)
        ports = range(base, base + count)
        if _taken.isdisjoint(ports) and all(_bindable(p, socket.SOCK_DGRAM) for p in ports):
            _taken.update(ports)
            return base, base + count - 1
    raise RuntimeError(f"no {count} consecutive free UDP ports on 127.0.0.1")


def wait_bound(
    port: int, transport: str, timeout: float = 5.0, process: subprocess.Popen[bytes] | None = None
) -> bool:
    """Wait until some process holds ``port`` (a bind of ours fails with EADDRINUSE)."""
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- SIP helpers


def options_request(port: int, transport: str = "udp", max_forwards: int = 70) -> bytes:
    branch = "z9hG4bK" + uuid.uuid4().hex
    return (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {HOST}:9;branch={branch};rport\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"From: <sip:probe@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{HOST}:{port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@{HOST}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def udp_exchange(port: int, data: bytes, timeout: float = 2.0) -> list[bytes]:
    """Send one datagram; collect replies until a final response or ``timeout``."""
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.sendto(data, (HOST, port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                break
            replies.append(reply)
            if status_of(reply) >= 200:
                break
    return replies


def status_of(message: bytes) -> int:
    """The status code of a response; 0 for anything else."""
    match = re.match(rb"SIP/2\.0 (\d{3}) ", message)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------- the proxy


@dataclass
class Proxy:
    """A running ``python -m proxy run`` and what it listens on."""

    inside: int
    outside: int
    admin: int
    media: tuple[int, int]
    config: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    token: str | None = None
    """The admin bearer token, when the config sets one."""

    def status(self) -> dict[str, Any]:
        return self.status_with(self.token)

    def status_with(self, token: str | None) -> dict[str, Any]:
        """``/status``, with the admin bearer token when the proxy has one."""
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        with socket.create_connection((HOST, self.admin), timeout=2) as conn:
            conn.sendall(f"GET /status HTTP/1.0\r\n{auth}\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        result: dict[str, Any] = json.loads(data.split(b"\r\n\r\n", 1)[1])
        return result

    def options(self, side: str = "inside", timeout: float = 2.0) -> bytes | None:
        """OPTIONS over UDP to one side; the final response, or None."""
        port = self.inside if side == "inside" else self.outside
        for reply in udp_exchange(port, options_request(port), timeout):
            if status_of(reply) >= 200:
                return reply
        return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_idle(self, timeout: float = 5.0) -> None:
        """No active call and every media port free again, within ``timeout``."""
        deadline = time.monotonic() + timeout
        calls: list[Any] = []
        while time.monotonic() < deadline:
            calls = self.status()["calls"]
            if not calls:
                break
            time.sleep(0.05)
        assert calls == [], f"calls still active: {calls}"
        busy: list[int] = []
        while time.monotonic() < deadline:
            media = self.status()["media"]
            # Released pairs may stay open in the engine's pool for the next call; every
            # other port must be free again, and no media session may be left.
            pooled = {p + k for p in media["pooled_rtp_ports"] for k in (0, 1)}
            ports = range(self.media[0], self.media[1] + 1)
            busy = [p for p in ports if p not in pooled and not _bindable(p, socket.SOCK_DGRAM)]
            if not busy and media["sessions"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"media ports still bound after the calls ended: {busy}")


_CONFIG = """\
[inside]
listen = "{host}:{inside}"
media_ip = "{host}"

[outside]
listen = "{host}:{outside}"
media_ip = "{host}"
upstream = "{upstream}"

[media]
port_min = {media_min}
port_max = {media_max}

[log]
level = "debug"

[admin]
listen = "{host}:{admin}"
"""


class ProxyFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proxy] = []

    def __call__(
        self, upstream: str, *, media_pairs: int = 8, extra: str = "", token: str | None = None
    ) -> Proxy:
        """``extra``: TOML appended to the generated config, whose last table is
        ``[admin]`` (so bare keys go there; open a table for anything else)."""
        index = len(self.started)
        media = free_port_range(2 * media_pairs)
        proxy = Proxy(
            inside=free_port(),
            outside=free_port(),
            admin=free_port(),
            media=media,
            config=self.tmp_path / f"proxy{index}.toml",
            log_path=self.tmp_path / f"proxy{index}.log",
            token=token,
        )
        text = _CONFIG.format(
            host=HOST, inside=proxy.inside, outside=proxy.outside, admin=proxy.admin,
            upstream=upstream, media_min=media[0], media_max=media[1],
        )  # fmt: skip
        proxy.config.write_text(text + extra)
        self.started.append(proxy)
        with proxy.log_path.open("wb") as log:
            proxy.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(proxy.config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not proxy.alive():
                raise AssertionError(f"the proxy exited at start-up:\n{proxy.log()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                proxy.status()
                if proxy.options("inside", 0.5) and proxy.options("outside", 0.5):
                    return proxy
            time.sleep(0.05)
        raise AssertionError(f"the proxy did not come up within 15 s:\n{proxy.log()}")

    def stop_all(self) -> None:
        for proxy in self.started:
            process = proxy.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGINT)  # SIGTERM would drain: up to drain_s
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures know at teardown if it failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture
def start_proxy(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Generator[ProxyFactory, None, None]:
    """Start proxies with ``start_proxy(upstream_uri)``; stopped (and logs dumped) at the end."""
    factory = ProxyFactory(tmp_path)
    yield factory
    factory.stop_all()
    if _failed(request):
        for proxy in factory.started:
            print(f"===== proxy log {proxy.log_path} =====\n{proxy.log()}")


@pytest.fixture(scope="module")
def shared_proxy(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Generator[Proxy, None, None]:
    """One proxy for a whole module, its upstream a UDP socket that never answers.

    For tests that throw many single messages at one process (it must survive them
    all); its log is printed at the end if any test of the module failed.
    """
    failed_before = request.session.testsfailed
    factory = ProxyFactory(tmp_path_factory.mktemp("shared-proxy"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((HOST, 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        try:
            yield factory(f"sip:{HOST}:{sink.getsockname()[1]}", media_pairs=64)
        finally:
            factory.stop_all()
            if request.session.testsfailed != failed_before:
                for proxy in factory.started:
                    print(f"===== proxy log {proxy.log_path} =====\n{proxy.log()}")


# --------------------------------------------------------------------------- SIPp


def sipp_binary() -> str:
    path = shutil.which("sipp")
    if path is None:
        pytest.skip("sipp is not installed (Debian/Ubuntu package sip-tester)")
    return path


@dataclass
class SippRun:
    name: str
    process: subprocess.Popen[bytes]
    files: dict[str, Path] = field(default_factory=dict)

    def messages(self) -> list[tuple[str, str]]:
        """(``"sent"``/``"received"``, SIP text) from the ``-trace_msg`` file."""
        return parse_message_log(self.files["messages"])

    def dump(self) -> str:
        parts = [f"----- SIPp {self.name}: exit {self.process.returncode}"]
        for kind, path in self.files.items():
            if path.exists() and path.stat().st_size:
                text = path.read_text(errors="replace")
                parts.append(f"--- {kind} ({path.name}):\n{text[-12000:]}")
        return "\n".join(parts)


def parse_message_log(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(errors="replace") if path.exists() else ""
    found = []
    for chunk in re.split(r"^-{20,} .*$", text, flags=re.M):
        match = re.match(r"\s*(?:UDP|TCP)\s+message\s+(sent|received).*?:\s*\n\n", chunk)
        if match:
            found.append((match.group(1), chunk[match.end() :].strip("\n")))
    return found


class Sipp:
    """Starts SIPp instances over one transport and keeps them bounded."""

    def __init__(self, binary: str, tmp_path: Path) -> None:
        self.binary = binary
        self.tmp_path = tmp_path
        self.runs: list[SippRun] = []

    def _start(
        self, name: str, scenario: str, port: int, transport: str, target: str | None,
        calls: int, extra: list[str],
    ) -> SippRun:  # fmt: skip
        prefix = self.tmp_path / f"{len(self.runs)}-{name}"
        files = {
            "stdout": prefix.with_suffix(".out"),
            "errors": prefix.with_suffix(".errors.log"),
            "messages": prefix.with_suffix(".messages.log"),
            "logs": prefix.with_suffix(".logs.log"),
        }
        command = [
            self.binary, *([target] if target else []),
            "-sf", str(SCENARIOS / scenario),
            "-i", HOST, "-p", str(port), "-t", "t1" if transport == "tcp" else "u1",
            "-m", str(calls), "-nostdin", "-buff_size", "4194304",
            "-timeout", f"{SIPP_TIMEOUT_S}s", "-timeout_error",
            "-trace_msg", "-message_file", str(files["messages"]),
            "-trace_err", "-error_file", str(files["errors"]),
            "-trace_logs", "-log_file", str(files["logs"]),
            *extra,
        ]  # fmt: skip
        with files["stdout"].open("wb") as out:
            process = subprocess.Popen(
                command, cwd=self.tmp_path, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        run = SippRun(name, process, files)
        self.runs.append(run)
        return run

    def uas(
        self, scenario: str, port: int, transport: str, *, calls: int = 1,
        extra: list[str] | None = None,
    ) -> SippRun:  # fmt: skip
        run = self._start("uas", scenario, port, transport, None, calls, extra or [])
        if not wait_bound(port, transport, process=run.process):
            self.wait(run, 1)
            raise AssertionError(f"SIPp uas did not bind {port}/{transport}\n{run.dump()}")
        return run

    def uac(
        self, scenario: str, target_port: int, transport: str, *, calls: int = 1,
        extra: list[str] | None = None,
    ) -> SippRun:  # fmt: skip
        port = free_port()
        return self._start(
            "uac", scenario, port, transport, f"{HOST}:{target_port}", calls, extra or []
        )

    def wait(self, run: SippRun, timeout: float = SIPP_TIMEOUT_S + 5) -> int:
        try:
            return run.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait(timeout=5)
            raise AssertionError(f"SIPp {run.name} did not finish in {timeout} s") from None

    def check(self, *runs: SippRun) -> None:
        """Wait for every run; all must exit 0 (every call passed).

        Once one has failed, the others get a short grace period, not the full timeout.
        """
        codes: list[int] = []
        for run in runs:
            grace = 2.0 if any(codes) else SIPP_TIMEOUT_S + 5
            try:
                codes.append(self.wait(run, grace))
            except AssertionError:
                codes.append(-9)
        if any(codes):
            summary = ", ".join(f"{r.name}={c}" for r, c in zip(runs, codes, strict=True))
            dumps = "\n".join(run.dump() for run in runs)
            raise AssertionError(f"SIPp failed: {summary}\n{dumps}")

    def stop_all(self) -> None:
        for run in self.runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait(timeout=5)


@pytest.fixture
def new_port() -> Callable[[], int]:
    """``new_port()``: a fresh port on 127.0.0.1, free for both UDP and TCP."""
    return free_port


@pytest.fixture
def sipp(tmp_path: Path, request: pytest.FixtureRequest) -> Generator[Sipp, None, None]:
    runner = Sipp(sipp_binary(), tmp_path)
    yield runner
    runner.stop_all()
    if _failed(request):
        for run in runner.runs:
            print(run.dump())
