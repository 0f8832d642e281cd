"""The ``Replaces`` header (RFC 3891), alone or embedded in a ``Refer-To`` URI.

``Replaces: call-id;to-tag=X;from-tag=Y[;early-only]`` names a dialog as the UA that
receives it sees it: ``to-tag`` is that UA's own tag, ``from-tag`` its peer's. In an
attended transfer it travels inside the Refer-To URI as an escaped URI header
(``<sip:bob@example.com?Replaces=abc%40host%3Bto-tag%3DX%3Bfrom-tag%3DY>``, RFC 3515
§2.1 and RFC 3891 §6.1), and the transferee copies it into the INVITE it sends. This
module parses and formats both forms; it knows nothing about calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import quote, unquote

from proxy.sip.headers import NameAddr, SipHeaderError, SipUri, split_header_values

__all__ = ["Replaces", "refer_to_replaces", "with_refer_to_replaces"]

_TAG_PARAMS = ("to-tag", "from-tag")


@dataclass(frozen=True, slots=True)
class Replaces:
    call_id: str
    to_tag: str
    from_tag: str
    early_only: bool = False
    params: tuple[tuple[str, str | None], ...] = ()
    """Other parameters, kept in order (extensions)."""

    @classmethod
    def parse(cls, text: str) -> Replaces:
        """Raises :class:`SipHeaderError` unless ``text`` has a Call-ID and both tags."""
        values = split_header_values(text)
        if len(values) != 1:
            raise SipHeaderError("Replaces must hold exactly one dialog")
        call_id, *parts = values[0].split(";")
        call_id = call_id.strip()
        if not call_id or any(c in call_id for c in ' \t"<>'):
            raise SipHeaderError(f"bad Replaces Call-ID {call_id[:40]!r}")
        tags: dict[str, str] = {}
        early = False
        params: list[tuple[str, str | None]] = []
        for part in parts:
            name, eq, value = part.strip().partition("=")
            key = name.strip().lower()
            if key in _TAG_PARAMS and eq and value.strip():
                tags[key] = value.strip()
            elif key == "early-only" and not eq:
                early = True
            elif key:
                params.append((name.strip(), value.strip() if eq else None))
            else:
                raise SipHeaderError("empty Replaces parameter")
        if set(tags) != set(_TAG_PARAMS):
            raise SipHeaderError("Replaces needs to-tag and from-tag")
        return cls(call_id, tags["to-tag"], tags["from-tag"], early, tuple(params))

    def __str__(self) -> str:
        text = f"{self.call_id};to-tag={self.to_tag};from-tag={self.from_tag}"
        if self.early_only:
            text += ";early-only"
        for name, value in self.params:
            text += f";{name}" if value is None else f";{name}={value}"
        return text

    def naming(self, call_id: str, to_tag: str, from_tag: str) -> Replaces:
        """The same request for another dialog's identifiers."""
        return replace(self, call_id=call_id, to_tag=to_tag, from_tag=from_tag)


def _uri_headers(headers: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for item in headers.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((name, value))
    return pairs


def refer_to_replaces(refer_to: str) -> Replaces | None:
    """The Replaces embedded in a Refer-To value (None: there is none). Raises
    :class:`SipHeaderError` when there is one and it is malformed."""
    target = NameAddr.parse(refer_to)
    try:
        uri = SipUri.parse(target.uri)
    except SipHeaderError:
        return None  # not a SIP URI (tel:, http:): nothing the proxy maps
    for name, value in _uri_headers(uri.headers):
        if name.lower() == "replaces":
            return Replaces.parse(unquote(value))
    return None


def with_refer_to_replaces(refer_to: str, replaces: Replaces) -> str:
    """The Refer-To value with its embedded Replaces rewritten (other URI headers and
    every parameter kept as they were)."""
    target = NameAddr.parse(refer_to)
    uri = SipUri.parse(target.uri)
    pairs = [
        (name, quote(str(replaces), safe="") if name.lower() == "replaces" else value)
        for name, value in _uri_headers(uri.headers)
    ]
    rewritten = replace(uri, headers="&".join(f"{n}={v}" for n, v in pairs))
    return str(target.with_uri(str(rewritten)))
