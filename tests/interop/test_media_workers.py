"""The proxy as a real process with media worker processes: a worker killed mid-call,
and the call limit, with hand-rolled SIP peers over UDP on 127.0.0.1.

The phone (inside) and the PBX (the proxy's upstream) are plain UDP sockets speaking
just enough SIP: INVITE / 200 / ACK, BYE / 200. Every wait is bounded and for a
message or a state, never an assertion on elapsed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.sip.message import Request, Response, parse_message
from testkit.ports import HOST, media_range
from testkit.processes import wait_for
from testkit.proxy import LocalProxy


def rtp(seq: int) -> bytes:
    return b"\x80\x00" + seq.to_bytes(2, "big") + bytes(8) + b"\xff" * 160


class Endpoint:
    """A UDP SIP endpoint plus one RTP socket; messages not waited for are kept."""

    def __init__(self) -> None:
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((HOST, 0))
        self.port = int(self.sip.getsockname()[1])
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((HOST, 0))
        self.rtp_port = int(self.rtp.getsockname()[1])
        self.backlog: list[tuple[Request | Response, tuple[str, int]]] = []

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()

    def wait(
        self, match: Callable[[Request | Response], bool], what: str, timeout: float = 10.0
    ) -> tuple[Request | Response, tuple[str, int]]:
        for index, (message, source) in enumerate(self.backlog):
            if match(message):
                del self.backlog[index]
                return message, source
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sip.settimeout(left)
            try:
                data, source = self.sip.recvfrom(65535)
            except TimeoutError:
                break
            message = parse_message(data)
            if match(message):
                return message, source
            self.backlog.append((message, source))
        raise AssertionError(f"no {what} within {timeout} s; kept: {self.backlog}")

    def send(self, message: Request | Response, dest: tuple[str, int]) -> None:
        self.sip.sendto(bytes(message), dest)

    def recv_rtp(self, timeout: float = 5.0) -> bytes:
        self.rtp.settimeout(timeout)
        return self.rtp.recv(4096)


def sdp(port: int) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


def media_port(body: bytes) -> int:
    for line in body.decode().splitlines():
        if line.startswith("m=audio "):
            return int(line.split()[1])
    raise AssertionError(f"no m=audio in {body!r}")


def reply(request: Request, status: int, reason: str, tag: str | None = None) -> Response:
    response = Response(status=status, reason=reason)
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        for value in request.get_all(name):
            if name == "To" and tag and ";tag=" not in value:
                value += f";tag={tag}"
            response.add(name, value)
    return response


def is_request(method: str, call_id: str | None = None) -> Callable[[Request | Response], bool]:
    return lambda m: isinstance(m, Request) and m.method == method and call_id in (None, m.call_id)


class Proxy(LocalProxy):
    """The proxy with media workers; its upstream is the PBX endpoint :attr:`pbx`."""

    def __init__(self, tmp_path: Path, *, workers: int, max_calls: int = 0) -> None:
        super().__init__("proxy", tmp_path, media=media_range(8))
        self.pbx = Endpoint()
        self.write_config(
            upstream=self.pbx.port, media={"workers": workers}, limits={"max_calls": max_calls}
        )
        self.run(ready=lambda status: all(w["alive"] for w in status["media"]["workers"]))

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (SIGTERM would drain calls first): the proxy stops its workers and
        exits cleanly."""
        pids = []
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids = [w["pid"] for w in self.status()["media"]["workers"]]
        code = super().stop(timeout)
        self.pbx.close()
        for pid in pids:  # no orphan: every worker is gone (reaped by the proxy)
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"worker {pid} left"
        return code


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def proxy_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(**kwargs: Any) -> Proxy:
        proxy = Proxy(tmp_path, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    for proxy in started:
        proxy.stop()
        if failed:
            print(f"===== proxy log =====\n{proxy.log_text()}")


class Call:
    """One call phone -> proxy -> PBX, answered and confirmed."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.phone = Endpoint()
        self.call_id = f"{uuid.uuid4().hex}@{HOST}"
        self.tag = uuid.uuid4().hex[:8]

    def invite(self) -> Request:
        invite = Request(method="INVITE", uri=f"sip:15550002222@{HOST}:{self.proxy.inside}")
        for name, value in (
            ("Via", f"SIP/2.0/UDP {HOST}:{self.phone.port};branch=z9hG4bK{uuid.uuid4().hex}"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:14085551234@{HOST}>;tag={self.tag}"),
            ("To", f"<sip:15550002222@{HOST}>"),
            ("Call-ID", self.call_id),
            ("CSeq", "1 INVITE"),
            ("Contact", f"<sip:phone@{HOST}:{self.phone.port}>"),
            ("Content-Type", "application/sdp"),
        ):
            invite.add(name, value)
        invite.body = sdp(self.phone.rtp_port)
        self.phone.send(invite, (HOST, self.proxy.inside))
        return invite

    def final(self) -> Response:
        response, _ = self.phone.wait(
            lambda m: isinstance(m, Response) and m.status >= 200 and m.call_id == self.call_id,
            "final response to the INVITE",
        )
        assert isinstance(response, Response)
        return response

    def establish(self) -> None:
        self.invite()
        pbx = self.proxy.pbx
        incoming, source = pbx.wait(is_request("INVITE"), "INVITE at the PBX")
        assert isinstance(incoming, Request)
        self.b_call_id = incoming.call_id
        self.pbx_media = media_port(incoming.body)  # the proxy's outside port
        answer = reply(incoming, 200, "OK", tag=uuid.uuid4().hex[:8])
        answer.add("Contact", f"<sip:pbx@{HOST}:{pbx.port}>")
        answer.add("Content-Type", "application/sdp")
        answer.body = sdp(pbx.rtp_port)
        pbx.send(answer, source)
        ok = self.final()
        assert ok.status == 200, ok
        self.phone_media = media_port(ok.body)  # the proxy's inside port
        ack = Request(method="ACK", uri=f"sip:15550002222@{HOST}:{self.proxy.inside}")
        for name, value in (
            ("Via", f"SIP/2.0/UDP {HOST}:{self.phone.port};branch=z9hG4bK{uuid.uuid4().hex}"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:14085551234@{HOST}>;tag={self.tag}"),
            ("To", ok.get("To") or ""),
            ("Call-ID", self.call_id),
            ("CSeq", "1 ACK"),
        ):
            ack.add(name, value)
        self.phone.send(ack, (HOST, self.proxy.inside))
        pbx.wait(is_request("ACK", self.b_call_id), "ACK at the PBX")

    def relays(self, seq: int) -> bool:
        """One RTP packet phone -> PBX through the proxy arrives intact."""
        self.phone.rtp.sendto(rtp(seq), (HOST, self.phone_media))
        return self.proxy.pbx.recv_rtp() == rtp(seq)

    def expect_bye(self) -> tuple[str, str]:
        """The BYE on both legs (answered 200): their Reason headers."""
        reasons = []
        for endpoint, call_id in ((self.phone, self.call_id), (self.proxy.pbx, self.b_call_id)):
            bye, source = endpoint.wait(is_request("BYE", call_id), f"BYE for {call_id}")
            assert isinstance(bye, Request)
            endpoint.send(reply(bye, 200, "OK"), source)
            reasons.append(bye.get("Reason") or "")
        return reasons[0], reasons[1]


def worker_of(proxy: Proxy, port: int) -> dict[str, Any]:
    for worker in proxy.status()["media"]["workers"]:
        if worker["port_min"] <= port <= worker["port_max"]:
            return dict(worker)
    raise AssertionError(f"port {port} in no worker's slice")


def test_killed_worker_hangs_up_its_calls_only_and_is_replaced(
    proxy_factory: Callable[..., Proxy],
) -> None:
    proxy = proxy_factory(workers=2)
    calls = [Call(proxy) for _ in range(3)]
    try:
        for call in calls:
            call.establish()
        for seq, call in enumerate(calls):
            assert call.relays(seq)
        owners = [worker_of(proxy, call.phone_media) for call in calls]
        indexes = [owner["index"] for owner in owners]
        assert indexes[0] != indexes[1] and sorted(set(indexes)) == [0, 1]  # least loaded
        victim = owners[2]  # the worker that got two of the three calls
        lost = [call for call, i in zip(calls, indexes, strict=True) if i == victim["index"]]
        (kept,) = [call for call in calls if call not in lost]
        os.kill(victim["pid"], signal.SIGKILL)

        for call in lost:
            for reason in call.expect_bye():
                assert reason == 'SIP;cause=200;text="media relay failed"', reason
        # The call on the other worker is untouched and still relays.
        assert kept.relays(100)
        assert [c["a_call_id"] for c in proxy.status()["calls"]] == [kept.call_id]

        def replaced() -> bool:
            worker = proxy.status()["media"]["workers"][victim["index"]]
            return bool(worker["alive"]) and worker["pid"] != victim["pid"]

        wait_for(replaced, 15, "a replacement worker")
        worker = proxy.status()["media"]["workers"][victim["index"]]
        assert worker["restarts"] == 1 and worker["sessions"] == 0
        assert f"media worker {victim['index']} (pid {victim['pid']}) died" in proxy.log_text()
        assert "killed by signal 9" in proxy.log_text()

        fresh = Call(proxy)
        fresh.establish()
        assert worker_of(proxy, fresh.phone_media)["index"] == victim["index"]
        assert fresh.relays(200)
    finally:
        for call in calls:
            call.phone.close()


def test_call_beyond_max_calls_gets_503_with_retry_after(
    proxy_factory: Callable[..., Proxy],
) -> None:
    proxy = proxy_factory(workers=2, max_calls=2)
    calls = [Call(proxy) for _ in range(3)]
    try:
        calls[0].establish()
        calls[1].establish()
        calls[2].invite()
        refused = calls[2].final()
        assert refused.status == 503, refused
        assert refused.get("Retry-After") is not None
        assert len(proxy.status()["calls"]) == 2
        assert calls[0].relays(1) and calls[1].relays(2)
    finally:
        for call in calls:
            call.phone.close()
