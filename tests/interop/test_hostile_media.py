"""Hostile packets against secured calls through a real ``sipura-proxy run``.

The far end is the independent x-sipura UA (``xsipura_ua.py``) calling a line whose phone
is a :class:`secure_setup.TestPhone`; the proxy is the x-sipura callee and relays in
its media worker processes. The attacker is this test, on 127.0.0.1:

* forged SRTP and fuzz during the switch-over's grace window, sent from the UA's own
  address (an attacker who can put packets on the latched source): nothing reaches the
  phone (the relay's plain-window rules, ``proxy/media/grace.py``);
* RTP sent to the proxy's inside RTCP port of a secured call with SRTCP off: nothing
  leaves on the outside, and what RTCP does leave is SR/RR/SDES/BYE only
  (``proxy/media/rtcp.py``);
* a packet from the far end's IP on another port, before the far end's first packet:
  the far end's own SDP address takes the stream back with its first packet.

Each test prints its figures (``-s`` shows them), the numbers quoted in the docs.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import xsipura_ua
from prometheus_client.parser import text_string_to_metric_families
from secure_setup import (
    HOST,
    UA_NAME,
    UA_NUMBER,
    UA_TAG,
    Line,
    PhoneSpec,
    Pki,
    ProxyProc,
    TestPhone,
    UpstreamRig,
    Watcher,
    dump_on_failure,
    leg_stats,
)
from xsipura_ua import Call, Subscriber, XsipuraUA

from proxy.admin.client import fetch
from proxy.sip.sdp import connection_endpoint, parse_sdp
from testkit.ports import reserve_udp
from testkit.processes import processes, until
from testkit.proxy import start_proxies

GRACE_MS = 3000
"""Long enough for a test to act inside the window after seeing the switch-over."""
SHORT_TONE = "397@-19,507@-19;0.4(.2/.1/1,.1/0/2)"
LINES = {  # scenario: (name, number)
    "grace": ("Gina Grace", "14155550201"),
    "rtcp": ("Ross Rtcp", "14155550202"),
    "hijack": ("Hank Hijack", "14155550203"),
}
GRACE_DROPS = ("grace_not_rtp", "grace_wrong_ssrc", "grace_bad_sequence")
Stats = dict[str, Any]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 40.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRig]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    expiry = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    rig = UpstreamRig(pki, ProxyProc("H", tmp_path_factory.mktemp("hostile")), reserve_udp(),
                      Subscriber.issue(pki.ca, UA_NAME, UA_NUMBER, expiry))  # fmt: skip
    lines = []
    for index, (key, (name, number)) in enumerate(LINES.items()):
        spec = rig.phones[key] = PhoneSpec(name, number, 0xD0 + index)
        lines.append(Line(number, pki.line_mc(name, number), contact=spec.contact))
    settings = {"grace_ms": GRACE_MS, "handshake_timeout_ms": 3000, "tone": SHORT_TONE}
    rig.proxy.configure(lines, upstream=rig.ua_port, xsipura=settings)
    with processes() as procs:
        start_proxies(procs, rig.proxy)
        yield rig
    rig.ua_socket.close()
    for spec in rig.phones.values():
        spec.close()


class RawPhone(TestPhone):
    """A test phone that also keeps every datagram its RTP port received, RTP or not."""

    __test__ = False

    def __init__(self, spec: PhoneSpec) -> None:
        super().__init__(spec, peer_tag=UA_TAG)
        self.datagrams: list[tuple[float, bytes]] = []

    def on_rtp(self, data: bytes) -> None:
        self.datagrams.append((time.monotonic(), data))
        super().on_rtp(data)

    def proxy_rtp_port(self) -> int:
        """The proxy's inside RTP port of the call, from the INVITE the phone got."""
        invite = self.requests_named("INVITE")[0]
        return connection_endpoint(parse_sdp(invite.body), 0).rtp_port


async def call_line(rig: UpstreamRig, ua: XsipuraUA, spec: PhoneSpec, *, quiet: bool = False
                    ) -> Call:  # fmt: skip
    """The UA calls ``spec``'s line on the proxy's outside port; ``quiet``: its media
    sends nothing until the test says so (``call.media.sending = True``)."""
    known = set(ua.calls)
    placing = asyncio.ensure_future(ua.call(f"sip:{spec.user}@{HOST}:{rig.proxy.outside}",
                                            dest=(HOST, rig.proxy.outside)))  # fmt: skip
    while not (set(ua.calls) - known) and not placing.done():
        await asyncio.sleep(0)  # the Call exists before the INVITE leaves
    (call_id,) = set(ua.calls) - known
    call = ua.calls[call_id]
    call.media.sending = not quiet
    await placing
    assert call.status == 200, call.status
    return call


def send_as(call: Call, data: bytes) -> None:
    """A packet from the UA's own RTP address to the proxy: what an attacker who can put
    packets on the latched source (on the path, or spoofing it) sends."""
    transport = call.media._transport
    assert transport is not None and call.media.remote is not None
    transport.sendto(data, call.media.remote)


def rtp(seq: int, ssrc: int, payload: bytes) -> bytes:
    return struct.pack(">BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + payload


async def settled(watcher: Watcher, line: str, side: str, count: Callable[[Stats], int],
                  expected: int) -> Stats:  # fmt: skip
    """Stream 0 counters of ``side`` once ``count`` of them reaches ``expected`` (a media
    worker pushes its counters every 100 ms), and a moment later, so that a count that
    would go on past ``expected`` is seen doing so."""
    stats: Stats = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        call = await watcher.fresh_call(line)
        stats = leg_stats(call, side) if call else {}
        if stats and count(stats) >= expected:
            break
    await asyncio.sleep(0.3)
    call = await watcher.fresh_call(line)
    assert call is not None, f"no call of line {line} in /status"
    return leg_stats(call, side)


def grace_drops(stats: Stats) -> int:
    return sum(stats["drops"][reason] for reason in GRACE_DROPS)


def drop(reason: str) -> Callable[[Stats], int]:
    return lambda stats: int(stats["drops"][reason])


# ======================================================================================
# Forged SRTP and fuzz in the grace window
# ======================================================================================


def test_forged_srtp_and_fuzz_in_the_grace_window_never_reach_the_phone(rig: UpstreamRig
                                                                          ) -> None:  # fmt: skip
    with dump_on_failure(rig.proxy):
        run(_grace(rig))


async def _grace(rig: UpstreamRig) -> None:
    spec = rig.phones["grace"]
    phone = RawPhone(spec)
    rng = random.Random(0x13)
    ua_options = {"name": "ua-grace", "grace": GRACE_MS / 1000, "stage2_delay": 1.5}
    async with rig.ua(**ua_options) as ua, Watcher(rig.proxy) as watcher:
        await phone.start()
        try:
            call = await call_line(rig, ua, spec)
            # Its plain stream reaches the phone through the proxy (the reference of the
            # plain window) before stage 2 starts, 1.5 s after the answer.
            await until(lambda: len(phone.rtp) >= 5, 5, "the UA's plain RTP at the phone")
            call.media.sending = False  # the peer's SRTP is late: the window stays open
            assert call.media.tx_srtp == 0, "the UA switched before the test paused it"
            assert await call.wait_outcome(5) == "secure", call.reason
            await asyncio.sleep(0.1)  # the last of the UA's plain packets has arrived
            quiet = len(phone.datagrams)
            last = phone.rtp[-1].seq  # the UA's last plain packet: the proxy's reference
            ssrc = call.media.ssrc
            junk = [rng.randbytes(rng.randrange(1, 300)) for _ in range(20)]  # fuzz
            junk += [rtp(last + 1 + i, ssrc ^ 0x5A5A, rng.randbytes(160)) for i in range(10)]
            junk += [rtp(last + 1000 + i, ssrc, rng.randbytes(160)) for i in range(10)]
            for data in junk:
                send_as(call, data)
                await asyncio.sleep(0.003)
            in_window = await settled(watcher, spec.user, "outside", grace_drops, len(junk))
            leaked = phone.datagrams[quiet:]
            print(f"\ngrace window open: {len(leaked)}/{len(junk)} fuzz and off-stream "
                  f"packets reached the phone; drops {_drops(in_window)}")  # fmt: skip
            assert leaked == []
            assert grace_drops(in_window) == len(junk), in_window
            assert in_window["drops"]["grace_bad_sequence"] == 10, in_window
            assert in_window["grace_ssrc"] == ssrc and in_window["grace_seq"] == last

            # The peer's SRTP: its first authenticated packet closes the window. Forged
            # SRTP with its SSRC and sequence numbers just ahead of its own, sent well
            # before the window's deadline, is an authentication failure, not audio.
            call.media.sending = True
            since = len(phone.rtp)
            await until(lambda: len(phone.rtp) >= since + 5, 5, "the UA's SRTP at the phone")
            ahead = phone.rtp[-1].seq + 100
            forged = [rtp(ahead + i, ssrc, rng.randbytes(170)) for i in range(50)]
            for data in forged:
                send_as(call, data)
                await asyncio.sleep(0.003)
            after = await settled(watcher, spec.user, "outside", drop("srtp_auth"), len(forged))
            payloads = {data[12:] for data in forged}
            delivered = sum(1 for p in phone.rtp[since:] if p.payload in payloads)
            foreign = [p for p in phone.rtp[since:] if not phone.intact(p)
                       and not phone.tone_only(p)]  # fmt: skip
            print(f"after the peer's first SRTP packet: {delivered}/{len(forged)} forged "
                  f"SRTP packets reached the phone; drops {_drops(after)}")  # fmt: skip
            assert delivered == 0 and foreign == []
            assert after["drops"]["srtp_auth"] >= len(forged), after
            assert grace_drops(after) == len(junk), after
            assert len(phone.datagrams) == len(phone.rtp)  # and nothing that is not RTP
            assert call.media.counters["srtp_auth_fail"] == 0  # the UA got clean SRTP
        finally:
            phone.close()


def _drops(stats: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in stats.get("drops", {}).items() if v}


# ======================================================================================
# RTCP ports
# ======================================================================================


@pytest.fixture
def ua_rtcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UA keeps every RTCP datagram it receives (``media.rtcp_log``)."""

    def record(self: xsipura_ua.Media, data: bytes, addr: tuple[str, int]) -> None:
        self.rtcp_rx += 1
        self.__dict__.setdefault("rtcp_log", []).append(data)

    monkeypatch.setattr(xsipura_ua.Media, "_on_rtcp", record)


def test_rtp_to_the_inside_rtcp_port_never_leaves_in_the_clear(rig: UpstreamRig, ua_rtcp: None
                                                               ) -> None:  # fmt: skip
    with dump_on_failure(rig.proxy):
        run(_rtcp(rig))


def sender_report(ssrc: int) -> bytes:
    sr = struct.pack(">BBHIIIIII", 0x80, 200, 6, ssrc, 1, 2, 3, 4, 5)
    sdes = struct.pack(">BBHI", 0x81, 202, 3, ssrc) + b"\x01\x05phone\x00"
    return sr + sdes


async def _rtcp(rig: UpstreamRig) -> None:
    spec = rig.phones["rtcp"]
    phone = RawPhone(spec)
    async with rig.ua(name="ua-rtcp") as ua, Watcher(rig.proxy) as watcher:
        await phone.start()
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the phone's IP
        try:
            attacker.bind((HOST, 0))
            call = await call_line(rig, ua, spec)
            assert await call.wait_outcome(5) == "secure", call.reason
            await watcher.wait_secure_state(spec.user)
            inside_rtcp = (HOST, phone.proxy_rtp_port() + 1)
            for seq in range(20):  # the phone's audio, misdirected to the RTCP port
                attacker.sendto(rtp(seq, phone.ssrc, b"\x55" * 160), inside_rtcp)
                await asyncio.sleep(0.003)
            stats = await settled(watcher, spec.user, "inside", drop("rtcp_invalid"), 20)
            log: list[bytes] = call.media.__dict__.get("rtcp_log", [])
            print(f"\n{len(log)}/20 RTP packets sent to the inside RTCP port left the proxy; "
                  f"inside drops {_drops(stats)}")  # fmt: skip
            assert log == []
            assert stats["drops"]["rtcp_invalid"] == 20, stats

            # Real RTCP passes, without its APP packet: SRTCP is off, x-sipura is on.
            app = struct.pack(">BBHI", 0x80, 204, 4, phone.ssrc) + b"name" + b"LEAK" * 2
            attacker.sendto(sender_report(phone.ssrc) + app, inside_rtcp)
            await until(lambda: call.media.__dict__.get("rtcp_log"), 3, "RTCP at the UA")
            assert call.media.__dict__["rtcp_log"] == [sender_report(phone.ssrc)]
            outside = await settled(watcher, spec.user, "outside", drop("rtcp_stripped"), 1)
            print(f"SR+SDES+APP toward the secured side: SR+SDES arrived; outside drops "
                  f"{_drops(outside)}")  # fmt: skip
            assert outside["drops"]["rtcp_stripped"] == 1, outside
            metrics = await asyncio.to_thread(media_drops, rig.proxy)
            assert metrics["rtcp_invalid"] >= 20 and metrics["rtcp_stripped"] >= 1, metrics
            assert {"grace_not_rtp", "grace_wrong_ssrc", "grace_bad_sequence"} <= set(metrics)
        finally:
            attacker.close()
            phone.close()


def media_drops(proxy: ProxyProc) -> dict[str, float]:
    """``sipura_media_drops_total`` by reason, from the proxy's ``/metrics``."""
    status, body = fetch(HOST, proxy.admin, "GET", "/metrics", token=proxy.token)
    assert status == 200, status
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "sipura_media_drops_total"
    }


# ======================================================================================
# Media hijack before the peer's first packet
# ======================================================================================


class Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.append((time.monotonic(), data))


def test_the_peers_sdp_address_takes_its_stream_back_from_a_squatter(rig: UpstreamRig) -> None:
    with dump_on_failure(rig.proxy):
        run(_hijack(rig))


ATTACK = b"\xaa" * 160


async def _hijack(rig: UpstreamRig) -> None:
    spec = rig.phones["hijack"]
    phone = RawPhone(spec)
    loop = asyncio.get_running_loop()
    async with rig.ua(name="ua-hijack", stage2_delay=2.0) as ua, Watcher(rig.proxy) as watcher:
        await phone.start()
        transport, attacker = await loop.create_datagram_endpoint(Recorder, local_addr=(HOST, 0))
        try:
            call = await call_line(rig, ua, spec, quiet=True)  # the UA has not spoken yet
            assert call.media.remote is not None
            outside = call.media.remote  # the proxy's outside RTP address, from its SDP
            for seq in range(10):  # the UA's IP, another port, first
                transport.sendto(rtp(seq, 0xBAD, ATTACK), outside)
                await asyncio.sleep(0.02)
            await until(lambda: len(attacker.received) >= 3, 3, "the phone's RTP at the squatter")
            squatted = sum(1 for p in phone.rtp if p.payload == ATTACK)

            call.media.sending = True  # the UA speaks, from its SDP address
            await until(lambda: any(phone.intact(p) for p in phone.rtp), 3, "the UA at the phone")
            await asyncio.sleep(0.1)  # (the phone's packets in flight to the squatter)
            taken_back = time.monotonic()
            for seq in range(10, 60):
                transport.sendto(rtp(seq, 0xBAD, ATTACK), outside)
                await asyncio.sleep(0.02)
            stats = await settled(watcher, spec.user, "outside", drop("wrong_source"), 50)
            to_phone = sum(1 for p in phone.rtp if p.at >= taken_back and p.payload == ATTACK)
            to_attacker = sum(1 for at, _ in attacker.received if at >= taken_back)
            print(f"\nbefore the UA's first packet ('sdp' latch: any port of its IP): "
                  f"{squatted}/10 squatter packets reached the phone; after it: "
                  f"{to_phone}/50, and {to_attacker} of the phone's packets reached the "
                  f"squatter; outside relatched={stats['relatched']} "
                  f"drops {_drops(stats)}")  # fmt: skip
            assert to_phone == 0 and to_attacker == 0
            assert stats["relatched"] == 1 and stats["drops"]["wrong_source"] >= 50, stats
            # The call then goes secure with the UA, the phone's audio going to it.
            assert await call.wait_outcome(6) == "secure", call.reason
            secured = sum(1 for p in call.media.received if p.secure)
            assert await call.wait_rx(secured + 10, 3, secure=True)
            assert all(at < taken_back for at, _ in attacker.received)
        finally:
            transport.close()
            phone.close()
