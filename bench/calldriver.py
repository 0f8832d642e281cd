"""Whole calls through one real proxy, for ``bench/setup_cost.py`` and ``bench/soak.py``.

:class:`CallDriver` owns the bench's two user agents (:mod:`benchua`: the legacy phones
on the proxy's inside, the remote SPA on its outside) and one media socket each. A call
is placed by a phone, answered by the SPA, and for a secured call awaited until the
proxy has finished x-sipura with the SPA *and* sent the phone the ``$`` caller ID (what
a user perceives as "secure"). The proxy starts stage 2 only once the phone's RTP flows
(profile §2), so the phone sends one RTP packet as soon as the call is answered.

Media (:meth:`CallDriver.exchange`): the phone sends plain RTP to the proxy's inside
port, the SPA sends RTP (SRTP under the agreed keys when the call is secured) to the
proxy's outside port; what comes back is told apart by the proxy port it came from and
checked: the phone must get plain RTP with the SPA's payload, the SPA must get SRTP
that authenticates under the agreed keys (plain RTP for a plain call).

Every wait has a timeout; a call that fails says why in one short string.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import benchua as ua

from proxy.media.srtp import SrtpContext, SrtpError

HOST = ua.HOST
RTP_HEADER = struct.Struct("!BBHII")
PAYLOAD_LEN = 160


def rtp(seq: int, ssrc: int, payload: bytes) -> bytes:
    """A PCMU RTP packet (20 ms of 8 kHz audio per sequence number)."""
    return RTP_HEADER.pack(0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + payload


@dataclass
class Pair:
    """One call as both bench agents see it."""

    secure: bool
    phone: ua.PhoneCall
    peer: ua.PeerCall


@dataclass
class MediaResult:
    """What one call's media exchange delivered, each way."""

    sent: int
    to_phone: int
    """Plain RTP packets the phone got from the call's inside port."""
    to_peer: int
    """Packets the SPA got from the call's outside port that passed its check (SRTP
    that authenticates, for a secured call; plain RTP for a plain one)."""
    bad_at_peer: int = 0
    """Packets the SPA got that failed the check (plain on a secured call, bad SRTP)."""


@dataclass
class _Inbox:
    """Packets received on a media socket, per source port (the proxy's port of a call)."""

    by_port: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    waiters: dict[int, asyncio.Event] = field(default_factory=dict)


class _MediaProtocol(asyncio.DatagramProtocol):
    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        port = int(addr[1])
        box = self.inbox.by_port.get(port)
        if box is None:
            return  # a call we stopped listening for (late packets of an ended call)
        box.append(data)


class CallDriver:
    """The phones and the remote SPA of one bench run, and their media sockets.

    Create it, give :attr:`spa_port` to the proxy as its upstream, start the proxy, then
    :meth:`start` with the proxy's inside port."""

    def __init__(self, pki: ua.BenchPki) -> None:
        self.pki = pki
        self.phone_media = ua.udp_socket()
        self.peer_media = ua.udp_socket()
        self.spa = ua.RemoteSpa(ua.udp_socket(), pki, self.peer_media.getsockname()[1])
        self.phones: ua.Phones | None = None
        self._next = 0
        self._phone_inbox = _Inbox()
        self._peer_inbox = _Inbox()
        self._transports: list[asyncio.BaseTransport] = []

    @property
    def spa_port(self) -> int:
        return self.spa.port

    async def start(self, proxy_inside: int) -> None:
        loop = asyncio.get_running_loop()
        await self.spa.start()
        self.phones = ua.Phones(
            ua.udp_socket(), (HOST, proxy_inside), self.phone_media.getsockname()[1]
        )
        await self.phones.start()
        for sock, inbox in ((self.phone_media, self._phone_inbox),
                            (self.peer_media, self._peer_inbox)):  # fmt: skip
            transport, _ = await loop.create_datagram_endpoint(
                lambda inbox=inbox: _MediaProtocol(inbox), sock=sock
            )
            self._transports.append(transport)

    def close(self) -> None:
        if self.phones is not None:
            self.phones.close()
        self.spa.close()
        for transport in self._transports:
            transport.close()
        if not self._transports:
            self.phone_media.close()
            self.peer_media.close()

    def _send_media(self, sock: socket.socket, data: bytes, port: int) -> None:
        with contextlib.suppress(OSError):  # a full socket buffer: counted as lost
            sock.sendto(data, (HOST, port))

    async def place(self, secure: bool, ssrc: int, timeout: float = 15.0) -> Pair | str:
        """One call; a secured one until the proxy sent the ``$`` caller ID. A
        :class:`Pair`, or why it failed."""
        phones = self.phones
        assert phones is not None, "start() first"
        index = self._next
        self._next += 1
        user = ua.LINE_USER if secure else ua.PLAIN_USER
        call = phones.call(index, user, ua.PEER_USER, 1, ssrc)
        waiter = self.spa.call_for(index)
        try:
            async with asyncio.timeout(timeout):
                await call.answered.wait()
                if call.status != 200:
                    self.spa.forget(index)
                    phones.calls.pop(call.call_id, None)
                    return f"INVITE answered {call.status}"
                peer = await waiter
                if call.proxy_media_port is None or peer.proxy_media_port is None:
                    phones.hang_up(call)
                    return "no media port in SDP"
                # the proxy starts stage 2 once the phone's RTP flows (profile §2)
                self._send_media(self.phone_media, rtp(0, ssrc, bytes(PAYLOAD_LEN)),
                                 call.proxy_media_port)  # fmt: skip
                if secure:
                    await peer.secured.wait()
                    await call.refreshed.wait()
                return Pair(secure, call, peer)
        except TimeoutError:
            phones.hang_up(call)
            if not call.answered.is_set():
                stage = "no answer"
            elif waiter.done() and waiter.result().clear_reason:
                stage = f"not secured ({waiter.result().clear_reason})"
            else:
                stage = "not secured"
            self.spa.forget(index)
            return f"timeout: {stage}"

    async def exchange(self, pair: Pair, packets: int, interval: float,
                       settle: float = 0.3) -> MediaResult:  # fmt: skip
        """``packets`` RTP packets each way, ``interval`` seconds apart, then wait up to
        ``settle`` s for the last to arrive; what arrived, checked."""
        phone_port, peer_port = pair.phone.proxy_media_port, pair.peer.proxy_media_port
        assert phone_port is not None and peer_port is not None
        to_phone = self._phone_inbox.by_port[phone_port] = []
        to_peer = self._peer_inbox.by_port[peer_port] = []
        session = pair.peer.session
        peer_ctx = None
        if pair.secure:
            assert session is not None
            peer_ctx = SrtpContext(session.keys.master_key, session.keys.master_salt)
        peer_ssrc = pair.peer.ssrc
        payload_up = bytes((pair.phone.index + j) & 0xFF for j in range(PAYLOAD_LEN))
        payload_down = bytes((pair.phone.index * 7 + j) & 0xFF for j in range(PAYLOAD_LEN))
        try:
            for seq in range(1, packets + 1):
                self._send_media(self.phone_media, rtp(seq, pair.phone.ssrc, payload_up),
                                 phone_port)  # fmt: skip
                down = rtp(seq, peer_ssrc, payload_down)
                if peer_ctx is not None:
                    down = peer_ctx.protect(down)
                self._send_media(self.peer_media, down, peer_port)
                await asyncio.sleep(interval)
            loop = asyncio.get_running_loop()
            until = loop.time() + settle
            while (len(to_phone) < packets or len(to_peer) < packets) and loop.time() < until:
                await asyncio.sleep(0.01)
        finally:
            self._phone_inbox.by_port.pop(phone_port, None)
            self._peer_inbox.by_port.pop(peer_port, None)
        good_phone = sum(1 for d in to_phone if d[12:] == payload_down)
        good_peer = bad_peer = 0
        for data in to_peer:
            if data[2:4] == b"\x00\x00" and len(data) == 12 + PAYLOAD_LEN:
                continue  # the phone's first packet (sequence 0), relayed before SRTP
            if _check_at_peer(data, peer_ctx, payload_up):
                good_peer += 1
            else:
                bad_peer += 1
        return MediaResult(packets, good_phone, good_peer, bad_peer)

    async def hang_up(self, pair: Pair, timeout: float = 10.0) -> bool:
        """The phone hangs up; True once the proxy answered its BYE with 200."""
        assert self.phones is not None
        return await ua.hang_up(self.phones, self.spa, pair.phone, timeout)


def _check_at_peer(data: bytes, ctx: SrtpContext | None, payload: bytes) -> bool:
    """What the SPA received is the phone's audio: under SRTP that authenticates
    (secured call) or in the clear (plain call)."""
    if ctx is not None:
        try:
            data = ctx.unprotect(data)
        except SrtpError:
            return False
    return len(data) == 12 + len(payload) and data[12:] == payload
