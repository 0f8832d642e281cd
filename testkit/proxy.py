"""A ``sipura-proxy run`` under test: ports, config, process, admin endpoint.

:class:`LocalProxy` picks its own free ports (SIP inside and outside, admin, a media
range) unless given, writes its config from parameters (every table can be extended or
overridden per test), starts the real process (``python -m proxy run`` from this
checkout), waits until ``/status`` answers (plus any readiness the test needs), and stops
it with SIGINT (hang up every call and exit; SIGTERM would drain them first), then
SIGKILL to its process group (it and its media workers). The config is written mode 0600:
it may hold a line's private key inline, which the proxy refuses from a readable file.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.demo.loopback import ProxyProcess, config_text
from proxy.keyperms import write_private
from testkit import ROOT
from testkit.ports import HOST, free_port, media_range
from testkit.processes import Processes, child_env

Status = dict[str, Any]


def sip_uri(port: int, host: str = HOST) -> str:
    return f"sip:{host}:{port}"


@dataclass
class LocalProxy:
    """One proxy on 127.0.0.1; ``name`` names its config and log in ``dir``."""

    name: str
    dir: Path
    inside: int = field(default_factory=free_port)
    outside: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    media: tuple[int, int] = field(default_factory=lambda: media_range(32))
    token: str | None = None
    """The admin bearer token, when the config sets one (``[admin] token``)."""
    process: ProxyProcess | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    def config_tables(
        self, *, upstream: int | str | None = None, log_level: str = "debug"
    ) -> dict[str, dict[str, Any]]:
        """The tables every test proxy has: its listeners, media range, admin, log."""
        if isinstance(upstream, int):
            upstream = sip_uri(upstream)
        return {
            "inside": {"listen": f"{HOST}:{self.inside}", "media_ip": HOST},
            "outside": {
                "listen": f"{HOST}:{self.outside}",
                "media_ip": HOST,
                "upstream": upstream,
            },
            "media": {"port_min": self.media[0], "port_max": self.media[1]},
            "admin": {"listen": f"{HOST}:{self.admin}"},
            "log": {"level": log_level},
        }

    def write_config(
        self, *, upstream: int | str | None = None, lines: Sequence[Mapping[str, Any]] = (),
        log_level: str = "debug", **tables: Mapping[str, Any],
    ) -> Path:  # fmt: skip
        """Write the config: the base tables, ``tables`` merged in key by key (a new
        table, e.g. ``xsipura={...}``, or more keys for a base one, e.g.
        ``media={"workers": 2}``; a None value drops a key), then one ``[[line]]`` per
        entry of ``lines``. ``upstream``: a port on 127.0.0.1 or a SIP URI."""
        merged = self.config_tables(upstream=upstream, log_level=log_level)
        for name, keys in tables.items():
            merged.setdefault(name, {}).update(keys)
        write_private(self.config_path, config_text(merged, lines).encode(), force=True)
        return self.config_path

    def start(self, procs: Processes | None = None) -> None:
        """Start the process (see :meth:`wait_up`); ``procs`` stops it with the rest."""
        self.process = ProxyProcess.start(
            self.config_path, self.log_path, self.admin, cwd=ROOT, env=child_env(),
            token=self.token,
        )  # fmt: skip
        if procs is not None:
            procs.adopt(self.process.proc, signal.SIGINT)

    def wait_up(
        self, timeout: float = 15.0, ready: Callable[[Status], object] | None = None
    ) -> Status:
        """Until ``/status`` answers and ``ready(status)`` holds; AssertionError with the
        log when the process exits first or ``timeout`` passes."""
        assert self.process is not None, f"proxy {self.name} was not started"
        try:
            return self.process.wait_ready(timeout, ready)
        except RuntimeError as exc:
            raise AssertionError(f"proxy {self.name}: {exc}\n{self.log_text()}") from None

    def run(self, procs: Processes | None = None, timeout: float = 15.0,
            ready: Callable[[Status], object] | None = None) -> Status:  # fmt: skip
        """:meth:`start` and :meth:`wait_up`."""
        self.start(procs)
        return self.wait_up(timeout, ready)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def get(self, path: str, timeout: float = 5.0) -> Any:
        assert self.process is not None
        return self.process.get(path, timeout)

    def status(self) -> Status:
        result: Status = self.get("/status")
        return result

    def calls(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/calls")
        return result

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (the proxy hangs up its calls, stops its workers and exits), SIGKILL
        after ``timeout``; its exit status, None if it never started."""
        return None if self.process is None else self.process.stop(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_proxies(procs: Processes, *proxies: LocalProxy, timeout: float = 15.0) -> None:
    """Start them all at once, then wait for each admin endpoint."""
    for proxy in proxies:
        proxy.start(procs)
    for proxy in proxies:
        proxy.wait_up(timeout)


@contextlib.contextmanager
def dump_logs_on_failure(*proxies: LocalProxy, tail: int = 40000) -> Iterator[None]:
    """Print the proxies' logs (pytest shows them with the failure) if the block raises."""
    try:
        yield
    except BaseException:
        for proxy in proxies:
            print(f"===== proxy {proxy.name} log ({proxy.log_path}) =====\n"
                  f"{proxy.log_text()[-tail:]}")  # fmt: skip
        raise
