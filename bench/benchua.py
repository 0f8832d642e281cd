"""SIP user agents for ``bench/capacity.py``: many plain phones, and a remote SPA.

* :class:`Phones`: the legacy phones on the proxy's inside. One UDP socket places any
  number of concurrent calls (INVITE, ACK, BYE, with retransmissions), answers what the
  proxy sends in the dialog (the caller-ID refresh UPDATE/re-INVITE, BYE) with 200, and
  notes the ``$`` caller ID that proves the proxy switched the call to SRTP.
* :class:`RemoteSpa`: the x-sipura peer on the outside (the proxy's upstream). It answers
  every INVITE with 200 + ``Supported: x-sipura`` and an SDP that points at the load
  generator's peer socket, and answers the proxy's Caller Hello / Caller Final INFOs
  with :class:`proxy.xsipura.handshake.CalleeHandshake`; the SRTP keys and SSRCs it ends
  up with are handed to the bench (:attr:`PeerCall.session`).

A phone call and the proxy's outbound call are matched by an ``X-Bench-Call`` header,
which the B2BUA passes through like any header it does not own. Nothing here retries
beyond what loopback UDP needs (a few retransmissions); every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.sip.headers import NameAddr
from proxy.sip.message import Request, Response, SipParseError, parse_message
from proxy.sip.transaction import response_to
from proxy.xsipura.handshake import CalleeHandshake, Secured, SecureSession, SendResponse
from proxy.xsipura.mc import MiniCertificate
from proxy.xsipura.rsa import PrivateKey
from proxy.xsipura.trust import TrustStore
from testkit.pki import TestCa

HOST = "127.0.0.1"
BENCH_HEADER = "X-Bench-Call"
LINE_USER = "14085551234"
"""The proxy's secured line (From of secured calls)."""
PLAIN_USER = "14085550000"
"""A user with no [[line]]: its calls are relayed in the clear."""
PEER_USER = "15550002000"
"""The remote SPA's number (its MC user id): every call dials it."""
RETRANSMIT = (0.5, 1.0, 2.0, 4.0)
_M_AUDIO = re.compile(rb"^m=audio (\d+) ", re.M)


def sdp(port: int, who: str) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns={who}\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n"
    ).encode()


def sdp_port(body: bytes) -> int | None:
    m = _M_AUDIO.search(body)
    return int(m.group(1)) if m else None


def udp_socket(port: int = 0, rcvbuf: int = 8 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt, size in ((33, rcvbuf), (socket.SO_RCVBUF, rcvbuf)):  # 33: SO_RCVBUFFORCE
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            break
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind((HOST, port))
    return sock


# --------------------------------------------------------------------------- PKI


@dataclass
class BenchPki:
    """A CA, the proxy line's MC files and the remote SPA's MC (all in ``directory``)."""

    directory: Path
    ca_pub: Path = field(init=False)
    line_mc: Path = field(init=False)
    line_key: Path = field(init=False)
    peer_certificate: MiniCertificate = field(init=False)
    peer_key: PrivateKey = field(init=False)
    trust: TrustStore = field(init=False)

    def __post_init__(self) -> None:
        ca = TestCa()
        self.ca_pub = ca.write_public(self.directory / "ca.pub")
        files = ca.issue("Bench Line", LINE_USER).write_files(self.directory)
        self.line_mc, self.line_key = files.mini_certificate, files.srtp_private_key
        peer = ca.issue("Bench SPA", PEER_USER)
        self.peer_key, self.peer_certificate = peer.key, peer.certificate
        self.trust = ca.trust


# --------------------------------------------------------------------------- transport


class _Sip(asyncio.DatagramProtocol):
    def __init__(self, owner: _Agent) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            message = parse_message(data)
        except SipParseError:
            self.owner.bad += 1
            return
        try:
            self.owner.on_message(message, (str(addr[0]), int(addr[1])))
        except Exception as exc:  # a bench UA must survive odd messages; count them
            self.owner.errors.append(repr(exc))


class _Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.transport: asyncio.DatagramTransport | None = None
        self.bad = 0
        self.errors: list[str] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _Sip(self), sock=self.sock)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, message: Request | Response, dest: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(message.serialize(), dest)

    def on_message(self, message: Request | Response, source: tuple[str, int]) -> None:
        raise NotImplementedError


def _branch() -> str:
    return f"z9hG4bK{secrets.token_hex(8)}"


# --------------------------------------------------------------------------- phones


@dataclass
class PhoneCall:
    index: int
    call_id: str
    from_hdr: str
    to_hdr: str
    ssrc: int
    seq0: int
    invite: Request | None = None
    remote_target: str = ""
    proxy_media_port: int | None = None
    cseq: int = 1
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    refreshed: asyncio.Event = field(default_factory=asyncio.Event)
    """The proxy sent the ``$`` caller ID: it switched the call to SRTP."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    bye_status: int = 0
    pending: dict[str, asyncio.TimerHandle] = field(default_factory=dict)


class Phones(_Agent):
    """Any number of plain phones behind one SIP socket (they all send their RTP from the
    generator's phone socket, ``media_port``)."""

    def __init__(self, sock: socket.socket, proxy: tuple[str, int], media_port: int) -> None:
        super().__init__(sock)
        self.proxy = proxy
        self.media_port = media_port
        self.calls: dict[str, PhoneCall] = {}

    def _request(self, call: PhoneCall, method: str, uri: str, cseq: int) -> Request:
        request = Request(method=method, uri=uri)
        request.add("Via", f"SIP/2.0/UDP {HOST}:{self.port};branch={_branch()};rport")
        request.add("Max-Forwards", "70")
        request.add("From", call.from_hdr)
        request.add("To", call.to_hdr)
        request.add("Call-ID", call.call_id)
        request.add("CSeq", f"{cseq} {method}")
        return request

    def _retransmit(self, call: PhoneCall, key: str, request: Request, step: int = 0) -> None:
        if step >= len(RETRANSMIT) or call.ended.is_set():
            call.pending.pop(key, None)
            return
        loop = asyncio.get_running_loop()
        call.pending[key] = loop.call_later(
            RETRANSMIT[step], self._resend, call, key, request, step
        )

    def _resend(self, call: PhoneCall, key: str, request: Request, step: int) -> None:
        self.send(request, self.proxy)
        self._retransmit(call, key, request, step + 1)

    def _stop(self, call: PhoneCall, key: str) -> None:
        handle = call.pending.pop(key, None)
        if handle is not None:
            handle.cancel()

    def call(self, index: int, from_user: str, to_user: str, seq0: int, ssrc: int) -> PhoneCall:
        host = f"{self.proxy[0]}:{self.proxy[1]}"
        call = PhoneCall(
            index=index,
            call_id=f"{secrets.token_hex(8)}-{index}@bench",
            from_hdr=f"<sip:{from_user}@{HOST}>;tag={secrets.token_hex(4)}",
            to_hdr=f"<sip:{to_user}@{host}>",
            ssrc=ssrc,
            seq0=seq0,
        )
        invite = self._request(call, "INVITE", f"sip:{to_user}@{host}", 1)
        invite.add("Contact", f"<sip:{from_user}@{HOST}:{self.port}>")
        invite.add(BENCH_HEADER, str(index))
        invite.add("Content-Type", "application/sdp")
        invite.body = sdp(self.media_port, "bench phone")
        call.invite = invite
        self.calls[call.call_id] = call
        self.send(invite, self.proxy)
        self._retransmit(call, "INVITE", invite)
        return call

    def hang_up(self, call: PhoneCall) -> None:
        if not call.remote_target:
            call.ended.set()
            return
        call.cseq += 1
        bye = self._request(call, "BYE", call.remote_target, call.cseq)
        self.send(bye, self.proxy)
        self._retransmit(call, "BYE", bye)

    def on_message(self, message: Request | Response, source: tuple[str, int]) -> None:
        call = self.calls.get(message.call_id)
        if call is None:
            if isinstance(message, Request) and message.method != "ACK":
                self.send(response_to(message, 481, "Call/Transaction Does Not Exist"), source)
            return
        if isinstance(message, Response):
            self._on_response(call, message, source)
        else:
            self._on_request(call, message, source)

    def _on_response(self, call: PhoneCall, response: Response, source: tuple[str, int]) -> None:
        method = response.cseq.method
        if method == "BYE":
            if response.status >= 200:
                self._stop(call, "BYE")
                call.bye_status = response.status
                call.ended.set()
            return
        if method != "INVITE":
            return
        if response.status < 200:
            self._stop(call, "INVITE")  # provisional: the proxy retransmits from here on
            return
        self._stop(call, "INVITE")
        call.status = response.status
        if 200 <= response.status < 300:
            if not call.answered.is_set():
                contacts = response.get_all("contact")
                call.remote_target = NameAddr.parse(contacts[0]).uri if contacts else ""
                call.to_hdr = response.get("to") or call.to_hdr
                call.proxy_media_port = sdp_port(response.body)
            ack = self._request(call, "ACK", call.remote_target, response.cseq.number)
            self.send(ack, source)
            call.answered.set()
        else:
            assert call.invite is not None
            ack = Request(method="ACK", uri=call.invite.uri)
            ack.add("Via", call.invite.get("via") or "")
            for name in ("From", "Call-ID"):
                ack.add(name, call.invite.get(name) or "")
            ack.add("To", response.get("to") or call.to_hdr)
            ack.add("CSeq", f"{response.cseq.number} ACK")
            self.send(ack, source)
            call.answered.set()
            call.ended.set()

    def _on_request(self, call: PhoneCall, request: Request, source: tuple[str, int]) -> None:
        if request.method == "ACK":
            return
        tag = call.from_hdr.rsplit(";tag=", 1)[-1]
        reply = response_to(request, 200, "OK", to_tag=tag)
        identity = request.get("p-asserted-identity") or ""
        if '"$' in identity or "$" in identity.split("<", 1)[0]:
            call.refreshed.set()
        if request.method == "INVITE":
            reply.add("Contact", f"<sip:{HOST}:{self.port}>")
            reply.add("Content-Type", "application/sdp")
            reply.body = sdp(self.media_port, "bench phone")
        self.send(reply, source)
        if request.method == "BYE":
            call.ended.set()


# --------------------------------------------------------------------------- remote SPA


@dataclass
class PeerCall:
    call_id: str
    to_tag: str
    index: int | None
    proxy_media_port: int | None
    ssrc: int
    handshake: CalleeHandshake
    session: SecureSession | None = None
    secured: asyncio.Event = field(default_factory=asyncio.Event)
    clear_reason: str = ""
    responses: dict[tuple[int, str], Response] = field(default_factory=dict)


class RemoteSpa(_Agent):
    """The x-sipura callee the proxy calls (its ``[outside] upstream``)."""

    def __init__(self, sock: socket.socket, pki: BenchPki, media_port: int) -> None:
        super().__init__(sock)
        self.pki = pki
        self.media_port = media_port
        self.calls: dict[str, PeerCall] = {}
        self.by_index: dict[int, PeerCall] = {}
        self.waiters: dict[int, asyncio.Future[PeerCall]] = {}
        self._ssrc = 0x5E000000 + secrets.randbelow(1 << 20)

    def call_for(self, index: int) -> asyncio.Future[PeerCall]:
        """The proxy's outbound call for phone call ``index`` (resolved on its INVITE)."""
        future = self.waiters.get(index)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.waiters[index] = future
            if index in self.by_index:
                future.set_result(self.by_index[index])
        return future

    def forget(self, index: int) -> None:
        self.waiters.pop(index, None)
        peer = self.by_index.pop(index, None)
        if peer is not None:
            self.calls.pop(peer.call_id, None)

    def on_message(self, message: Request | Response, source: tuple[str, int]) -> None:
        if isinstance(message, Response):
            return  # the peer sends no requests
        request = message
        call = self.calls.get(request.call_id)
        key = (request.cseq.number, request.method)
        if call is not None and key in call.responses:  # a retransmission
            self.send(call.responses[key], source)
            return
        if request.method == "ACK":
            return
        if request.method == "INVITE" and call is None:
            self._on_invite(request, source)
            return
        if call is None:
            self.send(response_to(request, 481, "Call/Transaction Does Not Exist"), source)
            return
        if request.method == "INFO":
            self._on_info(call, request, source)
            return
        reply = response_to(request, 200, "OK", to_tag=call.to_tag)
        if request.method == "INVITE":
            reply.add("Contact", f"<sip:{PEER_USER}@{HOST}:{self.port}>")
            reply.add("Content-Type", "application/sdp")
            reply.body = sdp(self.media_port, "bench spa")
        self._reply(call, key, reply, source)

    def _reply(
        self, call: PeerCall, key: tuple[int, str], reply: Response, source: tuple[str, int]
    ) -> None:
        call.responses[key] = reply
        self.send(reply, source)

    def _on_invite(self, request: Request, source: tuple[str, int]) -> None:
        self._ssrc += 1
        raw = request.get(BENCH_HEADER)
        index = int(raw) if raw and raw.strip().isdigit() else None
        call = PeerCall(
            call_id=request.call_id,
            to_tag=secrets.token_hex(4),
            index=index,
            proxy_media_port=sdp_port(request.body),
            ssrc=self._ssrc,
            handshake=CalleeHandshake(
                certificate=self.pki.peer_certificate,
                private_key=self.pki.peer_key,
                trust=self.pki.trust,
                local_ssrc=self._ssrc,
            ),
        )
        self.calls[call.call_id] = call
        reply = response_to(request, 200, "OK", to_tag=call.to_tag)
        reply.add("Contact", f"<sip:{PEER_USER}@{HOST}:{self.port}>")
        reply.add("Supported", "x-sipura")
        reply.add("Content-Type", "application/sdp")
        reply.body = sdp(self.media_port, "bench spa")
        self._reply(call, (request.cseq.number, "INVITE"), reply, source)
        if index is not None:
            self.by_index[index] = call
            future = self.waiters.get(index)
            if future is not None and not future.done():
                future.set_result(call)

    def _on_info(self, call: PeerCall, request: Request, source: tuple[str, int]) -> None:
        events = call.handshake.receive_request(request.body, time.monotonic(), datetime.now(UTC))
        for event in events:
            if isinstance(event, SendResponse):
                reply = response_to(request, event.status, event.reason, to_tag=call.to_tag)
                if event.body:
                    reply.add("Content-Type", event.content_type)
                    reply.body = event.body.encode("ascii")
                self._reply(call, (request.cseq.number, "INFO"), reply, source)
            elif isinstance(event, Secured):
                call.session = event.session
                call.secured.set()
            else:
                call.clear_reason = str(getattr(event, "reason", event))


async def hang_up(phones: Phones, spa: RemoteSpa, phone: PhoneCall, timeout: float = 10.0) -> bool:
    """The phone hangs up its call; True once the proxy answered the BYE with 200 (or the
    call had ended already). Both agents forget the call either way."""
    phones.hang_up(phone)
    try:
        async with asyncio.timeout(timeout):
            await phone.ended.wait()
    except TimeoutError:
        return False
    finally:
        spa.forget(phone.index)
        phones.calls.pop(phone.call_id, None)
    return phone.bye_status in (0, 200)
