"""RFC 4568 a=crypto: what is usable, formatting, and the SDP edits."""

from __future__ import annotations

import base64

from proxy.sip.sdp import parse_sdp
from proxy.sip.sdp_crypto import (
    Crypto,
    CryptoEdit,
    crypto_of,
    format_crypto,
    parse_crypto,
    redact,
    rewrite_crypto,
)

KEY = base64.b64encode(b"k" * 16 + b"s" * 14).decode()


def test_usable_attributes() -> None:
    crypto = parse_crypto(f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}")
    assert crypto == Crypto(1, "AES_CM_128_HMAC_SHA1_80", b"k" * 16, b"s" * 14)
    assert parse_crypto(f"2 AES_CM_128_HMAC_SHA1_32 inline:{KEY}|2^31") is not None
    assert format_crypto(crypto) == f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}"
    assert "k" * 4 not in repr(crypto)


def test_unusable_attributes_are_skipped_not_errors() -> None:
    for value in (
        f"1 AES_256_CM_HMAC_SHA1_80 inline:{KEY}",  # a suite the proxy lacks
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|2^20",  # lifetime too short
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}|1:4",  # MKI
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY} UNENCRYPTED_SRTP",  # session params
        "1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ=",  # wrong length
        "1 AES_CM_128_HMAC_SHA1_80 inline:!!!",
        "x AES_CM_128_HMAC_SHA1_80 inline:" + KEY,
        "1",
    ):
        assert parse_crypto(value) is None, value


BODY = (
    "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    "m=audio 4000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}\r\n"
    "m=video 0 RTP/AVP 96\r\n"
).encode()


def test_rewrite_replaces_crypto_and_protocol_only() -> None:
    sdp = parse_sdp(BODY)
    found, seen = crypto_of(sdp.media[0])
    assert seen and found[0].tag == 1
    ours = Crypto(1, "AES_CM_128_HMAC_SHA1_32", b"a" * 16, b"b" * 14)
    out = rewrite_crypto(BODY, [CryptoEdit("RTP/AVP", (ours,)), None])
    text = out.decode()
    assert "m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n" in text
    assert KEY not in text and format_crypto(ours) in text
    assert text.endswith("m=video 0 RTP/AVP 96\r\n")
    assert b"<redacted>" in redact(BODY) and KEY.encode() not in redact(BODY)
