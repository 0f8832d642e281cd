"""RFC 4475 torture messages, garbage and truncated messages against the running proxy.

Every message goes over UDP to one side (inside or outside) of one proxy process shared
by the module. After each one the same socket sends an OPTIONS: the proxy handles a
side's datagrams in order, so by the time the OPTIONS is answered every response the
message itself provoked has been sent (the wait is capped at 2 s either way). Then:

* the proxy must still answer (200 to the OPTIONS) and its log must show no traceback;
* an invalid request that carries what a response needs (Via, From, To, Call-ID, CSeq)
  must get 400 (505 for the unknown SIP version, 400 or 501 for ``mismatch02``); where
  RFC 4475 allows an element to be liberal instead, any response will do, not silence;
* a valid message may get any response or none (many are addressed to nobody);
* a response (valid or not) is never answered.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Proxy

HOST = "127.0.0.1"
DATA = Path(__file__).resolve().parents[1] / "data" / "rfc4475"
INDEX: list[dict[str, Any]] = json.loads((DATA / "INDEX.json").read_text())
SIDES = ["inside", "outside"]
REPLY_WAIT_S = 2.0

EXPECTED = {"badvers": {505}, "mismatch02": {400, 501}}
"""Invalid requests answered with something other than 400."""
LIBERAL = {"lwsstart", "trws", "escruri", "baddate", "regbadct", "badaspec", "baddn"}
"""Invalid requests RFC 4475 lets an element accept (be liberal) instead of rejecting:
any response is fine, silence is not."""

KNOWN_BUGS: dict[str, str] = {}
"""Proxy bugs in code this suite must not change: strict xfails, recorded expectations."""


def load(name: str) -> bytes:
    return (DATA / f"{name}.dat").read_bytes()


def is_response(data: bytes) -> bool:
    return data.startswith(b"SIP/")


def answerable(data: bytes) -> bool:
    """A request with every header a response must copy (compact forms count)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    names = {
        {"v": "via", "f": "from", "t": "to", "i": "call-id"}.get(n, n)
        for n in (m.lower().decode() for m in re.findall(rb"^([A-Za-z-]+)[ \t]*:", head, re.M))
    }
    return not is_response(data) and {"via", "from", "to", "call-id", "cseq"} <= names


def status_of(message: bytes) -> int:
    match = re.match(rb"SIP/2\.0 (\d{3}) ", message)
    return int(match.group(1)) if match else 0


def call_id_of(message: bytes) -> bytes | None:
    match = re.search(rb"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", message, re.M | re.I)
    return match.group(1) if match else None


def probe(port: int, call_id: str) -> bytes:
    return (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:9;branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{HOST}>;tag={uuid.uuid4().hex[:10]}\r\n"
        f"To: <sip:{HOST}:{port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def port_of(proxy: Proxy, side: str) -> int:
    return proxy.inside if side == "inside" else proxy.outside


def throw(proxy: Proxy, side: str, data: bytes) -> list[bytes]:
    """Send ``data``, then an OPTIONS; return what came back for ``data``.

    Asserts the OPTIONS got its 200 and the proxy logged no traceback meanwhile.
    """
    port = port_of(proxy, side)
    log_before = len(proxy.log_text())
    probe_id = f"probe-{uuid.uuid4().hex}@{HOST}".encode()
    replies: list[bytes] = []
    alive = False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.sendto(data, (HOST, port))
        sock.sendto(probe(port, probe_id.decode()), (HOST, port))
        deadline = time.monotonic() + REPLY_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                break
            if call_id_of(reply) == probe_id:
                alive = alive or status_of(reply) == 200
                if alive:
                    break
            else:
                replies.append(reply)
    log = proxy.log_text()[log_before:]
    assert proxy.alive(), f"the proxy died:\n{proxy.log_text()[-5000:]}"
    assert alive, f"no 200 to OPTIONS on the {side} after the message:\n{log[-5000:]}"
    assert "Traceback" not in log, f"internal error:\n{log[-5000:]}"
    return replies


def statuses(replies: list[bytes]) -> list[int]:
    return [status_of(r) for r in replies]


# --------------------------------------------------------------------------- RFC 4475


def _cases() -> list[Any]:
    cases = []
    for side in SIDES:
        for entry in INDEX:
            name = entry["name"]
            marks = []
            if name in KNOWN_BUGS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
            cases.append(pytest.param(entry, side, id=f"{name}-{side}", marks=marks))
    return cases


@pytest.mark.parametrize(("entry", "side"), _cases())
def test_rfc4475(shared_proxy: Proxy, entry: dict[str, Any], side: str) -> None:
    name = entry["name"]
    data = load(name)
    replies = throw(shared_proxy, side, data)
    codes = statuses(replies)
    assert all(code >= 100 for code in codes), f"not a SIP response: {replies}"
    if is_response(data):
        assert replies == [], f"a response was answered: {codes}"
        return
    if entry["valid"] or not answerable(data):
        return  # any response or none
    finals = [code for code in codes if code >= 200]
    if name in LIBERAL:
        assert codes, f"{name}: neither rejected nor processed (no response at all)"
        return
    wanted = EXPECTED.get(name, {400})
    assert finals and finals[0] in wanted, f"{name}: expected {sorted(wanted)}, got {codes}"


# --------------------------------------------------------------------------- garbage

INVITE = (
    "INVITE sip:1001@{host}:{port} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {host}:9;branch=z9hG4bKtrunc{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:alice@{host}>;tag=trunc{n}\r\n"
    "To: <sip:1001@{host}>\r\n"
    "Call-ID: trunc-{n}@{host}\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:alice@{host}:9>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 129\r\n"
    "\r\n"
    "v=0\r\n"
    "o=alice 1 1 IN IP4 {host}\r\n"
    "s=-\r\n"
    "c=IN IP4 {host}\r\n"
    "t=0 0\r\n"
    "m=audio 9 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=sendrecv\r\n"
)


def _garbage() -> list[Any]:
    rng = random.Random(4475)
    blobs: list[tuple[str, bytes]] = [
        ("empty-ish", b"\x00"),
        ("nul-run", b"\x00" * 1500),
        ("high-bytes", bytes(range(128, 256)) * 4),
        ("crlf-only-lf", b"\n\n\n\n"),
        ("start-line-only", b"INVITE sip:x@y SIP/2.0\r\n"),
        ("response-line-only", b"SIP/2.0 200 OK\r\n\r\n"),
        ("no-colon-headers", b"OPTIONS sip:x SIP/2.0\r\nVia\r\nFrom\r\nTo\r\n\r\n"),
        ("huge-header", b"OPTIONS sip:x SIP/2.0\r\nX-Big: " + b"a" * 60000 + b"\r\n\r\n"),
        ("utf8-junk", "INVITE sip:\u00e9\u00e8@\u4e2d SIP/2.0\r\nVia: \u2603\r\n\r\n".encode()),
        ("binary-after-line", b"REGISTER sip:x SIP/2.0\r\n" + bytes(range(256))),
        ("cl-negative", b"OPTIONS sip:x SIP/2.0\r\nContent-Length: -1\r\n\r\n"),
        ("folded-forever", b"OPTIONS sip:x SIP/2.0\r\nSubject: a\r\n" + b" b\r\n" * 2000),
    ]
    for index in range(8):
        size = rng.choice([1, 7, 64, 512, 1400, 8000])
        blobs.append((f"random-{index}", bytes(rng.getrandbits(8) for _ in range(size))))
        printable = "".join(rng.choice('SIP/2.0 :;,<>@\r\n\tabcINVITE="') for _ in range(size))
        blobs.append((f"printable-{index}", printable.encode()))
    return [pytest.param(data, id=name) for name, data in blobs]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("data", _garbage())
def test_garbage(shared_proxy: Proxy, data: bytes, side: str) -> None:
    replies = throw(shared_proxy, side, data)
    assert all(status_of(r) in (400, 505) for r in replies), replies


@pytest.mark.parametrize("side", SIDES)
def test_truncated(shared_proxy: Proxy, side: str) -> None:
    """A valid INVITE cut short at 40 places: answered 400 or dropped, never processed."""
    whole_len = len(INVITE.format(host=HOST, port=0, n=0))
    for n, cut in enumerate(range(1, whole_len, max(1, whole_len // 40))):
        whole = INVITE.format(host=HOST, port=port_of(shared_proxy, side), n=f"{side}{n}")
        replies = throw(shared_proxy, side, whole.encode()[:cut])
        assert all(status_of(r) == 400 for r in replies), (cut, replies)


def test_tcp_garbage_closes_connection(shared_proxy: Proxy) -> None:
    """Unframeable bytes over TCP: the proxy drops that connection, not the process."""
    for port in (shared_proxy.inside, shared_proxy.outside):
        with socket.create_connection((HOST, port), timeout=REPLY_WAIT_S) as conn:
            conn.sendall(b"INVITE sip:x SIP/2.0\r\nContent-Length: banana\r\n\r\n")
            try:
                data = conn.recv(65535)
            except ConnectionResetError:
                data = b""
            # closed (EOF/RST), possibly after a 400; a timeout here is a failure
            assert data == b"" or data.startswith(b"SIP/2.0 400"), data
        assert throw(shared_proxy, "inside", b"\r\n") == []
        assert throw(shared_proxy, "outside", b"\r\n") == []
