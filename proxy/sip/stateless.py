"""Answers to requests the stack will not process: too large, unparsable, refused.

RFC 4475 asks elements to answer what they can, and a flood must not cost state: these
responses are built from the raw bytes, statelessly, with no transaction behind them.
A response needs Via, From, To, Call-ID and CSeq, copied byte for byte even when one of
them is the broken part (the reply goes to the source address, so a broken Via cannot
misroute it; CR, LF and NUL never get through the line-based copy). Responses, and
requests without those five headers, get no answer (None): they are dropped.

Only the header section is read (up to the first blank line), so a 64 KB body costs one
scan for the blank line and no copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.sip.message import canonical

__all__ = ["REASON_PHRASES", "stateless_response"]

REASON_PHRASES = {
    400: "Bad Request",
    413: "Request Entity Too Large",
    503: "Service Unavailable",
    505: "Version Not Supported",
}

_HEADER_LINE = re.compile(rb"^(via|v|from|f|to|t|call-id|i|cseq)[ \t]*:(.*)$", re.I | re.M)
_REQUEST_START = re.compile(rb"^[A-Za-z!%*_+`'~.-]+[ \t]+\S.*[ \t]SIP/")
_NEEDED = ("via", "from", "to", "call-id", "cseq")


def stateless_response(
    data: bytes, status: int, detail: str = "", extra: Iterable[tuple[str, str]] = ()
) -> bytes | None:
    """A ``status`` response to the request in ``data`` (whole, or its header section),
    or None when ``data`` is a response or lacks what a response must copy. ``detail``
    (why, e.g. the parse error) goes into the reason phrase, made printable ASCII."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    line_end = head.find(b"\n")
    first = (head if line_end < 0 else head[:line_end]).rstrip(b"\r")
    if first.startswith(b"SIP/") or not _REQUEST_START.match(first):
        return None
    found: dict[str, bytes] = {}
    for match in _HEADER_LINE.finditer(head):
        key = canonical(match.group(1).decode("ascii"))
        value = match.group(2).strip()
        if b"\x00" in value or b"\r" in value:
            return None
        found.setdefault(key, value)
    if not set(_NEEDED) <= found.keys():
        return None
    phrase = REASON_PHRASES.get(status, "Error")
    if detail:
        phrase += " (" + re.sub(r"[^\x20-\x7e]", "?", detail)[:100] + ")"
    lines = [f"SIP/2.0 {status} {phrase}".encode()]
    lines += [name.encode() + b": " + found[key] for key, name in _HEADER_NAMES]
    lines += [f"{name}: {value}".encode() for name, value in extra]
    lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"


_HEADER_NAMES = (
    ("via", "Via"),
    ("from", "From"),
    ("to", "To"),
    ("call-id", "Call-ID"),
    ("cseq", "CSeq"),
)
