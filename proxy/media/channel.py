"""The local channel between the signalling process and a media worker process.

One AF_UNIX ``SOCK_SEQPACKET`` socketpair per worker: the kernel keeps message
boundaries (one datagram is one message, no framing of our own), delivers in order, and
reports the peer's exit as end-of-file, which is how either side learns that the other
is gone. File descriptors travel with a message as SCM_RIGHTS ancillary data
(:func:`socket.send_fds`): that is how the signalling process hands a worker the RTP
sockets it bound.

What travels: the media commands of :mod:`proxy.media.commands` exactly as the core
made them, plus the few messages only the channel needs (below: :class:`Allocate` with
its sockets, and the worker's reports :class:`Stats`, :class:`Authenticated`,
:class:`Closed`). There is no second copy of the commands here: every message is a
frozen dataclass, encoded generically from its field types as a JSON array
``[class name, *fields]``: str, int, float, bool and None as JSON, bytes as hex, an
enum as its value, a :class:`~proxy.media.tones.Tone` as its ToneScript, a nested
dataclass (:class:`~proxy.media.commands.SrtpKeys`) as an array of its fields, tuples
as arrays. A new command needs nothing here. The exception is the worker's periodic
counter report (:class:`Stats`), which is binary, for its cost (see "counter reports"
below).

JSON, not marshal or pickle: decoding it costs time and memory in proportion to the
message and never constructs anything but plain values, whereas marshal allocates
whatever container length a damaged message claims (a 50-byte message took 25 s) and
pickle can grow its memo the same way. The decoder checks the name, the arity and
every field's type (recursively: a bool is no int, an int no bool, NaN and infinities
are refused), then lets the dataclass check itself (key lengths, tone ranges), so a
damaged message raises :class:`ChannelError` and never reaches the engine as a wrong
value. The encoder checks the same types, so a wrong value fails in the process that
made it instead of killing the worker that would refuse it. Keys (SRTP master key and
salt) are message fields: a message's ``repr`` hides them, and nothing here logs a
message body.
"""

from __future__ import annotations

import json
import math
import struct
import types
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import Any, Final, NamedTuple, TypeAlias, Union, get_args, get_origin, get_type_hints

from proxy.media.commands import COMMAND_TYPES, MediaCommand
from proxy.media.engine import Side
from proxy.media.tones import Tone

__all__ = [
    "BATCH_TAG",
    "MAX_FDS",
    "MAX_MESSAGE",
    "STATS_TAG",
    "Allocate",
    "Authenticated",
    "ChannelError",
    "ChannelMessage",
    "Closed",
    "Stats",
    "batch",
    "decode",
    "decode_all",
    "decode_stats",
    "encode",
    "encode_stats",
    "pack_counters",
    "unpack_counters",
]

MAX_MESSAGE: Final = 1 << 16
"""Largest message either side sends (a stats batch is split to fit); receive buffer size."""

MAX_FDS: Final = 248
"""File descriptors per message: below the kernel's SCM_MAX_FD (253)."""


class ChannelError(ValueError):
    """A message that does not decode to a known, well-typed message (or a value that
    cannot be encoded as one)."""


# --- the channel's own messages ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allocate:
    """Signalling process -> worker: a new session with ``streams`` streams, on the
    sockets that come with the message (per stream: inside RTP, inside RTCP, outside
    RTP, outside RTCP). ``session`` is the id its commands name."""

    session: int
    call_id: str
    streams: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Worker -> signalling process: counter snapshots, ``(session, counters)`` per
    session whose counters changed, flat as :func:`proxy.media.counters.counters_of`
    lays them out per leg, packed as native 64-bit ints (``array("q")``; both processes
    run on one host). The one message that is not JSON (:func:`encode_stats`)."""

    sessions: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Worker -> signalling process: a :class:`~proxy.media.commands.WatchSrtp` fired
    (:class:`~proxy.media.commands.SrtpAuthenticated`). ``watch``: how many ``WatchSrtp``
    for that side the worker had received by then. Both processes count them in the same
    order, so the pool can drop a report that a later watch or key has overtaken (the
    in-process relay forgets such a watch synchronously)."""

    session: int
    side: Side
    watch: int


@dataclass(frozen=True, slots=True)
class Closed:
    """Worker -> signalling process: every socket of ``session`` is closed, its ports are
    free again. ``counters``: the session's final counters, taken once no packet can be
    counted any more (packed as :class:`Stats` has them; empty: none), so the totals and
    the call's summary hold its last packets too, not only those of the last report."""

    session: int
    counters: bytes = b""


ChannelMessage: TypeAlias = MediaCommand | Allocate | Stats | Authenticated | Closed

_MESSAGE_TYPES: Final[tuple[type[ChannelMessage], ...]] = (
    *COMMAND_TYPES, Allocate, Authenticated, Closed,
)  # fmt: skip
"""The JSON messages: every one but :class:`Stats`."""


# --- generic field codecs -----------------------------------------------------------------

_Convert = Callable[[Any], Any]


class _Codec(NamedTuple):
    """How one field type travels. Both functions raise :class:`ChannelError` for a
    value of the wrong type."""

    encode: _Convert
    """A field value -> its JSON value."""
    decode: _Convert
    """A JSON value -> the field value."""
    native: bool
    """JSON carries the value as it is (str, int, bool, None, tuples of those): ``encode``
    only checks it and returns it, so a container of natives need not be rebuilt."""


def _refuse(what: str, value: Any) -> ChannelError:
    return ChannelError(f"expected {what}, got {type(value).__name__}")


def _exact(kind: type) -> _Codec:
    """str, int and bool travel as themselves; ``type() is`` keeps bool and int apart."""

    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _refuse(kind.__name__, value)
        return value

    return _Codec(check, check, native=True)


def _float(value: Any) -> float:
    if type(value) not in (float, int) or not math.isfinite(value):
        raise _refuse("a finite float", value)
    return float(value)


def _hex(value: Any) -> str:
    if type(value) is not bytes:
        raise _refuse("bytes", value)
    return value.hex()


def _unhex(value: Any) -> bytes:
    if type(value) is not str:
        raise _refuse("bytes as hex", value)
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ChannelError("bad hex") from None


def _enum(kind: type[Enum]) -> _Codec:
    def encode(value: Any) -> Any:
        if not isinstance(value, kind):
            raise _refuse(kind.__name__, value)
        return value.value

    def decode(value: Any) -> Any:
        if type(value) is not str:
            raise _refuse(f"{kind.__name__} as text", value)
        try:
            return kind(value)
        except ValueError:
            raise ChannelError(f"not a {kind.__name__}: {value[:40]!r}") from None

    return _Codec(encode, decode, native=False)


def _tone() -> _Codec:
    """A tone travels as the ToneScript it was parsed from (``str(Tone)``)."""

    def encode(value: Any) -> str:
        if not isinstance(value, Tone):
            raise _refuse("Tone", value)
        return str(value)

    def decode(value: Any) -> Tone:
        if type(value) is not str:
            raise _refuse("a ToneScript", value)
        try:
            return Tone.parse(value)
        except ValueError as exc:
            raise ChannelError(f"bad tone: {exc}") from None

    return _Codec(encode, decode, native=False)


def _optional(inner: _Codec) -> _Codec:
    encode_inner, decode_inner, native = inner

    def encode(value: Any) -> Any:
        return None if value is None else encode_inner(value)

    def decode(value: Any) -> Any:
        return None if value is None else decode_inner(value)

    return _Codec(encode, decode, native)


_INT_ONLY = frozenset({int})


def _ints() -> _Codec:
    """``tuple[int, ...]`` (counters, session ids): checked in one pass in C, no Python
    call per item (a worker reports 36 counters per session every 100 ms)."""

    def encode(value: Any) -> Any:
        if type(value) not in (list, tuple) or not _INT_ONLY.issuperset(map(type, value)):
            raise _refuse("a list of ints", value)
        return value

    def decode(value: Any) -> tuple[int, ...]:
        return tuple(encode(value))

    return _Codec(encode, decode, native=True)


def _sequence(inner: _Codec) -> _Codec:
    """``tuple[X, ...]``."""
    encode_inner, decode_inner, native = inner

    def encode(value: Any) -> Any:
        if type(value) not in (list, tuple):
            raise _refuse("a tuple", value)
        if native:
            for item in value:
                encode_inner(item)
            return value
        return [encode_inner(item) for item in value]

    def decode(value: Any) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _refuse("a list", value)
        return tuple([decode_inner(item) for item in value])

    return _Codec(encode, decode, native)


def _record(name: str, parts: list[_Codec], build: Callable[..., Any] | None) -> _Codec:
    """A fixed-length tuple (``build`` None), or a dataclass (``build`` makes it from its
    fields, and runs its own checks)."""
    encoders = [part.encode for part in parts]
    decoders = [part.decode for part in parts]
    native = all(part.native for part in parts)
    arity = len(parts)

    def encode(values: Any) -> Any:
        if type(values) not in (list, tuple):
            raise _refuse(f"{name} as a tuple", values)
        if len(values) != arity:
            raise ChannelError(f"{name}: {len(values)} fields, expected {arity}")
        if native:
            for enc, value in zip(encoders, values, strict=True):
                enc(value)
            return values
        return [enc(value) for enc, value in zip(encoders, values, strict=True)]

    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _refuse(f"{name} as a list", value)
        if len(value) != arity:
            raise ChannelError(f"{name}: {len(value)} fields, expected {arity}")
        items = [dec(item) for dec, item in zip(decoders, value, strict=True)]
        if build is None:
            return tuple(items)
        try:
            return build(*items)
        except (ValueError, TypeError) as exc:  # the dataclass's own checks
            raise ChannelError(f"{name}: {exc}") from None

    return _Codec(encode, decode, native and build is None)


def _dataclass(cls: type) -> _Codec:
    """A dataclass as the array of its fields, each by its annotated type."""
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    fields_codec = _record(cls.__name__, [_codec(hints[n]) for n in names], cls)
    encode_fields = fields_codec.encode

    def encode(value: Any) -> Any:
        if type(value) is not cls:
            raise _refuse(cls.__name__, value)
        return encode_fields([getattr(value, n) for n in names])

    return _Codec(encode, fields_codec.decode, native=False)


_SIMPLE: Final[dict[Any, _Codec]] = {
    str: _exact(str),
    int: _exact(int),
    bool: _exact(bool),
    float: _Codec(_float, _float, native=False),
    bytes: _Codec(_hex, _unhex, native=False),
    Tone: _tone(),
}
"""The codecs of the field types that are not built from other types."""


def _codec(hint: Any) -> _Codec:
    """The codec of a field annotated ``hint``; ``TypeError`` for a type the channel
    does not carry (raised when this module is imported)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1 or len(args) != 2:
            raise TypeError(f"only X | None unions travel, not {hint}")
        return _optional(_codec(others[0]))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _ints() if args[0] is int else _sequence(_codec(args[0]))
        return _record("tuple", [_codec(arg) for arg in args], None)
    simple = _SIMPLE.get(hint)
    if simple is not None:
        return simple
    if isinstance(hint, type) and issubclass(hint, Enum):
        return _enum(hint)
    if isinstance(hint, type) and is_dataclass(hint):
        return _dataclass(hint)
    raise TypeError(f"no channel encoding for {hint!r}")


_CODECS: Final = {cls: _dataclass(cls) for cls in _MESSAGE_TYPES}
_ENCODERS: Final[dict[type, tuple[str, _Convert]]] = {
    cls: (cls.__name__, codec.encode) for cls, codec in _CODECS.items()
}
_DECODERS: Final[dict[str, _Convert]] = {cls.__name__: c.decode for cls, c in _CODECS.items()}


# --- messages and batches -----------------------------------------------------------------

_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number here")


_DECODE = json.JSONDecoder(parse_constant=_no_constant).decode


def encode(message: ChannelMessage) -> bytes:
    """``message`` as one datagram. :class:`ChannelError` for a message that is not one
    of the channel's types or holds a value of the wrong type."""
    if type(message) is Stats:
        return encode_stats(message)
    entry = _ENCODERS.get(type(message))
    if entry is None:
        raise ChannelError(f"{type(message).__name__} is not a channel message")
    name, encode_fields = entry
    try:
        values = encode_fields(message)
    except ChannelError as exc:
        raise ChannelError(f"{name}: {exc}") from None
    return _ENCODE([name, *values]).encode()


BATCH_TAG: Final = 0
"""A batch: ``[0, message, message, ...]``, the messages of one loop iteration in one
datagram (one wake-up of the other process instead of one per message); the file
descriptors of its ``Allocate`` messages travel with it, in order."""


def batch(encoded: list[bytes]) -> bytes:
    """One datagram carrying the already :func:`encode`-d messages, in order (JSON ones:
    a :class:`Stats` report always travels alone, ``ChannelError`` otherwise)."""
    if any(part[:1] == STATS_TAG for part in encoded):
        raise ChannelError("a counter report travels alone, not in a batch")
    return b"[0," + b",".join(encoded) + b"]"


def decode(data: bytes) -> ChannelMessage:
    """The message in ``data``; :class:`ChannelError` for anything else."""
    if data[:1] == STATS_TAG:
        return decode_stats(data)
    return _message(_load(data))


def decode_all(data: bytes) -> list[ChannelMessage]:
    """The messages in ``data``: a counter report, a batch or a single message."""
    if data[:1] == STATS_TAG:
        return [decode_stats(data)]
    raw = _load(data)
    if isinstance(raw, list) and raw and type(raw[0]) is int and raw[0] == BATCH_TAG:
        return [_message(item) for item in raw[1:]]
    return [_message(raw)]


def _load(data: bytes) -> Any:
    try:
        return _DECODE(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ChannelError(f"undecodable message ({len(data)} bytes): {exc}") from None


def _message(raw: Any) -> ChannelMessage:
    if type(raw) is not list or not raw or type(raw[0]) is not str:
        raise ChannelError(f"not a message: {type(raw).__name__}")
    decode_fields = _DECODERS.get(raw[0])
    if decode_fields is None:
        raise ChannelError(f"unknown message {raw[0][:40]!r}")
    try:
        message: ChannelMessage = decode_fields(raw[1:])
    except ChannelError as exc:
        raise ChannelError(f"{raw[0]}: {exc}") from None
    return message


# --- counter reports ----------------------------------------------------------------------
#
# A worker reports every session's counters every 100 ms: at 250 calls per worker that was
# ~13,000 ints per report as JSON, ~1.3 ms to encode in the worker and ~5 ms to decode in
# the signalling process per period, a tenth of the proxy's CPU at 500 calls
# (docs/decisions.md, entry 54). So this one message is binary: a tag byte that no JSON
# text starts with, then per session its id and count (native u64, u32) and the counters
# as native int64, the layout of ``array("q")``. Decoding checks that the records fill the
# datagram exactly and builds nothing but ints and bytes.

STATS_TAG: Final = b"\x00"
"""The first byte of a :class:`Stats` datagram (JSON starts with ``[``)."""

_STATS_HEAD: Final = struct.Struct("=QI")
_INT64 = 8


def encode_stats(message: Stats) -> bytes:
    """``message`` as one binary datagram; :class:`ChannelError` for ill-typed values."""
    sessions = message.sessions
    if type(sessions) not in (tuple, list):
        raise _refuse("Stats sessions as a tuple", sessions)
    parts = [STATS_TAG]
    for entry in sessions:
        if type(entry) not in (tuple, list) or len(entry) != 2:
            raise _refuse("(session, counters)", entry)
        sid, counters = entry
        if type(sid) is not int or not 0 <= sid < 1 << 64:
            raise _refuse("a session id", sid)
        if type(counters) is not bytes or len(counters) % _INT64:
            raise _refuse("counters packed as 64-bit ints", counters)
        parts.append(_STATS_HEAD.pack(sid, len(counters) // _INT64))
        parts.append(counters)
    return b"".join(parts)


def decode_stats(data: bytes) -> Stats:
    """The :class:`Stats` in a binary datagram; :class:`ChannelError` unless its records
    fill it exactly."""
    if data[:1] != STATS_TAG:
        raise ChannelError("not a counter report")
    view = memoryview(data)
    head = _STATS_HEAD.size
    pos, end = 1, len(data)
    sessions = []
    while pos < end:
        if end - pos < head:
            raise ChannelError(f"counter report cut at {pos} of {end} bytes")
        sid, count = _STATS_HEAD.unpack_from(view, pos)
        pos += head
        size = count * _INT64
        if size > end - pos:
            raise ChannelError(f"counter report: {count} counters, {end - pos} bytes left")
        sessions.append((sid, bytes(view[pos : pos + size])))
        pos += size
    return Stats(tuple(sessions))


def unpack_counters(counters: bytes) -> array[int]:
    """Packed counters (:class:`Stats`) as a sequence of ints."""
    values = array("q")
    values.frombytes(counters)
    return values


def pack_counters(values: Iterable[int]) -> bytes:
    """Counters as :class:`Stats` carries them."""
    return array("q", values).tobytes()
