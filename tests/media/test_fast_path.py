"""The compiled packet path (proxy.media._fastrelay) against its Python reference.

test_relay.py runs the whole relay on both paths; here: the compiled path is built where
it can be, its packet rules, SRTP and tone mixing equal the Python ones on arbitrary
input, and malformed RTP/RTCP/SRTP thrown at a secured call on either path crashes
nothing and leaves the call relaying.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import sysconfig
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.media import grace, packet_path, rtcp
from proxy.media.commands import PlayTone, SetRemote, SetTxSsrc, SrtpKeys, SwitchSrtp
from proxy.media.engine import Side
from proxy.media.packet_path import built_paths, fast_path_unavailable, resolve
from proxy.media.relay import RelayEngine, RelaySession
from proxy.media.relay_leg import plain_rtcp, plain_rtp
from proxy.media.srtp import SrtpContext, SrtpError, SrtpReplayError
from proxy.media.tones import PCMA, PCMU, Tone, ToneMixer
from testkit.ports import media_range

WHY = fast_path_unavailable()
needs_fast = pytest.mark.skipif(WHY is not None, reason=f"compiled path not built: {WHY}")

HOST = "127.0.0.1"
FUZZ_PACKETS = int(os.environ.get("SIPURA_FUZZ_PACKETS", "4000"))
"""Damaged packets per fuzz run: bounded in CI; raise it for a soak (under ASan, say)."""
KEYS = SrtpKeys(bytes(range(16)), bytes(range(16, 32)))
INSIDE, OUTSIDE = Side.INSIDE, Side.OUTSIDE


def can_build() -> bool:
    """What setup.py needs to build the extension is installed here."""
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return (
        shutil.which(os.environ.get("CC", "gcc")) is not None
        and include.exists()
        and Path("/usr/include/srtp2/srtp.h").exists()
        and Path("/usr/include/openssl/evp.h").exists()
    )


def test_the_compiled_path_is_built_where_it_can_be() -> None:
    if not can_build():
        pytest.skip("no compiler, Python headers, libsrtp2 or libssl headers here")
    assert WHY is None, f"the compiled packet path should have been built: {WHY}"
    assert resolve("auto") == "fast"


def test_modes_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("off") == "python"
    with pytest.raises(ValueError, match="fast_path must be one of"):
        resolve("yes")
    monkeypatch.setattr(packet_path, "fast_path_unavailable", lambda: "not built")
    assert resolve("auto") == "python"
    with pytest.raises(ValueError, match="cannot run: not built"):
        resolve("on")


# --------------------------------------------------------------------------- rules


def rtcp_like(draw: Any) -> bytes:
    """Compound RTCP, often valid, sometimes cut or padded wrong."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        words = draw(st.integers(0, 12))
        first = draw(st.sampled_from([0x80, 0x81, 0x82, 0xA0, 0xA1, 0x40, 0x9F]))
        kind = draw(st.sampled_from([200, 201, 202, 203, 204, 205, 206, 207, 192, 223, 72, 8]))
        body = bytearray(draw(st.binary(min_size=4 * words, max_size=4 * words)))
        if first & 0x20 and body:
            body[-1] = draw(st.sampled_from([0, 3, 4, 8, 12, 255]))
        parts.append(bytes((first, kind)) + struct.pack("!H", words) + bytes(body))
    data = b"".join(parts)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def packets(draw: Any) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return cast(bytes, draw(st.binary(max_size=120)))
    if kind == 1:
        return rtcp_like(draw)
    first = draw(st.sampled_from([0x80, 0x90, 0xA0, 0xB3, 0x8F]))
    header = bytes((first, draw(st.integers(0, 255))))
    return header + cast(bytes, draw(st.binary(max_size=100)))


@needs_fast
@settings(max_examples=3000, deadline=None)
@given(packets(), st.integers(-1, 0xFFFFFFFF), st.integers(-1, 0xFFFF))
def test_the_c_rules_are_the_python_rules(data: bytes, ssrc: int, seq: int) -> None:
    from proxy.media import _fastrelay as c

    assert c.rtp_shaped(data) == grace.rtp_shaped(data)
    assert c.plain_reference(data) == grace.plain_reference(data)
    assert c.valid_compound(data) == rtcp.valid_compound(data)
    assert c.plain_rtp(data) == plain_rtp(data)
    assert c.plain_rtcp(data) == plain_rtcp(data)
    if len(data) >= 12 and ssrc % 2:  # often the packet's own SSRC, near its sequence
        ssrc = int.from_bytes(data[8:12], "big")
        seq = (((data[2] << 8) | data[3]) - seq % 40) & 0xFFFF
    assert c.refuse_plain_rtp(data, ssrc, seq) == grace.refuse_plain_rtp(data, ssrc, seq)
    assert c.refuse_plain_rtcp(data, ssrc) == grace.refuse_plain_rtcp(data, ssrc)
    if rtcp.valid_compound(data):
        assert c.clear_compound(data) == rtcp.clear_compound(data)


# --------------------------------------------------------------------------- SRTP, tones


def rtp(seq: int, ssrc: int = 0x11223344, pt: int = 0, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, seq * 160, ssrc) + payload


@needs_fast
def test_srtp_is_libsrtp_byte_for_byte_and_fails_the_same_way() -> None:
    from proxy.media import _fastrelay as c

    for profile in ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"):
        keys = SrtpKeys(KEYS.master_key, KEYS.master_salt, profile)
        ours, theirs, receiver = c.Srtp(keys), SrtpContext.from_keys(keys), c.Srtp(keys)
        assert ours.keys is keys and "key" not in repr(ours).lower()
        for seq in (0, 1, 2, 70000, 70001):
            packet = rtp(seq, payload=bytes(range(160)))
            protected = theirs.protect(packet)
            assert ours.protect(packet) == protected
            assert receiver.unprotect(protected) == packet
            report = struct.pack("!BBHIIIIII", 0x80, 200, 6, 0x1234, seq, 0, 0, 0, 0)
            assert ours.protect_rtcp(report) == theirs.protect_rtcp(report)
        with pytest.raises(ValueError, match="9"):  # replay_fail, as SrtpReplayError
            receiver.unprotect(protected)
        with pytest.raises(SrtpReplayError):
            theirs_rx = SrtpContext.from_keys(keys)
            theirs_rx.unprotect(protected)
            theirs_rx.unprotect(protected)
        forged = bytearray(theirs.protect(rtp(70002)))
        forged[-1] ^= 1
        with pytest.raises(ValueError, match="7"):  # auth_fail
            receiver.unprotect(bytes(forged))
        with pytest.raises(ValueError):  # pylibsrtp's size limit, kept
            ours.protect(rtp(10, payload=bytes(1400)))
        with pytest.raises(SrtpError):
            theirs.protect(rtp(10, payload=bytes(1400)))


@needs_fast
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([PCMU, PCMA, 18, 13]),
            st.integers(0, 400),
            st.integers(0, 3000),
            st.booleans(),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_tone_mixing_is_tone_mixer(stream: list[tuple[int, int, int, bool, bool]]) -> None:
    from proxy.media.fast_path import FastPath

    tone = Tone.parse("1000@-10,300@-20;0.04(0.01/0.005/1,0.01/0.01/1+2);0.03(0/0.03/0)")
    reference, ours = ToneMixer(tone), FastPath().mixer(tone)
    ts = 0
    for pt, size, step, padded, extension in stream:
        ts = (ts + step) & 0xFFFFFFFF
        first = 0x80 | (0x20 if padded else 0) | (0x10 if extension else 0)
        body = bytes((i * 7) & 0xFF for i in range(size))
        if extension:
            body = b"\xbe\xde\x00\x01" + bytes(4) + body
        if padded and body:
            body = body[:-1] + bytes((min(len(body), 4),))
        packet = struct.pack("!BBHII", first, pt, 1, ts, 5) + body
        expected = reference.mix(packet)
        got = ours.mix(packet)
        assert got == expected
        assert ours.done == reference.done
    assert ours.mix(b"\x80") is None and reference.mix(b"\x80") is None


# --------------------------------------------------------------------------- fuzz


def mutate(rng: random.Random, packet: bytes) -> bytes:
    """A damaged copy: bytes flipped, cut, grown, header fields set to extremes."""
    data = bytearray(packet)
    for _ in range(rng.randrange(1, 6)):
        action = rng.randrange(6)
        if action == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif action == 1:
            data = data[: rng.randrange(len(data) + 1)]
        elif action == 2:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif action == 3 and len(data) > 1:
            data[0] = rng.choice([0x8F, 0x9F, 0xBF, 0xA0, 0x00, 0xFF])
        elif action == 4 and len(data) > 3:
            data[2:4] = b"\xff\xff"  # a header extension / RTCP length far too long
        elif action == 5 and len(data) > 1:
            data[1] = rng.choice([200, 201, 204, 0, 8, 72, 127, 255])
    return bytes(data)


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.got.append(data)


async def drained(session: RelaySession) -> None:
    """Until the relay has taken everything in its sockets' buffers (its counters of
    packets taken in or dropped stop moving)."""

    def handled() -> int:
        return sum(
            leg["packets_in"] + sum(leg["drops"].values())
            for legs in session.stats().values()
            for leg in legs
        )

    last = -1
    while (now := handled()) != last:
        last = now
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("path", built_paths())
def test_malformed_media_crashes_nothing_and_the_call_goes_on(path: str) -> None:
    """A secured call with a tone playing and RTCP muxed on one side, under 4000 damaged
    RTP, RTCP, SRTP and SRTCP packets (and random bytes) on all four ports from the peers
    and from a stranger; then genuine packets still go through both ways."""

    async def test() -> None:
        rng = random.Random(20261206)
        mode = "on" if path == "fast" else "off"
        engine = RelayEngine(HOST, HOST, *media_range(4), fast_path=mode)
        session = engine.allocate("fuzz", 1)
        loop = asyncio.get_running_loop()
        peers = []
        for _ in range(5):
            transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=(HOST, 0))
            peers.append((transport, sink))
        (phone, phone_sink), (pbx, pbx_sink), (pbx_rtcp, _), (stranger, _), (phone_rtcp, _) = peers
        phone_port, pbx_port, pbx_rtcp_port = (
            t.get_extra_info("sockname")[1] for t in (phone, pbx, pbx_rtcp)
        )
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone_port, phone_port, rtcp_mux=True))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx_port, pbx_rtcp_port))
        engine.apply(SwitchSrtp(session.id, OUTSIDE, KEYS, grace_s=0.2, srtcp=True))
        engine.apply(SetTxSsrc(session.id, OUTSIDE, 0x5555))
        engine.apply(PlayTone(session.id, INSIDE, 0, Tone.parse("1000@-10;5(0.1/0.1/1)")))
        inside, outside = session.local(INSIDE, 0), session.local(OUTSIDE, 0)
        far, far_rx = SrtpContext.from_keys(KEYS), SrtpContext.from_keys(KEYS)
        seeds = [rtp(1), rtp(2, pt=8), far.protect(rtp(3, 0xABCD)), far.protect_rtcp(
            struct.pack("!BBHIIIIII", 0x80, 200, 6, 0xABCD, 0, 0, 0, 0, 0)),
            struct.pack("!BBHIIIIII", 0x81, 201, 7, 1, 2, 3, 4, 5, 6) + bytes(4)]  # fmt: skip
        targets = [inside, (HOST, inside[1] + 1), outside, (HOST, outside[1] + 1)]
        senders = [phone, pbx, pbx_rtcp, stranger, phone_rtcp]
        await asyncio.sleep(0.02)
        for n in range(FUZZ_PACKETS):
            if n % 7 == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            else:
                data = mutate(rng, rng.choice(seeds))
            rng.choice(senders).sendto(data, rng.choice(targets))
            if n % 200 == 0:
                await asyncio.sleep(0.005)  # let the relay drain its buffers
        await asyncio.sleep(0.3)  # the grace window is over: only SRTP from the PBX now
        await drained(session)
        phone_sink.got.clear()
        pbx_sink.got.clear()
        for seq in range(4, 54):  # the far end's stream goes on after the seed's packet 3
            phone.sendto(rtp(5000 + seq), inside)
            pbx.sendto(far.protect(rtp(seq, 0xABCD)), outside)
            await asyncio.sleep(0.01)
            if pbx_sink.got and phone_sink.got:
                break
        assert pbx_sink.got and far_rx.unprotect(pbx_sink.got[-1])[8:12] == b"\x00\x00\x55\x55"
        assert phone_sink.got and phone_sink.got[-1][8:12] == (0xABCD).to_bytes(4, "big")
        stats = session.stats()
        assert sum(stats[OUTSIDE][0]["drops"].values()) > 100  # the noise was refused
        for transport, _ in peers:
            transport.close()
        await engine.close()

    asyncio.run(asyncio.wait_for(test(), 30))
