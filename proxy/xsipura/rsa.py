"""Raw RSA operations the x-sipura profile needs and `cryptography` does not offer.

Why this module exists:

* The MC signature is OpenSSL's ``RSA_private_encrypt(..., RSA_PKCS1_PADDING)``: a
  PKCS#1 v1.5 *type 1* block around the raw 20-byte SHA-1, with no DigestInfo.
  `cryptography` can only sign with a DigestInfo, so signing is done here with the raw
  private operation (CRT).  Verification is a public-exponent operation and a strict
  comparison of the whole block, which is cheap in Python (e = 65537).
* ``E(x)`` in the Caller Final is PKCS#1 v1.5 *type 2* under a 512-bit key.
  OpenSSL >= 3.2 uses implicit rejection when decrypting type 2 and would hand back random
  bytes instead of failing on a bad block, so the callee decrypts with the raw operation
  and checks the padding itself (a bad block must be a decode failure, never a garbage
  key).
* `cryptography` refuses to generate keys under 1024 bits, and subscriber keys are 512
  bits, so :func:`generate_subscriber_key` builds them from two probable primes.

Everything here works on Python ints; no I/O, no clock.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa as crsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15

PUBLIC_EXPONENT = 65537
"""The profile never transmits e: it is always 65537."""

RandomBytes = Callable[[int], bytes]


class RsaError(ValueError):
    """An RSA input that cannot be used: wrong size, bad padding, inconsistent key."""


def int_to_bytes(value: int, length: int) -> bytes:
    """Big-endian, left-padded to ``length`` bytes (raises if it does not fit)."""
    try:
        return value.to_bytes(length, "big")
    except OverflowError as exc:
        raise RsaError(f"integer does not fit in {length} bytes") from exc


def bytes_to_int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def byte_length(n: int) -> int:
    return (n.bit_length() + 7) // 8


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An RSA public key with e = 65537 (the profile never carries another e)."""

    n: int

    @property
    def size(self) -> int:
        """Modulus length in bytes (64 for subscribers, 128 for CAs)."""
        return byte_length(self.n)

    def modulus_bytes(self) -> bytes:
        return int_to_bytes(self.n, self.size)

    def to_cryptography(self) -> crsa.RSAPublicKey:
        return crsa.RSAPublicNumbers(PUBLIC_EXPONENT, self.n).public_key()

    def public_op(self, block: bytes) -> bytes:
        """``block ** e mod n``, same length as the modulus."""
        m = bytes_to_int(block)
        if len(block) != self.size or m >= self.n:
            raise RsaError("input block does not match the modulus")
        return int_to_bytes(pow(m, PUBLIC_EXPONENT, self.n), self.size)


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """An RSA private key kept as (n, d) plus the CRT values rebuilt from them.

    The x-sipura formats store only n and d (the Linksys ``ca-key`` file and the
    ``SRTP Private Key`` param), so the primes are recovered once, at load time, with
    `cryptography`'s ``rsa_recover_prime_factors``; the CRT makes the private operation
    about three times faster, which matters for handshakes per second.
    """

    n: int
    d: int
    p: int = field(repr=False)
    q: int = field(repr=False)
    dp: int = field(repr=False)
    dq: int = field(repr=False)
    qinv: int = field(repr=False)

    def __repr__(self) -> str:
        # Never let a private exponent reach a log line through repr().
        return f"PrivateKey(bits={self.n.bit_length()}, n=0x{self.n:x}…)"

    __str__ = __repr__

    @classmethod
    def from_n_d(cls, n: int, d: int) -> PrivateKey:
        """Rebuild the full key from the modulus and private exponent; checks consistency."""
        if n < 3 or n % 2 == 0 or not 1 < d < n:
            raise RsaError("not an RSA private key (n, d out of range)")
        try:
            p, q = crsa.rsa_recover_prime_factors(n, PUBLIC_EXPONENT, d)
        except (ValueError, ArithmeticError) as exc:
            raise RsaError("private exponent does not belong to this modulus") from exc
        if p * q != n or (PUBLIC_EXPONENT * d) % math.lcm(p - 1, q - 1) != 1:
            raise RsaError("private exponent does not belong to this modulus")
        return cls(
            n=n,
            d=d,
            p=p,
            q=q,
            dp=d % (p - 1),
            dq=d % (q - 1),
            qinv=pow(q, -1, p),
        )

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.n)

    @property
    def size(self) -> int:
        return byte_length(self.n)

    def private_op(self, block: bytes) -> bytes:
        """``block ** d mod n`` by CRT, same length as the modulus."""
        c = bytes_to_int(block)
        if len(block) != self.size or c >= self.n:
            raise RsaError("input block does not match the modulus")
        m1 = pow(c, self.dp, self.p)
        m2 = pow(c, self.dq, self.q)
        h = (self.qinv * (m1 - m2)) % self.p
        return int_to_bytes(m2 + h * self.q, self.size)

    def to_cryptography(self) -> crsa.RSAPrivateKey:
        numbers = crsa.RSAPrivateNumbers(
            p=self.p,
            q=self.q,
            d=self.d,
            dmp1=self.dp,
            dmq1=self.dq,
            iqmp=self.qinv,
            public_numbers=crsa.RSAPublicNumbers(PUBLIC_EXPONENT, self.n),
        )
        return numbers.private_key(unsafe_skip_rsa_key_validation=True)


# --- PKCS#1 v1.5 type 1 (signature over a raw digest, no DigestInfo) -------------------


def pad_type1(payload: bytes, size: int) -> bytes:
    """00 01 FF..FF 00 payload, at least 8 bytes of FF (RFC 8017 §9.2 step 5)."""
    if len(payload) > size - 11:
        raise RsaError("payload too long for the modulus")
    return b"\x00\x01" + b"\xff" * (size - 3 - len(payload)) + b"\x00" + payload


def sign_raw(key: PrivateKey, payload: bytes) -> bytes:
    """``RSA_private_encrypt(payload, RSA_PKCS1_PADDING)``."""
    return key.private_op(pad_type1(payload, key.size))


def verify_raw(key: PublicKey, payload: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is the type-1 signature of exactly ``payload``.

    The whole recovered block is compared with the expected one (not parsed), so there
    is no room for Bleichenbacher-style lax-parsing forgeries with e = 65537.
    """
    if len(signature) != key.size or bytes_to_int(signature) >= key.n:
        return False
    try:
        expected = pad_type1(payload, key.size)
    except RsaError:
        return False
    return hmac.compare_digest(key.public_op(signature), expected)


class Type1Verifier:
    """Fast :func:`verify_raw` for a key that verifies many signatures (a trusted CA).

    OpenSSL's ``RSA_public_decrypt`` (via `cryptography`'s ``recover_data_from_signature``
    with no hash algorithm) checks the type-1 block strictly and returns the payload;
    comparing it whole with the digest is the same check as :func:`verify_raw`, at about
    6 µs instead of 38 µs for a 1024-bit key (bench/crypto.py).
    """

    __slots__ = ("_key", "_size")

    def __init__(self, key: PublicKey) -> None:
        self._key = key.to_cryptography()
        self._size = key.size

    def verify(self, payload: bytes, signature: bytes) -> bool:
        if len(signature) != self._size:
            return False
        try:
            recovered = self._key.recover_data_from_signature(signature, PKCS1v15(), None)
        except InvalidSignature:
            return False
        return hmac.compare_digest(recovered, payload)


# --- PKCS#1 v1.5 type 2 (encryption) ---------------------------------------------------


def encrypt_type2(
    key: PublicKey, message: bytes, random_bytes: RandomBytes = secrets.token_bytes
) -> bytes:
    """RSAES-PKCS1-v1_5 encryption (RFC 8017 §7.2.1) with non-zero random padding.

    With the default random source, OpenSSL does it (same block, its own CSPRNG for the
    padding): 9 µs against 21 µs for ``pow`` in Python, twice per secured call. A
    caller-supplied ``random_bytes`` (reproducible vectors, tests) gets the Python
    construction below, which uses exactly the bytes it is given."""
    size = key.size
    if len(message) > size - 11:
        raise RsaError("message too long for the modulus")
    if random_bytes is secrets.token_bytes:
        with contextlib.suppress(ValueError):  # a modulus OpenSSL will not take: below
            return key.to_cryptography().encrypt(message, PKCS1v15())
    ps_len = size - 3 - len(message)
    ps = bytearray()
    while len(ps) < ps_len:
        # the non-zero bytes of the draw, in order (one C call, not a generator)
        ps += random_bytes(ps_len - len(ps)).replace(b"\x00", b"")
    block = b"\x00\x02" + bytes(ps) + b"\x00" + message
    return key.public_op(block)


def decrypt_type2(key: PrivateKey, ciphertext: bytes, expected_length: int) -> bytes:
    """Raw decryption with an explicit padding check; raises RsaError on a bad block.

    Checks: 00 02, at least 8 non-zero padding bytes, a 00 separator, and a message of
    exactly ``expected_length`` bytes (the profile's key and salt are 16 bytes each).
    """
    if len(ciphertext) != key.size or bytes_to_int(ciphertext) >= key.n:
        raise RsaError("ciphertext does not match the modulus")
    block = key.private_op(ciphertext)
    if block[0] != 0 or block[1] != 2:
        raise RsaError("not a PKCS#1 type-2 block")
    separator = block.find(b"\x00", 2)
    if separator < 10:
        raise RsaError("PKCS#1 type-2 padding too short or missing separator")
    message = block[separator + 1 :]
    if len(message) != expected_length:
        raise RsaError(f"decrypted length {len(message)}, expected {expected_length}")
    return message


# --- subscriber key generation ---------------------------------------------------------

_SMALL_PRIMES = tuple(p for p in range(3, 2000) if all(p % d for d in range(2, math.isqrt(p) + 1)))


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with random bases from `secrets` (error < 4**-40)."""
    if n < 2:
        return False
    for p in _SMALL_PRIMES:
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


def _random_prime(bits: int) -> int:
    while True:
        # Top two bits set so that the product of two such primes has exactly 2*bits bits.
        candidate = secrets.randbits(bits) | (0b11 << (bits - 2)) | 1
        if candidate % PUBLIC_EXPONENT == 1:
            continue  # gcd(e, p-1) would be e
        if _is_probable_prime(candidate):
            return candidate


def generate_key(bits: int) -> PrivateKey:
    """A fresh RSA key of exactly ``bits`` bits with e = 65537, from `secrets`.

    Used for the 512-bit subscriber keys that `cryptography` refuses to generate.
    """
    if bits % 2 or bits < 256:
        raise RsaError("key size must be an even number of bits >= 256")
    half = bits // 2
    while True:
        p = _random_prime(half)
        q = _random_prime(half)
        if p == q:
            continue
        n = p * q
        if n.bit_length() != bits:
            continue
        lam = math.lcm(p - 1, q - 1)
        if math.gcd(PUBLIC_EXPONENT, lam) != 1:
            continue
        d = pow(PUBLIC_EXPONENT, -1, lam)
        if p < q:
            p, q = q, p
        return PrivateKey(n=n, d=d, p=p, q=q, dp=d % (p - 1), dq=d % (q - 1), qinv=pow(q, -1, p))


def generate_subscriber_key() -> PrivateKey:
    """RSA-512, as every SPA subscriber key is."""
    return generate_key(512)
