"""Interop fixtures: the proxy as a real process, SIPp peers, free loopback ports.

Everything runs on 127.0.0.1. Every subprocess is bounded (``timeout=``) and killed at
teardown; the proxy's log (and SIPp's traces) are printed when a test fails. The tests
skip only when ``sipp`` is not installed (CI installs it, see ``.ci/run``).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit.ports import HOST, free_port, media_range, port_free, wait_bound
from testkit.processes import Processes
from testkit.proxy import LocalProxy

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SIPP_TIMEOUT_S = 20
"""SIPp's own global timeout; the subprocess gets a few seconds more before a kill."""


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


class Proxy(LocalProxy):
    """A running ``python -m proxy run`` and what it listens on (all transports)."""

    def options(self, side: str = "inside", timeout: float = 2.0) -> bytes | None:
        """OPTIONS over UDP to one side; the final response, or None."""
        port = self.inside if side == "inside" else self.outside
        for reply in udp_exchange(port, options_request(port), timeout):
            if status_of(reply) >= 200:
                return reply
        return None

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
            busy = [p for p in ports if p not in pooled and not port_free(p, tcp=False)]
            if not busy and media["sessions"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"media ports still bound after the calls ended: {busy}")


class ProxyFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proxy] = []

    def __call__(
        self, upstream: str, *, media_pairs: int = 8, token: str | None = None,
        **tables: dict[str, Any],
    ) -> Proxy:  # fmt: skip
        """``tables``: more config keys per table (``admin={"token": "@admin.token"}``,
        ``run={"drain_s": 20}``); ``token``: the admin token the tests send."""
        proxy = Proxy(f"proxy{len(self.started)}", self.tmp_path, media=media_range(media_pairs),
                      token=token)  # fmt: skip
        proxy.write_config(upstream=upstream, **tables)
        self.started.append(proxy)
        proxy.run(ready=lambda _: proxy.options("inside", 0.5) and proxy.options("outside", 0.5))
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop(timeout=5)


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
            print(f"===== proxy log {proxy.log_path} =====\n{proxy.log_text()}")


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
                    print(f"===== proxy log {proxy.log_path} =====\n{proxy.log_text()}")


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
        self.procs = Processes()

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
        process = self.procs.start(command, files["stdout"], cwd=self.tmp_path)
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
        self.procs.stop_all(timeout=2)


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
