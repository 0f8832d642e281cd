"""The worker channel: every media command and channel message round-trips through the
generic encoding, decoding is strict (types, arity, the dataclasses' own checks), and
no key shows in a repr."""

from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.media import channel as ch
from proxy.media.commands import (
    COMMAND_TYPES,
    AcceptSrtp,
    ClearSrtp,
    PlayTone,
    Release,
    SetRemote,
    SetSrtp,
    SetTxSsrc,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.engine import Side
from proxy.media.tones import SECURE_CALL_TONE, Tone
from proxy.media.worker_pool import split_range

KEY = bytes(range(16))
SALT = bytes(range(100, 116))
KEYS = SrtpKeys(KEY, SALT)
IN, OUT = Side.INSIDE, Side.OUTSIDE

MESSAGES: list[ch.ChannelMessage] = [
    ch.Allocate(1, "abc@host", 2),
    SetRemote(1, IN, 0, "127.0.0.1", 4000, 4001),
    SetRemote(1, OUT, 1, "::1", 0, 0, rtcp_mux=True),
    SetSrtp(1, OUT, KEYS),
    SetSrtp(1, OUT, SrtpKeys(KEY, SALT[:14], "AES_CM_128_HMAC_SHA1_32"), srtcp=False),
    SetSrtp(1, OUT, None),
    SetSrtp(
        1, OUT, KEYS, remote_keys=SrtpKeys(SALT, KEY[:14], "AES_CM_128_HMAC_SHA1_32"), index=1
    ),  # SDES: the peer's key, one stream
    AcceptSrtp(1, OUT, KEYS),
    AcceptSrtp(1, OUT, KEYS, srtcp=True),
    SwitchSrtp(1, OUT, KEYS, 2.0),
    SwitchSrtp(1, OUT, KEYS, 0.25, srtcp=True),
    WatchSrtp(1, OUT),
    ClearSrtp(1, OUT),
    SetTxSsrc(1, OUT, 0xDEADBEEF),
    SetTxSsrc(1, OUT, None),
    PlayTone(1, IN, 0, SECURE_CALL_TONE),
    PlayTone(1, IN, 0, Tone.parse("350@-19;10(*/0/1)")),
    PlayTone(1, IN, 0, None),
    Release(1),
    ch.Stats(((1, ch.pack_counters((1, 2, 3))), (2, b""), (2**64 - 1, ch.pack_counters((-1,))))),
    ch.Stats(()),
    ch.Authenticated(1, OUT, 7),
    ch.Closed(1),
]


def test_every_command_type_is_covered_here() -> None:
    assert set(COMMAND_TYPES) <= {type(m) for m in MESSAGES}


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: ch.ChannelMessage) -> None:
    data = ch.encode(message)
    assert len(data) < ch.MAX_MESSAGE
    decoded = ch.decode(data)
    assert decoded == message and type(decoded) is type(message)
    for f in fields(message):  # Side stays a Side, a float a float
        assert type(getattr(decoded, f.name)) is type(getattr(message, f.name))


def test_keys_are_not_in_the_repr_nor_in_errors() -> None:
    for message in MESSAGES:
        text = repr(message)
        assert KEY.hex() not in text and repr(KEY) not in text and repr(SALT) not in text
    damaged = ch.encode(SetSrtp(1, OUT, KEYS)).replace(b'"outside"', b'"sideways"')
    with pytest.raises(ch.ChannelError) as refused:
        ch.decode(damaged)
    assert KEY.hex() not in str(refused.value)


JSON_MESSAGES = [m for m in MESSAGES if type(m) is not ch.Stats]
"""Every message but the binary counter report."""


def raw(message: ch.ChannelMessage) -> list[Any]:
    """The JSON form of a valid message, to damage."""
    value: list[Any] = json.loads(ch.encode(message))
    return value


def edit(message: ch.ChannelMessage, position: int, value: object) -> list[Any]:
    data = raw(message)
    data[position] = value
    return data


KEYS_RAW = raw(SetSrtp(1, OUT, KEYS))[3]


@pytest.mark.parametrize(
    "damaged",
    [
        [],
        {"tag": 1},
        ["SetRemote"],  # no fields
        ["NoSuchCommand", 1],
        [7, 1],  # a number is no message name (0 is a batch, and that is no message)
        edit(ch.Allocate(1, "x", 1), 1, "1"),  # a str is no int
        edit(ch.Allocate(1, "x", 1), 1, True),  # a bool is no int
        edit(ch.Allocate(1, "x", 1), 1, 1.0),  # nor a float
        raw(ch.Allocate(1, "x", 1))[:-1],  # a field short
        [*raw(ch.Allocate(1, "x", 1)), 2],  # one too many
        edit(SetRemote(1, IN, 0, "127.0.0.1", 1, 2), 7, 1),  # an int is no bool
        edit(SetRemote(1, IN, 0, "127.0.0.1", 1, 2), 2, "upside"),  # no such Side
        edit(SetRemote(1, IN, 0, "127.0.0.1", 1, 2), 2, 0),
        edit(SetRemote(1, IN, 0, "127.0.0.1", 1, 2), 4, None),  # not optional
        edit(SetSrtp(1, OUT, KEYS), 3, ["zz", KEYS_RAW[1], KEYS_RAW[2]]),  # not hex
        edit(SetSrtp(1, OUT, KEYS), 3, [5, KEYS_RAW[1], KEYS_RAW[2]]),
        edit(SetSrtp(1, OUT, KEYS), 3, ["00", KEYS_RAW[1], KEYS_RAW[2]]),  # 1-byte key
        edit(SetSrtp(1, OUT, KEYS), 3, [KEYS_RAW[0], KEYS_RAW[1], "NULL_CIPHER"]),
        edit(SetSrtp(1, OUT, KEYS), 3, KEYS_RAW[:2]),  # a key field short
        edit(SetSrtp(1, OUT, KEYS), 3, "keys"),
        edit(SwitchSrtp(1, OUT, KEYS, 2.0), 4, "2"),  # a str is no float
        edit(SwitchSrtp(1, OUT, KEYS, 2.0), 4, True),
        edit(PlayTone(1, IN, 0, None), 4, "no tone at all"),  # not a ToneScript
        edit(PlayTone(1, IN, 0, None), 4, "99999@-19;1(1/0/1)"),  # out of range
        edit(SetTxSsrc(1, OUT, None), 3, [1]),
        ["Stats", [[1, [1, "2"]]]],
        ["Stats", [[1]]],
        ["Stats", [None]],
        ["Stats", 5],
        ["Stats", [[1, [1, 2], 3]]],
        edit(ch.Authenticated(1, OUT, 7), 3, None),
    ],
)
def test_ill_typed_messages_are_refused(damaged: object) -> None:
    with pytest.raises(ch.ChannelError):
        ch.decode(json.dumps(damaged).encode())


@pytest.mark.parametrize("text", [b'["SwitchSrtp",1,"outside",null,NaN,false]', b"1e999"])
def test_no_nan_or_infinity(text: bytes) -> None:
    with pytest.raises(ch.ChannelError):
        ch.decode(text)
    damaged = raw(SwitchSrtp(1, OUT, KEYS, 2.0))
    for value in (b"Infinity", b"-Infinity", b"NaN", b"1e999"):
        data = json.dumps(damaged).encode().replace(b"2.0", value)
        with pytest.raises(ch.ChannelError):
            ch.decode(data)


def test_the_encoder_checks_types_too() -> None:
    """A wrong value fails where it was made, not in the worker that would refuse it."""
    for message in (
        SetRemote(1, "inside", 0, "127.0.0.1", 1, 2),  # type: ignore[arg-type]
        SetRemote(1, IN, 0, "127.0.0.1", 1, 2, rtcp_mux=1),  # type: ignore[arg-type]
        SwitchSrtp(1, OUT, KEYS, float("nan")),
        SetTxSsrc(1, OUT, "1"),  # type: ignore[arg-type]
        ch.Stats(((1, (1, 2)),)),  # type: ignore[arg-type]  # counters not packed
        ch.Stats(((1, b"1234567"),)),  # not a whole number of 64-bit ints
        ch.Stats(((-1, b""),)),
        ch.Stats(((True, b""),)),
        ch.Stats(((1, b"", 2),)),  # type: ignore[arg-type]
    ):
        with pytest.raises(ch.ChannelError):
            ch.encode(message)
    with pytest.raises(ch.ChannelError):
        ch.encode(KEYS)  # type: ignore[arg-type]  # a field type, not a message
    assert ch.decode(ch.encode(SwitchSrtp(1, OUT, KEYS, 2))) == SwitchSrtp(1, OUT, KEYS, 2.0)


def test_srtp_keys_check_themselves() -> None:
    SrtpKeys(KEY, SALT[:14])  # SDES
    for key, salt, profile in (
        (KEY[:15], SALT, "AES_CM_128_HMAC_SHA1_80"),
        (KEY, SALT[:15], "AES_CM_128_HMAC_SHA1_80"),
        (KEY, SALT, "AES_256_CM_HMAC_SHA1_80"),
    ):
        with pytest.raises(ValueError):
            SrtpKeys(key, salt, profile)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_channel_error(data: bytes) -> None:
    with contextlib.suppress(ch.ChannelError):
        ch.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_damaged_messages_raise_only_channel_error(
    message: ch.ChannelMessage, data: st.DataObject
) -> None:
    encoded = bytearray(ch.encode(message))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(encoded)))
    with contextlib.suppress(ch.ChannelError):
        ch.decode(bytes(encoded[:cut]))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(JSON_MESSAGES), st.data())
def test_ill_typed_fields_raise_only_channel_error(
    message: ch.ChannelMessage, data: st.DataObject
) -> None:
    """Any JSON value in any field position: a well-typed message or ChannelError."""
    damaged = raw(message)
    position = data.draw(st.integers(1, max(1, len(damaged) - 1)))
    if position < len(damaged):
        damaged[position] = data.draw(JSON_VALUES)
    try:
        decoded = ch.decode(json.dumps(damaged).encode())
    except ch.ChannelError:
        return
    assert type(decoded) is type(message)
    assert ch.decode(ch.encode(decoded)) == decoded  # whatever passed is well-typed


def test_split_range() -> None:
    assert split_range(20000, 20015, 2) == [(20000, 20007), (20008, 20015)]
    # 9 pairs over 2 workers: cut in twos, the odd pair to the last; port_min rounds up.
    assert split_range(20001, 20019, 2) == [(20002, 20009), (20010, 20019)]
    # 14 pairs = 7 calls over 2: 4 + 3 calls, every pair used.
    assert split_range(20000, 20027, 2) == [(20000, 20015), (20016, 20027)]
    slices = split_range(20000, 29999, 3)
    assert slices[0][0] == 20000 and slices[-1][1] == 29999
    assert all(hi + 1 == lo for (_, hi), (lo, _) in itertools.pairwise(slices))
    with pytest.raises(ValueError, match="cannot be split"):
        split_range(20000, 20009, 3)  # 5 pairs: 2 calls, not 3


def test_batches_keep_order_and_single_messages_still_decode() -> None:
    data = ch.batch([ch.encode(m) for m in JSON_MESSAGES])
    assert ch.decode_all(data) == JSON_MESSAGES
    with pytest.raises(ch.ChannelError):  # a counter report travels alone
        ch.batch([ch.encode(JSON_MESSAGES[0]), ch.encode(ch.Stats(()))])
    assert ch.decode_all(ch.encode(MESSAGES[0])) == [MESSAGES[0]]
    with pytest.raises(ch.ChannelError):
        ch.decode_all(b'[0,["Release",1],["NoSuchCommand"]]')  # one bad message spoils it
    with pytest.raises(ch.ChannelError):
        ch.decode_all(b'[0,[0,["Release",1]]]')  # no batch inside a batch
    with pytest.raises(ch.ChannelError):
        ch.decode(data)  # a batch is not a single message


def test_counter_reports_are_binary_and_decode_exactly() -> None:
    counters = ch.pack_counters(range(-2, 50))
    report = ch.Stats(((7, counters), (2**40, b"")))
    data = ch.encode(report)
    assert data[:1] == ch.STATS_TAG and ch.decode_all(data) == [report]
    assert list(ch.unpack_counters(counters)) == list(range(-2, 50))
    for damaged in (data[:-1], data + b"\x00", data[:5], ch.STATS_TAG + b"\xff" * 12):
        with pytest.raises(ch.ChannelError):
            ch.decode_all(damaged)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_counter_reports_raise_only_channel_error(data: bytes) -> None:
    with contextlib.suppress(ch.ChannelError):
        decoded = ch.decode(ch.STATS_TAG + data)
        assert ch.decode(ch.encode(decoded)) == decoded
