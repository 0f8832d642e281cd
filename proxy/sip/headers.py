"""Structured SIP header values: URIs, name-addr, Via, CSeq (RFC 3261 §19, §20, §25).

Only what the B2BUA reads or rewrites is structured; everything else stays a string.
Parameters keep their order and spelling so that re-serialising a value we did not
change gives back the same text. Every malformed value raises :class:`SipHeaderError`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.sip.memo import TextMemo, memoise_text

MAGIC_COOKIE = "z9hG4bK"


MEMO_MAX_TEXT = 256
"""Header values longer than this are parsed every time, never cached (see
:mod:`proxy.sip.memo`): real From/To/Via/CSeq values are well under 200 characters."""


class SipHeaderError(ValueError):
    """A header value we needed to understand is malformed."""


_ASCII_DIGITS = re.compile(r"[0-9]+")
"""Not ``str.isdigit``/``\\d``: they accept ``²`` or ``٣``, which ``int()`` then rejects
or converts (``Expires: ²`` raised deep in the core and left a transaction unanswered)."""


def is_decimal(text: str) -> bool:
    """Only ASCII digits (at least one), as :func:`parse_decimal` reads them; for digit
    strings that are not quantities (a telephone number's user part), so no range."""
    return _ASCII_DIGITS.fullmatch(text) is not None


def parse_decimal(text: str, *, maximum: int = 2**32 - 1, what: str = "value") -> int:
    """The one rule for every numeric SIP value: ASCII digits only, surrounding SP/HT
    ignored, leading zeros allowed, at most ``maximum`` (RFC 3261 §25.1 ``1*DIGIT``).

    Expires, Max-Forwards, CSeq, Content-Length, RSeq/RAck, Session-Expires, Min-SE,
    Retry-After and ``expires=`` parameters all go through here (their callers cut the
    number out of the value first). Raises :class:`SipHeaderError` for anything else:
    a sign, a fraction, a non-ASCII digit, an empty value, a number out of range.
    """
    stripped = text.strip(" \t")
    if not _ASCII_DIGITS.fullmatch(stripped):
        raise SipHeaderError(f"{what} is not a number: {text[:20]!r}")
    digits = stripped.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise SipHeaderError(f"{what} out of range: {stripped[:20]}")
    return int(digits)


_LIST_SYNTAX = re.compile(r'[",<>\\]')
"""The characters that decide where a comma-joined header splits."""


def split_header_values(value: str) -> list[str]:
    """Split a comma-joined header into its values, respecting quotes and <...>."""
    if "," not in value:  # the common case: one value, no scan needed
        stripped = value.strip()
        return [stripped] if stripped else []
    if '"' not in value and "<" not in value:  # nothing can hide a comma: no scan needed
        return [part for part in (v.strip() for v in value.split(",")) if part]
    values: list[str] = []
    depth = 0
    quoted = False
    escaped_at = -1
    start = 0
    for match in _LIST_SYNTAX.finditer(value):  # only the characters that matter
        index = match.start()
        if index == escaped_at:
            continue
        char = value[index]
        if quoted:
            if char == "\\":
                escaped_at = index + 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            depth += 1
        elif char == ">":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            values.append(value[start:index].strip())
            start = index + 1
    values.append(value[start:].strip())
    return [v for v in values if v]


_PARAM_NAME = re.compile(r"[A-Za-z0-9\-.!%*_+`'~\[\]:/&$()]+")
"""RFC 3261 token (generic-param) and paramchar (uri-parameter) characters."""

_QUOTED = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
"""A quoted string, its loop unrolled (runs of plain characters at C speed)."""
_QUOTED_STRING = re.compile(_QUOTED, re.S)
_BAD_UNQUOTED_VALUE = re.compile(r'[\s",<>]')


def _split_params(text: str) -> list[tuple[str, str | None]]:
    """``a=b;c`` (the text after the first ';') -> [("a", "b"), ("c", None)].

    Quotes are respected; an empty parameter (``;;``), a bad name, or an unquoted value
    with whitespace, commas, quotes or angle brackets raises :class:`SipHeaderError`.
    """
    params: list[tuple[str, str | None]] = []
    for part in _split_outside_quotes(text, ";"):
        name, eq, val = part.partition("=")
        name = name.strip()
        if not _PARAM_NAME.fullmatch(name):
            raise SipHeaderError(f"bad parameter {part.strip()[:40]!r}")
        if not eq:
            params.append((name, None))
            continue
        val = val.strip()
        if val.startswith('"'):
            if not _QUOTED_STRING.fullmatch(val):
                raise SipHeaderError(f"bad quoted parameter value {val[:40]!r}")
        elif _BAD_UNQUOTED_VALUE.search(val):
            raise SipHeaderError(f"bad parameter value {val[:40]!r}")
        params.append((name, val))
    return params


def _param_tail(text: str) -> list[tuple[str, str | None]]:
    """Parameters after a value: empty, or ``;a=b;c`` (leading ';' required)."""
    text = text.strip()
    if not text:
        return []
    if not text.startswith(";"):
        raise SipHeaderError(f"unexpected text {text[:40]!r}")
    return _split_params(text[1:])


_UNTIL_UNQUOTED_SEMICOLON = re.compile(rf'(?:[^";]++|{_QUOTED})*+', re.S)
_UNTIL_UNQUOTED_LT = re.compile(rf'(?:[^"<]++|{_QUOTED})*+', re.S)
"""Everything up to the first ``;`` / ``<`` outside a quoted string (a backslash escapes
inside quotes only). Regular expressions, not a loop over characters: header values
come from the network, and a per-character Python loop cost ~4 ms for a 30 KB value."""


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """``text`` split at every ``separator`` (``;``) outside quotes."""
    assert separator == ";"
    if '"' not in text:
        return text.split(separator)
    parts: list[str] = []
    start = 0
    while True:
        end = _UNTIL_UNQUOTED_SEMICOLON.match(text, start).end()  # type: ignore[union-attr]
        parts.append(text[start:end])
        if end == len(text):
            return parts
        if text[end] == '"':
            raise SipHeaderError("unterminated quoted string")
        start = end + 1


def _format_params(params: list[tuple[str, str | None]]) -> str:
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


def _param(params: list[tuple[str, str | None]], name: str) -> str | None:
    lowered = name.lower()
    for pname, value in params:
        if pname.lower() == lowered:
            return "" if value is None else value
    return None


def _with_param(
    params: list[tuple[str, str | None]], name: str, value: str | None
) -> list[tuple[str, str | None]]:
    lowered = name.lower()
    out = [(n, v) for n, v in params if n.lower() != lowered]
    out.append((name, value))
    return out


def _without_param(params: list[tuple[str, str | None]], name: str) -> list[tuple[str, str | None]]:
    lowered = name.lower()
    return [(n, v) for n, v in params if n.lower() != lowered]


_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?::([0-9]{1,5}))?")


def parse_hostport(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; the host keeps its brackets."""
    match = _HOSTPORT.fullmatch(text.strip())
    if not match:
        raise SipHeaderError(f"bad host[:port] {text[:60]!r}")
    host = match.group(1)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SipHeaderError(f"bad IPv6 reference {host[:60]!r}") from None
    port = parse_decimal(match.group(2), maximum=65535, what="port") if match.group(2) else None
    if port == 0:
        raise SipHeaderError(f"port out of range in {text[:60]!r}")
    return host, port


def format_hostport(host: str, port: int | None) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def bare_host(host: str) -> str:
    """``[::1]`` -> ``::1`` (socket form)."""
    return host[1:-1] if host.startswith("[") else host


_BAD_URI_CHAR = re.compile(r'[\x00-\x20\x7f<>"]')
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")


def has_uri_scheme(text: str) -> bool:
    """True when ``text`` starts with an RFC 3986 scheme followed by ':' and something."""
    scheme, colon, rest = text.partition(":")
    return bool(colon and rest and _SCHEME.fullmatch(scheme))


@dataclass(frozen=True, slots=True)
class SipUri:
    """sip:/sips: URI (RFC 3261 §19.1). Other schemes (tel:) keep ``user`` = whole rest."""

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: list[tuple[str, str | None]] = field(default_factory=list)
    headers: str = ""

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse (memoised by text: a call's messages repeat the same values)."""
        return _parse_uri(text)

    @classmethod
    def _parse(cls, text: str) -> SipUri:
        text = text.strip()
        scheme, colon, rest = text.partition(":")
        scheme = scheme.lower()
        if not colon or scheme not in ("sip", "sips"):
            raise SipHeaderError(f"not a sip: URI: {text[:60]!r}")
        if _BAD_URI_CHAR.search(rest):
            raise SipHeaderError(f"whitespace, quote or bracket in URI {text[:60]!r}")
        # '@' cannot appear unescaped in params or headers, but ';', '?' and ':' can
        # appear in the userinfo (RFC 3261 §25.1 user-unreserved), so split there first.
        userinfo, at, hostpart = rest.rpartition("@")
        user = password = None
        if at:
            user, _, pw = userinfo.partition(":")
            password = pw or None
            if not user:
                raise SipHeaderError("empty user in URI")
        hostpart, _, uri_headers = hostpart.partition("?")
        hostport, semi, param_text = hostpart.partition(";")
        host, port = parse_hostport(hostport)
        params = _split_params(param_text) if semi else []
        return cls(scheme, user, password, host, port, params, uri_headers)

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user + (f":{self.password}" if self.password else "") + "@"
        text = f"{self.scheme}:{userinfo}{format_hostport(self.host, self.port)}"
        text += _format_params(self.params)
        if self.headers:
            text += "?" + self.headers
        return text

    def param(self, name: str) -> str | None:
        return _param(self.params, name)

    def with_param(self, name: str, value: str | None = None) -> SipUri:
        return replace(self, params=_with_param(self.params, name, value))

    def without_param(self, name: str) -> SipUri:
        return replace(self, params=_without_param(self.params, name))

    @property
    def transport(self) -> str:
        value = self.param("transport")
        return "udp" if not value else value.lower()

    @property
    def default_port(self) -> int:
        return 5061 if self.scheme == "sips" else 5060


@dataclass(frozen=True, slots=True)
class NameAddr:
    """``"Display" <uri>;params`` or ``uri;params`` (From, To, Contact, Route...).

    ``uri`` is kept as text: the B2BUA passes foreign URIs (tel:, urn:) through untouched
    and only parses it with :meth:`sip_uri` when it needs the parts.
    """

    display: str
    uri: str
    params: list[tuple[str, str | None]] = field(default_factory=list)
    bracketed: bool = True

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        """Parse (memoised by text: a call's messages repeat the same values)."""
        return _parse_name_addr(text)

    @classmethod
    def _parse(cls, text: str) -> NameAddr:
        text = text.strip()
        if not text:
            raise SipHeaderError("empty address")
        if text == "*":
            return cls("", "*", [], False)
        lt = _find_unquoted(text, "<")
        if lt >= 0:
            gt = text.find(">", lt)
            if gt < 0:
                raise SipHeaderError("unterminated <uri>")
            display = text[:lt].strip()
            _check_display(display)
            uri = text[lt + 1 : gt]
            if not has_uri_scheme(uri) or _BAD_URI_CHAR.search(uri):
                raise SipHeaderError(f"bad URI in {text[:60]!r}")
            return cls(display, uri, _param_tail(text[gt + 1 :]), True)
        # addr-spec form: URI params end at the first ';' (they belong to the header), and
        # a URI with ',', '?' or ';' of its own must be in <> (RFC 3261 §20.10).
        uri, semi, rest = text.partition(";")
        uri = uri.strip()
        if not has_uri_scheme(uri) or _BAD_URI_CHAR.search(uri) or _ADDR_SPEC_BAD.search(uri):
            raise SipHeaderError(f"bad address {text[:60]!r}")
        return cls("", uri, _split_params(rest) if semi else [], False)

    def __str__(self) -> str:
        if not self.bracketed and not self.display and "?" not in self.uri and ";" not in self.uri:
            core = self.uri
        else:
            core = (f"{self.display} " if self.display else "") + f"<{self.uri}>"
        return core + _format_params(self.params)

    @property
    def tag(self) -> str | None:
        value = _param(self.params, "tag")
        return value or None

    def param(self, name: str) -> str | None:
        return _param(self.params, name)

    def with_param(self, name: str, value: str | None) -> NameAddr:
        return replace(self, params=_with_param(self.params, name, value))

    def without_param(self, name: str) -> NameAddr:
        return replace(self, params=_without_param(self.params, name))

    def with_uri(self, uri: str) -> NameAddr:
        return replace(self, uri=uri, bracketed=True)

    def sip_uri(self) -> SipUri:
        return SipUri.parse(self.uri)


_ADDR_SPEC_BAD = re.compile(r"[,?]")
_DISPLAY_WORD = r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?={}]+'
_DISPLAY_TOKENS = re.compile(rf"{_DISPLAY_WORD}(?:[ \t]+{_DISPLAY_WORD})*")
"""``*(token LWS)``; non-ASCII is tolerated (common in the field, unambiguous)."""


def _check_display(display: str) -> None:
    """display-name = *(token LWS) / quoted-string (RFC 3261 §25.1)."""
    if not display:
        return
    if display.startswith('"'):
        if not _QUOTED_STRING.fullmatch(display):
            raise SipHeaderError(f"bad quoted display name {display[:40]!r}")
    elif not _DISPLAY_TOKENS.fullmatch(display):
        raise SipHeaderError(f"display name must be quoted: {display[:40]!r}")


def _find_unquoted(text: str, char: str) -> int:
    """Index of the first ``char`` (``<``) outside a quoted string, or -1."""
    assert char == "<"
    if '"' not in text:
        return text.find(char)
    end = _UNTIL_UNQUOTED_LT.match(text).end()  # type: ignore[union-attr]
    return end if end < len(text) and text[end] == char else -1


_VIA = re.compile(
    r"SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s+([^;\s]+(?:\s*:\s*[0-9]+)?)(.*)",
    re.S | re.I,
)


@dataclass(frozen=True, slots=True)
class Via:
    transport: str
    host: str
    port: int | None
    params: list[tuple[str, str | None]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Via:
        """Parse (memoised by text: a call's messages repeat the same values)."""
        return _parse_via(text)

    @classmethod
    def _parse(cls, text: str) -> Via:
        match = _VIA.fullmatch(text.strip())
        if not match:
            raise SipHeaderError(f"bad Via {text[:60]!r}")
        transport, sent_by, rest = match.groups()
        host, port = parse_hostport(re.sub(r"\s+", "", sent_by))
        return cls(transport.upper(), host, port, _param_tail(rest))

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {format_hostport(self.host, self.port)}" + (
            _format_params(self.params)
        )

    @property
    def branch(self) -> str | None:
        return _param(self.params, "branch") or None

    def param(self, name: str) -> str | None:
        return _param(self.params, name)

    def with_param(self, name: str, value: str | None) -> Via:
        return replace(self, params=_with_param(self.params, name, value))

    @property
    def sent_by(self) -> tuple[str, int]:
        return self.host.lower(), self.port or 5060


_CSEQ = re.compile(r"([0-9]+)[ \t]+([A-Za-z0-9\-.!%*_+`'~]+)")


@dataclass(frozen=True, slots=True)
class CSeq:
    number: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        """Parse (memoised by text: a call's messages repeat the same values)."""
        return _parse_cseq(text)

    @classmethod
    def _parse(cls, text: str) -> CSeq:
        match = _CSEQ.fullmatch(text.strip())
        if not match:
            raise SipHeaderError(f"bad CSeq {text[:40]!r}")
        number = parse_decimal(match.group(1), maximum=2**31 - 1, what="CSeq number")
        return cls(number, match.group(2))

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


# Parsed values by text: immutable (frozen dataclasses, edited only through ``with_*``
# copies), so one parse serves every message that repeats the text. Bounded in entries
# and in text length (proxy.sip.memo).
_parse_uri, URI_MEMO = memoise_text(SipUri._parse, max_entries=2048, max_text=MEMO_MAX_TEXT)
_parse_name_addr, NAME_ADDR_MEMO = memoise_text(
    NameAddr._parse, max_entries=4096, max_text=MEMO_MAX_TEXT
)
_parse_via, VIA_MEMO = memoise_text(Via._parse, max_entries=2048, max_text=MEMO_MAX_TEXT)
_parse_cseq, CSEQ_MEMO = memoise_text(CSeq._parse, max_entries=1024, max_text=MEMO_MAX_TEXT)


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_literal(text: str) -> tuple[IpAddress, str] | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address, str(address)


ip_literal, IP_MEMO = memoise_text(_ip_literal, max_entries=1024, max_text=64)
"""``text`` as an IP address and its normal spelling, or None when it is not one. Every
call's SDP and next hop name the same few addresses, and ``ipaddress`` parses each octet
in Python (a few µs a time). Not-an-address (None) is computed again at each use."""

MEMOS: dict[str, TextMemo[Any]] = {
    "ip": IP_MEMO,
    "uri": URI_MEMO,
    "name_addr": NAME_ADDR_MEMO,
    "via": VIA_MEMO,
    "cseq": CSEQ_MEMO,
}
