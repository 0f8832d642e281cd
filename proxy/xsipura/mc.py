"""The 252-byte Mini-Certificate (MC) and the provisioning params that carry it.

Layout (profile §1)::

    0   32  user (display) name, ASCII, NUL-padded
    32  16  user id (phone number), ASCII, NUL-padded
    48  12  expiry, ASCII digits HHMMSSMMDDYY, year = 2000 + YY
    60  64  subscriber public modulus n, big-endian
    124 128 CA signature: RSA-1024 over PKCS#1 type 1 around SHA-1(bytes 0..123)

Decoding is strict (exact length, printable ASCII, NUL padding only at the end, a real
calendar date) and every failure is one exception type, :class:`MalformedCertificate`,
so callers can map it to "malformed" / "bad_message" without catching half the stdlib.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.xsipura.rsa import (
    PrivateKey,
    PublicKey,
    RsaError,
    bytes_to_int,
    int_to_bytes,
    sign_raw,
)

MC_LENGTH = 252
SIGNED_LENGTH = 124
NAME_LENGTH = 32
USER_ID_LENGTH = 16
EXPIRY_LENGTH = 12
SUBSCRIBER_MODULUS_LENGTH = 64
CA_MODULUS_LENGTH = 128
PARAM_LENGTH = MC_LENGTH + CA_MODULUS_LENGTH  # the `Mini Certificate` provisioning param
MAX_PRIVATE_EXPONENT_LENGTH = 64


class MalformedCertificate(ValueError):
    """Input that is not a structurally valid MC, MC param or SRTP private key param."""


def _is_printable_ascii(text: str) -> bool:
    """Only 0x20..0x7E (for ASCII text, ``isprintable`` is exactly that range)."""
    return text.isascii() and text.isprintable()


def _encode_text(text: str, width: int, what: str) -> bytes:
    if not text or len(text) > width or not _is_printable_ascii(text):
        raise MalformedCertificate(f"{what} must be 1..{width} printable ASCII characters")
    return text.encode("ascii").ljust(width, b"\x00")


def _decode_text(field: bytes, what: str) -> str:
    text, _, padding = field.partition(b"\x00")
    if padding.strip(b"\x00"):
        raise MalformedCertificate(f"{what}: bytes after the NUL padding")
    if not text:
        raise MalformedCertificate(f"{what} is empty")
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedCertificate(f"{what} is not ASCII") from exc
    if not _is_printable_ascii(decoded):
        raise MalformedCertificate(f"{what} has control characters")
    return decoded


def format_expiry(when: datetime) -> bytes:
    """UTC datetime -> the 12 ASCII digits HHMMSSMMDDYY (years 2000..2099 only)."""
    when = as_utc(when)
    if not 2000 <= when.year <= 2099:
        raise MalformedCertificate("expiry year must be within 2000..2099")
    return when.strftime("%H%M%S%m%d").encode("ascii") + b"%02d" % (when.year - 2000)


def parse_expiry(field: bytes) -> datetime:
    """The 12 ASCII digits -> an aware UTC datetime; raises on anything not a real instant."""
    if len(field) != EXPIRY_LENGTH or not field.isdigit():
        raise MalformedCertificate("expiry is not 12 ASCII digits")
    hh, mi, ss, mo, dd, yy = (int(field[i : i + 2]) for i in range(0, 12, 2))
    try:
        return datetime(2000 + yy, mo, dd, hh, mi, ss, tzinfo=UTC)
    except ValueError as exc:
        raise MalformedCertificate(f"expiry is not a valid date/time: {exc}") from exc


def as_utc(when: datetime) -> datetime:
    """Naive datetimes are taken as UTC (the profile compares expiry in UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def iso_z(when: datetime) -> str:
    """ISO 8601 in UTC with a trailing Z, second precision (the CLI's output form)."""
    return as_utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class MiniCertificate:
    """A decoded MC. ``raw`` is kept so re-encoding is byte-exact even for odd padding."""

    name: str
    user_id: str
    expires: datetime
    subscriber_key: PublicKey
    signature: bytes
    raw: bytes

    @classmethod
    def decode(cls, data: bytes) -> MiniCertificate:
        if len(data) != MC_LENGTH:
            raise MalformedCertificate(f"MC must be {MC_LENGTH} bytes, got {len(data)}")
        name = _decode_text(data[0:32], "name")
        user_id = _decode_text(data[32:48], "user id")
        expires = parse_expiry(data[48:60])
        modulus = bytes_to_int(data[60:124])
        if modulus.bit_length() < 8 * SUBSCRIBER_MODULUS_LENGTH - 7 or modulus % 2 == 0:
            raise MalformedCertificate("subscriber modulus is not a 512-bit RSA modulus")
        return cls(
            name=name,
            user_id=user_id,
            expires=expires,
            subscriber_key=PublicKey(modulus),
            signature=bytes(data[124:252]),
            raw=bytes(data),
        )

    @classmethod
    def issue(
        cls,
        ca_key: PrivateKey,
        name: str,
        user_id: str,
        expires: datetime,
        subscriber_key: PublicKey,
    ) -> MiniCertificate:
        """Build and sign an MC, as ``gen_mc`` does."""
        if ca_key.size != CA_MODULUS_LENGTH:
            raise MalformedCertificate("the CA key must be RSA-1024")
        if subscriber_key.size != SUBSCRIBER_MODULUS_LENGTH:
            raise MalformedCertificate("the subscriber key must be RSA-512")
        body = (
            _encode_text(name, NAME_LENGTH, "name")
            + _encode_text(user_id, USER_ID_LENGTH, "user id")
            + format_expiry(expires)
            + int_to_bytes(subscriber_key.n, SUBSCRIBER_MODULUS_LENGTH)
        )
        signature = sign_raw(ca_key, hashlib.sha1(body).digest())  # noqa: S324 - the profile's hash
        return cls.decode(body + signature)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_LENGTH]

    @property
    def digest(self) -> bytes:
        """SHA-1 of bytes 0..123: what the CA signature covers."""
        return hashlib.sha1(self.signed_bytes).digest()  # noqa: S324 - the profile's hash

    def encode(self) -> bytes:
        return self.raw

    def is_expired(self, now: datetime) -> bool:
        """Expired means now > expiry; the expiry instant itself is still valid (§2a)."""
        return as_utc(now) > self.expires

    @property
    def key_sha256(self) -> str:
        """Fingerprint of the 64-byte subscriber modulus, as `mc show` prints it."""
        return hashlib.sha256(self.raw[60:124]).hexdigest()


@dataclass(frozen=True, slots=True)
class MiniCertificateParam:
    """The ``Mini Certificate`` provisioning param: MC ‖ CA modulus, base64 on one line.

    The appended CA modulus is the device's trust anchor for its peers' MCs.
    """

    certificate: MiniCertificate
    ca_key: PublicKey

    @classmethod
    def decode(cls, data: bytes) -> MiniCertificateParam:
        if len(data) != PARAM_LENGTH:
            raise MalformedCertificate(
                f"Mini Certificate param must be {PARAM_LENGTH} bytes, got {len(data)}"
            )
        ca_n = bytes_to_int(data[MC_LENGTH:])
        if ca_n.bit_length() < 8 * CA_MODULUS_LENGTH - 7 or ca_n % 2 == 0:
            raise MalformedCertificate("appended CA modulus is not a 1024-bit RSA modulus")
        return cls(MiniCertificate.decode(data[:MC_LENGTH]), PublicKey(ca_n))

    @classmethod
    def from_base64(cls, text: str | bytes) -> MiniCertificateParam:
        return cls.decode(strict_b64decode(text))

    def encode(self) -> bytes:
        return self.certificate.encode() + int_to_bytes(self.ca_key.n, CA_MODULUS_LENGTH)

    def to_base64(self) -> str:
        return base64.b64encode(self.encode()).decode("ascii")

    @property
    def ca_sha256(self) -> str:
        return hashlib.sha256(int_to_bytes(self.ca_key.n, CA_MODULUS_LENGTH)).hexdigest()


def encode_private_key_param(key: PrivateKey) -> str:
    """``SRTP Private Key`` param: base64 of d, big-endian, leading zero bytes stripped."""
    d = key.d.to_bytes((key.d.bit_length() + 7) // 8, "big")
    return base64.b64encode(d).decode("ascii")


def decode_private_key_param(text: str | bytes, certificate: MiniCertificate) -> PrivateKey:
    """Rebuild the subscriber key from the param and the modulus in its MC.

    Readers accept 1..64 bytes (leading zeros stripped by the writer). A d that does not
    belong to the MC's modulus is rejected here rather than failing later, mid-handshake.
    """
    raw = strict_b64decode(text)
    if not 1 <= len(raw) <= MAX_PRIVATE_EXPONENT_LENGTH:
        raise MalformedCertificate(
            f"SRTP Private Key must be 1..{MAX_PRIVATE_EXPONENT_LENGTH} bytes, got {len(raw)}"
        )
    try:
        return PrivateKey.from_n_d(certificate.subscriber_key.n, bytes_to_int(raw))
    except RsaError as exc:
        raise MalformedCertificate(
            "SRTP Private Key does not match the Mini Certificate's public key"
        ) from exc


def strict_b64decode(text: str | bytes) -> bytes:
    """Standard-alphabet base64 with padding; surrounding whitespace/CRLF tolerated (§2)."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError as exc:
            raise MalformedCertificate("base64 text is not ASCII") from exc
    compact = b"".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedCertificate(f"not valid base64: {exc}") from exc
