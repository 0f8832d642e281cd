"""Helpers for the field-telephony interop tests: media peers the test owns, REGISTERs
sent from a SIPp port, and what SIPp's message trace says (SDP ports, timings).

SIPp does the signalling; the media endpoints its SDP announces are UDP sockets of the
test (ports handed to the scenario with ``-key``), so the test sees exactly the bytes
and the source addresses the far end received. Everything on 127.0.0.0/8.
"""

from __future__ import annotations

import re
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from testkit.ports import HOST

_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d\s+\d\d:\d\d:\d\d(?:\.\d+)?)\s*$", re.M)


@dataclass
class Traced:
    direction: str
    """``sent`` or ``received``."""
    at: float
    """Wall-clock seconds (from the trace's separator line)."""
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    def header(self, name: str) -> str | None:
        head = self.text.split("\n\n", 1)[0]
        for line in head.split("\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def trace(path: Path) -> list[Traced]:
    """Every message of a SIPp ``-trace_msg`` file, with its time."""
    text = path.read_text(errors="replace") if path.exists() else ""
    found: list[Traced] = []
    marks = list(_SEPARATOR.finditer(text))
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        chunk = text[mark.end() : end]
        match = re.match(r"\s*(?:UDP|TCP)\s+message\s+(sent|received).*?:\s*\n\n", chunk)
        if not match:
            continue
        stamp = datetime.fromisoformat(mark.group(1).replace("  ", " "))
        found.append(Traced(match.group(1), stamp.timestamp(), chunk[match.end() :].strip("\n")))
    return found


def find(messages: list[Traced], direction: str, start: str, nth: int = 0) -> Traced:
    hits = [m for m in messages if m.direction == direction and m.first_line.startswith(start)]
    assert len(hits) > nth, f"no {direction} {start!r} #{nth}: {[m.first_line for m in messages]}"
    return hits[nth]


def wait_trace(path: Path, direction: str, start: str, nth: int = 0, timeout: float = 10) -> Traced:
    """Until SIPp's trace holds that message (SIPp writes each one as it goes)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = trace(path)
        hits = [m for m in messages if m.direction == direction and m.first_line.startswith(start)]
        if len(hits) > nth:
            return hits[nth]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {direction} {start!r} #{nth} in {path}")
        time.sleep(0.05)


def sdp_ports(message: str) -> dict[str, tuple[str, int]]:
    """``{"audio": (ip, port), "image": (ip, port)}`` of a message's SDP body."""
    body = message.split("\n\n", 1)[1] if "\n\n" in message else ""
    session = re.search(r"^c=IN IP4 (\S+)", body, re.M)
    found: dict[str, tuple[str, int]] = {}
    for section in re.split(r"^(?=m=)", body, flags=re.M)[1:]:
        kind, port = re.match(r"m=(\w+) (\d+)", section).groups()  # type: ignore[union-attr]
        conn = re.search(r"^c=IN IP4 (\S+)", section, re.M) or session
        assert conn is not None, body
        found[kind] = (conn.group(1), int(port))
    return found


# --- media the test owns -----------------------------------------------------------------


class Peer:
    """A UDP socket on loopback: the media endpoint a SIPp party announces."""

    def __init__(self, host: str = HOST, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.05)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        self.sock.sendto(data, dest)

    def drain(self, seconds: float = 0.3) -> list[tuple[bytes, tuple[str, int]]]:
        """Everything that arrives within ``seconds``."""
        got: list[tuple[bytes, tuple[str, int]]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            got.append((data, (str(addr[0]), int(addr[1]))))
        return got

    def close(self) -> None:
        self.sock.close()


def rtp(seq: int, ssrc: int, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + payload


def udptl(seq: int) -> bytes:
    """A T.38 UDPTL packet (RFC 3362): sequence number, an IFP carrying a fax page chunk,
    no redundancy. Unlike RTP: no version bits, its first bytes are a 16-bit counter."""
    ifp = bytes([0x06, 0xC0, 0x01]) + bytes((seq * 7 + i) & 0xFF for i in range(30))
    return struct.pack("!H", seq) + bytes([len(ifp)]) + ifp + b"\x00"


@dataclass
class Registered:
    status: int
    contacts: dict[str, int] = field(default_factory=dict)
    """Contact URI -> expires, as the proxy's 200 lists them."""
    text: str = ""


def register(
    proxy_port: int, from_port: int, user: str, *, contact_host: str = HOST,
    expires: int = 3600, transport: str = "udp", domain: str = HOST,
) -> Registered:  # fmt: skip
    """One REGISTER from 127.0.0.1:``from_port`` (the port SIPp listens on next: the
    proxy reaches the device over the flow it registered on), its final answer."""
    contact_uri = f"sip:{user}@{contact_host}:{from_port}"
    if transport == "tcp":
        contact_uri += ";transport=tcp"
    call_id = uuid.uuid4().hex
    message = (
        f"REGISTER sip:{domain} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {HOST}:{from_port};rport;"
        f"branch=z9hG4bK{uuid.uuid4().hex}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{domain}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{domain}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\n"
        f"Contact: <{contact_uri}>\r\nExpires: {expires}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, from_port))
        sock.settimeout(5)
        if transport == "tcp":
            sock.connect((HOST, proxy_port))
            sock.sendall(message)
        else:
            sock.sendto(message, (HOST, proxy_port))
        while True:
            text = sock.recv(65535).decode(errors="replace")
            status = int(text.split(" ", 2)[1])
            if status >= 200:
                break
    contacts = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^Contact:\s*<([^>]+)>;expires=(\d+)", text, re.M | re.I)
    }
    return Registered(status, contacts, text)
