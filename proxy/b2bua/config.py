"""The B2BUA's configuration file: TOML in, typed frozen dataclasses out.

The file format is a contract: operators write it by hand, and tests and provisioning
tooling generate it (see ``conf/proxy.example.toml`` for every key). So the loader is
strict and loud:

* every value is type-checked (a quoted ``"500"`` where an integer is wanted is an error,
  never silently coerced), and every semantic rule is checked before anything binds a
  socket, so a bad file fails at start-up, not on the first call;
* unknown tables and keys are errors, because a typo (``lisen``) that is ignored turns
  into a proxy that runs with a default nobody asked for. The only exceptions are the
  names another module gives meaning to (``[xsipura]`` and the per-line x-sipura keys):
  they are accepted and kept raw in ``extra``;
* every failure is a :class:`ConfigError` whose text is one line,
  ``FILE: KEY: what is wrong``, so the CLI can print it and exit 2 (it is a
  :class:`~proxy.errors.UsageError`) and scripts can grep it.

Nothing here touches the network: host names are checked for syntax only, because
resolving them belongs to start-up, where a failure can be retried or reported with
the resolver's own reason.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

from proxy import __version__
from proxy.errors import UsageError

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "LineConfig",
    "LogConfig",
    "MediaConfig",
    "SideConfig",
    "SipConfig",
    "load_config",
    "parse_config",
]

T = TypeVar("T")

UNKNOWN_USERS_CHOICES: Final = ("relay", "reject")
TRANSPORT_CHOICES: Final = ("udp", "tcp")
LOG_LEVEL_CHOICES: Final = ("debug", "info", "warning", "error")
LOG_FORMAT_CHOICES: Final = ("text", "json")
DEFAULT_USER_AGENT: Final = f"sipura-proxy/{__version__}"

MEDIA_PORT_FLOOR: Final = 1024
"""Below this are the privileged / well-known ports: never an RTP allocation range."""

_EXTRA_TABLES: Final = frozenset({"xsipura"})
MIN_PAIRS_PER_WORKER: Final = 4
"""RTP/RTCP pairs each media worker's slice of the port range must hold."""
_EXTRA_LINE_KEYS: Final = frozenset(
    {"mini_certificate", "srtp_private_key", "secure_by_default", "require_secure"}
)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_USER_ID = re.compile(r"\+?[0-9]+")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMERIC_HOST = re.compile(r"[0-9.]+")
_SIP_SCHEME = re.compile(r"(?i)sips?:")
_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$")
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


# --------------------------------------------------------------------------- dataclasses


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class SideConfig:
    """One side of the B2BUA: ``[inside]`` (the legacy phones) or ``[outside]``.

    Both sides share one class so the SIP layer handles them alike; ``upstream`` and
    ``registrar`` are only ever set on the outside and ``unknown_users`` only matters on
    the inside (the parser rejects the keys on the other side). Hosts are stored without
    IPv6 brackets. ``advertise_host`` / ``advertise_port`` are ``None`` when not
    configured: use :attr:`advertised`, which falls back to the listen address.
    """

    listen_host: str
    listen_port: int
    media_ip: str
    advertise_host: str | None = None
    advertise_port: int | None = None
    upstream: str | None = None
    registrar: str | None = None
    unknown_users: str = "relay"

    @property
    def advertised(self) -> tuple[str, int]:
        """The (host, port) to put in Via and Contact: ``advertise`` if set, else listen."""
        host = self.advertise_host if self.advertise_host is not None else self.listen_host
        port = self.advertise_port if self.advertise_port is not None else self.listen_port
        return host, port


@dataclass(frozen=True)
class MediaConfig:
    """RTP relay ports: pairs ``(even RTP, odd RTCP)`` drawn from ``port_min..port_max``."""

    port_min: int = 20000
    port_max: int = 29999
    rtp_timeout_s: int = 0
    """Hang up a call whose media has been silent this long; 0 disables the check."""
    workers: int | None = None
    """Media worker processes, each with an even share of the ports; 0: relay in the
    signalling process; None (``"auto"``): one per core (:meth:`worker_count`)."""

    @property
    def port_pairs(self) -> int:
        """How many RTP/RTCP pairs the inclusive range holds."""
        return (self.port_max - self.port_min + 1) // 2

    def worker_count(self, cpus: int | None = None) -> int:
        """The number of worker processes to run: ``workers``, or for ``"auto"`` one per
        core (``cpus``, default ``os.cpu_count()``) as far as the port range gives each
        at least :data:`MIN_PAIRS_PER_WORKER` pairs (0 when it cannot give even one)."""
        if self.workers is not None:
            return self.workers
        cpus = cpus if cpus is not None else (os.cpu_count() or 1)
        return max(0, min(cpus, self.port_pairs // MIN_PAIRS_PER_WORKER))


@dataclass(frozen=True)
class SipConfig:
    """SIP protocol knobs. Timers are RFC 3261 §17's T1/T2/T4, in milliseconds."""

    t1_ms: int = 500
    t2_ms: int = 4000
    t4_ms: int = 5000
    transports: tuple[str, ...] = TRANSPORT_CHOICES
    user_agent: str | None = DEFAULT_USER_AGENT
    """``None`` (configured as ``""``) means no User-Agent/Server header at all."""
    max_forwards: int = 70
    max_message_bytes: int = 65535
    """A larger message is answered 413 (when it can be) and never processed."""
    tcp_idle_timeout_s: int = 600
    """A TCP connection silent both ways this long is closed (registered flows excepted)."""


@dataclass(frozen=True)
class LineConfig:
    """One legacy phone line.

    ``user_key`` is ``user_id`` without a leading ``+``: phones and PBXs disagree on
    whether E.164 numbers carry it, so lookups and duplicate checks use the key.
    ``extra`` holds the per-line x-sipura keys, raw, until the secure-call issue gives
    them meaning.
    """

    user_id: str
    user_key: str
    contact: str | None = None
    extra: Mapping[str, Any] = field(default_factory=_empty_mapping)


@dataclass(frozen=True)
class LogConfig:
    """Logging: ``level`` is a stdlib logging level name, ``format`` ``text`` or ``json``."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class LimitsConfig:
    """Admission limits; ``max_calls`` 0 means unlimited."""

    max_calls: int = 0
    max_tcp_connections: int | None = None
    """Accepted TCP connections per listener (as many opened); None (``"auto"``): from
    the descriptor limit (:func:`proxy.sip.connections.auto_max_connections`)."""
    max_tcp_connections_per_source: int = 50


@dataclass(frozen=True)
class AdminConfig:
    """The optional status endpoint; disabled when ``listen_host`` is ``None``."""

    listen_host: str | None = None
    listen_port: int | None = None

    @property
    def enabled(self) -> bool:
        return self.listen_host is not None


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration.

    Built by :func:`parse_config` / :func:`load_config`, which do all the checking;
    constructing one directly (as tests may) trusts the caller. ``extra`` mirrors the
    accepted-but-not-yet-meaningful TOML entries at their TOML paths, e.g.
    ``extra["xsipura"]`` (the whole table) or ``extra["line"]``; it and
    every mapping in it are read-only. ``source`` is the file name used in messages.
    """

    inside: SideConfig
    outside: SideConfig
    media: MediaConfig = field(default_factory=MediaConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    lines: tuple[LineConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    extra: Mapping[str, Any] = field(default_factory=_empty_mapping)
    source: str = "<string>"
    _by_key: Mapping[str, LineConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Index once: every INVITE and REGISTER from the inside looks its line up.
        index = {line.user_key: line for line in reversed(self.lines)}
        object.__setattr__(self, "_by_key", MappingProxyType(index))

    def line_for_user(self, user: str) -> LineConfig | None:
        """The line whose ``user_key`` is ``user`` with any leading ``+`` removed."""
        return self._by_key.get(user.removeprefix("+"))


# --------------------------------------------------------------------------- entry points


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; the path as given names it in errors."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "cannot read", exc.strerror or str(exc)) from None
    try:
        # utf-8-sig: editors on Windows prepend a BOM that tomllib would call a syntax error.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(source, f"line {line}", "not valid UTF-8 text") from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate configuration text; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(text, source, exc) from None
    except RecursionError:
        # tomllib recurses per nested array / inline table; hostile depth must not crash.
        raise ConfigError(source, "line 1", "values nested too deeply") from None
    return _build(source, data)


def _syntax_error(text: str, source: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    # Python 3.11's TOMLDecodeError has no lineno attribute: the position is in the text.
    message = str(exc)
    match = _TOML_POSITION.search(message)
    if match is None:
        return ConfigError(source, "syntax", message)
    reason = message[: match.start()]
    if match.group(1) is not None:
        return ConfigError(source, f"line {match.group(1)}", f"{reason} (column {match.group(2)})")
    last = text.replace("\r\n", "\n").count("\n") + 1
    return ConfigError(source, f"line {last}", f"{reason} (at end of file)")


# --------------------------------------------------------------------------- building


def _build(source: str, data: Mapping[str, Any]) -> Config:
    root = _Table(source, "", data)
    root.check_keys(
        ("inside", "outside", "media", "sip", "line", "log", "limits", "admin", *_EXTRA_TABLES)
    )
    extra: dict[str, Any] = {}
    for name in sorted(_EXTRA_TABLES):
        if name in data:
            extra[name] = root.table(name).data

    inside = _side(root.table(name="inside", required=True), inside=True)
    outside = _side(root.table(name="outside", required=True), inside=False)
    _check_distinct_listen(source, inside, outside)
    media = _media(root.table("media"), root.table("limits"))
    sip = _sip(root.table("sip"))
    lines = _lines(root)
    log = _log(root.table("log"))
    limits = _limits(root.table("limits"), extra, inside, outside, media)
    admin = _admin(root.table("admin"), inside, outside)
    return Config(
        inside=inside,
        outside=outside,
        media=media,
        sip=sip,
        lines=lines,
        log=log,
        limits=limits,
        admin=admin,
        extra=_freeze(extra),
        source=source,
    )


def _side(t: _Table, *, inside: bool) -> SideConfig:
    only_inside = ("unknown_users",)
    only_outside = ("upstream", "registrar")
    own, other = (only_inside, only_outside) if inside else (only_outside, only_inside)
    elsewhere = {name: "outside" if inside else "inside" for name in other}
    t.check_keys(("listen", "media_ip", "advertise", *own), elsewhere)

    listen_host, listen_port = t.parse("listen", _host_port_required, required=True)
    media_ip = t.parse("media_ip", _media_ip, required=True)
    advertise_host: str | None = None
    advertise_port: int | None = None
    if t.has("advertise"):
        advertise_host, advertise_port = t.parse("advertise", _host_optional_port)
    return SideConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        media_ip=media_ip,
        advertise_host=advertise_host,
        advertise_port=advertise_port,
        upstream=t.parse("upstream", _sip_uri) if t.has("upstream") else None,
        registrar=t.parse("registrar", _sip_uri) if t.has("registrar") else None,
        unknown_users=t.choice("unknown_users", UNKNOWN_USERS_CHOICES, "relay")
        if inside
        else "relay",
    )


def _check_distinct_listen(source: str, inside: SideConfig, outside: SideConfig) -> None:
    # One socket cannot serve both sides: the side a message came from is the socket it
    # arrived on, so sharing an address would merge the trust boundary.
    if _same_socket(inside.listen_host, inside.listen_port, outside):
        raise ConfigError(source, "outside.listen", "same address and port as inside.listen")


def _same_socket(host: str, port: int, side: SideConfig) -> bool:
    if port != side.listen_port:
        return False
    wildcard = ("0.0.0.0", "::")  # noqa: S104 - comparing, not binding
    return host == side.listen_host or host in wildcard or side.listen_host in wildcard


def _workers(t: _Table, media: MediaConfig) -> MediaConfig:
    """``workers``: an integer >= 0 or ``"auto"``; each worker needs a slice of at least
    :data:`MIN_PAIRS_PER_WORKER` port pairs."""
    value = t.data["workers"]
    if value == "auto":
        return media
    if isinstance(value, str):
        raise t.error("workers", f'expected an integer >= 0 or "auto", got {_show(value)}')
    workers = t.integer("workers", 0, minimum=0)
    if workers and media.port_pairs // workers < MIN_PAIRS_PER_WORKER:
        room = media.port_pairs // MIN_PAIRS_PER_WORKER
        raise t.error(
            "workers",
            f"{workers} workers need {MIN_PAIRS_PER_WORKER} RTP/RTCP port pairs each; "
            f"media.port_min..port_max holds {media.port_pairs} (room for {room})",
        )
    return replace(media, workers=workers)


def _media(t: _Table, limits: _Table) -> MediaConfig:
    t.check_keys(("port_min", "port_max", "rtp_timeout_s", "workers"))
    port_min = t.integer("port_min", 20000)
    if port_min < MEDIA_PORT_FLOOR or port_min % 2 or port_min > 65535:
        raise t.error("port_min", f"must be an even number >= {MEDIA_PORT_FLOOR}, got {port_min}")
    port_max = t.integer("port_max", 29999)
    if port_max > 65535:
        raise t.error("port_max", f"must be <= 65535, got {port_max}")
    if port_max <= port_min:
        raise t.error("port_max", f"must be greater than media.port_min ({port_min})")
    media = MediaConfig(port_min, port_max, t.integer("rtp_timeout_s", 0, minimum=0))
    if media.port_pairs < 2:
        # One call holds a pair on each leg, so fewer than two pairs can carry nothing.
        raise t.error(
            "port_max",
            f"range {port_min}..{port_max} holds {media.port_pairs} RTP/RTCP port pair; "
            "at least 2 are needed",
        )
    if t.has("workers"):
        media = _workers(t, media)
    elif limits.has("workers"):  # the key's first home, still accepted
        media = _workers(limits, media)
    return media


def _sip(t: _Table) -> SipConfig:
    t.check_keys(("t1_ms", "t2_ms", "t4_ms", "transports", "user_agent", "max_forwards",
                  "max_message_bytes", "tcp_idle_timeout_s"))  # fmt: skip
    t1 = t.integer("t1_ms", 500, minimum=1)
    t2 = t.integer("t2_ms", 4000, minimum=1)
    if t2 < t1:
        # T2 caps the retransmit interval, which starts at T1 (RFC 3261 §17.1.2.2).
        raise t.error("t2_ms", f"must be >= sip.t1_ms ({t1}), got {t2}")
    t4 = t.integer("t4_ms", 5000, minimum=1)
    user_agent = t.string("user_agent", DEFAULT_USER_AGENT)
    if any(not ch.isprintable() for ch in user_agent):
        # It is copied into a header: a CR/LF would let the file inject SIP headers.
        raise t.error("user_agent", "must be printable text on one line")
    return SipConfig(
        t1_ms=t1,
        t2_ms=t2,
        t4_ms=t4,
        transports=_transports(t),
        user_agent=user_agent.strip() or None,
        max_forwards=t.integer("max_forwards", 70, minimum=1, maximum=255),
        max_message_bytes=t.integer("max_message_bytes", 65535, minimum=1500, maximum=1 << 20),
        tcp_idle_timeout_s=t.integer("tcp_idle_timeout_s", 600, minimum=1),
    )


def _transports(t: _Table) -> tuple[str, ...]:
    if not t.has("transports"):
        return TRANSPORT_CHOICES
    items = t.array("transports")
    if not items:
        raise t.error("transports", 'must name at least one of "udp", "tcp"')
    seen: list[str] = []
    for index, item in enumerate(items):
        key = f"{t.key('transports')}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(t.source, key, f"expected a string, got {_show(item)}")
        if item not in TRANSPORT_CHOICES:
            raise ConfigError(t.source, key, _choice_reason(item, TRANSPORT_CHOICES))
        if item in seen:
            raise ConfigError(t.source, key, f"{_quote(item)} is listed twice")
        seen.append(item)
    return tuple(seen)


def _log(t: _Table) -> LogConfig:
    t.check_keys(("level", "format"))
    return LogConfig(
        level=t.choice("level", LOG_LEVEL_CHOICES, "info"),
        format=t.choice("format", LOG_FORMAT_CHOICES, "text"),
    )


def _lines(root: _Table) -> tuple[LineConfig, ...]:
    if not root.has("line"):
        return ()
    raw = root.data["line"]
    if not isinstance(raw, list):
        raise root.error("line", f"expected an array of tables ([[line]]), got {_show(raw)}")
    lines: list[LineConfig] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(raw):
        path = f"line[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(root.source, path, f"expected a table, got {_show(item)}")
        t = _Table(root.source, path, item)
        t.check_keys(("user_id", "contact", *_EXTRA_LINE_KEYS))
        raw_id = item.get("user_id")
        if isinstance(raw_id, int | float) and not isinstance(raw_id, bool):
            raise t.error(
                "user_id",
                f"expected a string, got {_show(raw_id)} "
                "(quote it: a number loses leading zeros and '+')",
            )
        user_id = t.parse("user_id", _user_id, required=True)
        user_key = user_id.removeprefix("+")
        if user_key in first_index:
            raise t.error("user_id", f"duplicate of line[{first_index[user_key]}]")
        first_index[user_key] = index
        extra = {name: item[name] for name in sorted(_EXTRA_LINE_KEYS) if name in item}
        lines.append(
            LineConfig(
                user_id=user_id,
                user_key=user_key,
                contact=t.parse("contact", _sip_uri) if t.has("contact") else None,
                extra=_freeze(extra),
            )
        )
    return tuple(lines)


def _limits(
    t: _Table, extra: dict[str, Any], inside: SideConfig, outside: SideConfig, media: MediaConfig
) -> LimitsConfig:
    t.check_keys(("max_calls", "workers", "max_tcp_connections",
                  "max_tcp_connections_per_source"))  # fmt: skip
    max_calls = t.integer("max_calls", 0, minimum=0)
    # Each call holds one port pair per leg; when both legs' media share an address the
    # two pairs come from the same range, so the limit can never be reached past this.
    capacity = media.port_pairs // 2 if inside.media_ip == outside.media_ip else media.port_pairs
    if max_calls > capacity:
        raise t.error(
            "max_calls",
            f"{max_calls} calls need more RTP port pairs than media.port_min..port_max "
            f"holds (room for {capacity} calls)",
        )
    tcp = t.data.get("max_tcp_connections", "auto")
    if isinstance(tcp, str) and tcp != "auto":
        raise t.error(
            "max_tcp_connections", f'expected an integer >= 1 or "auto", got {_show(tcp)}'
        )
    return LimitsConfig(
        max_calls=max_calls,
        max_tcp_connections=None
        if tcp == "auto"
        else t.integer("max_tcp_connections", 0, minimum=1),
        max_tcp_connections_per_source=t.integer("max_tcp_connections_per_source", 50, minimum=1),
    )


def _admin(t: _Table, inside: SideConfig, outside: SideConfig) -> AdminConfig:
    t.check_keys(("listen",))
    if not t.has("listen"):
        return AdminConfig()
    host, port = t.parse("listen", _host_port_required)
    for name, side in (("inside", inside), ("outside", outside)):
        if _same_socket(host, port, side):
            raise t.error("listen", f"same address and port as {name}.listen")
    return AdminConfig(listen_host=host, listen_port=port)


# --------------------------------------------------------------------------- table access


class _Invalid(Exception):
    """A value parser's complaint; :meth:`_Table.parse` adds file and key."""


class _Table:
    """One TOML table plus its dotted path, so every complaint names the exact key."""

    def __init__(self, source: str, path: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.data = data

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

    def keep_extra(self, names: Collection[str], extra: dict[str, Any]) -> None:
        kept = {name: self.data[name] for name in sorted(names) if name in self.data}
        if kept:
            extra[self.path] = kept

    def table(self, name: str, *, required: bool = False) -> _Table:
        if name not in self.data:
            if required:
                raise self.error(name, f"missing (the [{self.key(name)}] table is required)")
            return _Table(self.source, self.key(name), {})
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {_show(value)}")
        return _Table(self.source, self.key(name), value)

    def _get(self, name: str, kind: type[T], article: str) -> T:
        value = self.data[name]
        # bool is an int subclass in Python, but `true` is never a valid number here.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"expected {article}, got {_show(value)}")
        return value

    def string(self, name: str, default: str) -> str:
        return self._get(name, str, "a string") if name in self.data else default

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

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        if name not in self.data:
            return default
        value = self._get(name, str, "a string")
        if value not in choices:
            raise self.error(name, _choice_reason(value, choices))
        return value

    def parse(self, name: str, parser: Callable[[str], T], *, required: bool = False) -> T:
        """Type-check a string value and run ``parser`` on it, blaming this key on failure.

        Callers test :meth:`has` for optional keys; ``required`` words the missing case.
        """
        if name not in self.data:
            raise self.error(name, "missing (required)" if required else "missing")
        try:
            return parser(self._get(name, str, "a string"))
        except _Invalid as exc:
            raise self.error(name, str(exc)) from None


# --------------------------------------------------------------------------- value parsers


def _host_port_required(text: str) -> tuple[str, int]:
    host, port = _host_port(text, '"host:port"', port_required=True)
    assert port is not None  # port_required guarantees it
    return host, port


def _host_optional_port(text: str) -> tuple[str, int | None]:
    return _host_port(text, '"host" or "host:port"', port_required=False)


def _host_port(text: str, expected: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split ``host[:port]``: IPv4, ``[IPv6]`` or a hostname; IPv6 comes back unbracketed."""
    got = f"expected {expected}, got {_quote(text)}"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid(f"{got} (no closing ']')")
        host, rest = text[1:end], text[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _Invalid(f"{got} (not an IPv6 address inside [])") from None
        if rest and not rest.startswith(":"):
            raise _Invalid(got)
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise _Invalid(f"{got} (write IPv6 addresses as [address]:port)")
        host, colon, port_text_raw = text.partition(":")
        if port_required and not colon:
            raise _Invalid(got)
        port_text = port_text_raw if colon else None
        checked = _check_host(host)
        if checked is None:
            raise _Invalid(f"{got} (not an IPv4 address, [IPv6] address or hostname)")
        host = checked
    if port_text is None:
        if port_required:
            raise _Invalid(got)
        return host, None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _Invalid(f"{got} (port must be 1..65535)")
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


def _media_ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        hint = " (no [] brackets here)" if text.startswith("[") else ""
        raise _Invalid(f"expected an IP address, got {_quote(text)}{hint}") from None
    if address.is_unspecified or address.is_multicast:
        # It is written into SDP c= lines: 0.0.0.0 there means "on hold", not "any".
        raise _Invalid(f"must be a unicast address peers can send RTP to, got {_quote(text)}")
    return str(address)


def _sip_uri(text: str) -> str:
    """Check ``sip:``/``sips:`` URI syntax as far as routing needs it: scheme and host."""
    scheme = _SIP_SCHEME.match(text)
    if scheme is None:
        raise _Invalid(f'expected a "sip:" or "sips:" URI, got {_quote(text)}')
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise _Invalid(f"URI contains whitespace or control characters: {_quote(text)}")
    rest = text[scheme.end() :]
    at = rest.find("@")
    if at == 0:
        raise _Invalid(f"URI has an empty user part: {_quote(text)}")
    hostport = re.split(r"[;?]", rest[at + 1 :], maxsplit=1)[0]
    if not hostport:
        raise _Invalid(f"URI has no host: {_quote(text)}")
    try:
        _host_port(hostport, '"host[:port]"', port_required=False)
    except _Invalid:
        raise _Invalid(f"URI host is not a valid host[:port]: {_quote(text)}") from None
    return text


def _user_id(text: str) -> str:
    if not _USER_ID.fullmatch(text):
        raise _Invalid(f"expected digits with an optional leading '+', got {_quote(text)}")
    return text


# --------------------------------------------------------------------------- helpers


def _choice_reason(value: str, choices: tuple[str, ...]) -> str:
    options = ", ".join(_quote(choice) for choice in choices)
    return f"expected one of {options}, got {_quote(value)}"


def _quote(text: str) -> str:
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def _show(value: object) -> str:
    """A TOML value as an error message shows it: its TOML type, then a short rendering."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
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


def _freeze(value: Any) -> Any:
    """Read-only copy of raw TOML data: a shared Config must not be mutable by accident."""
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value
