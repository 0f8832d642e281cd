"""The configuration schema: one typed, frozen dataclass per TOML table, with its defaults.

This is the module a reader looks up to learn what a configuration *holds*: every table
of the file (``conf/proxy.example.toml`` documents them for operators) is a dataclass
here, every key a field with the default the file falls back to, and every duration a
float of seconds (``t1_s``, ``grace_s``) whatever unit the file's key names (``t1_ms``).
File paths are already resolved against the config file's directory.

The classes trust whoever builds them: :func:`proxy.b2bua.config.parse_config` checks
every key (in :mod:`proxy.b2bua.config_tables`) before it builds one, and tests may build
them by hand. Keeping the checking out of this module is what keeps it short enough to
read as the schema; the choice lists and limits the checks use live here with the
fields they constrain, so a key's meaning and its allowed values are read together.
The ``[tls]`` and ``[dns]`` tables are in :mod:`proxy.b2bua.config_transport`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from proxy import __version__
from proxy.b2bua.config_transport import DnsConfig, TlsConfig
from proxy.b2bua.sources import Source
from proxy.media.tones import SECURE_CALL_TONE, Tone

__all__ = [
    "CALLERID_REFRESH_CHOICES",
    "DEFAULT_TRANSPORTS",
    "DEFAULT_USER_AGENT",
    "LATCH_CHOICES",
    "LOG_FORMAT_CHOICES",
    "LOG_LEVEL_CHOICES",
    "MEDIA_PORT_FLOOR",
    "MIN_PAIRS_PER_WORKER",
    "T38_CHOICES",
    "TRANSPORT_CHOICES",
    "UNKNOWN_USERS_CHOICES",
    "AdminConfig",
    "Config",
    "KeySource",
    "LimitsConfig",
    "LineConfig",
    "LogConfig",
    "MediaConfig",
    "RunConfig",
    "SideConfig",
    "SipConfig",
    "XsipuraConfig",
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

    Built by :func:`~proxy.b2bua.config.parse_config` /
    :func:`~proxy.b2bua.config.load_config`, which do all the checking; constructing one
    directly (as tests may) trusts the caller. ``source`` is the file name used in
    messages.
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
