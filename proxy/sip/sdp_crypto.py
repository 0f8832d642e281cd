"""SDES (RFC 4568): the ``a=crypto`` attribute, and the SDP edits SDES needs.

``a=crypto:<tag> <crypto-suite> inline:<base64 key||salt>[|lifetime][|MKI:length]
[session-params]``. Only what the proxy can use is modelled: the two AES-CM suites
(``AES_CM_128_HMAC_SHA1_80`` and ``_32``: a 16-byte master key and a 14-byte master
salt, RFC 4568 §6.2), one key per attribute, no MKI (a key without MKI is what every
peer sends by default; an attribute with one, a lifetime below 2^31 packets or session
parameters the proxy does not implement is *not usable*, and the answerer picks
another, as §6.1 says). Parsing never raises for an attribute it cannot use: it is
skipped, so an offer of suites the proxy lacks simply has no usable line.

:func:`rewrite_crypto` edits a body's media sections: it drops their ``a=crypto`` lines,
sets the transport protocol (``RTP/AVP`` <-> ``RTP/SAVP``) and adds the given ones,
leaving every other line byte for byte; it raises :class:`~proxy.sip.sdp.SdpError` for
a malformed body, as parsing does. Keys are in these lines: they are never logged
(:func:`redact` makes a body loggable).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from proxy.sip.sdp import CRLF, Media, Sdp, parse_sdp

__all__ = [
    "KEY_LENGTH",
    "SALT_LENGTH",
    "SUITES",
    "Crypto",
    "CryptoEdit",
    "crypto_of",
    "format_crypto",
    "is_savp",
    "parse_crypto",
    "plain_protocol",
    "redact",
    "rewrite_crypto",
    "secure_protocol",
    "strip_all",
]

SUITES: Final = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
"""The suites the proxy offers and accepts, in its order of preference."""
KEY_LENGTH: Final = 16
SALT_LENGTH: Final = 14
_LIFETIME_FLOOR: Final = 2**31
"""A key lifetime shorter than this would need re-keying mid-call: not usable here."""
_CRYPTO = re.compile(r"a=crypto:", re.IGNORECASE)
_M_PROTO = re.compile(r"^(m=\S+\s+\S+\s+)(\S+)")


@dataclass(frozen=True, slots=True)
class Crypto:
    """One usable ``a=crypto`` attribute."""

    tag: int
    suite: str
    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)


def parse_crypto(value: str) -> Crypto | None:
    """The attribute's value (after ``a=crypto:``) if the proxy can use it, else None."""
    parts = value.split()
    if len(parts) < 3 or not parts[0].isascii() or not parts[0].isdigit() or len(parts[0]) > 9:
        return None
    suite = parts[1].upper()
    if suite not in SUITES or len(parts) > 3:  # session parameters: none are implemented
        return None
    key_params = parts[2]
    if ";" in key_params or not key_params.lower().startswith("inline:"):
        return None  # several keys (one per ';') or another method: not usable
    inline, *extras = key_params[len("inline:") :].split("|")
    for extra in extras:
        if extra.upper().startswith("MKI") or ":" in extra:
            return None
        if not _lifetime_ok(extra):
            return None
    try:
        material = base64.b64decode(inline, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(material) != KEY_LENGTH + SALT_LENGTH:
        return None
    return Crypto(int(parts[0]), suite, material[:KEY_LENGTH], material[KEY_LENGTH:])


def _lifetime_ok(text: str) -> bool:
    """``2^n`` or a decimal count of packets; shorter than 2^31 is not usable."""
    if text.startswith("2^"):
        exponent = text[2:]
        return exponent.isascii() and exponent.isdigit() and int(exponent) >= 31
    return text.isascii() and text.isdigit() and int(text) >= _LIFETIME_FLOOR


def format_crypto(crypto: Crypto) -> str:
    """The ``a=crypto:`` line for ``crypto`` (no lifetime, no MKI)."""
    inline = base64.b64encode(crypto.key + crypto.salt).decode("ascii")
    return f"a=crypto:{crypto.tag} {crypto.suite} inline:{inline}"


def crypto_of(media: Media) -> tuple[list[Crypto], bool]:
    """The usable ``a=crypto`` attributes of a media section, in order, and whether it
    had any ``a=crypto`` line at all (usable or not)."""
    found: list[Crypto] = []
    seen = False
    for line in media.lines[1:]:
        if _CRYPTO.match(line):
            seen = True
            crypto = parse_crypto(line[len("a=crypto:") :])
            if crypto is not None:
                found.append(crypto)
    return found, seen


def is_savp(media: Media) -> bool:
    """``RTP/SAVP`` (or ``RTP/SAVPF``): SRTP is mandatory on this stream."""
    return media.protocol.upper() in ("RTP/SAVP", "RTP/SAVPF")


@dataclass(frozen=True, slots=True)
class CryptoEdit:
    """What one media section becomes: its protocol and its ``a=crypto`` lines."""

    protocol: str
    crypto: tuple[Crypto, ...] = ()


def plain_protocol(protocol: str) -> str:
    """``RTP/SAVP`` -> ``RTP/AVP`` (``SAVPF`` -> ``AVPF``); others as they are."""
    upper = protocol.upper()
    if upper == "RTP/SAVP":
        return "RTP/AVP"
    if upper == "RTP/SAVPF":
        return "RTP/AVPF"
    return protocol


def secure_protocol(protocol: str) -> str:
    upper = protocol.upper()
    if upper == "RTP/AVP":
        return "RTP/SAVP"
    if upper == "RTP/AVPF":
        return "RTP/SAVPF"
    return protocol


def rewrite_crypto(body: bytes, edits: Sequence[CryptoEdit | None]) -> bytes:
    """``body`` with each media section's crypto lines and protocol replaced by its edit
    (None: the section as it is). Raises :class:`SdpError` for a malformed body and
    ``ValueError`` when ``edits`` does not match the sections."""
    sdp = parse_sdp(body)
    if len(edits) != len(sdp.media):
        raise ValueError(f"{len(edits)} edits for {len(sdp.media)} m= lines")
    out = list(sdp.session_lines)
    for media, edit in zip(sdp.media, edits, strict=True):
        if edit is None:
            out.extend(media.lines)
            continue
        head = _M_PROTO.match(media.lines[0])
        assert head is not None  # parse_sdp checked the m= line
        out.append(head[1] + edit.protocol + media.lines[0][head.end() :])
        kept = [line for line in media.lines[1:] if not _CRYPTO.match(line)]
        out.extend(kept)
        out.extend(format_crypto(crypto) for crypto in edit.crypto)
    return "".join(line + CRLF for line in out).encode("utf-8", "surrogateescape")


def strip_all(sdp: Sdp) -> list[CryptoEdit]:
    """Edits that remove every crypto line and make every SRTP stream plain RTP."""
    return [CryptoEdit(plain_protocol(media.protocol)) for media in sdp.media]


def redact(body: bytes) -> bytes:
    """The body with every ``inline:`` key replaced, safe to log."""
    return re.sub(rb"(?i)(inline:)[A-Za-z0-9+/=]+", rb"\1<redacted>", body)
