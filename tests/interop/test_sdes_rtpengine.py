"""rtpengine as the outside peer offering ``RTP/SAVP`` (SDES): the proxy answers with its
own key, SRTP flows on the outside leg, the phone gets plain RTP.

The far end is a plain RTP endpoint behind rtpengine (userspace only, loopback), which
turns it into RTP/SAVP with SDES keys of its own, as an SBC in front of a PBX does; the
SIP side of that far end is a small UAC in this test, over SIP/TLS (keys only travel
over TLS). The inside phone is the demo's plain phone (static contact, answers at once).
Every RTP payload is a (marker, sequence number) pattern, so each end checks that it
received exactly what the other sent, and the outside leg, captured with tshark, is
decrypted packet by packet with libsrtp (pylibsrtp) using the keys from the two SDPs:
rtpengine's key for what it sent, the proxy's key (from its answer) for what the proxy
sent. The secure-call tone is off here so that the phone's payloads stay exact.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pylibsrtp
import pytest
from secure_setup import PhoneSpec, TestPhone

from proxy.demo.phone import payload_for
from testkit.capture import Capture
from testkit.ports import HOST, free_port, media_range
from testkit.processes import Processes, until
from testkit.proxy import LocalProxy, dump_logs_on_failure
from testkit.rtpengine import Rtpengine, rtpengine_binary, start_rtpengine
from tests.x509ca import TestCa

pytestmark = pytest.mark.skipif(rtpengine_binary() is None, reason="rtpengine not installed")

LINE = "2001"
PHONE_MARKER, FAR_MARKER = 0x2001, 0xFA12
FAR_SSRC = 0x0FA2FA2F
MEDIA_SECONDS = 3.0
MIN_PACKETS = 100
PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}


# --------------------------------------------------------------------------- SDP


def sdp(port: int, protocol: str = "RTP/AVP") -> str:
    return (f"v=0\r\no=far 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {port} {protocol} 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
            "a=sendrecv\r\n")  # fmt: skip


def media_port(body: str) -> int:
    match = re.search(r"^m=audio (\d+) ", body, re.M)
    assert match, body
    return int(match.group(1))


@dataclass(frozen=True)
class Crypto:
    tag: int
    suite: str
    key_salt: bytes


def cryptos(body: str) -> list[Crypto]:
    found = []
    for tag, suite, inline in re.findall(r"^a=crypto:(\d+) (\S+) inline:([^|\s]+)", body, re.M):
        found.append(Crypto(int(tag), suite, base64.b64decode(inline + "=" * (-len(inline) % 4))))
    return found


def unprotect_all(packets: list[bytes], crypto: Crypto) -> list[bytes]:
    """Every packet through one libsrtp inbound session under ``crypto`` (in order)."""
    policy = pylibsrtp.Policy(key=crypto.key_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                              srtp_profile=PROFILES[crypto.suite])  # fmt: skip
    session = pylibsrtp.Session(policy=policy)
    return [session.unprotect(packet) for packet in packets]


# --------------------------------------------------------------------------- SIP over TLS


@dataclass
class TlsUac:
    """The far end's SIP: one dialog over one TLS connection to the proxy."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    call_id: str = field(default_factory=lambda: f"{uuid.uuid4().hex}@{HOST}")
    from_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    to: str = ""
    target: str = ""
    received: list[str] = field(default_factory=list)

    @property
    def local(self) -> tuple[str, int]:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def send(self, method: str, uri: str, cseq: int, body: str = "", to: str = "") -> None:
        host, port = self.local
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/TLS {host}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
            "Max-Forwards: 70",
            f"From: <sip:5550100@{HOST}>;tag={self.from_tag}",
            f"To: {to or f'<sip:{LINE}@{HOST}>'}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:5550100@{host}:{port};transport=tls>",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n" + body).encode())

    async def response(self, method: str, timeout: float = 10.0) -> tuple[int, str, str]:
        """The next final response to ``method``: (status, head, body)."""
        while True:
            head = (await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)).decode()
            length = int(re.search(r"^content-length:\s*(\d+)", head, re.I | re.M)[1])  # type: ignore[index]
            body = (await self.reader.readexactly(length)).decode() if length else ""
            self.received.append(head + body)
            if not head.startswith("SIP/2.0 "):
                continue  # a request from the proxy: not expected in this test
            status = int(head.split()[1])
            cseq = re.search(r"^cseq:\s*\d+\s+(\S+)", head, re.I | re.M)
            if status >= 200 and cseq and cseq[1] == method:
                return status, head, body


# --------------------------------------------------------------------------- the far end's RTP


class FarRtp(asyncio.DatagramProtocol):
    """The plain endpoint behind rtpengine: sends its pattern, records what it gets."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[bytes] = []
        self.dest: tuple[str, int] | None = None
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)

    async def send_for(self, seconds: float) -> None:
        assert self.transport is not None and self.dest is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        seq = 1000
        while loop.time() < start + seconds:
            header = seq.to_bytes(2, "big")
            packet = (b"\x80\x00" + header + (seq * 160).to_bytes(4, "big")
                      + FAR_SSRC.to_bytes(4, "big") + payload_for(seq, FAR_MARKER))  # fmt: skip
            self.transport.sendto(packet, self.dest)
            self.sent += 1
            seq += 1
            await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the test


@dataclass
class Rig:
    tmp: Path
    procs: Processes
    proxy: LocalProxy
    tls_port: int
    rtpengine: Rtpengine
    capture: Capture
    ca: TestCa
    phone: PhoneSpec


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    procs = Processes()
    phone = PhoneSpec("Rita Rtpengine", LINE, PHONE_MARKER)
    try:
        rtpengine = start_rtpengine(procs, tmp_path)
        proxy = LocalProxy("proxy", tmp_path, media=media_range(4))
        tls_port = free_port()
        ca = TestCa(tmp_path)
        issued = ca.issue("proxy", ips=(HOST,))
        proxy.write_config(
            lines=[{"user_id": LINE, "contact": phone.contact}],
            sip={"transports": ["udp", "tls"]},
            tls={"certificate": str(issued.certificate), "private_key": f"@{issued.key}",
                 "ca": str(ca.pem)},
            outside={"tls_listen": f"{HOST}:{tls_port}"},
            xsipura={"tone": False},
        )  # fmt: skip
        bpf = (f"udp and (portrange {proxy.media[0]}-{proxy.media[1]} or "
               f"portrange {rtpengine.ports[0]}-{rtpengine.ports[1]})")  # fmt: skip
        capture = Capture(tmp_path / "media.pcapng", bpf)
        capture.start(procs)
        proxy.run(procs)
        capture.wait_ready()
        yield Rig(tmp_path, procs, proxy, tls_port, rtpengine, capture, ca, phone)
    finally:
        procs.stop_all()
        phone.close()


@dataclass
class Outcome:
    offer: str
    """rtpengine's RTP/SAVP offer (what the proxy received)."""
    answer: str
    """The proxy's answer (what rtpengine received)."""
    call: dict[str, Any]
    far: FarRtp
    phone: TestPhone


ALL_SUITES = ["AEAD_AES_256_GCM", "AEAD_AES_128_GCM", "AES_256_CM_HMAC_SHA1_80",
              "AES_256_CM_HMAC_SHA1_32", "AES_192_CM_HMAC_SHA1_80", "AES_192_CM_HMAC_SHA1_32",
              "AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32", "F8_128_HMAC_SHA1_80",
              "F8_128_HMAC_SHA1_32", "NULL_HMAC_SHA1_80", "NULL_HMAC_SHA1_32"]  # fmt: skip
"""What rtpengine 10.5 offers by default, in its order."""


@pytest.mark.parametrize("only", [None, "AES_CM_128_HMAC_SHA1_32"], ids=["all-suites", "_32"])
def test_rtpengine_offers_savp_the_proxy_answers_with_its_own_key(
    rig: Rig, only: str | None
) -> None:
    """Offered every suite rtpengine has (the proxy takes the first it supports,
    AES_CM_128_HMAC_SHA1_80), or only AES_CM_128_HMAC_SHA1_32."""
    sdes = [] if only is None else [f"no-{suite}" for suite in ALL_SUITES if suite != only]
    with dump_logs_on_failure(rig.proxy):
        outcome = asyncio.run(asyncio.wait_for(_call(rig, sdes), 40))
    rig.capture.stop()

    # SIP: RTP/SAVP both ways on the outside, the proxy's own key, a suite rtpengine offered.
    assert " RTP/SAVP " in outcome.offer and " RTP/SAVP " in outcome.answer
    (ours,) = cryptos(outcome.answer)
    theirs = {c.tag: c for c in cryptos(outcome.offer)}[ours.tag]
    assert ours.suite == theirs.suite and ours.suite in PROFILES
    print("rtpengine offered", [c.suite for c in cryptos(outcome.offer)], "; taken:", ours.suite)
    assert ours.key_salt != theirs.key_salt and len(ours.key_salt) == 30
    assert ours.suite == (only or "AES_CM_128_HMAC_SHA1_80")
    assert outcome.call["method"] == "sdes", outcome.call
    (invite,) = outcome.phone.requests_named("INVITE")  # the phone sees plain RTP/AVP only
    assert b"a=crypto" not in invite.body and b" RTP/AVP " in invite.body

    # The phone got plain RTP: exactly what the far end sent, in the clear.
    phone = outcome.phone
    assert phone.rx.packets >= MIN_PACKETS and phone.rx.altered == 0, phone.rx
    assert phone.rx.intact == phone.rx.packets
    # The far end got exactly the phone's audio (rtpengine decrypted the proxy's SRTP).
    far_rtp = [p for p in outcome.far.received if p[1] & 0x7F == 0]  # PCMU, not RTCP
    assert len(far_rtp) >= MIN_PACKETS
    assert all(
        p[12:] == payload_for(int.from_bytes(p[2:4], "big"), PHONE_MARKER) for p in far_rtp
    ), "the far end got something else than the phone's audio"

    # The wire between rtpengine and the proxy: SRTP each way, decrypted with the SDP keys.
    proxy_port, rtpe_port = media_port(outcome.answer), media_port(outcome.offer)
    legs = {("rtpengine", "proxy"): (rtpe_port, proxy_port, theirs, FAR_MARKER),
            ("proxy", "rtpengine"): (proxy_port, rtpe_port, ours, PHONE_MARKER)}  # fmt: skip
    for name, (src, dst, crypto, marker) in legs.items():
        rows = rig.capture.fields(f"udp.srcport=={src} && udp.dstport=={dst}", "udp.payload")
        packets = [bytes.fromhex(row[0].replace(":", "")) for row in rows]
        assert len(packets) >= MIN_PACKETS, (name, len(packets))
        tag = 10 if crypto.suite.endswith("_80") else 4
        assert all(len(p) == 172 + tag for p in packets), name
        assert not any(p[12:172] == payload_for(int.from_bytes(p[2:4], "big"), marker)
                       for p in packets), f"{name}: plain RTP on the outside leg"  # fmt: skip
        clear = unprotect_all(packets, crypto)
        assert all(c[12:] == payload_for(int.from_bytes(c[2:4], "big"), marker) for c in clear)
        print(f"{name}: {len(packets)} SRTP packets, {crypto.suite}, all decrypted")


async def _call(rig: Rig, sdes: list[str]) -> Outcome:
    ng = rig.rtpengine.ng
    loop = asyncio.get_running_loop()
    far_transport, far = await loop.create_datagram_endpoint(FarRtp, local_addr=(HOST, 0))
    phone = rig.phone.make(peer_marker=FAR_MARKER)
    await phone.start()
    try:
        far_port = far_transport.get_extra_info("sockname")[1]
        call_id = f"rtpe-{uuid.uuid4().hex}"
        common = {"call-id": call_id, "from-tag": "far-tag", "ICE": "remove", "DTLS": "off",
                  "replace": ["origin", "session-connection"]}  # fmt: skip
        offer = ng.cmd("offer", sdp=sdp(far_port), **common,
                       **{"transport-protocol": "RTP/SAVP", "SDES": sdes})["sdp"]  # fmt: skip

        context = ssl.create_default_context(cafile=str(rig.ca.pem))
        reader, writer = await asyncio.open_connection(HOST, rig.tls_port, ssl=context,
                                                       server_hostname=HOST)  # fmt: skip
        uac = TlsUac(reader, writer)
        uri = f"sip:{LINE}@{HOST}:{rig.tls_port};transport=tls"
        uac.send("INVITE", uri, 1, offer)
        status, head, answer = await uac.response("INVITE")
        assert status == 200, uac.received
        to = re.search(r"^to:\s*(.+)$", head, re.I | re.M)[1].strip()  # type: ignore[index]
        contact = re.search(r"^contact:\s*<([^>]+)>", head, re.I | re.M)[1]  # type: ignore[index]
        uac.send("ACK", contact, 1, to=to)
        to_tag = to.rsplit("tag=", 1)[1]
        back = ng.cmd("answer", sdp=answer, **common, **{"to-tag": to_tag})["sdp"]
        far.dest = (HOST, media_port(back))

        await far.send_for(MEDIA_SECONDS)
        calls = rig.proxy.calls()
        assert len(calls) == 1, calls
        uac.send("BYE", contact, 2, to=to)
        status, _, _ = await uac.response("BYE")
        assert status == 200
        await until(phone.ended.is_set, 5, "the phone to get the BYE")
        writer.close()
        ng.cmd("delete", **{"call-id": call_id})
        return Outcome(offer, answer, calls[0], far, phone)
    finally:
        phone.close()
        far_transport.close()
