"""SrtpContext: vectors, error classification, re-keys, RTCP, key hygiene."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from proxy.media.srtp import (
    AUTH_TAG_LENGTH,
    SrtpAuthError,
    SrtpContext,
    SrtpError,
    SrtpProtectError,
    SrtpReplayError,
    libsrtp_key,
)

KEY = bytes.fromhex("101112131415161718191a1b1c1d1e1f")
SALT = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
OTHER_KEY = bytes(range(32, 48))
OTHER_SALT = bytes(range(48, 64))


def rtp(seq: int, ssrc: int = 0x11223344, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack(">BBHII", 0x80, 0, seq, seq * 160, ssrc) + payload


def rtcp_rr(ssrc: int = 0x11223344) -> bytes:
    """An empty RTCP Receiver Report (V=2, RC=0, PT=201, length=1 word)."""
    return struct.pack(">BBHI", 0x80, 201, 1, ssrc)


def vector_keys(vectors: dict[str, Any]) -> tuple[bytes, bytes]:
    final = vectors["messages"]["caller_final"]
    return bytes.fromhex(final["master_key_hex"]), bytes.fromhex(final["master_salt_hex"])


# --- vectors --------------------------------------------------------------------------------------


def test_vectors_protect_byte_for_byte(vectors: dict[str, Any]) -> None:
    key, salt = vector_keys(vectors)
    assert (key, salt) == (KEY, SALT)
    assert libsrtp_key(key, salt).hex() == vectors["srtp"]["libsrtp_key_hex"]
    context = SrtpContext(key, salt)
    for packet in vectors["srtp"]["packets"]:
        rtp_bytes = bytes.fromhex(packet["rtp_hex"])
        protected = context.protect(rtp_bytes)
        assert protected.hex() == packet["srtp_hex"]
        assert len(protected) == len(rtp_bytes) + AUTH_TAG_LENGTH
        assert protected[:12] == rtp_bytes[:12]  # the header stays in the clear


def test_vectors_unprotect_in_any_order(vectors: dict[str, Any]) -> None:
    packets = vectors["srtp"]["packets"]
    context = SrtpContext(*vector_keys(vectors))
    for packet in reversed(packets):
        assert context.unprotect(bytes.fromhex(packet["srtp_hex"])) == bytes.fromhex(
            packet["rtp_hex"]
        )


def test_only_the_first_14_salt_bytes_matter(vectors: dict[str, Any]) -> None:
    key, salt = vector_keys(vectors)
    other_tail = salt[:14] + b"\x00\x00"
    context = SrtpContext(key, other_tail)
    packet = vectors["srtp"]["packets"][0]
    assert context.protect(bytes.fromhex(packet["rtp_hex"])).hex() == packet["srtp_hex"]
    changed = SrtpContext(key, b"\x00" + salt[1:])
    assert changed.protect(bytes.fromhex(packet["rtp_hex"])).hex() != packet["srtp_hex"]


def test_key_and_salt_lengths_are_checked() -> None:
    for key, salt in ((KEY[:15], SALT), (KEY, SALT[:14]), (KEY + b"x", SALT), (b"", b"")):
        with pytest.raises(ValueError):
            SrtpContext(key, salt)
        with pytest.raises(ValueError):
            libsrtp_key(key, salt)


# --- error classification -------------------------------------------------------------------------


def test_auth_failure_and_replay_are_distinct_errors() -> None:
    sender, receiver = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    protected = sender.protect(rtp(1000))
    assert receiver.unprotect(protected) == rtp(1000)

    with pytest.raises(SrtpReplayError) as replay:
        receiver.unprotect(protected)
    assert not isinstance(replay.value, SrtpAuthError)

    tampered = bytearray(sender.protect(rtp(1001)))
    tampered[20] ^= 0x01
    with pytest.raises(SrtpAuthError) as auth:
        receiver.unprotect(bytes(tampered))
    assert not isinstance(auth.value, SrtpReplayError)
    assert isinstance(auth.value, SrtpError)
    assert isinstance(replay.value, SrtpError)

    # A tampered packet does not burn its index: the genuine one still goes through.
    genuine = sender.protect(rtp(1002))
    bad_tag = genuine[:-1] + bytes([genuine[-1] ^ 0xFF])
    with pytest.raises(SrtpAuthError):
        receiver.unprotect(bad_tag)
    assert receiver.unprotect(genuine) == rtp(1002)


def test_packet_too_old_for_the_replay_window_is_a_replay_error() -> None:
    sender, receiver = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    old = sender.protect(rtp(1000))
    new = sender.protect(rtp(1300))
    assert receiver.unprotect(new) == rtp(1300)
    with pytest.raises(SrtpReplayError):
        receiver.unprotect(old)


def test_wrong_key_is_an_auth_error() -> None:
    protected = SrtpContext(KEY, SALT).protect(rtp(5))
    with pytest.raises(SrtpAuthError):
        SrtpContext(OTHER_KEY, SALT).unprotect(protected)
    with pytest.raises(SrtpAuthError):
        SrtpContext(KEY, OTHER_SALT).unprotect(protected)


def test_plain_rtp_is_not_accepted_as_srtp() -> None:
    receiver = SrtpContext(KEY, SALT)
    with pytest.raises(SrtpError):
        receiver.unprotect(rtp(9))


@pytest.mark.parametrize("packet", [b"", b"\x80", b"\x80" * 11, b"\x80" * 12, b"\x00" * 40])
def test_garbage_is_an_srtp_error(packet: bytes) -> None:
    with pytest.raises(SrtpError):
        SrtpContext(KEY, SALT).unprotect(packet)
    with pytest.raises(SrtpError):
        SrtpContext(KEY, SALT).unprotect_rtcp(packet)


def test_refusing_to_protect_is_a_protect_error() -> None:
    sender = SrtpContext(KEY, SALT)
    sender.protect(rtp(2000))
    for packet in (rtp(2000), b"\x80", b""):  # index reuse, too short
        with pytest.raises(SrtpProtectError) as info:
            sender.protect(packet)
        assert not isinstance(info.value, SrtpAuthError | SrtpReplayError)
    with pytest.raises(SrtpProtectError):
        sender.protect_rtcp(b"\x80")


# --- re-key ---------------------------------------------------------------------------------------


def test_rekey_is_a_fresh_context_that_refuses_old_packets() -> None:
    old_sender, old_receiver = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    new_sender, new_receiver = (
        SrtpContext(OTHER_KEY, OTHER_SALT),
        SrtpContext(OTHER_KEY, OTHER_SALT),
    )
    for seq in range(100, 110):
        assert old_receiver.unprotect(old_sender.protect(rtp(seq))) == rtp(seq)
    old_packet = old_sender.protect(rtp(110))
    with pytest.raises(SrtpAuthError):
        new_receiver.unprotect(old_packet)
    # Same SSRC and sequence numbers continue under the new key: fresh ROC/replay state.
    new_packet = new_sender.protect(rtp(111))
    assert new_packet != old_sender.protect(rtp(111))
    assert new_receiver.unprotect(new_packet) == rtp(111)
    with pytest.raises(SrtpAuthError):
        old_receiver.unprotect(new_packet)
    # The old context keeps working for late packets under the old key.
    assert old_receiver.unprotect(old_packet) == rtp(110)


def test_fresh_context_tracks_sequence_from_its_first_packet() -> None:
    # A receiver that saw seq 40000 guesses ROC 1 for seq 3 and fails; a fresh context
    # (as a re-key creates) starts at ROC 0 from its first packet and accepts it.
    first_sender, restarted_sender = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    receiver = SrtpContext(KEY, SALT)
    assert receiver.unprotect(first_sender.protect(rtp(40000))) == rtp(40000)
    restarted = restarted_sender.protect(rtp(3))
    with pytest.raises(SrtpAuthError):
        receiver.unprotect(restarted)
    assert SrtpContext(KEY, SALT).unprotect(restarted) == rtp(3)


def test_both_directions_share_one_key_with_distinct_ssrcs() -> None:
    caller, callee = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    up = caller.protect(rtp(1, ssrc=0xAAAA0001))
    down = callee.protect(rtp(1, ssrc=0xBBBB0002))
    assert callee.unprotect(up) == rtp(1, ssrc=0xAAAA0001)
    assert caller.unprotect(down) == rtp(1, ssrc=0xBBBB0002)
    assert up[12:] != down[12:]  # different keystreams


# --- RTCP -----------------------------------------------------------------------------------------


def test_rtcp_protect_unprotect_round_trip() -> None:
    sender, receiver = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    for i in range(3):
        report = rtcp_rr(0x11223344)
        protected = sender.protect_rtcp(report)
        assert protected != report
        assert len(protected) > len(report)  # E flag + SRTCP index + tag
        assert protected[:8] == report[:8]
        assert receiver.unprotect_rtcp(protected) == report, i
    with pytest.raises(SrtpReplayError):
        receiver.unprotect_rtcp(protected)
    tampered = bytearray(sender.protect_rtcp(rtcp_rr()))
    tampered[-1] ^= 0x01
    with pytest.raises(SrtpAuthError):
        receiver.unprotect_rtcp(bytes(tampered))
    with pytest.raises(SrtpAuthError):
        SrtpContext(OTHER_KEY, OTHER_SALT).unprotect_rtcp(sender.protect_rtcp(rtcp_rr()))


def test_rtcp_and_rtp_state_are_independent() -> None:
    sender, receiver = SrtpContext(KEY, SALT), SrtpContext(KEY, SALT)
    assert receiver.unprotect(sender.protect(rtp(7))) == rtp(7)
    assert receiver.unprotect_rtcp(sender.protect_rtcp(rtcp_rr())) == rtcp_rr()


# --- key hygiene ----------------------------------------------------------------------------------


def test_repr_hides_the_key() -> None:
    context = SrtpContext(KEY, SALT)
    for text in (repr(context), str(context), f"{context!r}", repr([context])):
        assert KEY.hex() not in text
        assert KEY.hex().upper() not in text
        assert SALT.hex() not in text
        assert repr(KEY) not in text
        assert repr(SALT) not in text
        assert libsrtp_key(KEY, SALT).hex() not in text
        assert "AES_CM_128_HMAC_SHA1_80" in text
    assert not hasattr(context, "__dict__")  # no stray attribute can carry the key
