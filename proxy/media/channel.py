"""The local channel between the signalling process and a media worker process.

One AF_UNIX ``SOCK_SEQPACKET`` socketpair per worker: the kernel keeps message
boundaries (one datagram is one message, no framing of our own), delivers in order, and
reports the peer's exit as end-of-file, which is how either side learns that the other
is gone. File descriptors travel with a message as SCM_RIGHTS ancillary data
(:func:`socket.send_fds`): that is how the signalling process hands a worker the RTP
sockets it bound.

Messages are typed frozen dataclasses of plain values (str, int, float, bytes, bool,
None, tuples of ints), encoded as a JSON array ``[tag, *fields]`` (bytes as hex). JSON,
not marshal or pickle: decoding it costs time and memory in proportion to the message
and never constructs anything but plain values, whereas marshal allocates whatever
container length a damaged message claims (a 50-byte message took 25 s) and pickle
can grow its memo the same way. The decoder checks the tag, the arity and every
field's type, so a damaged message raises :class:`ChannelError` and never reaches the
engine as a wrong value. Keys (SRTP master key and salt) are message fields: a
message's ``repr`` hides them, and nothing here logs a message body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "AcceptSrtp",
    "Allocate",
    "Authenticated",
    "ChannelError",
    "ClearSrtp",
    "Closed",
    "Message",
    "PlayTone",
    "Release",
    "SetRemote",
    "SetSrtp",
    "SetTxSsrc",
    "Stats",
    "SwitchSrtp",
    "WatchAuth",
    "batch",
    "decode",
    "decode_all",
    "encode",
]

MAX_MESSAGE: Final = 1 << 16
"""Largest message either side sends (a stats batch is split to fit); receive buffer size."""

MAX_FDS: Final = 248
"""File descriptors per message: below the kernel's SCM_MAX_FD (253)."""


class ChannelError(ValueError):
    """A message that does not decode to a known, well-typed message."""


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "bytes": (bytes,),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "bytes | None": (bytes, type(None)),
    "tuple[tuple[int, tuple[int, ...]], ...]": (tuple,),
}


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every channel message; ``TAG`` identifies the class on the wire."""

    TAG: ClassVar[int] = 0


# --- signalling process -> worker ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allocate(Message):
    """A new session ``sid`` with ``streams`` streams, on the sockets that come with the
    message: per stream, inside RTP, inside RTCP, outside RTP, outside RTCP."""

    TAG: ClassVar[int] = 1
    sid: int
    call_id: str
    streams: int


@dataclass(frozen=True, slots=True)
class SetRemote(Message):
    TAG: ClassVar[int] = 2
    sid: int
    side: str
    index: int
    ip: str
    rtp_port: int
    rtcp_port: int
    rtcp_mux: bool


@dataclass(frozen=True, slots=True)
class SetSrtp(Message):
    """``kid`` 0: clear. A key id names one SrtpContext of the session: the same id is
    the same context (the relay compares keys by identity, and a context carries the
    libsrtp replay and rollover state), so the key material is needed only the first
    time an id is sent; it is sent every time anyway, which keeps the worker stateless
    about what it was told before."""

    TAG: ClassVar[int] = 3
    sid: int
    side: str
    kid: int
    master_key: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)
    srtcp: bool


@dataclass(frozen=True, slots=True)
class AcceptSrtp(Message):
    TAG: ClassVar[int] = 4
    sid: int
    side: str
    kid: int
    master_key: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)
    srtcp: bool


@dataclass(frozen=True, slots=True)
class SwitchSrtp(Message):
    """``now`` is ``time.monotonic()`` of the signalling process: CLOCK_MONOTONIC is one
    clock for the whole system, so the worker's grace deadline is the same instant."""

    TAG: ClassVar[int] = 5
    sid: int
    side: str
    kid: int
    master_key: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)
    grace_s: float
    now: float
    srtcp: bool


@dataclass(frozen=True, slots=True)
class WatchAuth(Message):
    """Report :class:`Authenticated` with ``token`` once ``side``'s key authenticates."""

    TAG: ClassVar[int] = 6
    sid: int
    side: str
    token: int


@dataclass(frozen=True, slots=True)
class ClearSrtp(Message):
    TAG: ClassVar[int] = 7
    sid: int
    side: str


@dataclass(frozen=True, slots=True)
class SetTxSsrc(Message):
    TAG: ClassVar[int] = 8
    sid: int
    side: str
    ssrc: int | None


@dataclass(frozen=True, slots=True)
class PlayTone(Message):
    """``tone``: ToneScript text (``str(Tone)``), None to stop."""

    TAG: ClassVar[int] = 9
    sid: int
    side: str
    index: int
    tone: str | None


@dataclass(frozen=True, slots=True)
class Release(Message):
    TAG: ClassVar[int] = 10
    sid: int


# --- worker -> signalling process ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats(Message):
    """Counter snapshots: ``(sid, counters)`` per session whose counters changed, the
    counters flat as :func:`proxy.media.relay.RelaySession.counters` lays them out."""

    TAG: ClassVar[int] = 20
    sessions: tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True)
class Authenticated(Message):
    TAG: ClassVar[int] = 21
    sid: int
    side: str
    token: int


@dataclass(frozen=True, slots=True)
class Closed(Message):
    """Every socket of session ``sid`` is closed: its ports are free again."""

    TAG: ClassVar[int] = 22
    sid: int


_CLASSES: dict[int, tuple[type[Message], tuple[tuple[type, ...], ...]]] = {}
for _cls in (
    Allocate, SetRemote, SetSrtp, AcceptSrtp, SwitchSrtp, WatchAuth, ClearSrtp, SetTxSsrc,
    PlayTone, Release, Stats, Authenticated, Closed,
):  # fmt: skip
    _CLASSES[_cls.TAG] = (_cls, tuple(_FIELD_TYPES[str(f.type)] for f in fields(_cls)))
_NAMES: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls, _ in _CLASSES.values()
}


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_DECODE = json.JSONDecoder().decode


def encode(message: Message) -> bytes:
    values: list[Any] = [message.TAG]
    for name in _NAMES[type(message)]:
        value = getattr(message, name)
        values.append(value.hex() if isinstance(value, bytes) else value)
    return _ENCODE(values).encode()


BATCH_TAG: Final = 0
"""A batch: ``[0, message, message, ...]``, the messages of one loop iteration in one
datagram (one wake-up of the other process instead of one per message); the file
descriptors of its ``Allocate`` messages travel with it, in order."""


def batch(encoded: list[bytes]) -> bytes:
    """One datagram carrying the already :func:`encode`-d messages, in order."""
    return b"[0," + b",".join(encoded) + b"]"


def decode(data: bytes) -> Message:
    """The message in ``data``; :class:`ChannelError` for anything else."""
    return _message(_load(data))


def decode_all(data: bytes) -> list[Message]:
    """The messages in ``data``: a batch or a single message."""
    raw = _load(data)
    if isinstance(raw, list) and raw and type(raw[0]) is int and raw[0] == BATCH_TAG:
        return [_message(item) for item in raw[1:]]
    return [_message(raw)]


def _load(data: bytes) -> Any:
    try:
        return _DECODE(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ChannelError(f"undecodable message ({len(data)} bytes): {exc}") from None


def _message(raw: Any) -> Message:
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise ChannelError(f"not a message: {type(raw).__name__}")
    entry = _CLASSES.get(raw[0])
    if entry is None:
        raise ChannelError(f"unknown message tag {raw[0]}")
    cls, types = entry
    values = raw[1:]
    if len(values) != len(types):
        raise ChannelError(f"{cls.__name__}: {len(values)} fields, expected {len(types)}")
    for position, (value, kinds) in enumerate(zip(values, types, strict=True)):
        if kinds[0] is bytes:
            if not isinstance(value, str):
                raise ChannelError(f"{cls.__name__}: bytes not as hex")
            try:
                values[position] = bytes.fromhex(value)
            except ValueError:
                raise ChannelError(f"{cls.__name__}: bad hex") from None
        elif kinds[0] is tuple:
            values[position] = _stats(value)
        elif not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ChannelError(f"{cls.__name__}: a field of type {type(value).__name__}")
    return cls(*values)


def _stats(sessions: Any) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if not isinstance(sessions, list):
        raise ChannelError("Stats: not a list")
    result = []
    for entry in sessions:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or type(entry[0]) is not int
            or not isinstance(entry[1], list)
            or not all(type(n) is int for n in entry[1])
        ):
            raise ChannelError("Stats: malformed session entry")
        result.append((entry[0], tuple(entry[1])))
    return tuple(result)
