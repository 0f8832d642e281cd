"""An independent x-sipura test user agent (SIP over UDP + RTP/SRTP) for the interop tests.

Why it exists: the proxy implements both sides of x-sipura (it secures one leg as caller and
another as callee), so a misreading of the wire profile shared by both of its sides would
pass every proxy-to-proxy test. This module is written from the wire profile only
(``docs/profile.md``, "x-sipura wire profile v1") and the test vectors, and deliberately
imports nothing from the ``proxy`` package. Dependencies: stdlib,
``cryptography`` (RSA numbers, PKCS#1 v1.5 type-2 encryption, type-1 signature recovery) and
``pylibsrtp``. Do not "simplify" it by importing proxy code: that defeats its purpose.

Which parts implement which profile sections:

- PKI helper (``CaKey``, ``Subscriber``, ``build_mc``, ``verify_mc``, key generation,
  provisioning params): section 1 (MC layout, raw type-1 signature over raw SHA-1 without
  DigestInfo, expiry ``HHMMSSMMDDYY`` in UTC, ``Mini Certificate`` / ``SRTP Private Key``
  params, Linksys ``ca-key`` file, RSA-512 subscriber keys from two 256-bit primes).
- Stage-2 messages (``caller_hello`` ... ``callee_final``, ``encrypt_type2`` and the strict
  raw ``decrypt_type2``): section 2 table, version_flags, E(x).
- ``XsipuraUA`` / ``Call``: a small SIP UA (INVITE/100/180/200/ACK, BYE, CANCEL, re-INVITE,
  INFO, UDP retransmissions) running stage 2
  - as caller (``Call._stage2``, sections 2 and 2a): checks in order, caller-ID check with
    ``+``/``*18``/``*19`` stripping, SSRC clash; lost Callee Final: once it is overdue
    (min(T1, grace/2) after sending Caller Final) the caller switches on the first SRTP
    packet that authenticates under the key it sent;
  - as callee (``Call._xsipura_request``, section 2a): INFO classification, 400/488 codes,
    32 s half-done timeout, fallback to clear after a grace window without SRTP.
- ``Media``: section 3 (AES_CM_128_HMAC_SHA1_80, key = master key + first 14 salt bytes,
  same key both ways, switch-over moments, grace window, unprotect-first classification,
  fresh context per key, old key valid until new switch-over + grace) over G.711 u-law RTP
  at real pace (20 ms, 160-byte payloads, PT 0).

Test-only misbehaviour knobs on the callee: ``info_response`` (a status code for every
x-sipura INFO, e.g. 501; ``NO_RESPONSE`` to never answer; ``LOST_RESPONSE`` to process but
never send the response; or a dict keyed by msg_id 1/3 for per-step behaviour). Wrong,
expired or untrusted-CA MCs are simply different ``Subscriber`` identities or trust lists.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pylibsrtp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = logging.getLogger("xsipura_ua")

# ======================================================================================
# Section 1: keys, Mini-Certificates, provisioning params
# ======================================================================================

E = 65537
MC_LEN = 252
CA_BITS = 1024
SUBSCRIBER_BITS = 512


def _i2b(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def _b2i(data: bytes) -> int:
    return int.from_bytes(data, "big")


@dataclass(frozen=True)
class CaKey:
    """An RSA-1024 CA key (e = 65537)."""

    n: int
    d: int

    @classmethod
    def generate(cls) -> CaKey:
        numbers = rsa.generate_private_key(E, CA_BITS).private_numbers()
        return cls(numbers.public_numbers.n, numbers.d)

    @classmethod
    def from_key_file(cls, text: str) -> CaKey:
        """Linksys ``ca-key`` file: line 1 base64(n), line 2 base64(d)."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) != 2:
            raise ValueError("a Linksys ca-key file has exactly two base64 lines")
        return cls(_b2i(base64.b64decode(lines[0])), _b2i(base64.b64decode(lines[1])))

    def key_file(self) -> str:
        def b64(v: int) -> str:
            return base64.b64encode(_i2b(v, (v.bit_length() + 7) // 8)).decode("ascii")

        return f"{b64(self.n)}\n{b64(self.d)}\n"

    @property
    def modulus(self) -> bytes:
        return _i2b(self.n, CA_BITS // 8)


def format_expiry(when: datetime) -> str:
    """datetime -> ``HHMMSSMMDDYY`` (UTC; year = 2000 + YY)."""
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    if not 2000 <= when.year <= 2099:
        raise ValueError("MC expiry year must be 2000..2099")
    return when.strftime("%H%M%S%m%d") + f"{when.year - 2000:02d}"


def parse_expiry(digits: str) -> datetime:
    """``HHMMSSMMDDYY`` -> aware UTC datetime; ValueError when unparsable."""
    if len(digits) != 12 or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"expiry {digits!r} is not 12 ASCII digits")
    hh, mi, ss, mo, dd, yy = (int(digits[i : i + 2]) for i in range(0, 12, 2))
    return datetime(2000 + yy, mo, dd, hh, mi, ss, tzinfo=UTC)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True)
class McFields:
    """The fields of a 252-byte MC."""

    name: str
    user_id: str
    expiry: str
    n: int
    signature: bytes

    @classmethod
    def parse(cls, mc: bytes) -> McFields:
        if len(mc) != MC_LEN:
            raise ValueError(f"MC is {len(mc)} bytes, not {MC_LEN}")
        return cls(
            name=_cstr(mc[0:32]),
            user_id=_cstr(mc[32:48]),
            expiry=mc[48:60].decode("ascii", "replace"),
            n=_b2i(mc[60:124]),
            signature=mc[124:252],
        )


def _type1_block(digest: bytes, k: int) -> bytes:
    """PKCS#1 v1.5 block type 1 around the raw digest (no DigestInfo)."""
    return b"\x00\x01" + b"\xff" * (k - 3 - len(digest)) + b"\x00" + digest


def build_mc(ca: CaKey, name: str, user_id: str, expiry: str | datetime, n: int) -> bytes:
    """Issue an MC: fields, then the CA's raw private op over type-1(SHA-1(bytes 0..123))."""
    expiry_s = format_expiry(expiry) if isinstance(expiry, datetime) else expiry
    name_b, uid_b, exp_b = name.encode("ascii"), user_id.encode("ascii"), expiry_s.encode()
    if len(name_b) > 32 or len(uid_b) > 16 or len(exp_b) != 12:
        raise ValueError("name <= 32, user id <= 16, expiry == 12 ASCII bytes")
    body = name_b.ljust(32, b"\0") + uid_b.ljust(16, b"\0") + exp_b + _i2b(n, 64)
    block = _type1_block(hashlib.sha1(body).digest(), CA_BITS // 8)
    return body + _i2b(pow(_b2i(block), ca.d, ca.n), CA_BITS // 8)


def verify_mc(
    mc: bytes, trusted_ca_moduli: Iterable[int], now: datetime | None = None
) -> str | None:
    """None when the MC is valid (signature under a trusted CA, not expired), else why not."""
    if len(mc) != MC_LEN:
        return f"MC length {len(mc)}"
    digest = hashlib.sha1(mc[:124]).digest()
    signed = False
    for ca_n in trusted_ca_moduli:
        key = rsa.RSAPublicNumbers(E, ca_n).public_key()
        try:
            recovered = key.recover_data_from_signature(mc[124:], padding.PKCS1v15(), None)
        except (InvalidSignature, ValueError):  # ValueError: signature >= modulus
            continue
        if recovered == digest:
            signed = True
            break
    if not signed:
        return "signature does not verify under a trusted CA"
    try:
        expiry = parse_expiry(mc[48:60].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return "unparsable expiry"
    if (now or datetime.now(UTC)) > expiry:
        return f"expired {expiry.isoformat()}"
    return None


_SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % q for q in range(3, int(p**0.5) + 1, 2))]


def is_probable_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with random bases from ``secrets``."""
    if n < 2:
        return False
    for p in (2, *_SMALL_PRIMES):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        a = secrets.randbelow(n - 3) + 2
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def random_prime(bits: int) -> int:
    """A random probable prime of exactly ``bits`` bits with the top two bits set."""
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if is_probable_prime(candidate):
            return candidate


def generate_subscriber_key() -> tuple[int, int]:
    """RSA-512 (n, d): two random 256-bit primes, gcd(e, lambda(n)) = 1."""
    while True:
        p, q = random_prime(SUBSCRIBER_BITS // 2), random_prime(SUBSCRIBER_BITS // 2)
        if p == q:
            continue
        lam = math.lcm(p - 1, q - 1)
        if math.gcd(E, lam) != 1:
            continue
        n = p * q
        assert n.bit_length() == SUBSCRIBER_BITS
        return n, pow(E, -1, lam)


@dataclass(frozen=True)
class Subscriber:
    """One line's x-sipura identity: its MC, its private exponent and its trust anchor."""

    mc: bytes
    d: int
    ca_n: int

    @property
    def fields(self) -> McFields:
        return McFields.parse(self.mc)

    @property
    def n(self) -> int:
        return self.fields.n

    @property
    def name(self) -> str:
        return self.fields.name

    @property
    def user_id(self) -> str:
        return self.fields.user_id

    @classmethod
    def issue(
        cls,
        ca: CaKey,
        name: str,
        user_id: str,
        expiry: str | datetime,
        key: tuple[int, int] | None = None,
    ) -> Subscriber:
        n, d = key or generate_subscriber_key()
        return cls(build_mc(ca, name, user_id, expiry, n), d, ca.n)

    def mini_certificate_param(self) -> str:
        """``Mini Certificate`` = base64(MC || CA modulus), 380 bytes."""
        return base64.b64encode(self.mc + _i2b(self.ca_n, CA_BITS // 8)).decode("ascii")

    def srtp_private_key_param(self) -> str:
        """``SRTP Private Key`` = base64(d), big-endian, leading zero bytes stripped."""
        return base64.b64encode(_i2b(self.d, (self.d.bit_length() + 7) // 8)).decode("ascii")

    @classmethod
    def from_params(cls, mini_certificate: str, srtp_private_key: str) -> Subscriber:
        raw = base64.b64decode("".join(mini_certificate.split()), validate=True)
        if len(raw) != MC_LEN + CA_BITS // 8:
            raise ValueError(f"Mini Certificate param is {len(raw)} bytes, not 380")
        d_raw = base64.b64decode("".join(srtp_private_key.split()), validate=True)
        if not 1 <= len(d_raw) <= 64:
            raise ValueError("SRTP Private Key must be 1..64 bytes")
        sub = cls(raw[:MC_LEN], _b2i(d_raw), _b2i(raw[MC_LEN:]))
        if pow(pow(2, E, sub.n), sub.d, sub.n) != 2:
            raise ValueError("SRTP Private Key does not match the MC's modulus")
        return sub


def encrypt_type2(n: int, plaintext: bytes) -> bytes:
    """E(x): RSA-512 PKCS#1 v1.5 type-2 encryption under the callee MC's key."""
    return rsa.RSAPublicNumbers(E, n).public_key().encrypt(plaintext, padding.PKCS1v15())


def decrypt_type2(n: int, d: int, block: bytes, expected_len: int = 16) -> bytes | None:
    """Raw RSA decryption with a strict type-2 padding check; None on any defect.

    Done by hand because OpenSSL >= 3.2 answers bad padding with random bytes (implicit
    rejection) instead of an error (profile section 2).
    """
    k = (n.bit_length() + 7) // 8
    if len(block) != k:
        return None
    c = _b2i(block)
    if c >= n:
        return None
    em = _i2b(pow(c, d, n), k)
    if em[0] != 0 or em[1] != 2:
        return None
    sep = em.find(b"\x00", 2)
    if sep < 0 or sep - 2 < 8:
        return None
    message = em[sep + 1 :]
    return message if len(message) == expected_len else None


# ======================================================================================
# Section 2: stage-2 messages
# ======================================================================================

MSG_CALLER_HELLO, MSG_CALLEE_HELLO, MSG_CALLER_FINAL, MSG_CALLEE_FINAL = 1, 2, 3, 4
VERSION_FLAGS_V1 = 0x00010000
HELLO_LEN = 12 + MC_LEN
CALLER_FINAL_LEN = 4 + 64 + 64
XSIPURA_CONTENT_TYPE = "application/x-sipura"
OTHER_INFO_TYPES = frozenset(
    {"application/dtmf-relay", "application/dtmf", "application/media_control+xml"}
)


def hello(msg_id: int, ssrc: int, mc: bytes, version_flags: int = VERSION_FLAGS_V1) -> bytes:
    return struct.pack(">III", msg_id, version_flags, ssrc) + mc


def caller_final(callee_n: int, master_key: bytes, master_salt: bytes) -> bytes:
    return (
        struct.pack(">I", MSG_CALLER_FINAL)
        + encrypt_type2(callee_n, master_key)
        + encrypt_type2(callee_n, master_salt)
    )


def callee_final() -> bytes:
    return struct.pack(">I", MSG_CALLEE_FINAL)


def encode_body(message: bytes) -> bytes:
    return base64.b64encode(message)


def decode_body(body: bytes) -> bytes:
    """Base64 with surrounding whitespace/CRLF tolerated; ValueError when it does not decode."""
    try:
        return base64.b64decode(body.strip(), validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"base64: {exc}") from exc


def parse_hello(raw: bytes, msg_id: int) -> tuple[int, int, bytes]:
    """-> (version_flags, ssrc, mc); ValueError on length / msg_id / version."""
    if len(raw) != HELLO_LEN:
        raise ValueError(f"hello length {len(raw)}")
    got_id, version_flags, ssrc = struct.unpack(">III", raw[:12])
    if got_id != msg_id:
        raise ValueError(f"msg_id {got_id}, expected {msg_id}")
    if version_flags >> 16 != 1:
        raise ValueError(f"version {version_flags >> 16}")
    return version_flags, ssrc, raw[12:]


def dialled_user_id(user: str) -> str:
    """User part of the dialled URI with any ``*18``/``*19`` prefix and one ``+`` removed."""
    if user[:3] in ("*18", "*19"):
        user = user[3:]
    return user[1:] if user.startswith("+") else user


# ======================================================================================
# Section 3: media (RTP, SRTP, u-law payload sources)
# ======================================================================================

PTIME = 0.020
SAMPLES = 160


def srtp_policy_key(master_key: bytes, master_salt: bytes) -> bytes:
    """libsrtp key input: 16-byte master key || first 14 bytes of the 16-byte master salt."""
    return master_key + master_salt[:14]


def _srtp_session(master_key: bytes, master_salt: bytes, outbound: bool) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(
        key=srtp_policy_key(master_key, master_salt),
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND
        if outbound
        else pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    )
    return pylibsrtp.Session(policy)


def linear_to_ulaw(sample: int) -> int:
    """G.711 u-law encoding of one 16-bit linear sample."""
    sign = 0
    if sample < 0:
        sample, sign = -sample, 0x80
    sample = min(sample, 32635) + 0x84
    exponent = max(0, min(7, sample.bit_length() - 8))
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


PayloadSource = Callable[[int], bytes]
"""Packet index (0, 1, 2, ...) -> 160-byte u-law payload."""


def sine_source(freq: float = 1000.0, amplitude: float = 0.5) -> PayloadSource:
    """A continuous sine tone in u-law (1 kHz by default)."""

    def source(index: int) -> bytes:
        base = index * SAMPLES
        return bytes(
            linear_to_ulaw(
                int(amplitude * 32767 * math.sin(2 * math.pi * freq * (base + i) / 8000))
            )
            for i in range(SAMPLES)
        )

    return source


PATTERN_MAGIC = b"XSPT"


def pattern_source(tag: int = 0x41) -> PayloadSource:
    """Payloads that carry their own index: magic, tag byte, uint32 index, then filler
    bytes derived from the index, so a receiver can check exact content."""

    def source(index: int) -> bytes:
        head = PATTERN_MAGIC + bytes([tag]) + struct.pack(">I", index)
        return head + bytes((index * 7 + i) & 0xFF for i in range(SAMPLES - len(head)))

    return source


def check_pattern(payload: bytes, tag: int | None = None) -> int | None:
    """The index of a ``pattern_source`` payload, or None when it is not one exactly."""
    if len(payload) != SAMPLES or not payload.startswith(PATTERN_MAGIC):
        return None
    if tag is not None and payload[4] != tag:
        return None
    (index,) = struct.unpack(">I", payload[5:9])
    return index if pattern_source(payload[4])(index) == payload else None


@dataclass
class RxPacket:
    seq: int
    timestamp: int
    ssrc: int
    pt: int
    marker: bool
    payload: bytes
    secure: bool
    at: float


def parse_rtp(packet: bytes) -> tuple[int, int, int, int, bool, bytes] | None:
    """-> (seq, timestamp, ssrc, pt, marker, payload) or None when not RTP v2."""
    if len(packet) < 12 or packet[0] >> 6 != 2:
        return None
    b0, b1, seq, ts, ssrc = struct.unpack(">BBHII", packet[:12])
    offset = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        if len(packet) < offset + 4:
            return None
        (ext_words,) = struct.unpack(">H", packet[offset + 2 : offset + 4])
        offset += 4 + 4 * ext_words
    end = len(packet)
    if b0 & 0x20 and end > offset:
        end -= packet[-1]
    if end < offset:
        return None
    return seq, ts, ssrc, b1 & 0x7F, bool(b1 & 0x80), packet[offset:end]


@dataclass
class _RxKey:
    master_key: bytes
    master_salt: bytes
    session: pylibsrtp.Session
    ok: int = 0
    expires: float | None = None
    on_ok: Callable[[], None] | None = None


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.handler(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)


class Media:
    """One RTP stream pair: paced u-law sender plus receiver with SRTP switch-over.

    Counters: ``rtp_plain_rx``, ``srtp_rx_ok``, ``srtp_auth_fail`` (SRTP failing auth,
    or plain RTP after the grace window), ``tx_plain``, ``tx_srtp``, ``tx_protect_fail``,
    ``rtcp_rx``, ``rx_malformed``. ``received`` holds every accepted packet.
    """

    def __init__(
        self,
        host: str,
        payload_source: PayloadSource | None = None,
        grace: float = 2.0,
        ssrc: int | None = None,
    ) -> None:
        self.host = host
        self.payload_source = payload_source or sine_source()
        self.grace = grace
        self.ssrc = ssrc if ssrc is not None else secrets.randbits(32)
        self._seq0 = secrets.randbits(16)
        self._ts0 = secrets.randbits(32)
        self.port = 0
        self.remote: tuple[str, int] | None = None
        self.sending = True
        self.received: list[RxPacket] = []
        self.rtp_plain_rx = self.srtp_rx_ok = self.srtp_auth_fail = 0
        self.tx_plain = self.tx_srtp = self.tx_protect_fail = 0
        self.rtcp_rx = self.rx_malformed = 0
        self.rx_sources: set[tuple[str, int]] = set()
        self._tx: pylibsrtp.Session | None = None
        self.tx_key: _RxKey | None = None
        self._rx_keys: list[_RxKey] = []
        self._plain_until: float | None = None  # None: plain RTP accepted without limit
        self._transport: asyncio.DatagramTransport | None = None
        self._rtcp_transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Bind the RTP port (and RTCP on port + 1, so relayed RTCP has a home)."""
        loop = asyncio.get_running_loop()
        for _ in range(50):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagram(self._on_rtp), local_addr=(self.host, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                rtcp, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagram(self._on_rtcp), local_addr=(self.host, port + 1)
                )
            except OSError:
                transport.close()
                continue
            self._transport = transport
            self._rtcp_transport = rtcp
            self.port = port
            return
        raise OSError("no free RTP/RTCP port pair")

    # --- state --------------------------------------------------------------------------

    @property
    def secured(self) -> bool:
        return self._tx is not None

    def add_rx_key(self, master_key: bytes, master_salt: bytes) -> _RxKey:
        """Accept SRTP under this key from now on (plain RTP still accepted)."""
        ctx = _RxKey(master_key, master_salt, _srtp_session(master_key, master_salt, False))
        self._rx_keys.append(ctx)
        return ctx

    def remove_rx_key(self, ctx: _RxKey) -> None:
        if ctx in self._rx_keys:
            self._rx_keys.remove(ctx)

    def switch_tx(self, ctx: _RxKey) -> None:
        """Encrypt from now on under ``ctx``'s key (fresh context, ROC 0); start the grace
        window for the peer's plain RTP; older keys stay valid for the grace window."""
        now = time.monotonic()
        self._tx = _srtp_session(ctx.master_key, ctx.master_salt, True)
        self.tx_key = ctx
        self._plain_until = now + self.grace
        if ctx not in self._rx_keys:
            self._rx_keys.append(ctx)
        for other in self._rx_keys:
            if other is not ctx and other.expires is None:
                other.expires = now + self.grace

    def fall_back_clear(self) -> None:
        self._tx = None
        self.tx_key = None
        self._plain_until = None

    # --- receive ------------------------------------------------------------------------

    def _on_rtcp(self, data: bytes, addr: tuple[str, int]) -> None:
        self.rtcp_rx += 1

    def _on_rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        self.rx_sources.add(addr)
        now = time.monotonic()
        self._rx_keys = [k for k in self._rx_keys if k.expires is None or now <= k.expires]
        for ctx in self._rx_keys:
            try:
                clear = ctx.session.unprotect(data)
            except pylibsrtp.Error:
                continue
            parsed = parse_rtp(clear)
            if parsed is None:
                self.rx_malformed += 1
                return
            ctx.ok += 1
            self.srtp_rx_ok += 1
            self._record(parsed, True, now)
            if ctx.on_ok is not None:
                callback, ctx.on_ok = ctx.on_ok, None
                callback()
            return
        if self._plain_until is not None and now > self._plain_until:
            self.srtp_auth_fail += 1  # plain (or undecryptable) after the grace window
            return
        parsed = parse_rtp(data)
        if parsed is None:
            self.rx_malformed += 1
            return
        self.rtp_plain_rx += 1
        self._record(parsed, False, now)

    def _record(
        self, parsed: tuple[int, int, int, int, bool, bytes], secure: bool, at: float
    ) -> None:
        seq, ts, ssrc, pt, marker, payload = parsed
        self.received.append(RxPacket(seq, ts, ssrc, pt, marker, payload, secure, at))

    # --- send ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._send_loop())

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        index = 0
        while True:
            if self.sending and self.remote is not None and self._transport is not None:
                self._send_one(index)
            index += 1
            delay = start + index * PTIME - loop.time()
            if delay < -1.0:  # the loop stalled: resynchronise instead of bursting
                start = loop.time() - index * PTIME
                delay = 0.0
            await asyncio.sleep(max(delay, 0.0))

    def _send_one(self, index: int) -> None:
        assert self._transport is not None and self.remote is not None
        header = struct.pack(
            ">BBHII",
            0x80,
            0x80 if index == 0 else 0x00,  # marker on the first packet; PT 0 (PCMU)
            (self._seq0 + index) & 0xFFFF,
            (self._ts0 + index * SAMPLES) & 0xFFFFFFFF,
            self.ssrc,
        )
        packet = header + self.payload_source(index)
        if self._tx is not None:
            try:
                packet = self._tx.protect(packet)
            except pylibsrtp.Error:
                self.tx_protect_fail += 1
                return
            self.tx_srtp += 1
        else:
            self.tx_plain += 1
        self._transport.sendto(packet, self.remote)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()
        for transport in (self._transport, self._rtcp_transport):
            if transport is not None:
                transport.close()

    @property
    def counters(self) -> dict[str, int]:
        return {
            name: getattr(self, name)
            for name in (
                "rtp_plain_rx",
                "srtp_rx_ok",
                "srtp_auth_fail",
                "tx_plain",
                "tx_srtp",
                "tx_protect_fail",
                "rtcp_rx",
                "rx_malformed",
            )
        }


def make_sdp(host: str, port: int, session_id: int) -> bytes:
    return (
        f"v=0\r\no=- {session_id} {session_id} IN IP4 {host}\r\ns=-\r\n"
        f"c=IN IP4 {host}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n"
        "a=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n"
    ).encode("ascii")


def parse_sdp(body: bytes) -> tuple[str, int, list[int]] | None:
    """-> (connection address, audio port, payload types) of the first audio stream."""
    host: str | None = None
    media_host: str | None = None
    port: int | None = None
    pts: list[int] = []
    for raw in body.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line.startswith("c=") and len(line.split()) >= 3:
            if port is None:
                host = line.split()[2]
            else:
                media_host = line.split()[2]
        elif line.startswith("m="):
            if port is not None:
                break
            parts = line[2:].split()
            if parts and parts[0] == "audio" and len(parts) >= 3:
                port = int(parts[1])
                pts = [int(p) for p in parts[3:] if p.isdigit()]
    address = media_host or host
    if port is None or address is None:
        return None
    return address, port, pts


# ======================================================================================
# SIP (minimal RFC 3261 over UDP)
# ======================================================================================

_COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
}

REASONS = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    415: "Unsupported Media Type",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    603: "Decline",
}


def _hname(name: str) -> str:
    lower = name.strip().lower()
    return _COMPACT.get(lower, lower)


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas inside <> and quotes."""
    out, depth, quoted, cur = [], 0, False, []
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif ch == "," and not quoted and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def header_params(value: str) -> dict[str, str]:
    """Header parameters (after the ``>`` of a name-addr, or after the first ``;``)."""
    rest = value[value.index(">") + 1 :] if ">" in value else value
    params = {}
    for part in rest.split(";")[1:]:
        name, _, val = part.partition("=")
        params[name.strip().lower()] = val.strip()
    return params


def uri_of(value: str) -> str:
    if "<" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";", 1)[0].strip()


def uri_user(uri: str) -> str:
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    return rest.split("@", 1)[0] if "@" in rest else ""


def uri_hostport(uri: str) -> tuple[str, int]:
    rest = uri.split(":", 1)[1] if uri.lower().startswith(("sip:", "sips:")) else uri
    rest = rest.split("@", 1)[-1].split(";", 1)[0].split("?", 1)[0]
    host, _, port = rest.partition(":")
    return host, int(port) if port else 5060


@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> SipMessage:
        sep = data.find(b"\r\n\r\n")
        if sep >= 0:
            head, body = data[:sep], data[sep + 4 :]
        else:
            sep = data.find(b"\n\n")
            head, body = (data[:sep], data[sep + 2 :]) if sep >= 0 else (data, b"")
        lines = head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
        first = lines[0].strip()
        parts = first.split(" ", 2)
        if len(parts) < 3 or not (parts[0] == "SIP/2.0" or parts[2] == "SIP/2.0"):
            raise ValueError(f"not a SIP start line: {first!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line.strip():
                continue
            if line[0] in " \t" and headers:
                headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
                continue
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        msg = cls(first, headers, body)
        length = msg.get("content-length")
        if length is not None and length.strip().isdigit():
            msg.body = body[: int(length)]
        return msg

    @property
    def is_request(self) -> bool:
        return not self.first_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        return self.first_line.split(" ", 1)[0] if self.is_request else self.cseq[1]

    @property
    def uri(self) -> str:
        return self.first_line.split(" ")[1]

    @property
    def status(self) -> int:
        return int(self.first_line.split(" ")[1])

    @property
    def cseq(self) -> tuple[int, str]:
        num, _, method = (self.get("cseq") or "0 ?").partition(" ")
        return int(num), method.strip().upper()

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        key = _hname(name)
        return [v for n, v in self.headers if _hname(n) == key]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    @property
    def top_via(self) -> str:
        vias = self.get_all("via")
        return split_list(vias[0])[0] if vias else ""

    @property
    def branch(self) -> str:
        return header_params(self.top_via).get("branch", "")

    @property
    def call_id(self) -> str:
        return self.get("call-id") or ""

    @property
    def content_type(self) -> str:
        return (self.get("content-type") or "").split(";", 1)[0].strip().lower()

    def encode(self) -> bytes:
        lines = [self.first_line]
        lines += [f"{n}: {v}" for n, v in self.headers if _hname(n) != "content-length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


def _new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


@dataclass
class _ClientTx:
    future: asyncio.Future[SipMessage]
    on_provisional: Callable[[SipMessage], None] | None = None
    provisional: bool = False


NO_RESPONSE = "no-response"
"""info_response value: never answer (the peer's INFO transaction times out)."""
LOST_RESPONSE = "lost-response"
"""info_response value: process the INFO (switch keys etc.) but never send the response."""

InfoBehaviour = int | str | None


class Call:
    """One dialog with its media and its x-sipura handshake state.

    Attributes for tests: ``role`` ("caller"/"callee"), ``state`` ("calling", "early",
    "confirmed", "terminated"), ``status`` (final INVITE status), ``provisional`` (1xx
    codes seen/sent), ``media`` (``Media``), ``outcome`` (None until the handshake ends,
    then "secure" or "clear"), ``reason``, ``peer_name`` / ``peer_user_id`` / ``peer_mc``,
    ``srtp_keys`` ((master_key, master_salt) in use), ``info_codes`` (status of every
    x-sipura INFO: received as caller, sent as callee; None = no response),
    ``other_infos`` (INFOs that were not x-sipura), ``peer_supported``.
    """

    def __init__(self, ua: XsipuraUA, role: str, call_id: str) -> None:
        self.ua = ua
        self.role = role
        self.call_id = call_id
        self.state = "calling"
        self.status: int | None = None
        self.provisional: list[int] = []
        self.media = Media(ua.host, ua.payload_source, ua.grace, ua.ssrc)
        self.outcome: str | None = None
        self.reason = ""
        self.peer_name: str | None = None
        self.peer_user_id: str | None = None
        self.peer_mc: bytes | None = None
        self.srtp_keys: tuple[bytes, bytes] | None = None
        self.info_codes: list[int | None] = []
        self.other_infos: list[SipMessage] = []
        self.peer_supported = False
        self.invite: SipMessage | None = None
        self.answer: SipMessage | None = None
        self.expect_user_id: str | None = None
        self.secure = ua.secure
        # dialog
        self.local_tag = secrets.token_hex(4)
        self.local_hdr = ""
        self.remote_hdr = ""
        self.remote_target = ""
        self.route_set: list[str] = []
        self.local_cseq = 0
        self.peer_addr: tuple[str, int] | None = None
        self._ack: tuple[bytes, tuple[str, int]] | None = None
        self._acked = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hello: tuple[int, bytes] | None = None  # callee: accepted (peer ssrc, peer MC)
        self._hello_timer: asyncio.TimerHandle | None = None
        self._session_id = secrets.randbelow(10**9)

    # --- public API -----------------------------------------------------------------------

    @property
    def secured(self) -> bool:
        return self.media.secured

    @property
    def counters(self) -> dict[str, int]:
        return self.media.counters

    @property
    def payloads(self) -> list[bytes]:
        return [p.payload for p in self.media.received]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def wait_outcome(self, timeout: float = 10.0) -> str | None:
        await self.wait_for(lambda: self.outcome is not None, timeout)
        return self.outcome

    async def wait_secured(self, timeout: float = 10.0) -> bool:
        return await self.wait_for(lambda: self.secured, timeout)

    async def wait_rx(self, count: int, timeout: float = 5.0, secure: bool | None = None) -> bool:
        def enough() -> bool:
            got = [p for p in self.media.received if secure is None or p.secure == secure]
            return len(got) >= count

        return await self.wait_for(enough, timeout)

    async def wait_state(self, state: str, timeout: float = 5.0) -> bool:
        return await self.wait_for(lambda: self.state == state, timeout)

    async def hangup(self, timeout: float | None = None) -> int | None:
        """BYE a confirmed dialog, CANCEL an unanswered outgoing call, reject (486) an
        unanswered incoming one. Returns the response status (None on timeout)."""
        if self.state == "terminated":
            return None
        if self.state in ("calling", "early"):
            if self.role == "caller":
                return await self.ua._cancel(self)
            self.ua._reject_incoming(self, 486)
            return 486
        resp = await self.request("BYE", timeout=timeout)
        await self._terminate()
        return resp.status if resp else None

    async def send_info(
        self, body: bytes | str, content_type: str = XSIPURA_CONTENT_TYPE
    ) -> SipMessage | None:
        """Send a raw INFO in the dialog (e.g. a vector body); returns the final response."""
        data = body.encode("ascii") if isinstance(body, str) else body
        return await self.request("INFO", data, content_type)

    async def request(
        self,
        method: str,
        body: bytes = b"",
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> SipMessage | None:
        """Send any in-dialog request; the final response, or None on timeout (default:
        ``info_timeout`` for INFO, 64*T1 otherwise)."""
        msg = self.ua._in_dialog_request(self, method, body, content_type)
        if timeout is None:
            timeout = self.ua.info_timeout if method == "INFO" else 64 * self.ua.t1
        return await self.ua._send_request(msg, self.ua._dialog_dest(self), timeout=timeout)

    async def rekey(self) -> str | None:
        """Caller: run stage 2 again in this dialog (a re-key when already secure)."""
        self.outcome = None
        await self._stage2()
        return self.outcome

    # --- outcome helpers ------------------------------------------------------------------

    def _set_outcome(self, outcome: str, reason: str) -> None:
        self.outcome = outcome
        self.reason = reason
        log.info("%s %s: stage 2 %s (%s)", self.ua.name, self.call_id, outcome, reason)

    def _clear(self, reason: str) -> None:
        # A failed re-key leaves an already secured call secured.
        self._set_outcome("secure" if self.secured else "clear", reason)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _terminate(self) -> None:
        self.state = "terminated"
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        await self.media.stop()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    # --- stage 2, caller side (profile section 2, 2a) -------------------------------------

    async def _stage2_after_media(self) -> None:
        await asyncio.sleep(self.ua.stage2_delay)
        if self.state == "confirmed":
            await self._stage2()

    async def _stage2(self) -> None:
        ua = self.ua
        if ua.identity is None:
            self._clear("no x-sipura identity configured")
            return
        own_ssrc = self.media.ssrc
        resp = await self.send_info(
            encode_body(hello(MSG_CALLER_HELLO, own_ssrc, ua.identity.mc, ua.version_flags))
        )
        self.info_codes.append(resp.status if resp else None)
        if resp is None:
            self._clear("Caller Hello: INFO timed out")
            return
        if resp.status != 200:
            self._clear(f"Caller Hello answered {resp.status}")
            return
        if not resp.body.strip():
            self._clear("Caller Hello answered 200 without a body")
            return
        try:
            _, peer_ssrc, peer_mc = parse_hello(decode_body(resp.body), MSG_CALLEE_HELLO)
        except ValueError as exc:
            self._clear(f"Callee Hello does not decode: {exc}")
            return
        problem = verify_mc(peer_mc, ua.trusted_ca, ua.clock())
        if problem:
            self._clear(f"callee MC invalid: {problem}")
            return
        fields = McFields.parse(peer_mc)
        expected = self.expect_user_id
        if expected is None and self.invite is not None:
            expected = dialled_user_id(uri_user(self.invite.uri))
        if fields.user_id != expected:
            self._clear(f"callee MC user id {fields.user_id!r} != dialled {expected!r}")
            return
        if peer_ssrc == own_ssrc:
            self._clear("SSRC clash")
            return
        self.peer_name, self.peer_user_id, self.peer_mc = fields.name, fields.user_id, peer_mc
        master_key = ua.fixed_keys[0] if ua.fixed_keys else secrets.token_bytes(16)
        master_salt = ua.fixed_keys[1] if ua.fixed_keys else secrets.token_bytes(16)
        final = caller_final(fields.n, master_key, master_salt)
        ctx = self.media.add_rx_key(master_key, master_salt)  # callee SRTP may overtake the 200
        exchange = self._spawn(self.send_info(encode_body(final)))
        await asyncio.wait({exchange}, timeout=min(ua.t1, ua.grace / 2))
        if not exchange.done():
            # Callee Final overdue (lost?): the callee has switched if SRTP authenticates
            # under the key we sent; switch then, while the callee's grace window is open.
            ctx.on_ok = lambda: self._switch_on_srtp(ctx)
            if ctx.ok:
                self._switch_on_srtp(ctx)
        resp = await exchange
        ctx.on_ok = None
        self.info_codes.append(resp.status if resp else None)
        raw = b""
        if resp is not None and resp.status == 200:
            try:
                raw = decode_body(resp.body)
            except ValueError as exc:
                log.debug("callee final: %s", exc)
        if self.media.tx_key is ctx:  # already switched on authenticated SRTP
            got = "received late" if raw == callee_final() else "never received"
            self._set_outcome("secure", f"switched on authenticated SRTP; Callee Final {got}")
            return
        if resp is None:
            self.media.remove_rx_key(ctx)
            self._clear("Caller Final: INFO timed out")
            return
        if resp.status != 200:
            self.media.remove_rx_key(ctx)
            self._clear(f"Caller Final answered {resp.status}")
            return
        if raw != callee_final():
            self.media.remove_rx_key(ctx)
            self._clear(f"Callee Final does not decode: {raw.hex() or 'empty'}")
            return
        self._switch(ctx, "Callee Final received")

    def _switch_on_srtp(self, ctx: _RxKey) -> None:
        if self.media.tx_key is not ctx and self.state == "confirmed":
            self._switch(ctx, "Callee Final overdue; switched on authenticated SRTP")

    def _switch(self, ctx: _RxKey, reason: str) -> None:
        self.media.switch_tx(ctx)
        self.srtp_keys = (ctx.master_key, ctx.master_salt)
        self._set_outcome("secure", reason)

    # --- stage 2, callee side ---------------------------------------------------------------

    def _xsipura_request(self, body: bytes) -> tuple[int, bytes, Callable[[], None] | None]:
        """-> (status, response body, action to run as the response is sent)."""
        ua = self.ua
        if self.role != "callee":
            return 400, b"", None  # only the dialog's caller starts stage 2
        try:
            raw = decode_body(body)
        except ValueError as exc:
            return self._reject(400, str(exc))
        if len(raw) < 4:
            return self._reject(400, f"message of {len(raw)} bytes")
        (msg_id,) = struct.unpack(">I", raw[:4])
        if msg_id == MSG_CALLER_HELLO:
            try:
                _, peer_ssrc, peer_mc = parse_hello(raw, MSG_CALLER_HELLO)
            except ValueError as exc:
                return self._reject(400, f"Caller Hello: {exc}")
            assert ua.identity is not None
            problem = verify_mc(peer_mc, ua.trusted_ca, ua.clock())
            if problem:
                return self._reject(488, f"caller MC invalid: {problem}")
            if peer_ssrc == self.media.ssrc:
                return self._reject(488, "SSRC clash")
            self._hello = (peer_ssrc, peer_mc)
            fields = McFields.parse(peer_mc)
            self.peer_name, self.peer_user_id, self.peer_mc = fields.name, fields.user_id, peer_mc
            if self._hello_timer is not None:
                self._hello_timer.cancel()
            self._hello_timer = asyncio.get_running_loop().call_later(
                ua.half_done_timeout, self._half_done_expired
            )
            reply = hello(MSG_CALLEE_HELLO, self.media.ssrc, ua.identity.mc, ua.version_flags)
            return 200, encode_body(reply), None
        if msg_id == MSG_CALLER_FINAL:
            if len(raw) != CALLER_FINAL_LEN:
                return self._reject(400, f"Caller Final length {len(raw)}")
            if self._hello is None:
                return self._reject(400, "Caller Final without an accepted Caller Hello")
            assert ua.identity is not None
            n, d = ua.identity.n, ua.identity.d
            master_key = decrypt_type2(n, d, raw[4:68])
            master_salt = decrypt_type2(n, d, raw[68:132])
            if master_key is None or master_salt is None:
                return self._reject(400, "E(x) is not a valid type-2 block")
            self._hello = None
            if self._hello_timer is not None:
                self._hello_timer.cancel()

            def switch() -> None:
                ctx = self.media.add_rx_key(master_key, master_salt)
                self._switch(ctx, "Callee Final sent")
                asyncio.get_running_loop().call_later(ua.grace, self._grace_check, ctx)

            return 200, encode_body(callee_final()), switch
        return self._reject(400, f"msg_id {msg_id} in a request")

    def _reject(self, code: int, reason: str) -> tuple[int, bytes, None]:
        self._clear(f"answered {code}: {reason}")
        return code, b"", None

    def _half_done_expired(self) -> None:
        if self._hello is not None:
            self._hello = None
            self._clear("no Caller Final within the half-done timeout")

    def _grace_check(self, ctx: _RxKey) -> None:
        if self.ua.fallback_without_srtp and self.media.tx_key is ctx and ctx.ok == 0:
            self.media.fall_back_clear()
            self._set_outcome("clear", "no authenticated SRTP within the grace window")


class XsipuraUA:
    """A SIP UA on one UDP port; several calls at a time, each a ``Call``.

    Constructor (all keyword): ``name`` (log label), ``host`` ("127.0.0.1"), ``port`` (0 =
    any), ``user`` (From/Contact user part), ``display``, ``identity`` (``Subscriber`` or
    None for a non-x-sipura device), ``trusted_ca`` (CA moduli; default the identity's own
    anchor), ``supported`` (send ``Supported: x-sipura``; default: identity is set),
    ``secure`` (caller runs stage 2), ``probe`` (run it even without the peer's Supported),
    ``info_response`` (callee misbehaviour, see module doc), ``answer_code`` (200, or e.g.
    486 to reject), ``ring_delay``/``answer_delay`` (s), ``grace`` (2.0 s),
    ``info_timeout`` (INFO transaction timeout, default 64*T1 = 32 s), ``half_done_timeout``
    (32 s), ``stage2_delay`` (0.2 s after media starts), ``payload_source``, ``ssrc``
    (fixed tx SSRC), ``version_flags``, ``fixed_keys`` ((key, salt) instead of random),
    ``clock`` (UTC now for MC expiry), ``outbound_proxy`` ((host, port) for every request),
    ``fallback_without_srtp`` (callee falls back to clear after the grace window without
    authenticated SRTP; default True), ``t1``/``t2`` (0.5/4 s).
    """

    def __init__(
        self,
        *,
        name: str = "ua",
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = "ua",
        display: str | None = None,
        identity: Subscriber | None = None,
        trusted_ca: Iterable[int] | None = None,
        supported: bool | None = None,
        secure: bool = True,
        probe: bool = False,
        info_response: InfoBehaviour | Mapping[int, InfoBehaviour] = None,
        answer_code: int = 200,
        ring_delay: float = 0.05,
        answer_delay: float = 0.1,
        grace: float = 2.0,
        info_timeout: float | None = None,
        half_done_timeout: float = 32.0,
        stage2_delay: float = 0.2,
        payload_source: PayloadSource | None = None,
        ssrc: int | None = None,
        version_flags: int = VERSION_FLAGS_V1,
        fixed_keys: tuple[bytes, bytes] | None = None,
        clock: Callable[[], datetime] | None = None,
        outbound_proxy: tuple[str, int] | None = None,
        fallback_without_srtp: bool = True,
        t1: float = 0.5,
        t2: float = 4.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.user = user
        self.display = display or (identity.name if identity else user)
        self.identity = identity
        if trusted_ca is None:
            trusted_ca = [identity.ca_n] if identity else []
        self.trusted_ca = list(trusted_ca)
        self.supported = identity is not None if supported is None else supported
        self.secure = secure
        self.probe = probe
        self.info_response = info_response
        self.answer_code = answer_code
        self.ring_delay = ring_delay
        self.answer_delay = answer_delay
        self.grace = grace
        self.t1, self.t2 = t1, t2
        self.info_timeout = info_timeout if info_timeout is not None else 64 * t1
        self.half_done_timeout = half_done_timeout
        self.stage2_delay = stage2_delay
        self.payload_source = payload_source
        self.ssrc = ssrc
        self.version_flags = version_flags
        self.fixed_keys = fixed_keys
        self.clock = clock or (lambda: datetime.now(UTC))
        self.outbound_proxy = outbound_proxy
        self.fallback_without_srtp = fallback_without_srtp
        self.calls: dict[str, Call] = {}
        self.sip_log: list[tuple[str, tuple[str, int], SipMessage]] = []
        self.sip_parse_errors = 0
        self._incoming: asyncio.Queue[Call] = asyncio.Queue()
        self._client_tx: dict[tuple[str, str], _ClientTx] = {}
        self._server_tx: dict[tuple[str, str], bytes | None] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> XsipuraUA:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagram(self._on_datagram), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def close(self) -> None:
        for call in list(self.calls.values()):
            for task in list(call._tasks):
                task.cancel()
            if call._hello_timer is not None:
                call._hello_timer.cancel()
            await call.media.close()
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.close()

    async def __aenter__(self) -> XsipuraUA:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def uri(self) -> str:
        return f"sip:{self.user}@{self.host}:{self.port}"

    # --- caller API ---------------------------------------------------------------------

    async def call(
        self,
        uri: str,
        *,
        dest: tuple[str, int] | None = None,
        timeout: float = 10.0,
        secure: bool | None = None,
        expect_user_id: str | None = None,
    ) -> Call:
        """INVITE ``uri``; returns the Call after the final response (``call.status``;
        408 on timeout). On 200 it ACKs, starts media and (per policy) stage 2."""
        call = Call(self, "caller", f"{secrets.token_hex(8)}@{self.host}")
        if secure is not None:
            call.secure = secure
        call.expect_user_id = expect_user_id
        self.calls[call.call_id] = call
        await call.media.open()
        call.local_hdr = f'"{self.display}" <{self.uri}>;tag={call.local_tag}'
        call.remote_hdr = f"<{uri}>"
        call.remote_target = uri
        call.local_cseq = 1
        target = dest or self.outbound_proxy or uri_hostport(uri)
        call.peer_addr = target
        invite = self._build_request(
            call,
            "INVITE",
            uri,
            _new_branch(),
            1,
            body=make_sdp(self.host, call.media.port, call._session_id),
            content_type="application/sdp",
            route=False,
        )
        call.invite = invite
        resp = await self._send_request(
            invite, target, timeout=timeout, on_provisional=lambda r: self._on_18x(call, r)
        )
        if resp is None:
            call.status = 408
            await self._end_unanswered(call)
            return call
        call.status = resp.status
        if resp.status >= 300:
            call._ack = (self._ack_non2xx(call, invite, resp).encode(), target)
            self._send(*call._ack)
            await self._end_unanswered(call)
            return call
        self._on_invite_2xx(call, resp)
        return call

    async def _end_unanswered(self, call: Call) -> None:
        call.state = "terminated"
        call._set_outcome("clear", f"call not answered ({call.status})")
        await call.media.stop()

    def _on_18x(self, call: Call, resp: SipMessage) -> None:
        call.provisional.append(resp.status)
        if resp.status > 100 and call.state == "calling":
            call.state = "early"

    def _on_invite_2xx(self, call: Call, resp: SipMessage) -> None:
        call.answer = resp
        call.remote_hdr = resp.get("to") or call.remote_hdr
        contact = resp.get("contact")
        if contact:
            call.remote_target = uri_of(split_list(contact)[0])
        record_route = [r for v in resp.get_all("record-route") for r in split_list(v)]
        call.route_set = record_route[::-1]
        call.peer_supported = "x-sipura" in resp.tokens("supported")
        sdp = parse_sdp(resp.body)
        if sdp is not None:
            call.media.remote = (sdp[0], sdp[1])
        assert call.invite is not None
        cseq = call.invite.cseq[0]
        ack = self._build_request(call, "ACK", call.remote_target, _new_branch(), cseq)
        call._ack = (ack.encode(), self._dialog_dest(call))
        self._send(*call._ack)
        call.state = "confirmed"
        call.media.start()
        if not call.secure:
            call._set_outcome("clear", "secure call not requested")
        elif self.identity is None:
            call._set_outcome("clear", "no x-sipura identity configured")
        elif not (call.peer_supported or self.probe):
            call._set_outcome("clear", "peer did not advertise Supported: x-sipura")
        else:
            call._spawn(call._stage2_after_media())

    async def _cancel(self, call: Call) -> int | None:
        assert call.invite is not None
        invite = call.invite
        cancel = SipMessage(
            f"CANCEL {invite.uri} SIP/2.0",
            [
                ("Via", invite.top_via),
                ("Max-Forwards", "70"),
                ("From", invite.get("from") or ""),
                ("To", invite.get("to") or ""),
                ("Call-ID", invite.call_id),
                ("CSeq", f"{invite.cseq[0]} CANCEL"),
            ],
        )
        assert call.peer_addr is not None
        resp = await self._send_request(cancel, call.peer_addr)
        return resp.status if resp else None

    # --- callee API ---------------------------------------------------------------------

    async def wait_call(self, timeout: float = 5.0) -> Call:
        """The next incoming call (as soon as its INVITE arrives)."""
        return await asyncio.wait_for(self._incoming.get(), timeout)

    # --- message building ---------------------------------------------------------------

    def _build_request(
        self,
        call: Call,
        method: str,
        uri: str,
        branch: str,
        cseq: int,
        body: bytes = b"",
        content_type: str | None = None,
        route: bool = True,
    ) -> SipMessage:
        headers = [
            ("Via", f"SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", call.local_hdr),
            ("To", call.remote_hdr),
            ("Call-ID", call.call_id),
            ("CSeq", f"{cseq} {method}"),
        ]
        if route:
            headers += [("Route", r) for r in call.route_set]
        if method in ("INVITE",):
            headers.append(("Contact", f"<{self.uri}>"))
            headers.append(("Allow", "INVITE, ACK, BYE, CANCEL, INFO, OPTIONS"))
        if self.supported and method != "ACK":
            headers.append(("Supported", "x-sipura"))
        headers.append(("User-Agent", f"xsipura-test-ua/{self.name}"))
        if body:
            headers.append(("Content-Type", content_type or "application/octet-stream"))
        return SipMessage(f"{method} {uri} SIP/2.0", headers, body)

    def _in_dialog_request(
        self, call: Call, method: str, body: bytes = b"", content_type: str | None = None
    ) -> SipMessage:
        call.local_cseq += 1
        return self._build_request(
            call, method, call.remote_target, _new_branch(), call.local_cseq, body, content_type
        )

    def _ack_non2xx(self, call: Call, invite: SipMessage, resp: SipMessage) -> SipMessage:
        return SipMessage(
            f"ACK {invite.uri} SIP/2.0",
            [
                ("Via", invite.top_via),
                ("Max-Forwards", "70"),
                ("From", invite.get("from") or ""),
                ("To", resp.get("to") or ""),
                ("Call-ID", invite.call_id),
                ("CSeq", f"{invite.cseq[0]} ACK"),
            ],
        )

    def _dialog_dest(self, call: Call) -> tuple[str, int]:
        if self.outbound_proxy:
            return self.outbound_proxy
        if call.route_set:
            return uri_hostport(uri_of(call.route_set[0]))
        if call.remote_target:
            return uri_hostport(call.remote_target)
        assert call.peer_addr is not None
        return call.peer_addr

    def _response(
        self,
        req: SipMessage,
        code: int,
        *,
        call: Call | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> SipMessage:
        headers = [("Via", v) for v in req.get_all("via")]
        to = req.get("to") or ""
        if call is not None and code > 100 and "tag" not in header_params(to):
            to = f"{to};tag={call.local_tag}"
        headers += [
            ("From", req.get("from") or ""),
            ("To", to),
            ("Call-ID", req.call_id),
            ("CSeq", req.get("cseq") or ""),
        ]
        if req.method == "INVITE" and 100 < code < 300:
            headers.append(("Contact", f"<{self.uri}>"))
            headers += [("Record-Route", v) for v in req.get_all("record-route")]
        if self.supported and code > 100:
            headers.append(("Supported", "x-sipura"))
        headers.append(("User-Agent", f"xsipura-test-ua/{self.name}"))
        if body:
            headers.append(("Content-Type", content_type or XSIPURA_CONTENT_TYPE))
        return SipMessage(f"SIP/2.0 {code} {REASONS.get(code, 'Unknown')}", headers, body)

    def _reply_addr(self, req: SipMessage, source: tuple[str, int]) -> tuple[str, int]:
        """RFC 3261 18.2.2 / RFC 3581: received+rport, else the Via sent-by."""
        via = req.top_via
        params = header_params(via)
        if "rport" in params:
            return source
        sent_by = via.split(";", 1)[0].split()[-1] if via else ""
        host, _, port = sent_by.partition(":")
        return params.get("received") or host or source[0], int(port) if port else 5060

    def _respond(
        self,
        req: SipMessage,
        source: tuple[str, int],
        code: int,
        *,
        call: Call | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> bytes:
        data = self._response(req, code, call=call, body=body, content_type=content_type).encode()
        if code >= 200 or req.method == "INVITE":
            self._server_tx[(req.branch, req.method)] = data
        self._send(data, self._reply_addr(req, source))
        return data

    # --- transport ----------------------------------------------------------------------

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self._transport is not None, "call start() first"
        with contextlib.suppress(Exception):
            self.sip_log.append(("tx", addr, SipMessage.parse(data)))
        log.debug("%s -> %s %s", self.name, addr, data.split(b"\r\n", 1)[0])
        self._transport.sendto(data, addr)

    async def _send_request(
        self,
        msg: SipMessage,
        dest: tuple[str, int],
        *,
        timeout: float | None = None,
        on_provisional: Callable[[SipMessage], None] | None = None,
    ) -> SipMessage | None:
        """A client transaction with UDP retransmissions; the final response or None."""
        loop = asyncio.get_running_loop()
        key = (msg.branch, msg.method)
        tx = _ClientTx(loop.create_future(), on_provisional)
        self._client_tx[key] = tx
        data = msg.encode()
        invite = msg.method == "INVITE"
        deadline = loop.time() + (timeout if timeout is not None else 64 * self.t1)
        interval = self.t1
        try:
            self._send(data, dest)
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    return await asyncio.wait_for(
                        asyncio.shield(tx.future), min(interval, remaining)
                    )
                except TimeoutError:
                    pass
                if not (invite and tx.provisional):
                    self._send(data, dest)
                interval = interval * 2 if invite else min(interval * 2, self.t2)
        finally:
            self._client_tx.pop(key, None)

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip():
            return  # keep-alive
        try:
            msg = SipMessage.parse(data)
        except (ValueError, IndexError):
            self.sip_parse_errors += 1
            return
        self.sip_log.append(("rx", addr, msg))
        log.debug("%s <- %s %s", self.name, addr, msg.first_line)
        try:
            if msg.is_request:
                self._on_request(msg, addr)
            else:
                self._on_response(msg)
        except Exception:
            log.exception("%s: error handling %s", self.name, msg.first_line)

    def _on_response(self, msg: SipMessage) -> None:
        tx = self._client_tx.get((msg.branch, msg.cseq[1]))
        if tx is not None:
            if msg.status < 200:
                tx.provisional = True
                if tx.on_provisional:
                    tx.on_provisional(msg)
            elif not tx.future.done():
                tx.future.set_result(msg)
            return
        if msg.cseq[1] == "INVITE" and msg.status >= 200:
            call = self.calls.get(msg.call_id)
            if call is not None and call._ack is not None:
                self._send(*call._ack)  # retransmitted final response: ACK again

    # --- requests -----------------------------------------------------------------------

    def _on_request(self, req: SipMessage, addr: tuple[str, int]) -> None:
        method = req.method
        if method == "ACK":
            call = self.calls.get(req.call_id)
            if call is not None:
                call._acked.set()
            return
        key = (req.branch, method)
        if req.branch and key in self._server_tx:  # a retransmission: repeat the response
            last = self._server_tx[key]
            if last is not None:
                self._send(last, self._reply_addr(req, addr))
            return
        self._server_tx[key] = None
        call = self.calls.get(req.call_id)
        if method == "INVITE" and call is None:
            self._on_new_invite(req, addr)
        elif method == "OPTIONS":
            self._respond(req, addr, 200, call=call)
        elif call is None:
            self._respond(req, addr, 481)
        elif method == "CANCEL":
            self._on_cancel(call, req, addr)
        elif method == "INVITE":
            self._on_reinvite(call, req, addr)
        elif method == "BYE":
            self._respond(req, addr, 200, call=call)
            call._spawn(call._terminate())
        elif method == "INFO":
            self._on_info(call, req, addr)
        else:
            self._respond(req, addr, 501, call=call)

    def _on_new_invite(self, req: SipMessage, addr: tuple[str, int]) -> None:
        call = Call(self, "callee", req.call_id)
        self.calls[call.call_id] = call
        call.invite = req
        call.peer_addr = addr
        call.local_hdr = f"{req.get('to') or ''};tag={call.local_tag}"
        call.remote_hdr = req.get("from") or ""
        contact = req.get("contact")
        call.remote_target = uri_of(split_list(contact)[0]) if contact else ""
        call.route_set = [r for v in req.get_all("record-route") for r in split_list(v)]
        call.peer_supported = "x-sipura" in req.tokens("supported")
        self._respond(req, addr, 100)
        call.provisional.append(100)
        self._incoming.put_nowait(call)
        call._spawn(self._answer(call, req, addr))

    async def _answer(self, call: Call, req: SipMessage, addr: tuple[str, int]) -> None:
        await call.media.open()
        offer = parse_sdp(req.body)
        await asyncio.sleep(self.ring_delay)
        self._respond(req, addr, 180, call=call)
        call.provisional.append(180)
        call.state = "early"
        await asyncio.sleep(self.answer_delay)
        code = self.answer_code
        if code == 200 and (offer is None or 0 not in offer[2]):
            code = 488
        if code >= 300:
            self._reject_incoming(call, code)
            return
        assert offer is not None
        call.media.remote = (offer[0], offer[1])
        body = make_sdp(self.host, call.media.port, call._session_id)
        data = self._respond(req, addr, 200, call=call, body=body, content_type="application/sdp")
        call.status = 200
        call.state = "confirmed"
        call.media.start()
        # Retransmit the 200 until the ACK arrives (RFC 3261 13.3.1.4).
        interval, waited = self.t1, 0.0
        while not call._acked.is_set() and waited < 64 * self.t1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call._acked.wait(), interval)
            if not call._acked.is_set():
                self._send(data, self._reply_addr(req, addr))
                waited += interval
                interval = min(interval * 2, self.t2)

    def _reject_incoming(self, call: Call, code: int) -> None:
        assert call.invite is not None and call.peer_addr is not None
        current = asyncio.current_task()
        for task in list(call._tasks):
            if task is not current:
                task.cancel()
        self._respond(call.invite, call.peer_addr, code, call=call)
        call.status = code
        call.state = "terminated"
        call._set_outcome("clear", f"call rejected ({code})")

    def _on_cancel(self, call: Call, req: SipMessage, addr: tuple[str, int]) -> None:
        self._respond(req, addr, 200, call=call)
        if call.role == "callee" and call.state in ("calling", "early"):
            self._reject_incoming(call, 487)

    def _on_reinvite(self, call: Call, req: SipMessage, addr: tuple[str, int]) -> None:
        offer = parse_sdp(req.body)
        if offer is not None:
            call.media.remote = (offer[0], offer[1])
        call._session_id += 1
        body = make_sdp(self.host, call.media.port, call._session_id)
        self._respond(req, addr, 200, call=call, body=body, content_type="application/sdp")

    def _on_info(self, call: Call, req: SipMessage, addr: tuple[str, int]) -> None:
        """Profile 2a: empty -> 200; known other package -> 200 (recorded); else x-sipura."""
        if not req.body.strip():
            self._respond(req, addr, 200, call=call)
            return
        if req.content_type in OTHER_INFO_TYPES:
            call.other_infos.append(req)
            self._respond(req, addr, 200, call=call)
            return
        behaviour = self.info_response
        if isinstance(behaviour, Mapping):
            try:
                msg_id = struct.unpack(">I", decode_body(req.body)[:4])[0]
            except (ValueError, struct.error):
                msg_id = 0
            behaviour = behaviour.get(msg_id)
        if behaviour == NO_RESPONSE:
            call.info_codes.append(None)
            call._clear("info_response override: no response")
            return
        if isinstance(behaviour, int):
            call.info_codes.append(behaviour)
            call._clear(f"info_response override: {behaviour}")
            self._respond(req, addr, behaviour, call=call)
            return
        if self.identity is None:
            call.info_codes.append(415)
            self._respond(req, addr, 415, call=call)
            return
        code, body, action = call._xsipura_request(req.body)
        if action is not None:
            action()  # the callee encrypts from the moment it sends Callee Final
        if behaviour == LOST_RESPONSE:
            call.info_codes.append(None)
            return
        call.info_codes.append(code)
        self._respond(req, addr, code, call=call, body=body)
