"""A simulated legacy phone for ``sipura-proxy demo``: plain SIP over UDP, G.711 RTP.

It is deliberately dumb, like the handsets the proxy exists for: no x-sipura, no SRTP.
It places or answers one call, sends 20 ms u-law packets whose payload encodes the RTP
sequence number (so the far phone can prove every packet arrived byte for byte), and
records what it receives. It answers the proxy's in-dialog requests (the caller-ID
refresh UPDATE or re-INVITE) with 200 and remembers the identity it was given.

The interop tests build their phone on this one (``tests/interop/secure_setup.py``), so
what they need is public here: :meth:`Phone.start` on sockets bound beforehand,
:meth:`Phone.dial` of any Request-URI, :meth:`Phone.send_reinvite` with another direction
(hold / resume), :meth:`Phone.stop_media` / :meth:`Phone.start_media` with a chosen first
sequence number, and the :meth:`Phone.on_sip` / :meth:`Phone.on_rtp` hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.sip.headers import NameAddr
from proxy.sip.message import Request, Response, SipParseError, parse_message
from proxy.sip.sdp import SdpError, connection_endpoint, parse_sdp
from proxy.sip.transaction import response_to

HOST = "127.0.0.1"
PAYLOAD = 160
PTIME = 0.02


def payload_for(seq: int, marker: int) -> bytes:
    """A u-law payload carrying (marker, seq): verifiable end to end, audible as noise."""
    head = struct.pack(">HH", marker, seq & 0xFFFF)
    return (head * (PAYLOAD // len(head)))[:PAYLOAD]


@dataclass
class Reception:
    packets: int = 0
    intact: int = 0
    altered: int = 0
    altered_seqs: list[int] = field(default_factory=list)


class _Rtp(asyncio.DatagramProtocol):
    def __init__(self, phone: Phone) -> None:
        self.phone = phone

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.phone.on_rtp(data)


class _Sip(asyncio.DatagramProtocol):
    def __init__(self, phone: Phone) -> None:
        self.phone = phone

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        with contextlib.suppress(SipParseError):
            self.phone.on_sip(parse_message(data), (str(addr[0]), int(addr[1])))


async def _open(
    protocol: Callable[[], asyncio.DatagramProtocol], port: int, sock: socket.socket | None
) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    if sock is None:
        transport, _ = await loop.create_datagram_endpoint(protocol, local_addr=(HOST, port))
    else:
        transport, _ = await loop.create_datagram_endpoint(protocol, sock=sock)
    return transport


class Phone:
    def __init__(
        self, name: str, user: str, sip_port: int, rtp_port: int, marker: int, peer_marker: int
    ) -> None:
        self.name = name
        self.user = user
        self.sip_port = sip_port
        self.rtp_port = rtp_port
        self.marker = marker
        self.peer_marker = peer_marker
        self.ssrc = secrets.randbits(32)
        self.rx = Reception()
        self.sent = 0
        self.answered = asyncio.Event()
        self.ended = asyncio.Event()
        self.identities: list[str] = []
        self.direction = "sendrecv"
        """The SDP direction attribute this phone offers and answers with."""
        self.sdp_version = 1
        self.last_sent_seq = 0
        self._sip: asyncio.DatagramTransport | None = None
        self._rtp: asyncio.DatagramTransport | None = None
        self._remote_media: tuple[str, int] | None = None
        self._dialog: dict[str, str] = {}
        self._proxy: tuple[str, int] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._cseq = 1
        self._invite_branch = ""

    async def start(
        self, sip_socket: socket.socket | None = None, rtp_socket: socket.socket | None = None
    ) -> None:
        """Listen on ``sip_port`` / ``rtp_port``, or on sockets already bound to them (a
        caller that reserved its ports before writing them into a proxy's config)."""
        self._sip = await _open(lambda: _Sip(self), self.sip_port, sip_socket)
        self._rtp = await _open(lambda: _Rtp(self), self.rtp_port, rtp_socket)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        for transport in (self._sip, self._rtp):
            if transport is not None:
                transport.close()

    def _sdp(self) -> bytes:
        return (
            f"v=0\r\no=- 1 {self.sdp_version} IN IP4 {HOST}\r\ns=demo phone\r\n"
            f"c=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {self.rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
            f"a={self.direction}\r\n"
        ).encode()

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{HOST}:{self.sip_port}"

    def _send(self, message: Request | Response, dest: tuple[str, int]) -> None:
        if self._sip is not None:
            self._sip.sendto(message.serialize(), dest)

    # --- calling ---------------------------------------------------------------------------

    def _request(
        self, method: str, uri: str, cseq: int, to: str | None = None, branch: str = ""
    ) -> Request:
        """A request in this phone's dialog (the INVITE, its ACK, BYE)."""
        request = Request(method=method, uri=uri)
        branch = branch or f"z9hG4bK{secrets.token_hex(6)}"
        request.add("Via", f"SIP/2.0/UDP {HOST}:{self.sip_port};branch={branch};rport")
        request.add("Max-Forwards", "70")
        request.add("From", self._dialog["from"])
        request.add("To", to or self._dialog["to"])
        request.add("Call-ID", self._dialog["call_id"])
        request.add("CSeq", f"{cseq} {method}")
        return request

    def call(self, target_user: str, proxy: tuple[str, int]) -> None:
        """Dial ``target_user`` at ``proxy`` (the proxy's inside address)."""
        self.dial(f"sip:{target_user}@{proxy[0]}:{proxy[1]}", proxy)

    def dial(self, uri: str, proxy: tuple[str, int]) -> None:
        """INVITE any Request-URI (``sip:*18123@host:port`` ...) through ``proxy``."""
        self._proxy = proxy
        self._dialog = {
            "call_id": f"{secrets.token_hex(8)}@demo",
            "from": f'"{self.name}" <sip:{self.user}@{HOST}>;tag={secrets.token_hex(4)}',
            "to": f"<{uri}>",
        }
        invite = self._request("INVITE", uri, 1)
        self._invite_branch = invite.top_via.branch or ""
        invite.add("Contact", f"<{self.contact}>")
        invite.add("Content-Type", "application/sdp")
        invite.body = self._sdp()
        self._send(invite, proxy)

    def send_reinvite(self, direction: str) -> int:
        """A re-INVITE in the confirmed dialog this phone placed, offering ``direction``
        (``sendonly`` puts the call on hold, ``sendrecv`` resumes it). Returns its CSeq
        number, so the caller can find the final response."""
        if self._proxy is None or "remote_target" not in self._dialog:
            raise RuntimeError(f"{self.name}: no confirmed dialog to re-INVITE in")
        self._cseq += 1
        self.direction = direction
        self.sdp_version += 1
        invite = self._request("INVITE", self._dialog["remote_target"], self._cseq)
        invite.add("Contact", f"<{self.contact}>")
        invite.add("Content-Type", "application/sdp")
        invite.body = self._sdp()
        self._send(invite, self._proxy)
        return self._cseq

    def hang_up(self) -> None:
        if self._proxy is None or "remote_target" not in self._dialog:
            return
        self._cseq += 1
        self._send(self._request("BYE", self._dialog["remote_target"], self._cseq), self._proxy)
        self.stop_media()

    # --- SIP input -------------------------------------------------------------------------

    def on_sip(self, message: Request | Response, source: tuple[str, int]) -> None:
        if isinstance(message, Response):
            self._on_response(message, source)
        else:
            self._on_request(message, source)

    def _on_response(self, response: Response, source: tuple[str, int]) -> None:
        if response.cseq.method != "INVITE" or response.status < 200:
            if response.cseq.method == "BYE" and response.status >= 200:
                self.ended.set()
            return
        if 200 <= response.status < 300:
            contacts = response.get_all("contact")
            self._dialog["remote_target"] = NameAddr.parse(contacts[0]).uri if contacts else ""
            self._dialog["to"] = response.get("to") or self._dialog["to"]
            self._learn_media(response.body)
            self.answered.set()
            ack = self._request("ACK", self._dialog["remote_target"], response.cseq.number)
        else:  # the ACK for an error belongs to the INVITE transaction: same branch
            self.ended.set()
            uri = f"sip:{source[0]}:{source[1]}"
            ack = self._request("ACK", uri, response.cseq.number, response.get("to"),
                                branch=self._invite_branch)  # fmt: skip
        self._send(ack, source)
        if 200 <= response.status < 300:
            self.start_media()

    def _on_request(self, request: Request, source: tuple[str, int]) -> None:
        method = request.method
        if method == "ACK":
            return
        self._proxy = source
        if method == "INVITE" and not request.to.tag:
            tag = secrets.token_hex(4)
            self._dialog = {
                "call_id": request.call_id,
                "from": f"{request.get('to')};tag={tag}",
                "to": request.get("from") or "",
                "tag": tag,
                "remote_target": NameAddr.parse(request.get_all("contact")[0]).uri,
            }
            for status, reason in ((180, "Ringing"), (200, "OK")):
                response = response_to(request, status, reason, to_tag=tag)
                if status == 200:
                    response.add("Contact", f"<{self.contact}>")
                    response.add("Content-Type", "application/sdp")
                    response.body = self._sdp()
                self._send(response, source)
            self._learn_media(request.body)
            self.answered.set()
            self.start_media()
            return
        reply = response_to(request, 200, "OK", to_tag=self._dialog.get("tag"))
        identity = request.get("p-asserted-identity")
        if identity:
            self.identities.append(identity)
        if method == "INVITE":  # a re-INVITE (caller-ID refresh or hold): same media
            reply.add("Contact", f"<{self.contact}>")
            reply.add("Content-Type", "application/sdp")
            reply.body = self._sdp()
            self._learn_media(request.body)
        self._send(reply, source)
        if method == "BYE":
            self.stop_media()
            self.ended.set()

    # --- media -----------------------------------------------------------------------------

    def _learn_media(self, body: bytes) -> None:
        if not body:
            return
        try:
            endpoint = connection_endpoint(parse_sdp(body), 0)
        except (SdpError, IndexError):
            return
        if endpoint.rtp_port:
            self._remote_media = (endpoint.ip, endpoint.rtp_port)

    def start_media(self, first_seq: int | None = None) -> None:
        """Start sending RTP (no-op while sending); ``first_seq`` fixes the first sequence
        number, else it is random (RFC 3550)."""
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_media(first_seq))

    def stop_media(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None

    async def _send_media(self, first_seq: int | None) -> None:
        loop = asyncio.get_running_loop()
        seq = secrets.randbelow(1000) if first_seq is None else first_seq
        timestamp = secrets.randbits(31)
        next_at = loop.time()
        while True:
            if self._rtp is not None and self._remote_media is not None:
                header = struct.pack(
                    ">BBHII", 0x80, 0, seq & 0xFFFF, timestamp & 0xFFFFFFFF, self.ssrc
                )
                self._rtp.sendto(header + payload_for(seq, self.marker), self._remote_media)
                self.sent += 1
                self.last_sent_seq = seq & 0xFFFF
            seq += 1
            timestamp += PAYLOAD
            next_at += PTIME
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def on_rtp(self, data: bytes) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        count = data[0] & 0x0F
        offset = 12 + 4 * count
        seq = struct.unpack_from(">H", data, 2)[0]
        payload = data[offset:]
        self.rx.packets += 1
        if payload == payload_for(seq, self.peer_marker):
            self.rx.intact += 1
        else:
            self.rx.altered += 1
            self.rx.altered_seqs.append(seq)
