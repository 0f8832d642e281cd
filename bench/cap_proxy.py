"""The proxy side of the capacity bench: a real ``sipura-proxy run`` process
(:class:`ProxyProc`, its config, /status, its relaying pids) and the SIP harness that
places calls through it (:class:`Harness`: the bench's phones and remote SPA from
``benchua``, and the two media sockets the generators inherit)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchua as ua
from cap_common import HOST, REPO_ROOT, BenchError, drain

from testkit.proxy import LocalProxy


@dataclass
class ProxyProc:
    name: str
    workdir: Path
    pki: ua.BenchPki
    upstream: int
    media: tuple[int, int]
    workers: int | None
    fast_path: str | None = None
    """``[media] fast_path`` (None: the proxy's default, the compiled path where built)."""
    local: LocalProxy = field(init=False)

    def __post_init__(self) -> None:
        self.local = LocalProxy(self.name, self.workdir, media=self.media)

    @property
    def inside(self) -> int:
        return self.local.inside

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.local.process is None else self.local.process.proc

    @property
    def log_path(self) -> Path:
        return self.local.log_path

    def config(self) -> Path:
        line = {
            "user_id": ua.LINE_USER,
            "allowed_sources": [HOST],  # the bench's phones call from any port
            "mini_certificate": f"@{self.pki.line_mc}",
            "srtp_private_key": f"@{self.pki.line_key}",
            "secure_by_default": True,
        }
        return self.local.write_config(
            upstream=self.upstream,
            log_level="warning",
            lines=[line],
            inside={"unknown_users": "relay"},
            media={"workers": self.workers, "fast_path": self.fast_path},
            sip={"transports": ["udp"]},
            xsipura={"trusted_ca": [str(self.pki.ca_pub)], "tone": False},
        )

    def start(self, timeout: float = 20.0) -> None:
        self.config()
        self.local.start()
        try:
            self.local.wait_up(
                timeout, ready=lambda s: not self.workers_expected() or self.worker_pids(s)
            )
        except AssertionError:
            self.stop()
            raise BenchError(f"proxy {self.name} did not start: {self.log_tail()}") from None

    def workers_expected(self) -> bool:
        return self.workers != 0 and self.supports_workers

    supports_workers: bool = False

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def get(self, path: str, timeout: float = 10.0) -> Any:
        return self.local.get(path, timeout)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/status")
        return result

    @staticmethod
    def worker_info(status: dict[str, Any]) -> list[dict[str, Any]]:
        workers = (status.get("media") or {}).get("workers")
        return [w for w in workers if isinstance(w, dict)] if isinstance(workers, list) else []

    def worker_pids(self, status: dict[str, Any] | None = None) -> list[int]:
        info = self.worker_info(status if status is not None else self.status())
        return [int(w["pid"]) for w in info if w.get("alive", True) and w.get("pid")]

    def relay_pids(self) -> list[int]:
        """The relaying processes: the media workers when there are any, else the proxy."""
        assert self.proc is not None
        return self.worker_pids() or [self.proc.pid]

    def all_pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *self.worker_pids()]

    def stop(self) -> None:
        self.local.stop(timeout=10)  # SIGTERM, then SIGKILL to it and its workers


def config_knows_workers() -> bool:
    """Does this checkout's proxy run media workers (the ``workers`` config key means
    something)? Detected from /status at run time; this only guesses for the wait."""
    return (REPO_ROOT / "proxy" / "media" / "workers.py").exists() or any(
        "workers" in p.read_text(errors="replace")
        for p in (REPO_ROOT / "proxy" / "b2bua" / "server.py",)
        if p.exists()
    )


@dataclass
class Pair:
    phone: ua.PhoneCall
    peer: ua.PeerCall


class Harness:
    """The phones, the remote SPA and the two media sockets the generators inherit."""

    def __init__(self, pki: ua.BenchPki) -> None:
        self.pki = pki
        self.phone_media = ua.udp_socket()
        self.peer_media = ua.udp_socket()
        self.spa = ua.RemoteSpa(ua.udp_socket(), pki, self.peer_media.getsockname()[1])
        self.phones: ua.Phones | None = None
        self._next = 0

    @property
    def spa_port(self) -> int:
        return self.spa.port

    async def start(self, proxy: ProxyProc) -> None:
        await self.spa.start()
        await self.use(proxy)

    async def use(self, proxy: ProxyProc) -> None:
        if self.phones is not None:
            self.phones.close()
        self.phones = ua.Phones(
            ua.udp_socket(), (HOST, proxy.inside), self.phone_media.getsockname()[1]
        )
        await self.phones.start()

    def close(self) -> None:
        if self.phones is not None:
            self.phones.close()
        self.spa.close()
        self.phone_media.close()
        self.peer_media.close()

    async def place(self, secure: bool, ssrc: int, seq0: int, timeout: float = 15.0) -> Pair | str:
        """One call through SIP; secured ones until the proxy switched to SRTP. A Pair,
        or why it failed."""
        phones = self.phones
        assert phones is not None
        index = self._next
        self._next += 1
        call = phones.call(
            index, ua.LINE_USER if secure else ua.PLAIN_USER, ua.PEER_USER, seq0, ssrc
        )
        waiter = self.spa.call_for(index)
        try:
            async with asyncio.timeout(timeout):
                await call.answered.wait()
                if call.status != 200:
                    return f"INVITE answered {call.status}"
                peer = await waiter
                if call.proxy_media_port is None or peer.proxy_media_port is None:
                    return "no media port in SDP"
                # the proxy starts stage 2 once the phone's RTP flows (profile §2)
                kick = struct.pack(
                    "!BBHII", 0x80, 0, (seq0 - 1) & 0xFFFF, ((seq0 - 1) * 160) & 0xFFFFFFFF, ssrc
                ) + bytes(160)
                with contextlib.suppress(OSError):
                    self.phone_media.sendto(kick, (HOST, call.proxy_media_port))
                if secure:
                    await peer.secured.wait()
                    await call.refreshed.wait()
                return Pair(call, peer)
        except TimeoutError:
            phones.hang_up(call)
            self.spa.forget(index)
            stage = (
                "no answer"
                if not call.answered.is_set()
                else "not secured"
                + (
                    f" ({waiter.result().clear_reason})"
                    if waiter.done() and waiter.result().clear_reason
                    else ""
                )
            )
            return f"timeout: {stage}"

    async def hang_up(self, pair: Pair, timeout: float = 10.0) -> bool:
        """The phone hangs up; True once the proxy answered its BYE with 200."""
        assert self.phones is not None
        return await ua.hang_up(self.phones, self.spa, pair.phone, timeout)

    async def place_many(
        self, n: int, secure: bool, window: int, ssrc_base: int, seq0: Callable[[int], int]
    ) -> tuple[list[Pair], list[str]]:
        sem = asyncio.Semaphore(window)

        async def one(i: int) -> Pair | str:
            async with sem:
                return await self.place(secure, ssrc_base + i, seq0(i))

        results = await asyncio.gather(*(one(i) for i in range(n)))
        pairs = [r for r in results if isinstance(r, Pair)]
        return pairs, [r for r in results if isinstance(r, str)]

    async def hang_up_all(self, pairs: list[Pair]) -> None:
        sem = asyncio.Semaphore(300)

        async def one(p: Pair) -> None:
            async with sem:
                await self.hang_up(p)

        await asyncio.gather(*(one(p) for p in pairs))
        await asyncio.sleep(0.2)
        drain(self.phone_media)
        drain(self.peer_media)
