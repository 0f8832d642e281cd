"""Stateless answers built from raw bytes (proxy.sip.stateless)."""

from __future__ import annotations

import pytest

from proxy.sip.message import Response, parse_message
from proxy.sip.stateless import stateless_response

REQUEST = (
    b"OPTIONS sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKst1\r\n"
    b"Max-Forwards: 70\r\n"
    b"f: <sip:alice@example.org>;tag=1\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: st1@example.org\r\n"
    b"CSeq: 7 OPTIONS\r\n"
    b"Content-Length: 60000\r\n\r\n"
)


def test_413_copies_the_five_headers_and_ignores_the_body() -> None:
    data = REQUEST + b"x" * 60000
    reply = stateless_response(data, 413, "larger than 65535 bytes")
    assert reply is not None
    response = parse_message(reply)
    assert isinstance(response, Response)
    assert response.status == 413
    assert response.reason == "Request Entity Too Large (larger than 65535 bytes)"
    assert response.get("via") == "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKst1"
    assert response.from_.tag == "1"
    assert (response.call_id, response.cseq.number) == ("st1@example.org", 7)
    assert response.body == b""
    assert stateless_response(REQUEST[:-4], 413) is not None  # a head alone is enough


def test_extra_headers_and_reason_sanitised() -> None:
    reply = stateless_response(REQUEST, 503, "bad\r\ndetail\x00é", [("Retry-After", "5")])
    assert reply is not None
    response = parse_message(reply)
    assert isinstance(response, Response)
    assert response.get("retry-after") == "5"
    assert response.reason == "Service Unavailable (bad??detail??)"


@pytest.mark.parametrize(
    "data",
    [
        b"SIP/2.0 200 OK\r\nVia: x\r\nFrom: a\r\nTo: b\r\nCall-ID: c\r\nCSeq: 1 X\r\n\r\n",
        REQUEST.replace(b"Call-ID: st1@example.org\r\n", b""),
        REQUEST.replace(b"To: <sip:bob@example.com>", b"To: <sip:bob\x00@example.com>"),
        b"garbage",
        b"",
    ],
)
def test_unanswerable_input_gets_none(data: bytes) -> None:
    assert stateless_response(data, 413) is None
