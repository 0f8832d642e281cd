"""What the B2BUA writes into SIP messages, and what it copies: pure functions.

A B2BUA owns a few headers per leg and passes every other one through as received
(decision 11). Everything that decides which is which, and every small rewrite of an
owned or semi-owned value (RAck's CSeq, a ``*18``/``*19`` prefix, a 400 for an
unparsable request), lives here, free of call state, so each rule can be read and tested
on its own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import replace

from proxy.sip.headers import NameAddr, SipHeaderError, SipUri, split_header_values
from proxy.sip.message import Request, SipMessage, SipParseError, canonical

OWNED_HEADERS = frozenset(
    {"via", "route", "record-route", "contact", "call-id", "from", "to", "cseq",
     "content-length", "max-forwards"}
)  # fmt: skip
"""Headers the B2BUA rewrites per leg; all others pass through in order."""

TARGET_REFRESH = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})
"""Methods whose Contact replaces the dialog's remote target (RFC 3261 §12.2)."""

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK, REFER, NOTIFY, MESSAGE, REGISTER"
ONE_SHOT_METHODS = frozenset({"MESSAGE", "NOTIFY", "PUBLISH", "INFO"})
"""Out-of-dialog requests relayed as a single transaction (no dialog to keep)."""
SUPPORTED_REQUIRE = frozenset({"100rel", "timer", "replaces", "x-sipura"})
"""Option tags a request may ``Require`` of the proxy (it relays them end to end)."""
XSIPURA = "x-sipura"


class Reject(Exception):
    """Refuse the request being handled with this final response (and headers)."""

    def __init__(self, status: int, reason: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.extra = list(extra)


def digits(user: str | None) -> str:
    """A user part as a line key: E.164 numbers come with and without ``+``."""
    return (user or "").removeprefix("+")


def copy_end_to_end(source: SipMessage, target: SipMessage) -> None:
    """Append every header the B2BUA does not own, in order, spelled as received."""
    for name, value in source.headers:
        if canonical(name) not in OWNED_HEADERS:
            target.headers.append((name, value))


def supports_xsipura(message: SipMessage) -> bool:
    return any(v.strip().lower() == XSIPURA for v in message.get_all("supported"))


def forwarded_max_forwards(request: Request, default: int) -> int:
    """Max-Forwards for the relayed copy: one less than received, else the default."""
    value = request.get("max-forwards")
    return int(value) - 1 if value else default


def contact_target(values: list[str]) -> str | None:
    """The first Contact's URI when it can be a Request-URI (sip:/sips:, no ``?headers``).

    Raises :class:`SipHeaderError` otherwise (``*``, ``tel:``, a URI with no host...):
    a remote target that cannot be written into a request line must never be adopted.
    """
    if not values:
        return None
    uri = NameAddr.parse(values[0]).uri
    if SipUri.parse(uri).headers:
        raise SipHeaderError("a remote target cannot carry URI headers")
    return uri


def check_addresses(message: SipMessage) -> None:
    """From and To must be addresses; the parser lets ``*`` (a Contact form) through."""
    if "*" in (message.from_.uri, message.to.uri):
        raise SipParseError("From/To must be a name-addr or addr-spec, not *")


def unsupported_requirements(request: Request) -> list[str]:
    """The option tags of ``Require`` the proxy cannot honour (RFC 3261 §8.2.2.3)."""
    values = split_header_values(request.get("require") or "")
    return [tag for tag in values if tag.lower() not in SUPPORTED_REQUIRE]


def rewrite_rack(message: SipMessage, invite_cseq: int) -> None:
    """RFC 3262 ``RAck: rseq cseq method``: the CSeq is the relayed INVITE's, per leg.

    RSeq values pass through unchanged (each reliable 18x is relayed one to one), so only
    the middle number differs between the legs.
    """
    for index, (name, value) in enumerate(message.headers):
        if canonical(name) != "rack":
            continue
        parts = value.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            message.headers[index] = (name, f"{parts[0]} {invite_cseq} {parts[2]}")


def strip_star_code(original: Request) -> tuple[Request, bool | None]:
    """``*18`` + number: secure this call; ``*19`` + number: clear (profile §4).

    Returns the request to route and send on (a copy, with the prefix removed from the
    Request-URI and the To URI, as the SPA removes it before dialling; the phone's own
    request is untouched, its responses must echo its To) and True, False, or None when
    there is no prefix.
    """
    try:
        uri = SipUri.parse(original.uri)
    except SipHeaderError:
        return original, None
    user = uri.user or ""
    if not user.startswith(("*18", "*19")) or len(user) == 3:
        return original, None
    forced = user.startswith("*18")
    request = replace(original, headers=list(original.headers))
    request.uri = str(replace(uri, user=user[3:]))
    to = request.to
    with contextlib.suppress(SipHeaderError):
        to_uri = to.sip_uri()
        if to_uri.user and to_uri.user.startswith(("*18", "*19")):
            request.set("To", str(to.with_uri(str(replace(to_uri, user=to_uri.user[3:])))))
    return request, forced


_HEADER_LINE = re.compile(rb"^(via|v|from|f|to|t|call-id|i|cseq)[ \t]*:(.*)$", re.I | re.M)


def bad_request(data: bytes, reason: str, status: int = 400) -> bytes | None:
    """A 400 for an unparsable *request*, when enough of it survives to address one.

    RFC 4475 asks elements to answer what they can; a response needs Via, From, To,
    Call-ID and CSeq, copied byte for byte even when one of them is the broken part (the
    reply goes to the source address, so a broken Via cannot misroute it; CR, LF and NUL
    never get through the line-based copy). Responses and hopeless requests are dropped.
    """
    head = data.split(b"\r\n\r\n", 1)[0]
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if first.startswith(b"SIP/") or not re.match(
        rb"^[A-Za-z!%*_+`'~.-]+[ \t]+\S.*[ \t]SIP/", first
    ):
        return None
    found: dict[str, bytes] = {}
    for match in _HEADER_LINE.finditer(head):
        key = canonical(match.group(1).decode("ascii"))
        value = match.group(2).strip()
        if b"\x00" in value or b"\r" in value:
            return None
        found.setdefault(key, value)
    if not {"via", "from", "to", "call-id", "cseq"} <= found.keys():
        return None
    safe_reason = re.sub(r"[^\x20-\x7e]", "?", reason)[:100]
    phrase = "Version Not Supported" if status == 505 else "Bad Request"
    lines = [f"SIP/2.0 {status} {phrase} ({safe_reason})".encode()]
    lines += [
        b"Via: " + found["via"],
        b"From: " + found["from"],
        b"To: " + found["to"],
        b"Call-ID: " + found["call-id"],
        b"CSeq: " + found["cseq"],
        b"Content-Length: 0",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"
