"""The four stage-2 messages and their SIP INFO body encoding (profile §2).

=============  ===============================================  =========
message        layout (big-endian uint32 fields)                 length
=============  ===============================================  =========
Caller Hello   msg_id=1 ‖ version_flags ‖ ssrc ‖ MC(252)          264
Callee Hello   msg_id=2 ‖ version_flags ‖ ssrc ‖ MC(252)          264
Caller Final   msg_id=3 ‖ E(master_key)(64) ‖ E(master_salt)(64)  132
Callee Final   msg_id=4                                           4
=============  ===============================================  =========

version_flags: high 16 bits version (1), low 16 bits flags (ignored on receipt).
Every body is one line of standard base64. Receivers accept any surrounding whitespace.

Decoding is strict and every malformed input raises :class:`MessageError`, nothing else:
that is what lets the handshake answer 400 without guessing what went wrong.
The E(x) blocks stay opaque here; decrypting them needs the callee's key and belongs to
the handshake.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from proxy.xsipura.mc import MC_LENGTH, MalformedCertificate, MiniCertificate, strict_b64decode

VERSION = 1
CONTENT_TYPE = "application/x-sipura"
ENCRYPTED_BLOCK_LENGTH = 64  # RSA-512 ciphertext
HELLO_LENGTH = 12 + MC_LENGTH
CALLER_FINAL_LENGTH = 4 + 2 * ENCRYPTED_BLOCK_LENGTH
CALLEE_FINAL_LENGTH = 4
MAX_BODY_TEXT = 4096
"""Bodies are at most 352 base64 characters; anything far larger is refused unread."""


class MessageError(ValueError):
    """A stage-2 body that does not decode: base64, length, msg_id, version or MC."""


class MessageId(IntEnum):
    CALLER_HELLO = 1
    CALLEE_HELLO = 2
    CALLER_FINAL = 3
    CALLEE_FINAL = 4


_HEADER = struct.Struct(">III")


@dataclass(frozen=True, slots=True)
class _Hello:
    """Common shape of both Hellos.

    The MC travels as raw bytes: a message that decodes (length, id, version) but
    carries a structurally bad MC is a *certificate* problem (488), not a message
    problem (400), so MC parsing happens in :meth:`certificate`, at verification.
    """

    ssrc: int
    mc: bytes
    flags: int = 0

    msg_id: ClassVar[MessageId]

    def __post_init__(self) -> None:
        if len(self.mc) != MC_LENGTH:
            raise MessageError(f"MC must be {MC_LENGTH} bytes, got {len(self.mc)}")
        if not 0 <= self.flags <= 0xFFFF:
            raise MessageError("flags must fit in 16 bits")
        if not 0 <= self.ssrc <= 0xFFFFFFFF:
            raise MessageError("ssrc must fit in 32 bits")

    def certificate(self) -> MiniCertificate:
        """The sender's MC; raises :class:`MalformedCertificate` if its fields are bad."""
        return MiniCertificate.decode(self.mc)

    def encode(self) -> bytes:
        return _HEADER.pack(self.msg_id, (VERSION << 16) | self.flags, self.ssrc) + self.mc


@dataclass(frozen=True, slots=True)
class CallerHello(_Hello):
    msg_id: ClassVar[MessageId] = MessageId.CALLER_HELLO


@dataclass(frozen=True, slots=True)
class CalleeHello(_Hello):
    msg_id: ClassVar[MessageId] = MessageId.CALLEE_HELLO


@dataclass(frozen=True, slots=True)
class CallerFinal:
    encrypted_key: bytes
    encrypted_salt: bytes

    msg_id: ClassVar[MessageId] = MessageId.CALLER_FINAL

    def __post_init__(self) -> None:
        if (
            len(self.encrypted_key) != ENCRYPTED_BLOCK_LENGTH
            or len(self.encrypted_salt) != ENCRYPTED_BLOCK_LENGTH
        ):
            raise MessageError("E(master_key) and E(master_salt) must be 64 bytes each")

    def encode(self) -> bytes:
        return struct.pack(">I", self.msg_id) + self.encrypted_key + self.encrypted_salt


@dataclass(frozen=True, slots=True)
class CalleeFinal:
    msg_id: ClassVar[MessageId] = MessageId.CALLEE_FINAL

    def encode(self) -> bytes:
        return struct.pack(">I", self.msg_id)


Message = CallerHello | CalleeHello | CallerFinal | CalleeFinal


def decode(data: bytes) -> Message:
    """Binary message -> typed message. Raises :class:`MessageError` only."""
    if len(data) < 4:
        raise MessageError(f"message too short ({len(data)} bytes)")
    (msg_id,) = struct.unpack_from(">I", data)
    if msg_id in (MessageId.CALLER_HELLO, MessageId.CALLEE_HELLO):
        if len(data) != HELLO_LENGTH:
            raise MessageError(f"Hello must be {HELLO_LENGTH} bytes, got {len(data)}")
        _, version_flags, ssrc = _HEADER.unpack_from(data)
        version = version_flags >> 16
        if version != VERSION:
            raise MessageError(f"unknown version {version}")
        cls = CallerHello if msg_id == MessageId.CALLER_HELLO else CalleeHello
        return cls(ssrc=ssrc, mc=bytes(data[12:]), flags=version_flags & 0xFFFF)
    if msg_id == MessageId.CALLER_FINAL:
        if len(data) != CALLER_FINAL_LENGTH:
            raise MessageError(f"Caller Final must be {CALLER_FINAL_LENGTH} bytes, got {len(data)}")
        return CallerFinal(bytes(data[4:68]), bytes(data[68:132]))
    if msg_id == MessageId.CALLEE_FINAL:
        if len(data) != CALLEE_FINAL_LENGTH:
            raise MessageError(f"Callee Final must be {CALLEE_FINAL_LENGTH} bytes, got {len(data)}")
        return CalleeFinal()
    raise MessageError(f"unknown msg_id {msg_id}")


def encode_body(message: Message) -> str:
    """Message -> the INFO/200 body: one line of base64, no trailing newline."""
    return base64.b64encode(message.encode()).decode("ascii")


def decode_body(body: bytes | str) -> Message:
    """INFO/200 body -> typed message; tolerates surrounding whitespace and CRLF."""
    if len(body) > MAX_BODY_TEXT:
        raise MessageError(f"body too large ({len(body)} bytes)")
    try:
        raw = strict_b64decode(body)
    except MalformedCertificate as exc:
        raise MessageError(str(exc)) from exc
    return decode(raw)
