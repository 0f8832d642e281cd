"""Checked reading of one TOML configuration file: tables, typed values, value syntax.

:mod:`proxy.b2bua.config_schema` says *which* tables and keys exist and what they mean,
and :mod:`proxy.b2bua.config_tables` reads each table; this module is the machinery
every key goes through, so that all of them fail alike: a :class:`ConfigError` of one
line, ``FILE: KEY: what is wrong``, that names the exact key (``line[2].contact``,
``xsipura.trusted_ca[1]``). :class:`Table` reads typed values
(a quoted ``"500"`` where an integer is wanted is an error, never coerced), rejects
unknown keys with a did-you-mean hint, and resolves file paths against the config
file's directory. The value parsers check syntax only (host, port, SIP URI, user id):
nothing here touches the network or reads another file.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Collection, Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import UsageError

__all__ = [
    "ConfigError",
    "InvalidValue",
    "Table",
    "choice_reason",
    "host_optional_port",
    "host_port",
    "media_ip",
    "quote",
    "show",
    "sip_uri",
    "user_id",
]

T = TypeVar("T")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_USER_ID = re.compile(r"\+?[0-9]+")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMERIC_HOST = re.compile(r"[0-9.]+")
_SIP_SCHEME = re.compile(r"(?i)sips?:")
_QUOTE_LIMIT = 60


class ConfigError(UsageError):
    """A configuration file the proxy must not start with.

    ``str(error)`` is always exactly one line, ``SOURCE: KEY: REASON``: the CLI prints it
    as is and exits 2. The parts are kept as attributes so tests and tooling can check
    which key was blamed without parsing the text.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = _one_line(source)
        self.key = _one_line(key)
        self.reason = _one_line(reason)
        super().__init__(_one_line(f"{source}: {key}: {reason}"))


class InvalidValue(Exception):
    """A value parser's complaint; :meth:`Table.parse` adds file and key."""


class Table:
    """One TOML table plus its dotted path, so every complaint names the exact key.

    ``base`` is the directory relative file paths are resolved against: the config
    file's own directory, so a configuration and the keys next to it move together
    (and work in a container whatever its working directory).
    """

    def __init__(self, source: str, path: str, data: Mapping[str, Any], base: Path) -> None:
        self.source = source
        self.path = path
        self.data = data
        self.base = base

    def key(self, name: str) -> str:
        part = name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)
        return f"{self.path}.{part}" if self.path else part

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self.data

    def check_keys(
        self, allowed: Collection[str], elsewhere: Mapping[str, str] | None = None
    ) -> None:
        for name, value in self.data.items():
            if name in allowed:
                continue
            if elsewhere and name in elsewhere:
                raise self.error(name, f"not valid here (only in [{elsewhere[name]}])")
            what = "table" if isinstance(value, dict) and not self.path else "key"
            close = difflib.get_close_matches(name, list(allowed), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise self.error(name, f"unknown {what}{hint}")

    def table(self, name: str, *, required: bool = False) -> Table:
        if name not in self.data:
            if required:
                raise self.error(name, f"missing (the [{self.key(name)}] table is required)")
            return Table(self.source, self.key(name), {}, self.base)
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {show(value)}")
        return Table(self.source, self.key(name), value, self.base)

    def item(self, path: str, data: Mapping[str, Any]) -> Table:
        """A table found inside this one under ``path`` (an array item: ``line[2]``)."""
        return Table(self.source, path, data, self.base)

    def _get(self, name: str, kind: type[T], article: str) -> T:
        value = self.data[name]
        # bool is an int subclass in Python, but `true` is never a valid number here.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"expected {article}, got {show(value)}")
        return value

    def string(self, name: str, default: str) -> str:
        return self._get(name, str, "a string") if name in self.data else default

    def boolean(self, name: str, default: bool) -> bool:
        return self._get(name, bool, "true or false") if name in self.data else default

    def array(self, name: str) -> list[Any]:
        return self._get(name, list, "an array")

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        if name not in self.data:
            return default
        value = self._get(name, int, "an integer")
        if maximum is not None and minimum is not None and not minimum <= value <= maximum:
            raise self.error(name, f"must be {minimum}..{maximum}, got {value}")
        if minimum is not None and value < minimum:
            wanted = "a positive integer" if minimum == 1 else f">= {minimum}"
            raise self.error(name, f"must be {wanted}, got {value}")
        return value

    def milliseconds(self, name: str, default_ms: int, *, minimum: int = 0) -> float:
        """An integer key in ms (the file's unit, ``*_ms``) as seconds (the code's unit)."""
        return self.integer(name, default_ms, minimum=minimum) / 1000

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        if name not in self.data:
            return default
        value = self._get(name, str, "a string")
        if value not in choices:
            raise self.error(name, choice_reason(value, choices))
        return value

    def parse(self, name: str, parser: Callable[[str], T], *, required: bool = False) -> T:
        """Type-check a string value and run ``parser`` on it, blaming this key on failure.

        Callers test :meth:`has` for optional keys; ``required`` words the missing case.
        """
        if name not in self.data:
            raise self.error(name, "missing (required)" if required else "missing")
        try:
            return parser(self._get(name, str, "a string"))
        except InvalidValue as exc:
            raise self.error(name, str(exc)) from None

    def file_path(self, text: str, key: str) -> Path:
        """A file path as written in the file (``key`` names it in errors), resolved:
        ``~`` expanded, a relative path joined to :attr:`base`. Existence is not checked
        here: reading the file is the job of whoever needs its content."""
        if not text.strip() or any(not ch.isprintable() for ch in text):
            raise ConfigError(self.source, key, f"expected a file path, got {quote(text)}")
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path


# --------------------------------------------------------------------------- value parsers


def host_port(text: str) -> tuple[str, int]:
    """``host:port``, the port required."""
    host, port = _host_port(text, '"host:port"', port_required=True)
    assert port is not None  # port_required guarantees it
    return host, port


def host_optional_port(text: str) -> tuple[str, int | None]:
    """``host`` or ``host:port``."""
    return _host_port(text, '"host" or "host:port"', port_required=False)


def _host_port(text: str, expected: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split ``host[:port]``: IPv4, ``[IPv6]`` or a hostname; IPv6 comes back unbracketed."""
    got = f"expected {expected}, got {quote(text)}"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidValue(f"{got} (no closing ']')")
        host, rest = text[1:end], text[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise InvalidValue(f"{got} (not an IPv6 address inside [])") from None
        if rest and not rest.startswith(":"):
            raise InvalidValue(got)
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise InvalidValue(f"{got} (write IPv6 addresses as [address]:port)")
        host, colon, port_text_raw = text.partition(":")
        if port_required and not colon:
            raise InvalidValue(got)
        port_text = port_text_raw if colon else None
        checked = _check_host(host)
        if checked is None:
            raise InvalidValue(f"{got} (not an IPv4 address, [IPv6] address or hostname)")
        host = checked
    if port_text is None:
        if port_required:
            raise InvalidValue(got)
        return host, None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise InvalidValue(f"{got} (port must be 1..65535)")
    return host, int(port_text)


def _check_host(host: str) -> str | None:
    """The host if it is a valid IPv4 address or RFC 1123 hostname, else ``None``."""
    if _NUMERIC_HOST.fullmatch(host):
        # All digits and dots is meant as an IPv4 address: "10.0.0.256" is not a hostname.
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            return None
    if len(host) <= 253 and _HOSTNAME.fullmatch(host):
        return host
    return None


def media_ip(text: str) -> str:
    """A unicast IP address, written into SDP ``c=`` lines."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        hint = " (no [] brackets here)" if text.startswith("[") else ""
        raise InvalidValue(f"expected an IP address, got {quote(text)}{hint}") from None
    if address.is_unspecified or address.is_multicast:
        # It is written into SDP c= lines: 0.0.0.0 there means "on hold", not "any".
        raise InvalidValue(f"must be a unicast address peers can send RTP to, got {quote(text)}")
    return str(address)


def sip_uri(text: str) -> str:
    """Check ``sip:``/``sips:`` URI syntax as far as routing needs it: scheme and host."""
    scheme = _SIP_SCHEME.match(text)
    if scheme is None:
        raise InvalidValue(f'expected a "sip:" or "sips:" URI, got {quote(text)}')
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise InvalidValue(f"URI contains whitespace or control characters: {quote(text)}")
    rest = text[scheme.end() :]
    at = rest.find("@")
    if at == 0:
        raise InvalidValue(f"URI has an empty user part: {quote(text)}")
    hostport = re.split(r"[;?]", rest[at + 1 :], maxsplit=1)[0]
    if not hostport:
        raise InvalidValue(f"URI has no host: {quote(text)}")
    try:
        _host_port(hostport, '"host[:port]"', port_required=False)
    except InvalidValue:
        raise InvalidValue(f"URI host is not a valid host[:port]: {quote(text)}") from None
    return text


def user_id(text: str) -> str:
    """A line's user: digits with an optional leading ``+``."""
    if not _USER_ID.fullmatch(text):
        raise InvalidValue(f"expected digits with an optional leading '+', got {quote(text)}")
    return text


# --------------------------------------------------------------------------- messages


def choice_reason(value: str, choices: tuple[str, ...]) -> str:
    options = ", ".join(quote(choice) for choice in choices)
    return f"expected one of {options}, got {quote(value)}"


def quote(text: str) -> str:
    """A value as a message quotes it: JSON-escaped, cut to a readable length."""
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def show(value: object) -> str:
    """A TOML value as an error message shows it: its TOML type, then a short rendering."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        kind = type(value).__name__
        return f"{'date-time' if kind == 'datetime' else kind} {value.isoformat()}"
    return type(value).__name__


def _one_line(text: str) -> str:
    """Escape anything that is not printable, so a message is always one line."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
