"""The in-process media relay (proxy.media.relay) over real UDP sockets on loopback.

Every test runs on the stdlib loop and, when installed, on uvloop: the relay must behave
the same on both. Peers are plain asyncio datagram endpoints; "nothing arrives" is
checked by sending a packet that must arrive after it on the same path, where possible,
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

from proxy.media.commands import (
    AcceptSrtp,
    ClearSrtp,
    MediaEvent,
    PlayTone,
    Release,
    SetRemote,
    SetSrtp,
    SetTxSsrc,
    SrtpAuthenticated,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.counters import COUNTERS
from proxy.media.engine import DROP_REASONS, MediaEngine, Side
from proxy.media.ports import PortsExhausted
from proxy.media.relay import RelayEngine, RelaySession
from proxy.media.relay_leg import RelayLeg, flush_noise
from proxy.media.srtp import SrtpContext
from proxy.media.tones import Tone
from testkit.ports import media_range as free_range

HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"  # also loopback on Linux: "another machine" for source checks
INSIDE, OUTSIDE = Side.INSIDE, Side.OUTSIDE
KEY = bytes(range(16))
SALT = bytes(range(16, 32))

Runner = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])

pytestmark = pytest.mark.usefixtures("relay_path")  # every test on each packet path


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Runner:
    async def guarded(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await asyncio.wait_for(test(), 10)
        finally:
            while PEERS:
                PEERS.pop().close()
            await asyncio.sleep(0.01)

    def runner(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if request.param == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                r.run(guarded(test))
        else:
            asyncio.run(guarded(test))

    return runner


def rtp(seq: int, ssrc: int = 0x11223344, pt: int = 0, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq, seq * 160, ssrc) + payload


def rtcp_sr(ssrc: int = 0x11223344) -> bytes:
    """A minimal RTCP sender report (PT 200), 28 bytes."""
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 0, 0, 0, 0, 0)


def make_engine(pairs: int = 8, pool: int = 256) -> RelayEngine:
    return RelayEngine(HOST, HOST, *free_range(pairs), pool_pairs=pool)


def free(engine: RelayEngine) -> int:
    """Pairs an allocation can have: free in the allocator or pooled for reuse."""
    return engine.ports.available + engine.pooled


COUNTS = frozenset(COUNTERS) - {"grace_ssrc", "grace_seq"}
"""The counters of a leg (the rest of its stats is state)."""

POOLS = pytest.mark.parametrize("pool", [0, 256], ids=["unpooled", "pooled"])


class Peer(asyncio.DatagramProtocol):
    """A phone's or a PBX's socket."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port

    @property
    def ip(self) -> str:
        assert self.transport is not None
        ip: str = self.transport.get_extra_info("sockname")[0]
        return ip

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), 2)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


PEERS: list[Peer] = []
"""Peers of the running test, closed when it ends."""


async def peer(host: str = HOST) -> Peer:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Peer, local_addr=(host, 0))
    PEERS.append(protocol)
    return protocol


async def settle() -> None:
    """Let the relay process what is already in its socket buffers (loopback is
    synchronous: a datagram is queued on the receiver before sendto returns)."""
    for _ in range(5):
        await asyncio.sleep(0.01)


def stat(session: RelaySession, side: Side, key: str, index: int = 0) -> int:
    counters = session.stats()[side][index]
    if key in counters:
        value = counters[key]  # type: ignore[literal-required]
        assert isinstance(value, int)
        return value
    return counters["drops"][key]


async def call(engine: RelayEngine) -> tuple[RelaySession, Peer, Peer]:
    """A one-stream call with a phone inside and a PBX outside, both remotes set."""
    session = engine.allocate("call-1", 1)
    phone, pbx = await peer(), await peer()
    engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1))
    engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
    return session, phone, pbx


# --------------------------------------------------------------------------- relaying


def test_relay_both_ways_with_counters(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        assert inside[0] == outside[0] == HOST and inside[1] != outside[1]
        assert inside[1] % 2 == 0 and outside[1] % 2 == 0

        for seq in range(3):
            phone.send(rtp(seq), inside)
            data, source = await pbx.recv()
            assert data == rtp(seq)
            assert source == outside  # from the proxy's outside port: symmetric RTP
        pbx.send(rtp(7, ssrc=0x99), outside)
        data, source = await phone.recv()
        assert (data, source) == (rtp(7, ssrc=0x99), inside)

        stats = session.stats()
        assert set(stats) == {INSIDE, OUTSIDE}
        size = len(rtp(0))
        assert stats[INSIDE][0]["packets_in"] == 3 and stats[INSIDE][0]["bytes_in"] == 3 * size
        assert stats[OUTSIDE][0]["packets_out"] == 3 and stats[OUTSIDE][0]["bytes_out"] == 3 * size
        assert stats[OUTSIDE][0]["packets_in"] == 1 and stats[INSIDE][0]["packets_out"] == 1
        for side in (INSIDE, OUTSIDE):
            assert stats[side][0]["drops"] == dict.fromkeys(DROP_REASONS, 0)
        await engine.close()

    run(test)


def test_rtcp_is_relayed_between_rtcp_ports(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone_rtcp, pbx_rtcp = await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone_rtcp.port - 1, phone_rtcp.port))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx_rtcp.port - 1, pbx_rtcp.port))
        ip, inside_rtp = session.local(INSIDE, 0)
        outside_rtcp = (ip, session.local(OUTSIDE, 0)[1] + 1)
        phone_rtcp.send(rtcp_sr(), (ip, inside_rtp + 1))
        assert await pbx_rtcp.recv() == (rtcp_sr(), outside_rtcp)
        pbx_rtcp.send(rtcp_sr(5), outside_rtcp)
        assert (await phone_rtcp.recv())[0] == rtcp_sr(5)
        assert stat(session, INSIDE, "rtcp_packets_in") == 1
        assert stat(session, OUTSIDE, "rtcp_packets_out") == 1
        assert stat(session, OUTSIDE, "rtcp_packets_in") == 1
        await engine.close()

    run(test)


def test_rtcp_mux_on_one_side(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, pbx, pbx_rtcp = await peer(), await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port, rtcp_mux=True))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        inside = session.local(INSIDE, 0)
        outside_ip, outside_rtp = session.local(OUTSIDE, 0)

        phone.send(rtp(1), inside)  # RTP on the muxed port goes to the PBX's RTP port
        assert (await pbx.recv())[0] == rtp(1)
        phone.send(rtcp_sr(), inside)  # RTCP on the muxed port goes to the PBX's RTCP port
        assert await pbx_rtcp.recv() == (rtcp_sr(), (outside_ip, outside_rtp + 1))
        pbx_rtcp.send(rtcp_sr(9), (outside_ip, outside_rtp + 1))  # and back on the RTP port
        assert await phone.recv() == (rtcp_sr(9), inside)
        assert pbx.queue.empty()
        assert stat(session, INSIDE, "rtcp_packets_in") == 1
        assert stat(session, INSIDE, "rtcp_packets_out") == 1
        assert stat(session, INSIDE, "packets_in") == 2
        await engine.close()

    run(test)


# --------------------------------------------------------------------------- latching


def test_latching_follows_nat_port_then_drops_other_sources(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, sdp_phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)

        # Before any packet from the phone, the relay sends where the SDP said.
        pbx.send(rtp(1), outside)
        assert (await sdp_phone.recv())[0] == rtp(1)

        # Not the SDP's IP: dropped, never latched.
        stranger = await peer(OTHER_HOST)
        stranger.send(rtp(666), inside)
        # The phone is behind a port-rewriting NAT: same IP, another port. It latches.
        natted = await peer()
        natted.send(rtp(2), inside)
        assert (await pbx.recv())[0] == rtp(2)
        assert stat(session, INSIDE, "wrong_source") == 1

        # Replies now go to the latched address, not the SDP's.
        pbx.send(rtp(3), outside)
        assert await natted.recv() == (rtp(3), inside)
        assert sdp_phone.queue.empty()

        # After latching, any other source is dropped: no injection ...
        stranger.send(rtp(668), inside)
        natted.send(rtp(4), inside)
        assert (await pbx.recv())[0] == rtp(4)
        assert stat(session, INSIDE, "wrong_source") == 2
        # ... except the exact SDP address and port, which always wins the latch (a peer
        # on another port of the phone's IP must not keep the stream).
        sdp_phone.send(rtp(5), inside)
        assert (await pbx.recv())[0] == rtp(5)
        pbx.send(rtp(6), outside)
        assert await sdp_phone.recv() == (rtp(6), inside)
        natted.send(rtp(667), inside)
        sdp_phone.send(rtp(7), inside)
        assert (await pbx.recv())[0] == rtp(7)
        assert stat(session, INSIDE, "wrong_source") == 3
        assert stat(session, INSIDE, "packets_in") == 4
        assert stat(session, INSIDE, "relatched") == 1
        await engine.close()

    run(test)


def test_wrong_source_drops_are_logged_rate_limited_per_source(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sipura.media")

    async def test() -> None:
        engine = make_engine()
        flush_noise(engine.clock() + 3600)  # windows other tests opened (one per process)
        caplog.clear()
        session, sdp_phone, pbx = await call(engine)
        inside = session.local(INSIDE, 0)
        sdp_phone.send(rtp(1), inside)  # latches
        assert (await pbx.recv())[0] == rtp(1)
        stranger, other = await peer(OTHER_HOST), await peer()
        for seq in range(50):
            stranger.send(rtp(100 + seq), inside)
        other.send(rtp(200), inside)
        sdp_phone.send(rtp(2), inside)
        assert (await pbx.recv())[0] == rtp(2)
        await settle()
        assert stat(session, INSIDE, "wrong_source") == 51
        lines = [r.getMessage() for r in caplog.records if "not the peer" in r.getMessage()]
        assert len(lines) == 2, lines  # one per source address, not one per packet
        assert lines[0].startswith(f"media: RTP from {OTHER_HOST}:{stranger.port} dropped on ")
        assert lines[0].endswith(f"(latched {HOST}:{sdp_phone.port})")
        caplog.clear()
        flush_noise(engine.clock() + 10.0)  # the window closes: the count comes out
        assert [r.getMessage() for r in caplog.records] == [
            f"49 more wrong-source media from {OTHER_HOST} suppressed in the last 10 s"
        ]
        await engine.close()

    run(test)


def test_packets_before_the_remote_is_known(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, pbx = await peer(), await peer()
        inside = session.local(INSIDE, 0)
        phone.send(rtp(1), inside)  # nobody expected on the inside yet: not ours
        await settle()
        assert stat(session, INSIDE, "wrong_source") == 1

        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1))
        phone.send(rtp(2), inside)  # accepted, but nowhere to send it
        await settle()
        assert stat(session, INSIDE, "packets_in") == 1
        assert stat(session, OUTSIDE, "no_destination") == 1

        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        phone.send(rtp(3), inside)
        assert (await pbx.recv())[0] == rtp(3)
        await engine.close()

    run(test)


def test_hold_and_resume(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        phone.send(rtp(1), inside)
        assert (await pbx.recv())[0] == rtp(1)
        pbx.send(rtp(1), outside)
        await phone.recv()

        # The PBX puts the call on hold, old style (c=0.0.0.0) ...
        engine.apply(SetRemote(session.id, OUTSIDE, 0, "0.0.0.0", pbx.port, pbx.port + 1))
        phone.send(rtp(2), inside)
        # ... but still sends music on hold from where it was: relayed to the phone.
        pbx.send(rtp(50), outside)
        assert (await phone.recv())[0] == rtp(50)
        assert stat(session, OUTSIDE, "no_destination") == 1

        # ... then with port 0.
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, 0, 0))
        phone.send(rtp(3), inside)
        pbx.send(rtp(51), outside)
        assert (await phone.recv())[0] == rtp(51)
        assert stat(session, OUTSIDE, "no_destination") == 2

        # Resume at the same address: the latch is kept, media flows again.
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        phone.send(rtp(4), inside)
        assert (await pbx.recv())[0] == rtp(4)
        assert pbx.queue.empty()
        await engine.close()

    run(test)


def test_retarget_with_set_remote_rearms_latching(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, old_pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        old_pbx.send(rtp(1), outside)  # latches the old PBX
        await phone.recv()

        new_pbx = await peer(OTHER_HOST)  # re-INVITE: media moves to another host
        engine.apply(SetRemote(session.id, OUTSIDE, 0, OTHER_HOST, new_pbx.port, new_pbx.port + 1))
        phone.send(rtp(2), inside)
        assert await new_pbx.recv() == (rtp(2), outside)

        old_pbx.send(rtp(99), outside)  # the old address is now a stranger
        new_pbx.send(rtp(3), outside)
        assert (await phone.recv())[0] == rtp(3)
        assert stat(session, OUTSIDE, "wrong_source") == 1
        assert old_pbx.queue.empty()

        # Same host, new port (the PBX re-bound): also re-arms.
        newer = await peer(OTHER_HOST)
        engine.apply(SetRemote(session.id, OUTSIDE, 0, OTHER_HOST, newer.port, newer.port + 1))
        newer.send(rtp(4), outside)
        assert (await phone.recv())[0] == rtp(4)
        phone.send(rtp(5), inside)
        assert (await newer.recv())[0] == rtp(5)
        await engine.close()

    run(test)


def test_set_remote_validation(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 2)
        with pytest.raises(ValueError):
            engine.apply(SetRemote(session.id, INSIDE, 0, "::1", 4000, 4001))  # IPv4 socket
        with pytest.raises(ValueError):
            engine.apply(SetRemote(session.id, INSIDE, 0, "pbx.example.com", 4000, 4001))
        with pytest.raises(ValueError):
            engine.apply(SetRemote(session.id, INSIDE, 0, HOST, 70000, 4001))
        with pytest.raises(IndexError):
            engine.apply(SetRemote(session.id, INSIDE, 2, HOST, 4000, 4001))
        with pytest.raises(IndexError):
            session.local(OUTSIDE, -1)
        assert session.streams == 2 and session.call_id == "c"
        with pytest.raises(ValueError):
            engine.allocate("d", 0)
        twin = engine.allocate("c", 1)  # a Call-ID is a label, not a key
        assert twin.local(INSIDE, 0) != session.local(INSIDE, 0)
        await engine.close()

    run(test)


# --------------------------------------------------------------------------- ports


@POOLS
def test_release_frees_ports_and_exhaustion(run: Runner, pool: int) -> None:
    async def test() -> None:
        engine = make_engine(
            pairs=2, pool=pool
        )  # exactly one stream: an inside and an outside pair
        first = engine.allocate("a", 1)
        with pytest.raises(PortsExhausted):
            engine.allocate("b", 1)
        assert engine.sessions == 1
        ports_before = {first.local(INSIDE, 0), first.local(OUTSIDE, 0)}

        engine.apply(Release(first.id))
        engine.apply(Release(first.id))  # idempotent
        await first.wait_closed()
        assert free(engine) == 2
        second = engine.allocate("a", 1)  # the same call id is free again too
        assert {second.local(INSIDE, 0), second.local(OUTSIDE, 0)} == ports_before
        engine.apply(Release(second.id))
        await engine.close()
        assert engine.ports.available == 2 and engine.sessions == 0

    run(test)


@POOLS
def test_partial_allocation_gives_everything_back(run: Runner, pool: int) -> None:
    async def test() -> None:
        engine = make_engine(pairs=3, pool=pool)
        with pytest.raises(PortsExhausted):
            engine.allocate("big", 2)  # needs 4 pairs
        for _ in range(5):
            await asyncio.sleep(0)
        assert engine.ports.available == 3 and engine.sessions == 0
        session = engine.allocate("small", 1)
        assert session.streams == 1
        await engine.close()

    run(test)


def test_ports_held_by_another_process_are_skipped(run: Runner) -> None:
    async def test() -> None:
        low, high = free_range(3)
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind((HOST, low + 1))  # the RTCP port of the first pair
        try:
            engine = RelayEngine(HOST, HOST, low, high)
            session = engine.allocate("c", 1)
            used = {session.local(INSIDE, 0)[1], session.local(OUTSIDE, 0)[1]}
            assert used == {low + 2, low + 4}
            assert engine.ports.available == 1  # the squatted pair is back in the pool
            with pytest.raises(PortsExhausted):
                engine.allocate("d", 1)
            await engine.close()
        finally:
            squatter.close()

    run(test)


@POOLS
def test_sync_allocation_relays_before_attach_and_releases_at_once(run: Runner, pool: int) -> None:
    async def test() -> None:
        engine = make_engine(pairs=2, pool=pool)
        phone, pbx = await peer(), await peer()
        # Allocated, remotes set and a packet sent, all before the loop ran once: the
        # packet waits in the kernel buffer until the transports are attached.
        session = engine.allocate("c", 1)
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        phone.send(rtp(1), session.local(INSIDE, 0))
        assert (await pbx.recv())[0] == rtp(1)
        engine.apply(Release(session.id))
        await session.wait_closed()

        # Released before the transports were ever attached: ports are back at once
        # (pooled pairs are attached already, and back in the pool at once).
        session = engine.allocate("d", 1)
        assert free(engine) == 0
        engine.apply(Release(session.id))
        assert free(engine) == 2
        await asyncio.sleep(0.01)  # the attach task finds nothing to do
        assert free(engine) == 2

        session = engine.allocate("e", 1)
        await asyncio.sleep(0.01)
        engine.close_now()
        assert engine.sessions == 0
        await session.wait_closed()
        assert engine.ports.available == 2 and engine.pooled == 0  # close_now pools nothing

    run(test)


# --------------------------------------------------------------------------- pool
#
# Released pairs whose transports are attached stay open in a FIFO pool and come back on
# a later allocate, with a new leg: nothing of the previous call may carry over.


def count_binds(engine: RelayEngine) -> list[int]:
    """Counts the engine's ``_bind_pair`` calls (new sockets) from now on."""
    calls: list[int] = []
    bind = engine._bind_pair

    def counting(ip: str, family: socket.AddressFamily) -> tuple[int, socket.socket, socket.socket]:
        calls.append(1)
        return bind(ip, family)

    engine._bind_pair = counting  # type: ignore[method-assign]
    return calls


async def pooled_call(engine: RelayEngine) -> tuple[RelaySession, Peer, Peer]:
    """A call whose both sides latched and relayed, released into the pool."""
    session, phone, pbx = await live_call(engine)
    pooled = engine.pooled
    engine.apply(Release(session.id))
    await session.wait_closed()
    assert engine.pooled == pooled + 2
    return session, phone, pbx


async def live_call(engine: RelayEngine) -> tuple[RelaySession, Peer, Peer]:
    """A call whose both sides latched and relayed, its transports attached."""
    session, phone, pbx = await call(engine)
    inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
    phone.send(rtp(1), inside)
    await expect(pbx, rtp(1))
    pbx.send(rtp(2), outside)
    await expect(phone, rtp(2))
    phone.send(rtcp_sr(), (inside[0], inside[1] + 1))  # latches RTCP (relayed to pbx:port+1)
    await settle()  # every transport attached
    assert stat(session, INSIDE, "rtcp_packets_in") == 1
    return session, phone, pbx


def test_released_pairs_are_reused_first_in_first_out(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine(pairs=8)
        first, _, _ = await live_call(engine)
        second, _, _ = await live_call(engine)
        engine.apply(Release(first.id))
        engine.apply(Release(second.id))
        assert (
            engine.pooled == 4 and engine.ports.available == 4
        )  # pooled ports stay out of the allocator
        binds = count_binds(engine)
        session, phone, pbx = await call(engine)
        assert binds == [] and session._attach is None  # no socket made, none to attach
        for side in (INSIDE, OUTSIDE):  # the pair released longest ago comes back first
            assert session.local(side, 0) == first.local(side, 0)
        assert engine.pooled == 2 and engine.ports.available == 4
        assert first.stats() != session.stats()  # the released session kept its counters
        assert stat(first, INSIDE, "packets_in") == 2  # RTP and RTCP

        # The reused pair relays like a fresh one, counters from zero.
        for side in (INSIDE, OUTSIDE):
            counters = session.stats()[side][0]
            assert counters["drops"] == dict.fromkeys(DROP_REASONS, 0)
            assert all(value == 0 for key, value in counters.items() if key in COUNTS)
            assert counters["grace_ssrc"] == counters["grace_seq"] == -1
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        phone.send(rtp(5), inside)
        assert await pbx.recv() == (rtp(5), outside)
        pbx.send(rtp(6, ssrc=0x99), outside)
        assert await phone.recv() == (rtp(6, ssrc=0x99), inside)
        assert stat(session, INSIDE, "packets_in") == stat(session, OUTSIDE, "packets_in") == 1

        # A third call takes the second pooled pair; a fourth needs new sockets.
        third = engine.allocate("c", 1)
        assert third.local(INSIDE, 0) == second.local(INSIDE, 0) and binds == []
        fourth = engine.allocate("d", 1)
        assert len(binds) == 2 and engine.pooled == 0
        for s in (session, third, fourth):
            engine.apply(Release(s.id))
        await engine.close()

    run(test)


def test_stale_packets_of_the_previous_call_are_dropped(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = RelayEngine(HOST, HOST, *free_range(8), clock=clock, quarantine_s=4)
        old, old_phone, old_pbx = await pooled_call(engine)
        inside, outside = old.local(INSIDE, 0), old.local(OUTSIDE, 0)
        old_phone.send(rtp(3), inside)  # into the pool: dropped, relayed nowhere
        await settle()
        old_phone.send(rtp(4), inside)  # still in the kernel buffer when the pair is reused
        session = engine.allocate("new", 1)
        assert session.local(INSIDE, 0) == inside and session.local(OUTSIDE, 0) == outside
        await settle()
        assert stat(session, INSIDE, "wrong_source") == 1  # no expected IP yet
        assert stat(session, INSIDE, "packets_in") == 0

        # The new peers are at the old ones' IP: the old addresses still cannot latch.
        phone, pbx = await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        old_phone.send(rtp(7), inside)
        old_phone.send(rtcp_sr(), (inside[0], inside[1] + 1))
        old_pbx.send(rtp(8), outside)
        phone.send(rtp(9), inside)
        await expect(pbx, rtp(9))  # the old phone's packet before it was not relayed
        pbx.send(rtp(10), outside)
        await expect(phone, rtp(10))
        assert stat(session, INSIDE, "wrong_source") == 3
        assert stat(session, OUTSIDE, "wrong_source") == 1
        assert stat(session, INSIDE, "packets_in") == 1
        assert old_phone.queue.empty() and old_pbx.queue.empty()
        assert stat(old, INSIDE, "wrong_source") == 0  # the old call's counters are its own

        # After the quarantine the address is an ordinary one: a new SDP address latches.
        clock.now += 5
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, 9, 10))  # re-arms latching
        old_pbx.send(rtp(11), outside)
        await expect(phone, rtp(11))
        await engine.close()

    run(test)


def test_the_new_sdp_may_name_the_previous_peers_address(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        _, phone, pbx = await pooled_call(engine)  # a phone with a fixed RTP port calls again
        session = engine.allocate("again", 1)
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        phone.send(rtp(1), session.local(INSIDE, 0))
        await expect(pbx, rtp(1))
        await engine.close()

    run(test)


def test_a_reused_pair_starts_plain_with_nothing_of_the_previous_call(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        far_end = SrtpContext(KEY, SALT)
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        engine.apply(WatchSrtp(session.id, OUTSIDE))
        engine.apply(SetTxSsrc(session.id, OUTSIDE, 0x5555))
        engine.apply(PlayTone(session.id, INSIDE, 0, Tone.parse("1000@-10;5(5/0/1)")))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, 0, rtcp_mux=True))
        phone.send(rtp(1), inside)
        assert far_end.unprotect((await pbx.recv())[0])[8:12] == b"\x00\x00\x55\x55"
        pbx.send(far_end.protect(rtp(2, FAR_SSRC)), outside)
        await phone.recv()
        await settle()
        engine.apply(Release(session.id))
        assert engine.pooled == 2

        reused = engine.allocate("next", 1)
        fresh_engine = make_engine(pool=0)
        fresh = fresh_engine.allocate("fresh", 1)
        pair_state = {"port", "sockets", "alive", "rtp_send", "rtcp_send", "stale", "stale_until"}
        state = set(RelayLeg.__slots__) - pair_state
        for side in (INSIDE, OUTSIDE):
            leg, new = reused._legs[side][0], fresh._legs[side][0]
            if not isinstance(leg, RelayLeg):  # the compiled leg keeps the plain reference
                state = state - {"plain_last"} | {"plain_ref"}
            for name in state:
                assert getattr(leg, name) == getattr(new, name), (side, name)
            assert all(sock.session is reused and sock.a is leg for sock in leg.sockets)
        with pytest.raises(ValueError):
            engine.apply(WatchSrtp(reused.id, OUTSIDE))  # no key: plain

        phone2, pbx2 = await peer(), await peer()
        engine.apply(SetRemote(reused.id, INSIDE, 0, HOST, phone2.port, phone2.port + 1))
        engine.apply(SetRemote(reused.id, OUTSIDE, 0, HOST, pbx2.port, pbx2.port + 1))
        phone2.send(rtp(100, payload=b"\xff" * 160), inside)
        await expect(pbx2, rtp(100, payload=b"\xff" * 160))  # plain, own SSRC and seq
        pbx2.send(rtp(200), outside)
        await expect(phone2, rtp(200))  # plain taken as is, no tone mixed in
        phone2.send(rtcp_sr(), (inside[0], inside[1] + 1))  # to pbx2's RTCP port: no mux
        await settle()
        assert pbx2.queue.empty() and stat(reused, OUTSIDE, "rtcp_packets_out") == 1
        for side in (INSIDE, OUTSIDE):
            counters = reused.stats()[side][0]
            assert counters["packets_encrypted"] == counters["packets_decrypted"] == 0
            assert counters["tone_packets"] == 0 and counters["drops"]["srtp_auth"] == 0
        await engine.close()
        await fresh_engine.close()

    run(test)


def test_the_pool_is_bounded_and_close_empties_it(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine(pairs=6, pool=1)  # one pair per side: two, on a shared IP
        sessions = [await call(engine) for _ in range(3)]
        await settle()
        pooled = [s.local(side, 0)[1] for s, _, _ in sessions[:1] for side in (INSIDE, OUTSIDE)]
        for s, _, _ in sessions:
            engine.apply(Release(s.id))
        await asyncio.sleep(0.01)
        assert engine.pooled == 2 and engine.ports.available == 4  # the rest was closed
        await engine.close()
        assert engine.pooled == 0 and engine.ports.available == 6
        for port in pooled:  # really closed: the ports can be bound again
            for p in (port, port + 1):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((HOST, p))

        # close_now closes the pool too, and pools none of the sessions it releases.
        await pooled_call(engine)
        live = engine.allocate("live", 1)
        await settle()
        engine.close_now()
        assert engine.pooled == 0
        await live.wait_closed()
        await engine.close()
        assert engine.ports.available == 6

    run(test)


# --------------------------------------------------------------------------- SRTP


def test_srtp_on_the_outside(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        far_end = SrtpContext(KEY, SALT)  # the remote SPA's context: same key, own SSRC

        # Leaving toward the outside: SRTP that the far end's context decrypts.
        phone.send(rtp(1), inside)
        wire, _ = await pbx.recv()
        assert wire != rtp(1) and len(wire) == len(rtp(1)) + 10
        assert far_end.unprotect(wire) == rtp(1)

        # Arriving from the outside: unprotected for the phone.
        srtp_in = far_end.protect(rtp(1, ssrc=0xABCD))
        pbx.send(srtp_in, outside)
        assert (await phone.recv())[0] == rtp(1, ssrc=0xABCD)

        # Tampered (one payload bit), replayed, and plain RTP: dropped and counted.
        tampered = bytearray(far_end.protect(rtp(2, ssrc=0xABCD)))
        tampered[20] ^= 1
        pbx.send(bytes(tampered), outside)
        pbx.send(srtp_in, outside)
        pbx.send(rtp(3, ssrc=0xABCD), outside)
        pbx.send(far_end.protect(rtp(4, ssrc=0xABCD)), outside)
        assert (await phone.recv())[0] == rtp(4, ssrc=0xABCD)
        assert stat(session, OUTSIDE, "srtp_auth") == 2
        assert stat(session, OUTSIDE, "srtp_replay") == 1
        assert stat(session, OUTSIDE, "packets_in") == 2
        assert stat(session, OUTSIDE, "bytes_in") == 2 * len(srtp_in)  # as on the wire
        assert phone.queue.empty()

        # SRTCP too.
        pbx_rtcp = await peer()
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        phone.send(rtcp_sr(), (inside[0], inside[1] + 1))
        wire, _ = await pbx_rtcp.recv()
        assert far_end.unprotect_rtcp(wire) == rtcp_sr()

        # Back to clear.
        engine.apply(SetSrtp(session.id, OUTSIDE, None))
        phone.send(rtp(5), inside)
        assert (await pbx.recv())[0] == rtp(5)
        await engine.close()

    run(test)


def test_announced_ssrc_replaces_the_phones_on_the_srtp_side(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside = session.local(INSIDE, 0)
        far_end = SrtpContext(KEY, SALT)
        engine.apply(SetTxSsrc(session.id, OUTSIDE, 0xCAFEF00D))
        phone.send(rtp(1), inside)  # still plain: the phone's SSRC passes
        assert (await pbx.recv())[0] == rtp(1)
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        phone.send(rtp(2), inside)
        wire, _ = await pbx.recv()
        assert wire[8:12] == bytes.fromhex("cafef00d")
        assert far_end.unprotect(wire) == rtp(2, ssrc=0xCAFEF00D)
        engine.apply(SetTxSsrc(session.id, OUTSIDE, None))
        phone.send(rtp(3), inside)
        assert far_end.unprotect((await pbx.recv())[0]) == rtp(3)
        await engine.close()

    run(test)


Relayed = Callable[[bytes], Coroutine[Any, Any, bytes]]


async def srtp_toward_the_far_end(engine: RelayEngine) -> tuple[RelaySession, Relayed]:
    """A call whose outside is SRTP under the announced SSRC ``0xCAFEF00D``, and a
    function that sends one packet from the phone and returns it as the far end
    decrypts it (the numbering tests)."""
    session, phone, pbx = await call(engine)
    inside = session.local(INSIDE, 0)
    far_end = SrtpContext(KEY, SALT)
    engine.apply(SetTxSsrc(session.id, OUTSIDE, 0xCAFEF00D))
    engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))

    async def relayed(packet: bytes) -> bytes:
        phone.send(packet, inside)
        clear: bytes = far_end.unprotect((await pbx.recv())[0])
        return clear

    return session, relayed


def test_a_new_stream_from_the_phone_carries_on_the_srtp_numbering(run: Runner) -> None:
    """A phone that starts a new RTP stream (new SSRC, sequence number far behind; e.g. on
    resume after hold) must not be refused by libsrtp as "index too old": toward the SRTP
    side its packets continue the numbering, under the announced SSRC."""

    async def test() -> None:
        engine = make_engine()
        session, relayed = await srtp_toward_the_far_end(engine)
        first = [await relayed(rtp(seq)) for seq in (40000, 40001, 40003)]  # a loss: kept
        assert first == [rtp(s, ssrc=0xCAFEF00D) for s in (40000, 40001, 40003)]
        assert await relayed(rtp(40002)) == rtp(40002, ssrc=0xCAFEF00D)  # late: kept
        # A new stream from the phone: new SSRC, number far behind -> 40004, 40005.
        renumbered = [await relayed(rtp(seq, ssrc=0x77)) for seq in (100, 101)]
        assert [int.from_bytes(p[2:4], "big") for p in renumbered] == [40004, 40005]
        assert all(p[4:] == rtp(s, ssrc=0xCAFEF00D)[4:] for p, s in zip(renumbered, (100, 101),
                                                                       strict=True))  # fmt: skip
        # The same SSRC restarting far behind (beyond reordering): carries on too.
        assert (await relayed(rtp(60000, ssrc=0x77)))[2:4] == (40006).to_bytes(2, "big")
        # ... and a jump far ahead.
        assert (await relayed(rtp(30000, ssrc=0x77)))[2:4] == (40007).to_bytes(2, "big")
        assert stat(session, OUTSIDE, "srtp_protect") == 0
        assert stat(session, OUTSIDE, "packets_encrypted") == 8
        await engine.close()

    run(test)


def test_the_same_ssrc_restarting_a_little_behind_carries_on_the_numbering(
    run: Runner,
) -> None:
    """Regression (found by the hold/resume interop test): a phone that stops and starts
    its sender under the same SSRC at a number up to ``_REORDER_WINDOW`` behind its last
    one looks like reordering to ``number_on``; libsrtp refused every such packet as an
    index already sent (two seconds of silence one way). Each one refused is numbered on
    afresh; a genuinely late packet that was never sent keeps its number."""

    async def test() -> None:
        engine = make_engine()
        session, relay = await srtp_toward_the_far_end(engine)

        async def relayed(seq: int) -> int:
            return int.from_bytes((await relay(rtp(seq, ssrc=0x77)))[2:4], "big")

        assert [await relayed(seq) for seq in (500, 501, 503)] == [500, 501, 503]
        assert await relayed(502) == 502  # late, never sent: keeps its number
        # The sender restarts behind under the same SSRC, at numbers it sent before.
        assert [await relayed(seq) for seq in (501, 502, 503)] == [504, 505, 506]
        assert await relayed(504) == 507  # and the stream goes on from there
        assert stat(session, OUTSIDE, "srtp_protect") == 0
        assert stat(session, OUTSIDE, "packets_encrypted") == 8
        await engine.close()

    run(test)


def test_srtp_first_packet_latches_only_once_authenticated(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        far_end = SrtpContext(KEY, SALT)
        outside = session.local(OUTSIDE, 0)
        forger = await peer()  # same IP as the PBX, no key
        forger.send(rtp(1, ssrc=0xABCD) + bytes(10), outside)
        pbx.send(far_end.protect(rtp(2, ssrc=0xABCD)), outside)
        assert (await phone.recv())[0] == rtp(2, ssrc=0xABCD)
        assert stat(session, OUTSIDE, "srtp_auth") == 1
        forger.send(far_end.protect(rtp(3, ssrc=0xABCD)), outside)  # even valid SRTP
        pbx.send(far_end.protect(rtp(4, ssrc=0xABCD)), outside)
        assert (await phone.recv())[0] == rtp(4, ssrc=0xABCD)
        assert stat(session, OUTSIDE, "wrong_source") == 1
        await engine.close()

    run(test)


def test_latch_any_takes_the_first_source_from_anywhere(run: Runner) -> None:
    """NAT: the SDP names an address the phone's packets never come from."""

    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("nat", 1)
        phone, pbx, sdp_only = await peer(), await peer(), await peer(OTHER_HOST)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        engine.apply(SetRemote(session.id, INSIDE, 0, OTHER_HOST, sdp_only.port,
                               sdp_only.port + 1, latch="any"))  # fmt: skip
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        phone.send(rtp(1), inside)  # from 127.0.0.1, the SDP said 127.0.0.2
        assert (await pbx.recv())[0] == rtp(1)
        pbx.send(rtp(2), outside)
        assert await phone.recv() == (rtp(2), inside)  # the NAT's address, not the SDP's
        stranger = await peer()
        stranger.send(rtp(666), inside)  # latched: nobody else
        phone.send(rtp(3), inside)
        assert (await pbx.recv())[0] == rtp(3)
        assert stat(session, INSIDE, "wrong_source") == 1
        # "sdp" (the default): the same packet from another IP is dropped.
        engine.apply(SetRemote(session.id, INSIDE, 0, OTHER_HOST, sdp_only.port + 2,
                               sdp_only.port + 3))  # fmt: skip
        phone.send(rtp(4), inside)
        sdp_only.send(rtp(5), inside)  # (another port of the SDP's IP: latches)
        assert (await pbx.recv())[0] == rtp(5)
        assert stat(session, INSIDE, "wrong_source") == 2
        await engine.close()

    run(test)


def test_latch_any_on_an_srtp_side_latches_only_authenticated_packets(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("nat-srtp", 1)
        phone, pbx = await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, OTHER_HOST, 40000, 40001, latch="any"))
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        far_end = SrtpContext(KEY, SALT)
        outside = session.local(OUTSIDE, 0)
        forger = await peer()
        forger.send(rtp(1, ssrc=0xABCD) + bytes(10), outside)  # no key: never latches
        pbx.send(far_end.protect(rtp(2, ssrc=0xABCD)), outside)
        assert (await phone.recv())[0] == rtp(2, ssrc=0xABCD)
        phone.send(rtp(3), session.local(INSIDE, 0))
        wire, _ = await pbx.recv()  # the authenticated source holds the latch
        assert far_end.unprotect(wire)[12:] == rtp(3)[12:]
        assert stat(session, OUTSIDE, "srtp_auth") == 1
        await engine.close()

    run(test)


def test_a_non_rtp_stream_is_never_srtp_processed_renumbered_or_mixed(run: Runner) -> None:
    """T.38 UDPTL beside the audio on a side that is SRTP: relayed byte for byte."""

    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("fax", 2)
        phone, pbx, phone_fax, pbx_fax = await peer(), await peer(), await peer(), await peer()
        for side, audio, fax in ((INSIDE, phone, phone_fax), (OUTSIDE, pbx, pbx_fax)):
            engine.apply(SetRemote(session.id, side, 0, HOST, audio.port, audio.port + 1))
            engine.apply(SetRemote(session.id, side, 1, HOST, fax.port, fax.port + 1,
                                   kind="udptl"))  # fmt: skip
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        engine.apply(SetTxSsrc(session.id, OUTSIDE, 0x5151))
        engine.apply(PlayTone(session.id, INSIDE, 1, Tone.parse("1000@-10;1(*/0/1)")))
        udptl = b"\x00\x01" + bytes(range(40))  # looks nothing like RTP
        rtp_like = rtp(9)  # and one that does: still not touched
        for data in (udptl, rtp_like):
            phone_fax.send(data, session.local(INSIDE, 1))
            assert (await pbx_fax.recv())[0] == data
            pbx_fax.send(data, session.local(OUTSIDE, 1))
            assert (await phone_fax.recv())[0] == data
        assert stat(session, OUTSIDE, "packets_encrypted", 1) == 0
        assert stat(session, INSIDE, "tone_packets", 1) == 0
        # the audio stream beside it is protected as usual
        phone.send(rtp(1), session.local(INSIDE, 0))
        wire, _ = await pbx.recv()
        assert SrtpContext(KEY, SALT).unprotect(wire)[8:12] == (0x5151).to_bytes(4, "big")
        await engine.close()

    run(test)


# --------------------------------------------------------------------------- interface


def test_engine_satisfies_the_interface(run: Runner) -> None:
    async def test() -> None:
        engine: MediaEngine = make_engine()
        session = engine.allocate("c", 2)
        assert isinstance(session.id, int)
        assert len(session.stats()[INSIDE]) == 2
        assert session.local(Side("outside"), 1)[0] == HOST
        engine.apply(Release(session.id))
        await engine.close()

    run(test)


def test_stats_names_every_drop_reason(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        counters = session.stats()[OUTSIDE][0]
        assert set(counters["drops"]) == set(DROP_REASONS)
        assert set(counters) == {
            "packets_in",
            "bytes_in",
            "packets_out",
            "bytes_out",
            "rtcp_packets_in",
            "rtcp_packets_out",
            "packets_encrypted",
            "packets_decrypted",
            "plain_accepted",
            "plain_after_grace",
            "tone_packets",
            "tone_skipped",
            "relatched",
            "grace_ssrc",
            "grace_seq",
            "drops",
        }
        assert all(value == 0 for key, value in counters.items() if key in COUNTS)
        assert counters["grace_ssrc"] == counters["grace_seq"] == -1  # no reference yet
        await engine.close()

    run(test)


# --------------------------------------------------------------------------- switch-over
#
# Profile §3 on the outside leg: accept before switching, switch with a grace window for
# the peer's plain RTP, re-key with the old key still accepted, the one-shot
# "authenticated" callback, SRTCP as a switch. Grace windows run on a fake clock.

OTHER_KEY = bytes(range(32, 48))
OTHER_SALT = bytes(range(48, 64))
FAR_SSRC = 0xABCD


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked_engine(clock: FakeClock) -> RelayEngine:
    return RelayEngine(HOST, HOST, *free_range(8), clock=clock)


def far(seq: int) -> bytes:
    """The far end's plain RTP (its own SSRC)."""
    return rtp(seq, ssrc=FAR_SSRC)


async def expect(receiver: Peer, data: bytes) -> None:
    """``data`` is the next packet ``receiver`` gets: whatever was sent to it before on
    the same path and is not there was dropped."""
    assert (await receiver.recv())[0] == data
    assert receiver.queue.empty()


def test_accept_before_switch(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        far_end = SrtpContext(KEY, SALT)
        pbx.send(far(0), outside)  # the far end's plain stream, before stage 2
        await expect(phone, far(0))
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))

        # Accepting, not sending: the phone's RTP still leaves in the clear ...
        phone.send(rtp(1), inside)
        await expect(pbx, rtp(1))
        # ... the peer's plain RTP is still relayed, however long the handshake takes ...
        pbx.send(far(1), outside)
        await expect(phone, far(1))
        clock.now += 3600
        pbx.send(far(2), outside)
        await expect(phone, far(2))
        # ... and its SRTP, which may overtake the Callee Final, is decrypted.
        pbx.send(far_end.protect(far(3)), outside)
        await expect(phone, far(3))
        assert stat(session, OUTSIDE, "plain_accepted") == 2
        assert stat(session, OUTSIDE, "packets_decrypted") == 1
        assert stat(session, OUTSIDE, "packets_encrypted") == 0
        # The peer has switched: nothing it sends in the clear is genuine any more.
        pbx.send(far(4), outside)
        pbx.send(far_end.protect(far(5)), outside)
        await expect(phone, far(5))
        assert stat(session, OUTSIDE, "srtp_auth") == 1

        # The Callee Final arrives: switch-over (with the same keys: the context that
        # accepted carries on). From now on the phone's RTP is SRTP.
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 2.0))
        phone.send(rtp(2), inside)
        wire, _ = await pbx.recv()
        assert far_end.unprotect(wire) == rtp(2)
        assert stat(session, OUTSIDE, "packets_encrypted") == 1
        assert stat(session, OUTSIDE, "bytes_out") == 2 * len(rtp(1)) + 10
        await engine.close()

    run(test)


def test_switch_grace_window_then_plain_is_dropped_and_counted(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        far_end = SrtpContext(KEY, SALT)
        pbx.send(far(0), outside)  # the caller's plain stream before stage 2
        await expect(phone, far(0))
        # The callee: switches when it sends the Callee Final, without accepting first.
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), grace_s=2.0))
        phone.send(rtp(1), inside)
        assert far_end.unprotect((await pbx.recv())[0]) == rtp(1)

        # Within the grace window the caller, not switched yet, still sends plain.
        clock.now += 1.9
        pbx.send(far(1), outside)
        await expect(phone, far(1))
        srtp_2 = far_end.protect(far(2))
        pbx.send(srtp_2, outside)
        await expect(phone, far(2))
        # It switched: the window is closed, though the clock has not reached its end.
        pbx.send(far(3), outside)
        # A duplicate SRTP packet is dropped: its ciphertext is no audio.
        pbx.send(srtp_2, outside)
        pbx.send(far_end.protect(far(4)), outside)
        await expect(phone, far(4))
        assert stat(session, OUTSIDE, "srtp_replay") == 1
        assert stat(session, OUTSIDE, "srtp_auth") == 1

        # After the window: plain RTP is dropped, as an auth failure that looks plain.
        clock.now += 0.2
        pbx.send(far(5), outside)
        pbx.send(b"\x00" * 40, outside)  # not even RTP: an auth failure, not "plain"
        tampered = bytearray(far_end.protect(far(6)))
        tampered[-1] ^= 1
        pbx.send(bytes(tampered), outside)
        pbx.send(far_end.protect(far(7)), outside)
        await expect(phone, far(7))
        assert stat(session, OUTSIDE, "srtp_auth") == 4
        assert stat(session, OUTSIDE, "plain_after_grace") == 3  # far(3), far(5), tampered
        assert stat(session, OUTSIDE, "plain_accepted") == 1
        assert stat(session, OUTSIDE, "packets_decrypted") == 3
        assert stat(session, OUTSIDE, "packets_in") == 5

        # libsrtp refuses to protect a packet too short to be RTP: dropped and counted.
        phone.send(b"\x80\x00\x00", inside)
        phone.send(rtp(2), inside)
        assert far_end.unprotect((await pbx.recv())[0]) == rtp(2)
        assert stat(session, OUTSIDE, "srtp_protect") == 1
        assert stat(session, OUTSIDE, "packets_encrypted") == 2
        await engine.close()

    run(test)


def test_grace_window_on_the_real_clock(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        pbx.send(far(0), outside)
        await expect(phone, far(0))
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), grace_s=0.2))  # now=None
        pbx.send(far(1), outside)
        await expect(phone, far(1))
        await asyncio.sleep(0.25)
        pbx.send(far(2), outside)
        pbx.send(SrtpContext(KEY, SALT).protect(far(3)), outside)
        await expect(phone, far(3))
        assert stat(session, OUTSIDE, "plain_after_grace") == 1
        with pytest.raises(ValueError):
            engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), grace_s=-1))
        await engine.close()

    run(test)


def test_rekey_keeps_the_old_key_until_switch_plus_grace(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        old, new = SrtpKeys(KEY, SALT), SrtpKeys(OTHER_KEY, OTHER_SALT)
        far_old, far_new = SrtpContext(KEY, SALT), SrtpContext(OTHER_KEY, OTHER_SALT)
        engine.apply(SwitchSrtp(session.id, OUTSIDE, old, 2.0))
        clock.now += 10  # a secured call, long past its first grace window

        # Caller re-keys: accepts the new key, still sends and accepts the old one.
        engine.apply(AcceptSrtp(session.id, OUTSIDE, new))
        pbx.send(far_old.protect(far(1)), outside)
        await expect(phone, far(1))
        pbx.send(far_new.protect(far(2)), outside)
        await expect(phone, far(2))
        pbx.send(far(3), outside)  # plain is not back just because of a re-key
        pbx.send(far_old.protect(far(4)), outside)
        await expect(phone, far(4))
        assert stat(session, OUTSIDE, "plain_after_grace") == 1
        phone.send(rtp(1), inside)
        assert far_old.unprotect((await pbx.recv())[0]) == rtp(1)

        # Switch-over to the new key: sent with it; the old key is taken for the grace.
        engine.apply(SwitchSrtp(session.id, OUTSIDE, new, 2.0))
        phone.send(rtp(2), inside)
        assert far_new.unprotect((await pbx.recv())[0]) == rtp(2)
        clock.now += 1.5
        pbx.send(far_old.protect(far(5)), outside)
        await expect(phone, far(5))
        pbx.send(far(6), outside)  # still no plain during a re-key's grace
        pbx.send(far_new.protect(far(7)), outside)
        await expect(phone, far(7))
        clock.now += 1.0
        pbx.send(far_old.protect(far(8)), outside)  # the old key's time is over
        pbx.send(far_new.protect(far(9)), outside)
        await expect(phone, far(9))
        assert stat(session, OUTSIDE, "srtp_auth") == 3
        assert stat(session, OUTSIDE, "packets_decrypted") == 6
        assert stat(session, OUTSIDE, "plain_accepted") == 0
        await engine.close()

    run(test)


class Watcher:
    """Watches the outside of ``session`` and records the engine's reports, each under
    the label of the watch given last: ``fired == ["k1"]`` reads "one report, while the
    watch labelled k1 was the latest"."""

    def __init__(self, engine: RelayEngine, session: RelaySession) -> None:
        self.engine, self.session = engine, session
        self.fired: list[str] = []
        self.label = ""
        engine.on_event = self.on_event

    def on_event(self, event: MediaEvent) -> None:
        assert event == SrtpAuthenticated(self.session.id, OUTSIDE)
        self.fired.append(self.label)

    def watch(self, label: str) -> None:
        self.label = label
        self.engine.apply(WatchSrtp(self.session.id, OUTSIDE))


def test_authenticated_report_fires_once_per_key(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session, phone, pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        k1, k2 = SrtpKeys(KEY, SALT), SrtpKeys(OTHER_KEY, OTHER_SALT)
        far1, far2 = SrtpContext(KEY, SALT), SrtpContext(OTHER_KEY, OTHER_SALT)
        watcher = Watcher(engine, session)
        fired = watcher.fired
        with pytest.raises(ValueError):  # nothing to authenticate yet
            watcher.watch("none")

        # A watch for a key that is replaced before it authenticates is forgotten.
        pbx.send(far(0), outside)
        await expect(phone, far(0))
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(OTHER_KEY, SALT)))
        watcher.watch("stale")
        engine.apply(AcceptSrtp(session.id, OUTSIDE, k1))
        watcher.watch("k1")
        pbx.send(far(1), outside)  # plain: not an authentication
        await expect(phone, far(1))
        assert fired == []
        for seq in (2, 3):
            pbx.send(far1.protect(far(seq)), outside)
            await expect(phone, far(seq))
        assert fired == ["k1"]
        # Switching to the key that already authenticated does not re-arm it; asking
        # again gets an answer on the next loop iteration, not from inside apply().
        engine.apply(SwitchSrtp(session.id, OUTSIDE, k1, 2.0))
        watcher.watch("k1 again")
        assert fired == ["k1"]
        await asyncio.sleep(0)
        assert fired == ["k1", "k1 again"]

        # Re-key: the watch is for the new key; the old one still authenticating
        # does not count. A failing handler is logged, and the packet still relayed.
        def broken(event: MediaEvent) -> None:
            fired.append("k2")
            raise RuntimeError("handshake machine bug")

        engine.apply(SwitchSrtp(session.id, OUTSIDE, k2, 2.0))
        watcher.watch("k2")
        engine.on_event = broken
        pbx.send(far1.protect(far(4)), outside)
        await expect(phone, far(4))
        assert fired == ["k1", "k1 again"]
        for seq in (5, 6):
            pbx.send(far2.protect(far(seq)), outside)
            await expect(phone, far(seq))
        assert fired == ["k1", "k1 again", "k2"]

        engine.apply(ClearSrtp(session.id, OUTSIDE))
        with pytest.raises(ValueError):
            watcher.watch("clear")
        await engine.close()

    run(test)


def test_a_watch_is_forgotten_when_the_key_changes(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        watcher = Watcher(engine, session)
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(OTHER_KEY, OTHER_SALT)))
        watcher.watch("other key")
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))  # no new watch
        pbx.send(SrtpContext(KEY, SALT).protect(far(1)), outside)
        await expect(phone, far(1))
        await asyncio.sleep(0)
        assert watcher.fired == []
        # Equal keys are the same key: giving them again keeps an armed watch.
        other = SrtpKeys(OTHER_KEY, OTHER_SALT)
        engine.apply(AcceptSrtp(session.id, OUTSIDE, other))
        watcher.watch("other")
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(OTHER_KEY, OTHER_SALT)))
        pbx.send(SrtpContext(OTHER_KEY, OTHER_SALT).protect(far(2)), outside)
        await expect(phone, far(2))
        assert watcher.fired == ["other"]
        await engine.close()

    run(test)


def test_switch_with_the_accepted_keys_keeps_the_libsrtp_state(run: Runner) -> None:
    """The relay builds one libsrtp context per key: switching with the keys it accepted
    under keeps that context's replay window (a fresh one would take a replay)."""

    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        far_end = SrtpContext(KEY, SALT)
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        accepted = far_end.protect(far(1))
        pbx.send(accepted, outside)
        await expect(phone, far(1))
        context = session.legs(OUTSIDE)[0].rx
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 2.0))
        assert session.legs(OUTSIDE)[0].rx is context and session.legs(OUTSIDE)[0].tx is context
        pbx.send(accepted, outside)  # the same packet again: a replay, not audio
        pbx.send(far_end.protect(far(2)), outside)
        await expect(phone, far(2))
        assert stat(session, OUTSIDE, "srtp_replay") == 1
        # Other keys (or another profile) are another key: a new context.
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT[:14]), 2.0))
        assert session.legs(OUTSIDE)[0].tx is not context
        await engine.close()

    run(test)


def test_handler_may_switch_over_from_inside_the_packet_handler(run: Runner) -> None:
    async def test() -> None:
        # The caller's machine switches as soon as the callee's SRTP authenticates.
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        key, far_end = SrtpKeys(KEY, SALT), SrtpContext(KEY, SALT)
        engine.apply(AcceptSrtp(session.id, OUTSIDE, key))
        engine.on_event = lambda event: engine.apply(SwitchSrtp(session.id, OUTSIDE, key, 2.0))
        engine.apply(WatchSrtp(session.id, OUTSIDE))
        pbx.send(far_end.protect(far(1)), outside)
        await expect(phone, far(1))
        phone.send(rtp(1), inside)
        assert far_end.unprotect((await pbx.recv())[0]) == rtp(1)
        # The switch came from the peer's SRTP: no grace window for its plain RTP.
        pbx.send(far(2), outside)
        pbx.send(far_end.protect(far(3)), outside)
        await expect(phone, far(3))
        assert stat(session, OUTSIDE, "srtp_auth") == 1
        await engine.close()

    run(test)


def test_srtcp_authenticates_too_and_fires_the_report(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, pbx = await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port, rtcp_mux=True))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port, rtcp_mux=True))
        outside = session.local(OUTSIDE, 0)
        fired: list[MediaEvent] = []
        engine.on_event = fired.append
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), srtcp=True))
        engine.apply(WatchSrtp(session.id, OUTSIDE))
        pbx.send(SrtpContext(KEY, SALT).protect_rtcp(rtcp_sr(FAR_SSRC)), outside)
        await expect(phone, rtcp_sr(FAR_SSRC))
        assert fired == [SrtpAuthenticated(session.id, OUTSIDE)]
        await engine.close()

    run(test)


def test_latching_while_accepting_needs_an_authenticated_packet(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, old_pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        old_pbx.send(far(0), outside)  # the far end's plain stream (the reference) ...
        await expect(phone, far(0))
        pbx = await peer()  # ... then it moves (a re-INVITE): latching starts over
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        far_end = SrtpContext(KEY, SALT)
        forger = await peer()  # the PBX's IP, another port, no key
        forger.send(far(1), outside)  # its plain stream going on is accepted ...
        await expect(phone, far(1))
        forger.send(far(2), outside)
        await expect(phone, far(2))  # ... but it did not latch: the PBX still can
        pbx.send(far_end.protect(far(3)), outside)
        await expect(phone, far(3))
        forger.send(far(4), outside)  # now the PBX is the peer
        pbx.send(far_end.protect(far(5)), outside)
        await expect(phone, far(5))
        assert stat(session, OUTSIDE, "wrong_source") == 1
        assert stat(session, OUTSIDE, "relatched") == 0  # latching started over
        await engine.close()

    run(test)


def test_rtcp_in_the_clear_unless_srtcp_is_on(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session = engine.allocate("c", 1)
        phone, phone_rtcp, pbx, pbx_rtcp = await peer(), await peer(), await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone_rtcp.port))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        ip, inside_rtp = session.local(INSIDE, 0)
        inside_rtcp = (ip, inside_rtp + 1)
        outside_rtcp = (ip, session.local(OUTSIDE, 0)[1] + 1)
        far_end = SrtpContext(KEY, SALT)

        # Default: RTCP stays in the clear both ways, even after the grace window.
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 2.0))
        clock.now += 10
        phone_rtcp.send(rtcp_sr(), inside_rtcp)
        await expect(pbx_rtcp, rtcp_sr())
        pbx_rtcp.send(rtcp_sr(FAR_SSRC), outside_rtcp)
        await expect(phone_rtcp, rtcp_sr(FAR_SSRC))

        # SRTCP switched on: protected out, unprotected in, plain dropped after grace.
        context = SrtpKeys(OTHER_KEY, OTHER_SALT)
        far_end = SrtpContext(OTHER_KEY, OTHER_SALT)
        engine.apply(SwitchSrtp(session.id, OUTSIDE, context, 2.0, srtcp=True))
        phone_rtcp.send(rtcp_sr(), inside_rtcp)
        wire, _ = await pbx_rtcp.recv()
        assert far_end.unprotect_rtcp(wire) == rtcp_sr()
        pbx_rtcp.send(far_end.protect_rtcp(rtcp_sr(FAR_SSRC)), outside_rtcp)
        await expect(phone_rtcp, rtcp_sr(FAR_SSRC))
        pbx_rtcp.send(rtcp_sr(FAR_SSRC), outside_rtcp)  # plain, and plain is over
        forged = bytearray(far_end.protect_rtcp(rtcp_sr(FAR_SSRC)))
        forged[-1] ^= 1
        pbx_rtcp.send(bytes(forged), outside_rtcp)  # SRTCP-shaped: not "plain"
        pbx_rtcp.send(far_end.protect_rtcp(rtcp_sr(7)), outside_rtcp)
        await expect(phone_rtcp, rtcp_sr(7))
        assert stat(session, OUTSIDE, "srtp_auth") == 2
        assert stat(session, OUTSIDE, "plain_after_grace") == 1
        assert stat(session, OUTSIDE, "packets_encrypted") == 1
        assert stat(session, OUTSIDE, "packets_decrypted") == 2
        await engine.close()

    run(test)


def test_clear_srtp_goes_back_to_plain(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 0.0))
        pbx.send(far(1), outside)  # no grace at all
        await settle()
        engine.apply(ClearSrtp(session.id, OUTSIDE))  # the handshake fell back
        pbx.send(far(2), outside)
        await expect(phone, far(2))
        phone.send(rtp(3), inside)
        await expect(pbx, rtp(3))
        assert stat(session, OUTSIDE, "srtp_auth") == 1
        # set_srtp(None) is the same thing; set_srtp(context) is SRTP at once, no grace.
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        pbx.send(far(4), outside)
        await settle()
        engine.apply(SetSrtp(session.id, OUTSIDE, None))
        pbx.send(far(5), outside)
        await expect(phone, far(5))
        assert stat(session, OUTSIDE, "srtp_auth") == 2
        await engine.close()

    run(test)


# --------------------------------------------------------------------------- tones


def test_tone_is_mixed_toward_the_phone_only_while_it_sounds(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        # The outside is SRTP: the tone is mixed into what the relay decrypted.
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        far_end = SrtpContext(KEY, SALT)
        # 60 ms of 1 kHz, 60 ms gap, 60 ms of 1 kHz, cut at 200 ms: with 20 ms packets,
        # packets 0-2 and 6-8 carry it.
        tone = Tone.parse("1000@-10;.2(.06/.06/1)")
        engine.apply(PlayTone(session.id, INSIDE, 0, tone))
        silence = b"\xff" * 160  # u-law
        received = []
        for seq in range(12):
            pbx.send(far_end.protect(rtp(seq, FAR_SSRC, 0, silence)), outside)
            received.append((await phone.recv())[0])
        changed = [seq for seq, data in enumerate(received) if data[12:] != silence]
        assert changed == [0, 1, 2, 6, 7, 8]
        assert all(data[:12] == rtp(seq, FAR_SSRC)[:12] for seq, data in enumerate(received))
        assert stat(session, INSIDE, "tone_packets") == 6
        assert session._legs[INSIDE][0].tone is None  # done: back to the bare path

        # Nothing toward the PBX was touched.
        phone.send(rtp(1, payload=silence), inside)
        assert far_end.unprotect((await pbx.recv())[0]) == rtp(1, payload=silence)

        # A-law is mixed too; another payload type is counted and left alone.
        engine.apply(PlayTone(session.id, INSIDE, 0, tone))
        pbx.send(far_end.protect(rtp(20, FAR_SSRC, 18, b"\x12" * 20)), outside)  # G.729
        assert (await phone.recv())[0] == rtp(20, FAR_SSRC, 18, b"\x12" * 20)
        pbx.send(far_end.protect(rtp(21, FAR_SSRC, 8, b"\xd5" * 160)), outside)
        data = (await phone.recv())[0]
        assert data[1] == 8 and data[12:] != b"\xd5" * 160
        assert stat(session, INSIDE, "tone_skipped") == 1
        assert stat(session, INSIDE, "tone_packets") == 7
        engine.apply(PlayTone(session.id, INSIDE, 0, None))  # stopped
        pbx.send(far_end.protect(rtp(22, FAR_SSRC, 8, b"\xd5" * 160)), outside)
        assert (await phone.recv())[0] == rtp(22, FAR_SSRC, 8, b"\xd5" * 160)
        await engine.close()

    run(test)


# --------------------------------------------------------------------------- hostile peers
#
# What the relay takes from a secured side's address that is not the peer's SRTP (plain
# windows: proxy.media.grace), what it takes on RTCP ports (proxy.media.rtcp), and who
# may take a latch over. The rules themselves are tested as pure functions in
# test_packet_rules.py; here, that the relay applies them, through commands and sockets.


def forged_srtp(seq: int, ssrc: int = FAR_SSRC) -> bytes:
    """What an attacker who saw the stream can send: the peer's SSRC and next sequence
    number, then bytes that only look encrypted, and a tag it cannot compute."""
    return rtp(seq, ssrc=ssrc, payload=bytes((seq * 7 + i) & 0xFF for i in range(170)))


def test_grace_takes_only_the_peers_plain_stream_and_closes_on_its_srtp(run: Runner) -> None:
    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session, phone, pbx = await call(engine)
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        far_end = SrtpContext(KEY, SALT)
        pbx.send(far(100), outside)  # the peer's plain stream: the reference
        await expect(phone, far(100))
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), grace_s=2.0))
        assert (stat(session, OUTSIDE, "grace_ssrc"), stat(session, OUTSIDE, "grace_seq")) == (
            FAR_SSRC, 100)  # fmt: skip
        phone.send(rtp(1), inside)
        assert far_end.unprotect((await pbx.recv())[0]) == rtp(1)

        clock.now += 1.0  # the grace window is open; the peer has not switched yet
        for junk in (
            b"\x00" * 40,  # P1: not RTP
            b"\x40" + far(101)[1:],  # P1: version 1
            far(101)[:1] + bytes((200,)) + far(101)[2:],  # P1: PT 72 + marker: RTCP's
            rtp(101, ssrc=FAR_SSRC + 1),  # P2: another SSRC
            far(100),  # P3: a duplicate
            far(99),  # P3: late
            far(100 + 33),  # P3: too far ahead
        ):
            pbx.send(junk, outside)
        pbx.send(far(101), outside)  # the peer's stream going on
        await expect(phone, far(101))
        pbx.send(far(101 + 32), outside)  # 31 lost: still the peer's stream
        await expect(phone, far(133))
        drops = session.stats()[OUTSIDE][0]["drops"]
        assert (drops["grace_not_rtp"], drops["grace_wrong_ssrc"], drops["grace_bad_sequence"]
                ) == (3, 1, 3)  # fmt: skip
        assert drops["srtp_auth"] == 0 and stat(session, OUTSIDE, "plain_accepted") == 2
        assert stat(session, OUTSIDE, "grace_seq") == 133

        # The peer's first SRTP packet closes the window: 50 forged packets with its SSRC
        # and its next sequence numbers, sent while the clock is still within the grace
        # window, are all dropped.
        pbx.send(far_end.protect(far(134)), outside)
        await expect(phone, far(134))
        for seq in range(135, 185):
            pbx.send(forged_srtp(seq), outside)
        pbx.send(far(185), outside)  # and plain from the peer is no longer taken either
        pbx.send(far_end.protect(far(186)), outside)
        await expect(phone, far(186))
        assert stat(session, OUTSIDE, "srtp_auth") == 51
        assert stat(session, OUTSIDE, "plain_accepted") == 2
        await engine.close()

    run(test)


def test_no_plain_before_the_switch_the_first_in_the_window_is_the_reference(run: Runner
                                                                          ) -> None:  # fmt: skip
    """The peer's first packets were queued behind the switch-over (a busy worker), or it
    started sending late: its first plain packet in the window sets the reference."""

    async def test() -> None:
        clock = FakeClock()
        engine = clocked_engine(clock)
        session, phone, pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), grace_s=2.0))
        assert stat(session, OUTSIDE, "grace_ssrc") == -1
        pbx.send(b"\x00" * 40, outside)  # P1 still applies, and sets nothing
        pbx.send(far(1), outside)
        await expect(phone, far(1))
        assert (stat(session, OUTSIDE, "grace_ssrc"), stat(session, OUTSIDE, "grace_seq")) == (
            FAR_SSRC, 1)  # fmt: skip
        pbx.send(rtp(2, ssrc=0x5555), outside)  # from now on: the peer's stream only
        pbx.send(far(50), outside)
        pbx.send(far(2), outside)
        await expect(phone, far(2))
        assert stat(session, OUTSIDE, "grace_not_rtp") == 1
        assert stat(session, OUTSIDE, "grace_wrong_ssrc") == 1
        assert stat(session, OUTSIDE, "grace_bad_sequence") == 1
        await engine.close()

    run(test)


def test_accepting_before_the_switch_takes_only_the_peers_plain_stream(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        outside = session.local(OUTSIDE, 0)
        pbx.send(far(7), outside)
        await expect(phone, far(7))
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        pbx.send(forged_srtp(30), outside)  # 22 ahead: taken as plain, the limit of P3 ...
        await expect(phone, forged_srtp(30))
        pbx.send(forged_srtp(70), outside)  # ... but not 40 ahead of that
        pbx.send(rtp(31, ssrc=0x5555), outside)
        pbx.send(far(31), outside)
        await expect(phone, far(31))
        assert stat(session, OUTSIDE, "grace_bad_sequence") == 1
        assert stat(session, OUTSIDE, "grace_wrong_ssrc") == 1
        # A second AcceptSrtp (other keys, still plain) keeps the reference it has.
        engine.apply(AcceptSrtp(session.id, OUTSIDE, SrtpKeys(OTHER_KEY, OTHER_SALT)))
        pbx.send(far(32), outside)
        await expect(phone, far(32))
        # ClearSrtp (the handshake failed): plain again, no window, no reference.
        engine.apply(ClearSrtp(session.id, OUTSIDE))
        assert stat(session, OUTSIDE, "grace_ssrc") == -1
        pbx.send(rtp(1, ssrc=0x5555), outside)
        await expect(phone, rtp(1, ssrc=0x5555))
        await engine.close()

    run(test)


def test_srtcp_in_the_grace_window_takes_only_the_peers_valid_rtcp(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, pbx = await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port, rtcp_mux=True))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port, rtcp_mux=True))
        outside = session.local(OUTSIDE, 0)
        pbx.send(far(1), outside)
        await expect(phone, far(1))
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 2.0, srtcp=True))
        pbx.send(rtcp_sr(0x5555), outside)  # P2: not the peer's SSRC
        pbx.send(rtcp_sr(FAR_SSRC) + bytes(14), outside)  # P1: not a valid compound
        pbx.send(rtcp_sr(FAR_SSRC), outside)
        await expect(phone, rtcp_sr(FAR_SSRC))
        assert stat(session, OUTSIDE, "grace_wrong_ssrc") == 1
        assert stat(session, OUTSIDE, "grace_not_rtp") == 1
        await engine.close()

    run(test)


def sdes_app(ssrc: int = 0x11223344) -> bytes:
    """An SDES (CNAME "phone") and an APP packet carrying ``LEAK``: 16 + 20 bytes."""
    sdes = struct.pack("!BBHI", 0x81, 202, 3, ssrc) + b"\x01\x05phone\x00"
    app = struct.pack("!BBHI", 0x80, 204, 4, ssrc) + b"name" + b"LEAK" * 2
    return sdes + app


def test_rtcp_ports_relay_only_valid_compound_rtcp(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, phone_rtcp, pbx, pbx_rtcp = await peer(), await peer(), await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone_rtcp.port))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        ip, inside_rtp = session.local(INSIDE, 0)
        inside_rtcp = (ip, inside_rtp + 1)
        outside_rtcp = (ip, session.local(OUTSIDE, 0)[1] + 1)
        squatter = await peer()  # the phone's IP, another port: an invalid packet first
        squatter.send(rtp(0), inside_rtcp)
        for seq in range(20):  # RTP sent to an RTCP port: never relayed, on a plain call too
            phone_rtcp.send(rtp(seq), inside_rtcp)
        phone_rtcp.send(rtcp_sr() + b"\x00", inside_rtcp)  # framing that does not add up
        phone_rtcp.send(rtcp_sr() + sdes_app(), inside_rtcp)
        await expect(pbx_rtcp, rtcp_sr() + sdes_app())  # a plain leg: relayed as it is
        assert stat(session, INSIDE, "rtcp_invalid") == 22
        assert stat(session, INSIDE, "rtcp_packets_in") == 1
        pbx_rtcp.send(rtp(1), outside_rtcp)
        pbx_rtcp.send(rtcp_sr(FAR_SSRC), outside_rtcp)
        await expect(phone_rtcp, rtcp_sr(FAR_SSRC))
        assert stat(session, OUTSIDE, "rtcp_invalid") == 1
        # An invalid packet does not latch: the phone's RTCP latched, not the squatter.
        assert session.legs(INSIDE)[0].rtcp_peer == (HOST, phone_rtcp.port)
        assert stat(session, INSIDE, "relatched") == 0
        await engine.close()

    run(test)


def test_rtcp_on_a_muxed_port_is_checked_too(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, pbx = await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port, rtcp_mux=True))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port, rtcp_mux=True))
        inside = session.local(INSIDE, 0)
        phone.send(rtp(1, pt=0xC8), inside)  # marker + PT 72: taken for RTCP, not valid
        phone.send(rtcp_sr(), inside)
        await expect(pbx, rtcp_sr())
        assert stat(session, INSIDE, "rtcp_invalid") == 1
        await engine.close()

    run(test)


def test_rtcp_toward_a_secured_side_in_the_clear_is_sr_rr_sdes_bye_only(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, phone_rtcp, pbx, pbx_rtcp = await peer(), await peer(), await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone_rtcp.port))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        ip, inside_rtp = session.local(INSIDE, 0)
        inside_rtcp = (ip, inside_rtp + 1)
        outside_rtcp = (ip, session.local(OUTSIDE, 0)[1] + 1)
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 2.0))  # SRTCP off
        for seq in range(20):
            phone_rtcp.send(rtp(seq), inside_rtcp)
        phone_rtcp.send(rtcp_sr() + sdes_app(), inside_rtcp)
        await expect(pbx_rtcp, rtcp_sr() + sdes_app()[:16])  # the APP packet left out
        assert stat(session, INSIDE, "rtcp_invalid") == 20
        assert stat(session, OUTSIDE, "rtcp_stripped") == 1
        phone_rtcp.send(sdes_app()[16:], inside_rtcp)  # an APP alone: nothing left to send
        phone_rtcp.send(rtcp_sr(), inside_rtcp)
        await expect(pbx_rtcp, rtcp_sr())
        assert stat(session, OUTSIDE, "rtcp_stripped") == 2
        assert stat(session, INSIDE, "rtcp_invalid") == 20
        # Toward the phone (plain) nothing is stripped.
        pbx_rtcp.send(rtcp_sr(FAR_SSRC) + sdes_app(FAR_SSRC), outside_rtcp)
        await expect(phone_rtcp, rtcp_sr(FAR_SSRC) + sdes_app(FAR_SSRC))
        # SRTCP on: the compound leaves whole, encrypted.
        engine.apply(SwitchSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT), 2.0, srtcp=True))
        phone_rtcp.send(rtcp_sr() + sdes_app(), inside_rtcp)
        wire, _ = await pbx_rtcp.recv()
        assert SrtpContext(KEY, SALT).unprotect_rtcp(wire) == rtcp_sr() + sdes_app()
        assert stat(session, OUTSIDE, "rtcp_stripped") == 2
        await engine.close()

    run(test)


def test_the_exact_sdp_source_takes_the_rtcp_latch_over(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, phone_rtcp, pbx, pbx_rtcp = await peer(), await peer(), await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone_rtcp.port))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        ip, inside_rtp = session.local(INSIDE, 0)
        inside_rtcp = (ip, inside_rtp + 1)
        outside_rtcp = (ip, session.local(OUTSIDE, 0)[1] + 1)
        squatter = await peer()  # the phone's IP, another port, first
        squatter.send(rtcp_sr(0x666), inside_rtcp)
        await expect(pbx_rtcp, rtcp_sr(0x666))
        pbx_rtcp.send(rtcp_sr(FAR_SSRC), outside_rtcp)
        await expect(squatter, rtcp_sr(FAR_SSRC))
        phone_rtcp.send(rtcp_sr(), inside_rtcp)  # the SDP's exact RTCP address
        await expect(pbx_rtcp, rtcp_sr())
        squatter.send(rtcp_sr(0x666), inside_rtcp)
        pbx_rtcp.send(rtcp_sr(FAR_SSRC), outside_rtcp)
        await expect(phone_rtcp, rtcp_sr(FAR_SSRC))
        assert squatter.queue.empty()
        assert stat(session, INSIDE, "relatched") == 1
        assert stat(session, INSIDE, "wrong_source") == 1
        await engine.close()

    run(test)


def test_on_an_srtp_side_the_sdp_source_takes_over_only_when_authenticated(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session, phone, pbx = await call(engine)
        engine.apply(SetSrtp(session.id, OUTSIDE, SrtpKeys(KEY, SALT)))
        far_end = SrtpContext(KEY, SALT)
        outside = session.local(OUTSIDE, 0)
        natted = await peer()  # the PBX's own packets, through a port-rewriting NAT
        natted.send(far_end.protect(far(1)), outside)
        await expect(phone, far(1))
        pbx.send(forged_srtp(2), outside)  # from the SDP's address, not authenticated
        natted.send(far_end.protect(far(3)), outside)
        await expect(phone, far(3))  # the NAT's port still holds the latch
        assert stat(session, OUTSIDE, "relatched") == 0
        pbx.send(far_end.protect(far(4)), outside)  # authenticated from the SDP's address
        await expect(phone, far(4))
        natted.send(far_end.protect(far(5)), outside)
        pbx.send(far_end.protect(far(6)), outside)
        await expect(phone, far(6))
        assert stat(session, OUTSIDE, "relatched") == 1
        assert stat(session, OUTSIDE, "wrong_source") == 1
        assert stat(session, OUTSIDE, "srtp_auth") == 1
        await engine.close()

    run(test)


def test_with_latch_any_the_exact_sdp_source_still_takes_over(run: Runner) -> None:
    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("c", 1)
        phone, pbx, elsewhere = await peer(), await peer(), await peer(OTHER_HOST)
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone.port + 1,
                               latch="any"))  # fmt: skip
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
        inside = session.local(INSIDE, 0)
        elsewhere.send(rtp(1), inside)  # first from anywhere: latches
        await expect(pbx, rtp(1))
        phone.send(rtp(2), inside)
        await expect(pbx, rtp(2))
        elsewhere.send(rtp(3), inside)
        phone.send(rtp(4), inside)
        await expect(pbx, rtp(4))
        assert stat(session, INSIDE, "relatched") == 1
        await engine.close()

    run(test)


def test_refusals_are_logged_rate_limited_with_their_reason(
    run: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from proxy.media import relay_leg
    from proxy.ratelimit import LogLimiter

    monkeypatch.setattr(relay_leg, "_noise", LogLimiter(relay_leg.log))  # nothing held yet

    async def test() -> None:
        engine = make_engine()
        session, phone, _pbx = await call(engine)
        inside_rtcp = (HOST, session.local(INSIDE, 0)[1] + 1)
        for seq in range(5):
            phone.send(rtp(seq), inside_rtcp)
        await settle()
        assert stat(session, INSIDE, "rtcp_invalid") == 5
        await engine.close()

    with caplog.at_level(logging.INFO, logger="sipura.media"):
        run(test)
    lines = [r.getMessage() for r in caplog.records if "rtcp_invalid" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "inside peer 127.0.0.1" in lines[0] and "not a valid compound RTCP" in lines[0]
