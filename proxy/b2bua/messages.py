"""What the B2BUA writes into SIP messages, and what it copies: pure functions.

A B2BUA owns a few headers per leg and passes every other one through as received
(decision 11). Everything that decides which is which, and every small rewrite of an
owned or semi-owned value (RAck's CSeq, a ``*18``/``*19`` prefix), lives here, free of
call state, so each rule can be read and tested on its own. (The 400 for an unparsable
request is :func:`proxy.sip.stateless.stateless_response`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import replace

from proxy.sip.headers import (
    NameAddr,
    SipHeaderError,
    SipUri,
    is_decimal,
    parse_decimal,
    split_header_values,
)
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
    """Refuse the request being handled with this final response (and headers).

    ``cause`` says why in the operator's terms when the refusal is the proxy's own
    limit, not the request's fault (a 503: ``max_calls (100) reached``, ``media ports
    exhausted``...): such refusals are logged, rate-limited (:meth:`SipSides.refusal`).
    """

    def __init__(
        self, status: int, reason: str, extra: Iterable[tuple[str, str]] = (), *, cause: str = ""
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.extra = list(extra)
        self.cause = cause


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


def max_forwards(request: Request) -> int | None:
    """The request's Max-Forwards (None when absent; the parser checked it is 0..255)."""
    value = request.get("max-forwards")
    return None if value is None else parse_decimal(value, maximum=255, what="Max-Forwards")


def forwarded_max_forwards(request: Request, default: int) -> int:
    """Max-Forwards for the relayed copy: one less than received, else the default."""
    value = max_forwards(request)
    return default if value is None else value - 1


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
        if len(parts) == 3 and is_decimal(parts[0]) and is_decimal(parts[1]):
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
