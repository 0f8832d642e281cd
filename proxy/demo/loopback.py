"""Real proxies on 127.0.0.1: free ports, a config file, the process, its admin endpoint.

``sipura-proxy demo`` runs two ``sipura-proxy run`` processes; so do the project's
interop tests and benches. All of them have to find ports nobody holds, write a config,
start the process, wait until its admin endpoint answers, read ``/status`` and
``/calls``, and stop it without leaving a media worker behind. This module is the one
implementation of that. It ships in the wheel because the demo does; the tests' and
benches' support package (``testkit/`` at the repository root, not shipped) builds on
it and adds what only they need (ports never handed out twice in a test session,
process groups with log files, a throwaway PKI).

Ports are bind-tested on loopback only, and the proxy's documented defaults
(:data:`DEFAULT_PORTS`) are never handed out, so a demo or a test run cannot collide
with a proxy someone runs on the same machine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy.admin.client import fetch

LOOPBACK = "127.0.0.1"
DEFAULT_PORTS = frozenset({5060, 5070, 5080, 5090, 5099})
"""The ports the README and ``conf/proxy.example.toml`` use: never handed out here."""
BLOCK_LOW, BLOCK_HIGH = 10000, 32768
"""Where port blocks are looked for (``BLOCK_HIGH`` excluded): below Linux's ephemeral
range (32768-60999), so no outgoing socket of another process takes a port of the block
between check and use, and above the well-known services."""


class ProxyStartError(RuntimeError):
    """The proxy exited at start-up or its admin endpoint did not answer in time."""


# --- ports ----------------------------------------------------------------------------------


def port_free(port: int, *, host: str = LOOPBACK, tcp: bool = True) -> bool:
    """Can ``port`` be bound on ``host`` right now, for UDP (and TCP unless ``tcp=False``)?"""
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp else (socket.SOCK_DGRAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(*, host: str = LOOPBACK, avoid: Collection[int] = ()) -> int:
    """A port the kernel offers for TCP that is free for UDP too, not a default port and
    not in ``avoid`` (ports the caller already handed out)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
        if port not in DEFAULT_PORTS and port not in avoid and port_free(port, host=host):
            return port
    raise RuntimeError(f"no free UDP+TCP port on {host}")


def free_port_block(
    count: int,
    *,
    host: str = LOOPBACK,
    tcp: bool = True,
    avoid: Collection[int] = (),
    low: int = BLOCK_LOW,
    high: int = BLOCK_HIGH,
) -> int:
    """The first of ``count`` consecutive free ports, from an even base (RTP/RTCP pairs
    start on even ports), within ``low``..``high`` - 1; none a default port or in
    ``avoid``."""
    if not 0 < count <= high - low:
        raise ValueError(f"cannot fit {count} ports in {low}..{high}")
    taken = DEFAULT_PORTS.union(avoid)
    for _ in range(500):
        base = random.randrange(low, high - count + 1) & ~1
        block = range(base, base + count)
        if taken.isdisjoint(block) and all(port_free(p, host=host, tcp=tcp) for p in block):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {low}..{high} on {host}")


# --- config ---------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def config_text(
    tables: Mapping[str, Mapping[str, Any]], lines: Sequence[Mapping[str, Any]] = ()
) -> str:
    """A proxy config: ``[table]`` per entry of ``tables``, then one ``[[line]]`` per
    entry of ``lines``. Keys whose value is None are left out (the proxy's default)."""
    sections = [(f"[{name}]", keys) for name, keys in tables.items()]
    sections += [("[[line]]", keys) for keys in lines]
    out: list[str] = []
    for header, keys in sections:
        out.append(header)
        out += [f"{key} = {_toml_value(value)}" for key, value in keys.items() if value is not None]
        out.append("")
    return "\n".join(out)


# --- processes ------------------------------------------------------------------------------


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float = 5.0, sig: int = signal.SIGTERM
) -> int:
    """``sig``, then after ``timeout`` SIGKILL to its process group when it leads one
    (``start_new_session``: it and its children, e.g. media workers), else to it alone.
    Returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait(timeout)
    return proc.returncode


class AdminError(ValueError):
    """The admin endpoint answered, but not 200 with a body (a 401 without the token...)."""


def admin_get(
    port: int, path: str = "/status", *, host: str = LOOPBACK, timeout: float = 5.0,
    token: str | None = None,
) -> Any:  # fmt: skip
    """``GET path`` from a proxy's admin endpoint (with its bearer ``token``, if it has
    one); the decoded JSON body.

    Raises OSError when nothing answers, ValueError (:class:`AdminError`, a JSON error)
    for an answer that is not 200 with JSON (e.g. a proxy still starting)."""
    try:
        status, body = fetch(host, port, "GET", path, token=token, timeout=timeout)
    except http.client.HTTPException as exc:
        raise AdminError(f"GET {path}: {exc!r}") from exc
    if status != 200:
        raise AdminError(f"GET {path}: status {status}")
    return json.loads(body)


class ProxyProcess:
    """One ``python -m proxy run --config FILE``, its output in a log file, in its own
    session so that a stop can always take its media workers down with it.

    :meth:`stop` sends SIGINT (hang up every call, exit), not SIGTERM, which makes the
    proxy drain its calls first for up to ``[run] drain_s``."""

    def __init__(self, proc: subprocess.Popen[bytes], admin_port: int, log: Path,
                 host: str = LOOPBACK, token: str | None = None) -> None:  # fmt: skip
        self.proc = proc
        self.admin_port = admin_port
        self.log = log
        self.host = host
        self.token = token
        """The admin endpoint's bearer token, when the config sets one."""

    @classmethod
    def start(
        cls, config: Path, log: Path, admin_port: int, *, cwd: Path | None = None,
        env: Mapping[str, str] | None = None, host: str = LOOPBACK, token: str | None = None,
    ) -> ProxyProcess:  # fmt: skip
        """Start it (the admin endpoint must be ``[admin] listen`` = host:admin_port)."""
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )  # fmt: skip
        return cls(proc, admin_port, log, host, token)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """SIGHUP reloads the config, SIGTERM drains, SIGINT stops at once."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def get(self, path: str, timeout: float = 5.0) -> Any:
        return admin_get(self.admin_port, path, host=self.host, timeout=timeout, token=self.token)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/status")
        return result

    def calls(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/calls")
        return result

    def wait_ready(
        self, timeout: float = 15.0, ready: Callable[[dict[str, Any]], object] | None = None
    ) -> dict[str, Any]:
        """Wait until ``/status`` answers (and ``ready(status)`` is true); that status.

        Raises :class:`ProxyStartError`, with the end of the log, when the process exits
        first or ``timeout`` passes (the process is then left to the caller to stop)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ProxyStartError(f"the proxy exited at start-up:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                status = self.status()
                if ready is None or ready(status):
                    return status
            if time.monotonic() > deadline:
                raise ProxyStartError(f"the proxy not up in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.proc, timeout, signal.SIGINT)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty log)"
