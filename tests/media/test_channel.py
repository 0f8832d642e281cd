"""The worker channel's messages: round trips, strict decoding, no keys in a repr."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.media import channel as ch
from proxy.media.workers import split_range

KEY = bytes(range(16))
SALT = bytes(range(100, 114))

MESSAGES: list[ch.Message] = [
    ch.Allocate(1, "abc@host", 2),
    ch.SetRemote(1, "inside", 0, "127.0.0.1", 4000, 4001, False),
    ch.SetSrtp(1, "outside", 3, KEY, SALT, True),
    ch.SetSrtp(1, "outside", 0, b"", b"", True),
    ch.AcceptSrtp(1, "outside", 3, KEY, SALT, False),
    ch.SwitchSrtp(1, "outside", 4, KEY, SALT, 2.0, 12345.678, False),
    ch.WatchAuth(1, "outside", 7),
    ch.ClearSrtp(1, "outside"),
    ch.SetTxSsrc(1, "outside", 0xDEADBEEF),
    ch.SetTxSsrc(1, "outside", None),
    ch.PlayTone(1, "inside", 0, "397@-19;1(.2/.1/1)"),
    ch.PlayTone(1, "inside", 0, None),
    ch.Release(1),
    ch.Stats(((1, (1, 2, 3)), (2, ()))),
    ch.Stats(()),
    ch.Authenticated(1, "outside", 7),
    ch.Closed(1),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: ch.Message) -> None:
    data = ch.encode(message)
    assert len(data) < ch.MAX_MESSAGE
    assert ch.decode(data) == message


def test_keys_are_not_in_the_repr() -> None:
    for message in MESSAGES:
        assert repr(KEY) not in repr(message) and repr(SALT) not in repr(message)


@pytest.mark.parametrize(
    "raw",
    [
        (),
        {"tag": 1},
        (ch.SetSrtp.TAG, 1, "outside", 3, "zz", "00", True),  # not hex
        (ch.SetSrtp.TAG, 1, "outside", 3, 5, "00", True),
        (ch.SwitchSrtp.TAG, 1, "outside", 4, "00", "00", "2", 1.0, False),
        (99, 1),
        (ch.Allocate.TAG, 1, "x"),  # a field short
        (ch.Allocate.TAG, 1, "x", 1, 2),  # one too many
        (ch.Allocate.TAG, "1", "x", 1),  # wrong type
        (ch.Allocate.TAG, True, "x", 1),  # a bool is no int here
        (ch.SetRemote.TAG, 1, "inside", 0, "127.0.0.1", 1, 2, 1),  # an int is no bool
        (ch.Stats.TAG, ((1, (1, "2")),)),
        (ch.Stats.TAG, ((1,),)),
        (ch.Stats.TAG, (None,)),
        (ch.Stats.TAG, 5),
    ],
)
def test_malformed_messages_are_refused(raw: object) -> None:
    with pytest.raises(ch.ChannelError):
        ch.decode(json.dumps(raw).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_channel_error(data: bytes) -> None:
    with contextlib.suppress(ch.ChannelError):
        ch.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_damaged_messages_raise_only_channel_error(
    message: ch.Message, data: st.DataObject
) -> None:
    encoded = bytearray(ch.encode(message))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(encoded)))
    with contextlib.suppress(ch.ChannelError):
        ch.decode(bytes(encoded[:cut]))


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
    data = ch.batch([ch.encode(m) for m in MESSAGES])
    assert ch.decode_all(data) == MESSAGES
    assert ch.decode_all(ch.encode(MESSAGES[0])) == [MESSAGES[0]]
    with pytest.raises(ch.ChannelError):
        ch.decode_all(b"[0,[10,1],[99]]")  # one bad message spoils the batch
    with pytest.raises(ch.ChannelError):
        ch.decode(data)  # a batch is not a single message
