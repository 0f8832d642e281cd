"""Reading and writing the key material operators handle: CA keys and trust anchors.

Formats accepted, because operators arrive with whatever their SPA tooling produced:

* Linksys ``ca-key`` file: two base64 lines, CA modulus n then private exponent d.
* A one-line base64 CA modulus (the public half of a ``ca-key`` file).
* PEM: PKCS#1 or PKCS#8 private keys, SubjectPublicKeyInfo or PKCS#1 public keys.
* A ``Mini Certificate`` provisioning param (bare base64 line, the ``gen_mc`` output
  block, or an SPA XML config line): its appended CA modulus is a trust anchor, which
  is exactly how an SPA device uses it.

Errors are :class:`KeyFileError` with a reason that never quotes key material.
"""

from __future__ import annotations

import base64
import re
from enum import StrEnum

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa as crsa

from proxy.xsipura.mc import (
    CA_MODULUS_LENGTH,
    PARAM_LENGTH,
    MalformedCertificate,
    MiniCertificateParam,
    strict_b64decode,
)
from proxy.xsipura.rsa import PUBLIC_EXPONENT, PrivateKey, PublicKey, RsaError, int_to_bytes

CA_KEY_BITS = 1024


class KeyFileError(ValueError):
    """A key or trust-anchor file that cannot be used; the message says why."""


class CaKeyFormat(StrEnum):
    LINKSYS = "linksys"
    PEM = "pem"


def _b64(value: int, length: int) -> str:
    return base64.b64encode(int_to_bytes(value, length)).decode("ascii")


def dump_ca_key(key: PrivateKey, fmt: CaKeyFormat) -> bytes:
    """Serialise a CA private key (Linksys two-line form or PKCS#1 PEM, as gen_mc reads)."""
    if fmt is CaKeyFormat.LINKSYS:
        return (_b64(key.n, key.size) + "\n" + _b64(key.d, key.size) + "\n").encode("ascii")
    return key.to_cryptography().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def dump_ca_public(key: PublicKey, fmt: CaKeyFormat) -> bytes:
    """The public half, for distributing trust: one base64 line of n, or a PEM public key."""
    if fmt is CaKeyFormat.LINKSYS:
        return (_b64(key.n, key.size) + "\n").encode("ascii")
    public = crsa.RSAPublicNumbers(PUBLIC_EXPONENT, key.n).public_key()
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_ca_key() -> PrivateKey:
    """A new RSA-1024 CA key (`cryptography` still generates 1024-bit keys)."""
    generated = crsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=CA_KEY_BITS)
    numbers = generated.private_numbers()
    return PrivateKey.from_n_d(numbers.public_numbers.n, numbers.d)


def _is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


def _pem_key(data: bytes) -> PrivateKey | PublicKey:
    if b"PRIVATE KEY-----" in data:
        if b"ENCRYPTED" in data:
            raise KeyFileError("encrypted PEM keys are not supported; decrypt it first")
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError("not a readable PEM private key") from exc
        if not isinstance(loaded, crsa.RSAPrivateKey):
            raise KeyFileError("PEM key is not an RSA key")
        numbers = loaded.private_numbers()
        if numbers.public_numbers.e != PUBLIC_EXPONENT:
            raise KeyFileError("RSA public exponent must be 65537")
        return PrivateKey.from_n_d(numbers.public_numbers.n, numbers.d)
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, NotImplementedError, UnsupportedAlgorithm) as exc:
        raise KeyFileError("not a readable PEM public key") from exc
    if not isinstance(public, crsa.RSAPublicKey):
        raise KeyFileError("PEM key is not an RSA key")
    pub_numbers = public.public_numbers()
    if pub_numbers.e != PUBLIC_EXPONENT:
        raise KeyFileError("RSA public exponent must be 65537")
    return PublicKey(pub_numbers.n)


def _check_ca_size(n: int) -> None:
    if n.bit_length() != CA_KEY_BITS:
        raise KeyFileError(f"CA key must be RSA-{CA_KEY_BITS}, got {n.bit_length()} bits")


def _b64_lines(data: bytes) -> list[bytes]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFileError("not a text key file") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        return [strict_b64decode(line) for line in lines]
    except MalformedCertificate as exc:
        raise KeyFileError("not a Linksys ca-key file (lines are not base64)") from exc


def load_ca_private_key(data: bytes) -> PrivateKey:
    """A CA private key from a Linksys ``ca-key`` file or a PEM private key."""
    try:
        if _is_pem(data):
            key = _pem_key(data)
            if not isinstance(key, PrivateKey):
                raise KeyFileError("this is a public key; issuing needs the CA private key")
        else:
            lines = _b64_lines(data)
            if len(lines) != 2:
                raise KeyFileError(
                    "not a Linksys ca-key file (expected two base64 lines: n, then d)"
                )
            key = PrivateKey.from_n_d(
                int.from_bytes(lines[0], "big"), int.from_bytes(lines[1], "big")
            )
    except RsaError as exc:
        raise KeyFileError(f"inconsistent RSA key: {exc}") from exc
    _check_ca_size(key.n)
    return key


_TAGGED_PARAM = re.compile(r"<Mini[ _]Certificate[^>]*>\s*([A-Za-z0-9+/]+={0,2})")


def extract_param_text(text: str) -> str | None:
    """Find a ``Mini Certificate`` param in text: gen_mc output, SPA XML, or a bare line.

    Returns the base64 text, or None if there is no tagged param (the caller may then
    treat the whole text as base64).
    """
    match = _TAGGED_PARAM.search(text)
    if match:
        return match.group(1)
    return None


def load_trust_anchor(data: bytes) -> PublicKey:
    """A CA public modulus from any accepted form (see the module docstring)."""
    try:
        if _is_pem(data):
            key = _pem_key(data)
            anchor = key.public if isinstance(key, PrivateKey) else key
        else:
            text = data.decode("ascii", errors="replace")
            tagged = extract_param_text(text)
            if tagged is not None:
                anchor = MiniCertificateParam.from_base64(tagged).ca_key
            else:
                lines = _b64_lines(data)
                if not lines:
                    raise KeyFileError("file is empty")
                first = lines[0]
                if len(lines) == 1 and len(first) == PARAM_LENGTH:
                    anchor = MiniCertificateParam.decode(first).ca_key
                elif len(lines) in (1, 2) and len(first) == CA_MODULUS_LENGTH:
                    anchor = PublicKey(int.from_bytes(first, "big"))
                    if len(lines) == 2:  # a full ca-key file: check it is consistent
                        PrivateKey.from_n_d(anchor.n, int.from_bytes(lines[1], "big"))
                else:
                    raise KeyFileError(
                        "not a CA key: expected a Linksys ca-key file, a PEM key,"
                        " or a Mini Certificate param"
                    )
    except MalformedCertificate as exc:
        raise KeyFileError(f"Mini Certificate param: {exc}") from exc
    except RsaError as exc:
        raise KeyFileError(f"inconsistent RSA key: {exc}") from exc
    _check_ca_size(anchor.n)
    return anchor
