"""The B2BUA's configuration file: TOML in, typed frozen dataclasses out.

The file format is a contract: operators write it by hand, and tests and provisioning
tooling generate it (see ``conf/proxy.example.toml`` for every key). This module is the
one place that knows it: every table and key, ``[xsipura]`` and the per-line x-sipura
keys included, becomes a typed field here, so the rest of the code never sees raw TOML.
The loader is strict and loud:

* every value is type-checked (a quoted ``"500"`` where an integer is wanted is an error,
  never silently coerced), and every semantic rule is checked before anything binds a
  socket, so a bad file fails at start-up, not on the first call;
* unknown tables and keys are errors, because a typo (``lisen``) that is ignored turns
  into a proxy that runs with a default nobody asked for;
* every failure is a :class:`ConfigError` whose text is one line,
  ``FILE: KEY: what is wrong``, so the CLI can print it and exit 2 (it is a
  :class:`~proxy.errors.UsageError`) and scripts can grep it.

Units are converted once, here: the file's keys keep their unit in their name
(``t1_ms``, ``grace_ms``, ``rtp_timeout_s``), and every duration in the dataclasses is
seconds as a float (``t1_s``, ``grace_s``). File paths (``trusted_ca``, ``@path`` key
material) are resolved here against the config file's directory; they are read later by
:mod:`proxy.b2bua.line_keys`, which loads the key material.

Nothing here touches the network: host names are checked for syntax only, because
resolving them belongs to start-up, where a failure can be retried or reported with
the resolver's own reason. The reading machinery (:class:`Table`, host and URI syntax)
is in :mod:`proxy.b2bua.config_reader`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final

from proxy import __version__
from proxy.b2bua.config_reader import (
    ConfigError,
    Table,
    choice_reason,
    host_optional_port,
    host_port,
    media_ip,
    quote,
    show,
    sip_uri,
    user_id,
)
from proxy.b2bua.config_transport import (
    SDES_CHOICES,
    DnsConfig,
    TlsConfig,
    dns_config,
    sip_uri_list,
    tls_config,
    uses_tls,
)
from proxy.b2bua.sources import Source
from proxy.media.engine import FAST_PATH_MODES
from proxy.media.tones import SECURE_CALL_TONE, Tone

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "KeySource",
    "LimitsConfig",
    "LineConfig",
    "LogConfig",
    "MediaConfig",
    "RunConfig",
    "SideConfig",
    "SipConfig",
    "TlsConfig",
    "XsipuraConfig",
    "load_config",
    "parse_config",
]

UNKNOWN_USERS_CHOICES: Final = ("relay", "reject")
LATCH_CHOICES: Final = ("auto", "sdp", "any")
T38_CHOICES: Final = ("refuse", "clear")
TRANSPORT_CHOICES: Final = ("udp", "tcp", "tls")
DEFAULT_TRANSPORTS: Final = ("udp", "tcp")
LOG_LEVEL_CHOICES: Final = ("debug", "info", "warning", "error")
LOG_FORMAT_CHOICES: Final = ("text", "json")
CALLERID_REFRESH_CHOICES: Final = ("update", "reinvite", "off")
DEFAULT_USER_AGENT: Final = f"sipura-proxy/{__version__}"

MEDIA_PORT_FLOOR: Final = 1024
"""Below this are the privileged / well-known ports: never an RTP allocation range."""

MIN_PAIRS_PER_WORKER: Final = 4
"""RTP/RTCP pairs each media worker's slice of the port range must hold."""

_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$")


# --------------------------------------------------------------------------- dataclasses


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
    """The first of :attr:`upstreams` (None: no upstream)."""
    registrar: str | None = None
    """The first of :attr:`registrars` (None: the proxy is the registrar)."""
    unknown_users: str = "relay"
    keepalive_s: float = 0.0
    """Inside only: OPTIONS to each registered contact detected behind NAT, over the flow
    it registered on, this often (0: off); a contact that stops answering is dropped."""
    tls_listen_host: str | None = None
    tls_listen_port: int | None = None
    """SIP over TLS listen address (``tls_listen``); None: no TLS listener on this side."""
    upstreams: tuple[str, ...] = ()
    """``upstream`` as configured, tried in order (failover on 503, 408, timeout or a
    transport failure). Use :attr:`upstream_uris`, which also covers ``upstream``
    set alone (a dataclass built by hand)."""
    registrars: tuple[str, ...] = ()
    sdes: str = "off"
    """Outside only: SDES-SRTP (RFC 4568) ``off``, ``offer`` or ``require``."""
    sdes_over_insecure_transport: bool = False
    """Outside only: allow SDES keys in SDP sent over UDP/TCP (they are readable there)."""
    failover_hold_down_s: float = 30.0
    """Outside only: a target that failed is skipped this long while others remain."""

    @property
    def upstream_uris(self) -> tuple[str, ...]:
        return self.upstreams or ((self.upstream,) if self.upstream else ())

    @property
    def registrar_uris(self) -> tuple[str, ...]:
        return self.registrars or ((self.registrar,) if self.registrar else ())

    @property
    def tls_listen(self) -> tuple[str, int] | None:
        if self.tls_listen_host is None or self.tls_listen_port is None:
            return None
        return self.tls_listen_host, self.tls_listen_port

    @property
    def advertised(self) -> tuple[str, int]:
        """The (host, port) to put in Via and Contact: ``advertise`` if set, else listen."""
        host = self.advertise_host if self.advertise_host is not None else self.listen_host
        port = self.advertise_port if self.advertise_port is not None else self.listen_port
        return host, port

    def advertised_for(self, transport: str) -> tuple[str, int]:
        """:attr:`advertised` for messages sent over ``transport``: over TLS, the TLS
        listener's port (a peer that opens a connection to our Contact, for its ACK or
        BYE, must reach the TLS listener, not the UDP/TCP one), on the advertised host
        if one is set. Without a TLS listener there is nothing better to say."""
        tls = self.tls_listen
        if transport != "tls" or tls is None:
            return self.advertised
        return (self.advertise_host if self.advertise_host is not None else tls[0]), tls[1]


@dataclass(frozen=True)
class MediaConfig:
    """RTP relay ports: pairs ``(even RTP, odd RTCP)`` drawn from ``port_min..port_max``."""

    port_min: int = 20000
    port_max: int = 29999
    rtp_timeout_s: float = 60.0
    """Hang up a call whose media has been silent this long; 0 disables the check."""
    rtp_timeout_onhold_s: float = 3600.0
    """The same for a call on hold (sendonly/inactive/0.0.0.0 in its last SDP)."""
    latch: str = "auto"
    """Which RTP source a stream latches to: ``sdp`` (the SDP address only), ``any``
    (the first packet from anywhere), ``auto`` (per leg: ``sdp`` when the SDP address is
    the address the SIP message came from, ``any`` otherwise: NAT)."""
    workers: int | None = None
    """Media worker processes, each with an even share of the ports; 0: relay in the
    signalling process; None (``"auto"``): one per core (:meth:`worker_count`)."""
    fast_path: str = "auto"
    """Who relays the packets: ``auto`` (the compiled packet path where the extension was
    built, else Python), ``on`` (the compiled path; refuse to start without it), ``off``
    (Python). See :mod:`proxy.media.packet_path`."""

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
    """SIP protocol knobs. Timers are RFC 3261 §17's T1/T2/T4, in seconds (the file's
    ``t1_ms``, ``t2_ms``, ``t4_ms`` divided by 1000)."""

    t1_s: float = 0.5
    t2_s: float = 4.0
    t4_s: float = 5.0
    transports: tuple[str, ...] = DEFAULT_TRANSPORTS
    user_agent: str | None = DEFAULT_USER_AGENT
    """``None`` (configured as ``""``) means no User-Agent/Server header at all."""
    max_forwards: int = 70
    max_message_bytes: int = 65535
    """A larger message is answered 413 (when it can be) and never processed."""
    tcp_idle_timeout_s: float = 600.0
    """A TCP connection silent both ways this long is closed (registered flows excepted)."""
    tcp_message_timeout_s: float = 10.0
    """A TCP message (headers and body) must arrive whole within this time of its first
    byte, and an accepted connection must deliver its first message this soon."""
    timer_c_s: float = 180.0
    """RFC 3261 §16.6 Timer C: a call ringing this long without a final answer is
    cancelled (408 to the caller); 0: off."""


@dataclass(frozen=True)
class XsipuraConfig:
    """``[xsipura]``: how the proxy runs the x-sipura secure-call protocol on the outside
    leg. Durations in seconds (the file's ``*_ms`` keys divided by 1000)."""

    trusted_ca: tuple[Path, ...] = ()
    """Files holding the CAs whose MCs peers may present, resolved against the config
    file's directory; loaded by :func:`proxy.b2bua.line_keys.load_security`."""
    grace_s: float = 2.0
    """Plain RTP from the peer is still accepted this long after the switch to SRTP."""
    handshake_timeout_s: float = 5.0
    """Stage 2 not completed in this time: the call stays clear (or, with
    ``require_secure``, is hung up)."""
    probe_unadvertised: bool = False
    """Try x-sipura even when the peer did not send ``Supported: x-sipura``."""
    callerid_refresh: str = "update"
    """How the phone learns the peer's name: ``update``, ``reinvite`` or ``off``."""
    srtcp: bool = False
    """Protect RTCP too (the profile relays RTCP in the clear by default)."""
    start_delay_s: float = 0.2
    """Stage 2 starts once the outside dialog is confirmed *and* media flows (profile
    §2); the proxy waits for the phone's first RTP packet, at least this long."""
    tone: Tone | None = SECURE_CALL_TONE
    """The secure-call indication tone (an SPA ToneScript); None: no tone."""
    t38: str = "refuse"
    """A T.38 re-offer on a secured call: ``refuse`` (488: the fax stays G.711 inside
    SRTP) or ``clear`` (UDPTL relayed unprotected; the call shows ``fax_clear``)."""


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a line's key material is: ``inline`` text from the file, or a ``path``
    (``@path`` in the file, resolved against the config file's directory). Exactly one is
    set. The inline text may be a private key: it is never part of a repr."""

    inline: str | None = field(default=None, repr=False)
    path: Path | None = None


@dataclass(frozen=True)
class LineConfig:
    """One legacy phone line.

    ``user_key`` is ``user_id`` without a leading ``+``: phones and PBXs disagree on
    whether E.164 numbers carry it, so lookups and duplicate checks use the key. A line
    with a ``mini_certificate`` always has an ``srtp_private_key`` too (the parser checks
    it); :mod:`proxy.b2bua.line_keys` loads and matches them.
    """

    user_id: str
    user_key: str
    contact: str | None = None
    mini_certificate: KeySource | None = None
    srtp_private_key: KeySource | None = field(default=None, repr=False)
    secure_by_default: bool = True
    """Calls from the phone are secured unless the user dials ``*19``."""
    require_secure: bool = False
    """Hang up both legs when a call cannot be secured."""
    allowed_sources: tuple[Source, ...] = ()
    """Sources besides the registered flows and the static contact that may use the
    line's identity (and its MC)."""


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
    max_streams_per_call: int = 4
    """Media streams (``m=`` lines) anchored per call; the others are declined (port 0)."""
    max_bindings_per_aor: int = 10
    """Contacts one address-of-record may register (RFC 3261 §10); also the most
    branches an inbound call forks into."""
    max_aors: int = 10000
    """Addresses-of-record with live bindings (lines and relayed users together)."""


@dataclass(frozen=True)
class AdminConfig:
    """The optional status endpoint; disabled when ``listen_host`` is ``None``."""

    listen_host: str | None = None
    listen_port: int | None = None
    token: str | None = None
    """``"@path"`` of a file (mode 0600) holding the bearer token, as written; read and
    checked by :func:`proxy.admin.routes.load_token`, relative to the config's directory."""

    @property
    def enabled(self) -> bool:
        return self.listen_host is not None


@dataclass(frozen=True)
class RunConfig:
    """Process lifecycle: ``drain_s`` is how long SIGTERM waits for calls to end."""

    drain_s: int = 30


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration.

    Built by :func:`parse_config` / :func:`load_config`, which do all the checking;
    constructing one directly (as tests may) trusts the caller. ``source`` is the file
    name used in messages.
    """

    inside: SideConfig
    outside: SideConfig
    media: MediaConfig = field(default_factory=MediaConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    lines: tuple[LineConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    xsipura: XsipuraConfig = field(default_factory=XsipuraConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    run: RunConfig = field(default_factory=RunConfig)
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
    """Read and validate a configuration file; the path as given names it in errors.

    Relative file paths inside it resolve against the file's own directory."""
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
    return parse_config(text, source, base_dir=Path(path).absolute().parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse and validate configuration text; ``source`` names it in error messages.

    Relative file paths resolve against ``base_dir``; by default the directory of
    ``source`` when it names a file, else (``"<string>"``) the working directory."""
    if base_dir is None:
        named = bool(source) and not source.startswith("<")
        base_dir = Path(source).absolute().parent if named else Path.cwd()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(text, source, exc) from None
    except RecursionError:
        # tomllib recurses per nested array / inline table; hostile depth must not crash.
        raise ConfigError(source, "line 1", "values nested too deeply") from None
    return _build(Table(source, "", data, base_dir.absolute()))


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


def _build(root: Table) -> Config:
    root.check_keys(
        ("inside", "outside", "media", "sip", "line", "log", "limits", "admin", "xsipura",
         "tls", "dns", "run")
    )  # fmt: skip
    inside = _side(root.table(name="inside", required=True), inside=True)
    outside = _side(root.table(name="outside", required=True), inside=False)
    _check_distinct_listen(root.source, inside, outside)
    media = _media(root.table("media"), root.table("limits"))
    sip = _sip(root.table("sip"))
    tls = tls_config(root.table("tls"))
    _check_tls(root, sip, tls, inside, outside)
    outside = _sdes(root.table("outside"), outside)
    return Config(
        inside=inside,
        outside=outside,
        media=media,
        sip=sip,
        lines=_lines(root, outside),
        log=_log(root.table("log")),
        limits=_limits(root.table("limits"), inside, outside, media),
        admin=_admin(root.table("admin"), inside, outside),
        xsipura=_xsipura(root.table("xsipura")),
        tls=tls,
        dns=dns_config(root.table("dns")),
        run=_run(root.table("run")),
        source=root.source,
    )


def _check_tls(
    root: Table, sip: SipConfig, tls: TlsConfig, inside: SideConfig, outside: SideConfig
) -> None:
    """A TLS listener needs "tls" in ``[sip] transports`` and a certificate; so does a
    TLS upstream (without the certificate: the proxy is only a client there)."""
    for name, side in (("inside", inside), ("outside", outside)):
        if side.tls_listen is None:
            continue
        table = root.table(name)
        if "tls" not in sip.transports:
            raise table.error("tls_listen", 'needs "tls" in sip.transports')
        if not tls.has_identity:
            raise table.error("tls_listen", "needs tls.certificate and tls.private_key")
        host, port = side.tls_listen
        for other_name, other in (("inside", inside), ("outside", outside)):
            if _same_socket(host, port, other):  # TCP and TLS listeners share TCP ports
                raise table.error("tls_listen", f"same address and port as {other_name}.listen")
    if inside.tls_listen is not None and outside.tls_listen is not None:
        as_listen = replace(inside, listen_host=inside.tls_listen[0],
                            listen_port=inside.tls_listen[1])  # fmt: skip
        if _same_socket(*outside.tls_listen, as_listen):
            raise root.table("outside").error("tls_listen", "same address and port as inside")
    table = root.table("outside")
    for key, uris in (("upstream", outside.upstream_uris), ("registrar", outside.registrar_uris)):
        for uri in uris:
            if uses_tls(uri) and "tls" not in sip.transports:
                raise table.error(key, f'{quote(uri)} needs "tls" in sip.transports')


def _sdes(t: Table, outside: SideConfig) -> SideConfig:
    """``sdes`` defaults to "offer" when the outside leg runs over TLS (a TLS listener or
    a TLS upstream), else "off"; SDES keys travel in the SDP, so offering them over
    plain UDP/TCP needs ``sdes_over_insecure_transport`` (and gets a warning)."""
    tls_outside = _outside_tls(outside)
    insecure_ok = t.boolean("sdes_over_insecure_transport", False)
    sdes = t.choice("sdes", SDES_CHOICES, "offer" if tls_outside else "off")
    if sdes != "off" and not tls_outside and not insecure_ok:
        raise t.error(
            "sdes",
            f'"{sdes}" sends SRTP keys in SDP, but the outside leg has no TLS '
            "(set tls_listen or a sips:/transport=tls upstream, or "
            "sdes_over_insecure_transport = true)",
        )
    return replace(outside, sdes=sdes, sdes_over_insecure_transport=insecure_ok)


def _side(t: Table, *, inside: bool) -> SideConfig:
    only_inside = ("unknown_users", "keepalive_s")
    only_outside = ("upstream", "registrar", "sdes", "sdes_over_insecure_transport",
                    "failover_hold_down_s")  # fmt: skip
    own, other = (only_inside, only_outside) if inside else (only_outside, only_inside)
    elsewhere = {name: "outside" if inside else "inside" for name in other}
    t.check_keys(("listen", "media_ip", "advertise", "tls_listen", *own), elsewhere)

    listen_host, listen_port = t.parse("listen", host_port, required=True)
    advertise_host: str | None = None
    advertise_port: int | None = None
    if t.has("advertise"):
        advertise_host, advertise_port = t.parse("advertise", host_optional_port)
    tls_host: str | None = None
    tls_port: int | None = None
    if t.has("tls_listen"):
        tls_host, tls_port = t.parse("tls_listen", host_port)
    upstreams = sip_uri_list(t, "upstream") if t.has("upstream") else ()
    registrars = sip_uri_list(t, "registrar") if t.has("registrar") else ()
    return SideConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        media_ip=t.parse("media_ip", media_ip, required=True),
        advertise_host=advertise_host,
        advertise_port=advertise_port,
        upstream=upstreams[0] if upstreams else None,
        registrar=registrars[0] if registrars else None,
        unknown_users=t.choice("unknown_users", UNKNOWN_USERS_CHOICES, "relay")
        if inside
        else "relay",
        keepalive_s=float(t.integer("keepalive_s", 30, minimum=0)) if inside else 0.0,
        tls_listen_host=tls_host,
        tls_listen_port=tls_port,
        upstreams=upstreams,
        registrars=registrars,
        failover_hold_down_s=float(t.integer("failover_hold_down_s", 30, minimum=0)),
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


def _workers(t: Table, media: MediaConfig) -> MediaConfig:
    """``workers``: an integer >= 0 or ``"auto"``; each worker needs a slice of at least
    :data:`MIN_PAIRS_PER_WORKER` port pairs."""
    value = t.data["workers"]
    if value == "auto":
        return media
    if isinstance(value, str):
        raise t.error("workers", f'expected an integer >= 0 or "auto", got {show(value)}')
    workers = t.integer("workers", 0, minimum=0)
    if workers and media.port_pairs // workers < MIN_PAIRS_PER_WORKER:
        room = media.port_pairs // MIN_PAIRS_PER_WORKER
        raise t.error(
            "workers",
            f"{workers} workers need {MIN_PAIRS_PER_WORKER} RTP/RTCP port pairs each; "
            f"media.port_min..port_max holds {media.port_pairs} (room for {room})",
        )
    return replace(media, workers=workers)


def _media(t: Table, limits: Table) -> MediaConfig:
    t.check_keys(("port_min", "port_max", "rtp_timeout_s", "rtp_timeout_onhold_s", "workers",
                  "latch", "fast_path"))  # fmt: skip
    port_min = t.integer("port_min", 20000)
    if port_min < MEDIA_PORT_FLOOR or port_min % 2 or port_min > 65535:
        raise t.error("port_min", f"must be an even number >= {MEDIA_PORT_FLOOR}, got {port_min}")
    port_max = t.integer("port_max", 29999)
    if port_max > 65535:
        raise t.error("port_max", f"must be <= 65535, got {port_max}")
    if port_max <= port_min:
        raise t.error("port_max", f"must be greater than media.port_min ({port_min})")
    rtp_timeout_s = float(t.integer("rtp_timeout_s", 60, minimum=0))
    onhold_s = float(t.integer("rtp_timeout_onhold_s", 3600, minimum=0))
    latch = t.choice("latch", LATCH_CHOICES, "auto")
    fast_path = t.choice("fast_path", FAST_PATH_MODES, "auto")
    media = MediaConfig(port_min, port_max, rtp_timeout_s, onhold_s, latch, fast_path=fast_path)
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


def _sip(t: Table) -> SipConfig:
    t.check_keys(("t1_ms", "t2_ms", "t4_ms", "transports", "user_agent", "max_forwards",
                  "max_message_bytes", "tcp_idle_timeout_s", "tcp_message_timeout_s",
                  "timer_c_s"))  # fmt: skip
    t1 = t.integer("t1_ms", 500, minimum=1)
    t2 = t.integer("t2_ms", 4000, minimum=1)
    if t2 < t1:
        # T2 caps the retransmit interval, which starts at T1 (RFC 3261 §17.1.2.2).
        raise t.error("t2_ms", f"must be >= sip.t1_ms ({t1}), got {t2}")
    user_agent = t.string("user_agent", DEFAULT_USER_AGENT)
    if any(not ch.isprintable() for ch in user_agent):
        # It is copied into a header: a CR/LF would let the file inject SIP headers.
        raise t.error("user_agent", "must be printable text on one line")
    return SipConfig(
        t1_s=t1 / 1000,
        t2_s=t2 / 1000,
        t4_s=t.milliseconds("t4_ms", 5000, minimum=1),
        transports=_transports(t),
        user_agent=user_agent.strip() or None,
        max_forwards=t.integer("max_forwards", 70, minimum=1, maximum=255),
        max_message_bytes=t.integer("max_message_bytes", 65535, minimum=1500, maximum=1 << 20),
        tcp_idle_timeout_s=float(t.integer("tcp_idle_timeout_s", 600, minimum=1)),
        tcp_message_timeout_s=float(t.integer("tcp_message_timeout_s", 10, minimum=1)),
        timer_c_s=float(t.integer("timer_c_s", 180, minimum=0)),
    )


def _transports(t: Table) -> tuple[str, ...]:
    if not t.has("transports"):
        return DEFAULT_TRANSPORTS
    items = t.array("transports")
    if not items:
        raise t.error("transports", 'must name at least one of "udp", "tcp", "tls"')
    seen: list[str] = []
    for index, item in enumerate(items):
        key = f"{t.key('transports')}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(t.source, key, f"expected a string, got {show(item)}")
        if item not in TRANSPORT_CHOICES:
            raise ConfigError(t.source, key, choice_reason(item, TRANSPORT_CHOICES))
        if item in seen:
            raise ConfigError(t.source, key, f"{quote(item)} is listed twice")
        seen.append(item)
    return tuple(seen)


def _log(t: Table) -> LogConfig:
    t.check_keys(("level", "format"))
    return LogConfig(
        level=t.choice("level", LOG_LEVEL_CHOICES, "info"),
        format=t.choice("format", LOG_FORMAT_CHOICES, "text"),
    )


def _lines(root: Table, outside: SideConfig) -> tuple[LineConfig, ...]:
    if not root.has("line"):
        return ()
    raw = root.data["line"]
    if not isinstance(raw, list):
        raise root.error("line", f"expected an array of tables ([[line]]), got {show(raw)}")
    lines: list[LineConfig] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(raw):
        path = f"line[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(root.source, path, f"expected a table, got {show(item)}")
        line = _line(root.item(path, item), sdes=outside.sdes != "off")
        if line.user_key in first_index:
            raise ConfigError(
                root.source, f"{path}.user_id", f"duplicate of line[{first_index[line.user_key]}]"
            )
        first_index[line.user_key] = index
        lines.append(line)
    return tuple(lines)


def _outside_tls(outside: SideConfig) -> bool:
    """The outside leg runs over TLS: a TLS listener there, or a TLS upstream."""
    return outside.tls_listen is not None or any(uses_tls(u) for u in outside.upstream_uris)


def _line(t: Table, *, sdes: bool) -> LineConfig:
    t.check_keys(
        ("user_id", "contact", "mini_certificate", "srtp_private_key", "secure_by_default",
         "require_secure", "allowed_sources")
    )  # fmt: skip
    raw_id = t.data.get("user_id")
    if isinstance(raw_id, int | float) and not isinstance(raw_id, bool):
        raise t.error(
            "user_id",
            f"expected a string, got {show(raw_id)} "
            "(quote it: a number loses leading zeros and '+')",
        )
    line_user = t.parse("user_id", user_id, required=True)
    mini_certificate = _key_source(t, "mini_certificate")
    srtp_private_key = _key_source(t, "srtp_private_key")
    require_secure = t.boolean("require_secure", False)
    if mini_certificate is None:
        # Without an MC x-sipura cannot secure the line: a key alone is a mistake, and so
        # is a policy when SDES cannot secure its calls either.
        if t.has("srtp_private_key"):
            raise t.error("srtp_private_key", "needs mini_certificate too")
        if t.has("require_secure") and not sdes:
            raise t.error("require_secure", "needs mini_certificate too (or outside.sdes)")
    elif srtp_private_key is None:
        raise t.error("srtp_private_key", "required with mini_certificate")
    return LineConfig(
        user_id=line_user,
        user_key=line_user.removeprefix("+"),
        contact=t.parse("contact", sip_uri) if t.has("contact") else None,
        mini_certificate=mini_certificate,
        srtp_private_key=srtp_private_key,
        secure_by_default=t.boolean("secure_by_default", True),
        require_secure=require_secure,
        allowed_sources=_allowed_sources(t),
    )


def _allowed_sources(t: Table) -> tuple[Source, ...]:
    """``["ip", "ip:port", "cidr"]``: sources that may use the line besides its phone."""
    if not t.has("allowed_sources"):
        return ()
    sources: list[Source] = []
    for index, item in enumerate(t.array("allowed_sources")):
        key = f"{t.key('allowed_sources')}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(t.source, key, f"expected a string, got {show(item)}")
        try:
            sources.append(Source.parse(item))
        except ValueError as exc:
            raise ConfigError(t.source, key, str(exc)) from None
    return tuple(sources)


def _key_source(t: Table, name: str) -> KeySource | None:
    """Inline base64 text, or ``@path``. The value is never quoted in an error: it may
    be a private key."""
    if not t.has(name):
        return None
    value = t.data[name]
    if not isinstance(value, str) or not value.strip():
        raise t.error(name, "expected a base64 string or @path")
    if value.startswith("@"):
        return KeySource(path=t.file_path(value[1:], t.key(name)))
    return KeySource(inline=value)


def _limits(t: Table, inside: SideConfig, outside: SideConfig, media: MediaConfig) -> LimitsConfig:
    t.check_keys(("max_calls", "workers", "max_tcp_connections",
                  "max_tcp_connections_per_source", "max_streams_per_call",
                  "max_bindings_per_aor", "max_aors"))  # fmt: skip
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
        raise t.error("max_tcp_connections", f'expected an integer >= 1 or "auto", got {show(tcp)}')
    return LimitsConfig(
        max_calls=max_calls,
        max_tcp_connections=None
        if tcp == "auto"
        else t.integer("max_tcp_connections", 0, minimum=1),
        max_tcp_connections_per_source=t.integer("max_tcp_connections_per_source", 50, minimum=1),
        max_streams_per_call=t.integer("max_streams_per_call", 4, minimum=1, maximum=64),
        max_bindings_per_aor=t.integer("max_bindings_per_aor", 10, minimum=1, maximum=1000),
        max_aors=t.integer("max_aors", 10000, minimum=1),
    )


def _admin(t: Table, inside: SideConfig, outside: SideConfig) -> AdminConfig:
    t.check_keys(("listen", "token"))
    token = t.string("token", "") or None
    if token is not None and (not token.startswith("@") or len(token) < 2):
        # A secret written into the config file would be readable wherever the config is.
        raise t.error("token", 'expected "@path" of a file holding the token')
    if not t.has("listen"):
        return AdminConfig(token=token)
    host, port = t.parse("listen", host_port)
    for name, side in (("inside", inside), ("outside", outside)):
        if _same_socket(host, port, side):
            raise t.error("listen", f"same address and port as {name}.listen")
    return AdminConfig(listen_host=host, listen_port=port, token=token)


def _run(t: Table) -> RunConfig:
    t.check_keys(("drain_s",))
    return RunConfig(drain_s=t.integer("drain_s", 30, minimum=0, maximum=3600))


def _xsipura(t: Table) -> XsipuraConfig:
    t.check_keys(
        ("trusted_ca", "grace_ms", "handshake_timeout_ms", "probe_unadvertised",
         "callerid_refresh", "srtcp", "start_delay_ms", "tone", "t38")
    )  # fmt: skip
    return XsipuraConfig(
        trusted_ca=_trusted_ca(t),
        grace_s=t.milliseconds("grace_ms", 2000),
        handshake_timeout_s=t.milliseconds("handshake_timeout_ms", 5000, minimum=1),
        probe_unadvertised=t.boolean("probe_unadvertised", False),
        callerid_refresh=t.choice("callerid_refresh", CALLERID_REFRESH_CHOICES, "update"),
        srtcp=t.boolean("srtcp", False),
        start_delay_s=t.milliseconds("start_delay_ms", 200),
        tone=_tone(t),
        t38=t.choice("t38", T38_CHOICES, "refuse"),
    )


def _trusted_ca(t: Table) -> tuple[Path, ...]:
    """A list of file paths; a single string is taken as a list of one."""
    if not t.has("trusted_ca"):
        return ()
    value = t.data["trusted_ca"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise t.error("trusted_ca", f"expected an array of file paths, got {show(value)}")
    paths: list[Path] = []
    for index, item in enumerate(items):
        key = f"{t.key('trusted_ca')}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(t.source, key, f"expected a file path, got {show(item)}")
        paths.append(t.file_path(item, key))
    return tuple(paths)


def _tone(t: Table) -> Tone | None:
    """``tone = false`` disables it; a string is an SPA ToneScript (as on the device's
    "Secure Call Indication Tone" setting); absent or ``true``: the SPA factory tone."""
    value = t.data.get("tone", True)
    if isinstance(value, bool):
        return SECURE_CALL_TONE if value else None
    if not isinstance(value, str):
        raise t.error("tone", f"expected a ToneScript string or false, got {show(value)}")
    try:
        return Tone.parse(value)
    except ValueError as exc:
        raise t.error("tone", f"not a ToneScript: {exc}") from None
