"""SetSrtp as SDES uses it (RFC 4568): a key per direction, per stream, either suite.

With SDES each end announces the key *it* sends with, so the relay protects toward the
peer with the proxy's key and checks what comes from the peer with the peer's key (a
:class:`SetSrtp` with ``remote_keys``), and each ``m=`` line has keys of its own (its
``index``). The far end here is libsrtp itself (pylibsrtp sessions built in the test,
not the relay's wrapper), one outbound session per key it sends with and one inbound
session per key it receives with, as a real SDES peer holds them.
"""

from __future__ import annotations

import pylibsrtp

from proxy.media.commands import SetRemote, SetSrtp, SrtpKeys
from proxy.media.engine import Side
from proxy.media.relay import RelayEngine, RelaySession
from tests.media.test_relay import (
    HOST,
    Peer,
    Runner,
    expect,
    make_engine,
    peer,
    rtp,
    run,
    settle,
    stat,
)

__all__ = ["run"]  # the fixture, used by name

INSIDE, OUTSIDE = Side.INSIDE, Side.OUTSIDE
SUITE_80, SUITE_32 = "AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"
PROFILES = {
    SUITE_80: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    SUITE_32: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}
TAG_LENGTH = {SUITE_80: 10, SUITE_32: 4}
FAR_SSRC = 0x0BADCAFE


def keys(first: int, suite: str = SUITE_80) -> SrtpKeys:
    """A distinct SDES key (16-byte key, 14-byte salt) per ``first``."""
    material = bytes((first + i) % 256 for i in range(30))
    return SrtpKeys(material[:16], material[16:], suite)


def far_session(key: SrtpKeys, outbound: bool) -> pylibsrtp.Session:
    """The far end's libsrtp session for ``key``: to protect what it sends, or to
    unprotect what it receives."""
    policies = pylibsrtp.Policy
    ssrc_type = policies.SSRC_ANY_OUTBOUND if outbound else policies.SSRC_ANY_INBOUND
    policy = pylibsrtp.Policy(key=key.master_key + key.master_salt, ssrc_type=ssrc_type,
                              srtp_profile=PROFILES[key.profile])  # fmt: skip
    return pylibsrtp.Session(policy=policy)


async def two_stream_call() -> tuple[RelayEngine, list[Peer], list[Peer], RelaySession]:
    """A two-stream call (audio and another RTP stream): a phone and a PBX per stream."""
    engine = make_engine()
    session = engine.allocate("sdes", 2)
    phones, pbxs = [await peer(), await peer()], [await peer(), await peer()]
    for index in range(2):
        phone, pbx = phones[index], pbxs[index]
        engine.apply(SetRemote(session.id, INSIDE, index, HOST, phone.port, phone.port + 1))
        engine.apply(SetRemote(session.id, OUTSIDE, index, HOST, pbx.port, pbx.port + 1))
    return engine, phones, pbxs, session


def test_sdes_keys_differ_per_direction_and_per_stream(run: Runner) -> None:
    """Stream 0 on the _80 suite, stream 1 on _32, four different keys: each stream's
    packets toward the peer verify under the proxy's key of that stream only, and the
    peer's packets are accepted under the peer's key of that stream only."""

    async def test() -> None:
        engine, phones, pbxs, session = await two_stream_call()
        ours = [keys(1), keys(101, SUITE_32)]
        theirs = [keys(51), keys(151, SUITE_32)]
        for index in range(2):
            engine.apply(SetSrtp(session.id, OUTSIDE, ours[index], remote_keys=theirs[index],
                                 index=index))  # fmt: skip

        for index in range(2):
            phone, pbx = phones[index], pbxs[index]
            suite = ours[index].profile
            inside, outside = session.local(INSIDE, index), session.local(OUTSIDE, index)
            # Toward the peer: protected with the proxy's key of this stream, this suite.
            phone.send(rtp(1), inside)
            wire, _ = await pbx.recv()
            assert wire[:12] == rtp(1)[:12] and wire[12:172] != rtp(1)[12:]
            assert len(wire) == len(rtp(1)) + TAG_LENGTH[suite]
            assert far_session(ours[index], outbound=False).unprotect(wire) == rtp(1)
            for wrong in (theirs[index], ours[1 - index]):  # the peer's or the other stream's
                if wrong.profile == suite:
                    try:
                        far_session(wrong, outbound=False).unprotect(wire)
                    except pylibsrtp.Error:
                        pass
                    else:
                        raise AssertionError(f"stream {index} verified under a wrong key")

            # From the peer: its own key of this stream is accepted ...
            sender = far_session(theirs[index], outbound=True)
            pbx.send(sender.protect(rtp(1, FAR_SSRC)), outside)
            await expect(phone, rtp(1, FAR_SSRC))
            # ... the proxy's key (a peer that echoed our key back) is not, nor is the
            # other stream's peer key.
            pbx.send(far_session(ours[index], outbound=True).protect(rtp(2, FAR_SSRC)), outside)
            other = theirs[1 - index]
            pbx.send(far_session(other, outbound=True).protect(rtp(3, FAR_SSRC)), outside)
            pbx.send(sender.protect(rtp(4, FAR_SSRC)), outside)
            await expect(phone, rtp(4, FAR_SSRC))
            assert stat(session, OUTSIDE, "srtp_auth", index) == 2
            assert stat(session, OUTSIDE, "packets_decrypted", index) == 2
            assert stat(session, OUTSIDE, "packets_encrypted", index) == 1
        await engine.close()

    run(test)


def test_keying_one_stream_leaves_the_other_alone(run: Runner) -> None:
    """``index`` 1 only: stream 0 stays plain both ways, stream 1 is SRTP."""

    async def test() -> None:
        engine, phones, pbxs, session = await two_stream_call()
        ours, theirs = keys(7), keys(77)
        engine.apply(SetSrtp(session.id, OUTSIDE, ours, remote_keys=theirs, index=1))
        phones[0].send(rtp(1), session.local(INSIDE, 0))
        await expect(pbxs[0], rtp(1))
        pbxs[0].send(rtp(2, FAR_SSRC), session.local(OUTSIDE, 0))
        await expect(phones[0], rtp(2, FAR_SSRC))
        phones[1].send(rtp(1), session.local(INSIDE, 1))
        wire, _ = await pbxs[1].recv()
        assert far_session(ours, outbound=False).unprotect(wire) == rtp(1)
        pbxs[1].send(rtp(2, FAR_SSRC), session.local(OUTSIDE, 1))  # plain on an SRTP stream
        await settle()
        assert phones[1].queue.empty()
        assert stat(session, OUTSIDE, "srtp_auth", 1) == 1
        assert stat(session, OUTSIDE, "srtp_auth", 0) == 0
        await engine.close()

    run(test)


def test_the_same_keys_again_keep_each_streams_srtp_state(run: Runner) -> None:
    """A re-INVITE that keeps the keys (RFC 4568 §6.8: unchanged a=crypto) re-sends the
    same SetSrtp: every stream keeps its libsrtp state (a replayed packet is still
    refused as a replay), not only stream 0; new keys start a new state."""

    async def test() -> None:
        engine, phones, pbxs, session = await two_stream_call()
        ours = [keys(1), keys(101, SUITE_32)]
        theirs = [keys(51), keys(151, SUITE_32)]

        def key_all(mine: list[SrtpKeys], peer_keys: list[SrtpKeys]) -> None:
            for index in range(2):
                engine.apply(SetSrtp(session.id, OUTSIDE, mine[index],
                                     remote_keys=peer_keys[index], index=index))  # fmt: skip

        key_all(ours, theirs)
        replays = []
        for index in range(2):
            packet = far_session(theirs[index], outbound=True).protect(rtp(9, FAR_SSRC))
            replays.append(packet)
            pbxs[index].send(packet, session.local(OUTSIDE, index))
            await expect(phones[index], rtp(9, FAR_SSRC))

        key_all(ours, theirs)  # unchanged keys: same contexts
        for index in range(2):
            pbxs[index].send(replays[index], session.local(OUTSIDE, index))
        await settle()
        for index in range(2):
            assert phones[index].queue.empty(), f"stream {index}: a replay was accepted"
            assert stat(session, OUTSIDE, "srtp_replay", index) == 1

        # The peer re-keys stream 1 (a new a=crypto): a new key of ours too, fresh state.
        theirs[1], ours[1] = keys(200, SUITE_32), keys(220, SUITE_32)
        key_all(ours, theirs)
        packet = far_session(theirs[1], outbound=True).protect(rtp(9, FAR_SSRC))
        pbxs[1].send(packet, session.local(OUTSIDE, 1))
        await expect(phones[1], rtp(9, FAR_SSRC))
        phones[1].send(rtp(10), session.local(INSIDE, 1))
        wire, _ = await pbxs[1].recv()
        assert far_session(ours[1], outbound=False).unprotect(wire) == rtp(10)
        await engine.close()

    run(test)


def test_srtcp_uses_the_key_of_each_direction_with_an_80_bit_tag_on_both_suites(
    run: Runner,
) -> None:
    """SRTCP under SDES: sent with the proxy's key, accepted with the peer's; the _32
    suite shortens the RTP tag only (RFC 4568 §6.2: SRTCP keeps 80 bits)."""

    async def test() -> None:
        engine = make_engine()
        session = engine.allocate("sdes-rtcp", 1)
        phone, phone_rtcp, pbx, pbx_rtcp = await peer(), await peer(), await peer(), await peer()
        engine.apply(SetRemote(session.id, INSIDE, 0, HOST, phone.port, phone_rtcp.port))
        engine.apply(SetRemote(session.id, OUTSIDE, 0, HOST, pbx.port, pbx_rtcp.port))
        ours, theirs = keys(3, SUITE_32), keys(33, SUITE_32)
        engine.apply(SetSrtp(session.id, OUTSIDE, ours, remote_keys=theirs, index=0))
        inside_rtcp = (session.local(INSIDE, 0)[0], session.local(INSIDE, 0)[1] + 1)
        outside_rtcp = (session.local(OUTSIDE, 0)[0], session.local(OUTSIDE, 0)[1] + 1)
        report = bytes.fromhex("80c90001") + (0x11223344).to_bytes(4, "big")  # empty RR
        phone_rtcp.send(report, inside_rtcp)
        wire, _ = await pbx_rtcp.recv()
        assert len(wire) == len(report) + 4 + 10  # SRTCP index + 80-bit tag
        assert far_session(ours, outbound=False).unprotect_rtcp(wire) == report
        far_report = bytes.fromhex("80c90001") + FAR_SSRC.to_bytes(4, "big")
        pbx_rtcp.send(far_session(theirs, outbound=True).protect_rtcp(far_report), outside_rtcp)
        await expect(phone_rtcp, far_report)
        await engine.close()

    run(test)
