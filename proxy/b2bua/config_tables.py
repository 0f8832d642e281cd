"""The configuration's tables, one parser each: a TOML table in, its checked dataclass out.

:mod:`proxy.b2bua.config_schema` says what each table holds; this module is where each
key is read and checked, so every error message an operator can get about one key (the
text is a contract: scripts grep it) is written next to the key's parsing. A parser sees
only its own table, plus the few already-built sides and media settings its checks need
(a port range, a listen address); rules that join tables (TLS listeners against
transports, SDES against the outside leg's transport) are in :mod:`proxy.b2bua.config`,
which calls these in order. Units are converted here, once (``*_ms`` keys to seconds),
and nothing touches the network or reads a file: host names are checked for syntax.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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
from proxy.b2bua.config_schema import (
    CALLERID_REFRESH_CHOICES,
    DEFAULT_TRANSPORTS,
    DEFAULT_USER_AGENT,
    LATCH_CHOICES,
    LOG_FORMAT_CHOICES,
    LOG_LEVEL_CHOICES,
    MEDIA_PORT_FLOOR,
    MIN_PAIRS_PER_WORKER,
    T38_CHOICES,
    TRANSPORT_CHOICES,
    UNKNOWN_USERS_CHOICES,
    AdminConfig,
    KeySource,
    LimitsConfig,
    LineConfig,
    LogConfig,
    MediaConfig,
    RunConfig,
    SideConfig,
    SipConfig,
    XsipuraConfig,
)
from proxy.b2bua.config_transport import sip_uri_list
from proxy.b2bua.sources import Source
from proxy.media.engine import FAST_PATH_MODES
from proxy.media.tones import SECURE_CALL_TONE, Tone

__all__ = [
    "admin_config",
    "limits_config",
    "lines_config",
    "log_config",
    "media_config",
    "run_config",
    "same_socket",
    "side_config",
    "sip_config",
    "xsipura_config",
]


def side_config(t: Table, *, inside: bool) -> SideConfig:
    """``[inside]`` or ``[outside]``: one parser for both, as one class holds both, with
    each side's own keys refused on the other (named, so the fix is obvious). SDES is
    filled in later by :mod:`proxy.b2bua.config`: its default depends on ``[tls]``."""
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


def same_socket(host: str, port: int, side: SideConfig) -> bool:
    """Would binding ``host:port`` collide with ``side``'s listener? A wildcard address
    collides with every address on its port, which an equality test would miss."""
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


def media_config(t: Table, limits: Table) -> MediaConfig:
    """``[media]``; ``limits`` is read too because ``workers`` was first a ``[limits]``
    key and configs that still put it there must keep working."""
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


def sip_config(t: Table) -> SipConfig:
    """``[sip]``: the RFC 3261 timers (``*_ms`` in the file, seconds here), transports
    and the bounds on what a peer may send."""
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
    """``transports``: each item named in its own error (``sip.transports[1]``)."""
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


def log_config(t: Table) -> LogConfig:
    """``[log]``: choices checked here so a typo fails at start-up, not in logging."""
    t.check_keys(("level", "format"))
    return LogConfig(
        level=t.choice("level", LOG_LEVEL_CHOICES, "info"),
        format=t.choice("format", LOG_FORMAT_CHOICES, "text"),
    )


def lines_config(root: Table, outside: SideConfig) -> tuple[LineConfig, ...]:
    """``[[line]]``: each item named by its index; a user listed twice (``+`` ignored)
    is an error, because calls could only ever reach the first. ``outside`` tells
    whether SDES can secure a line that has no MC."""
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


def _line(t: Table, *, sdes: bool) -> LineConfig:
    """One ``[[line]]``: its user id must be a quoted string (a TOML number would lose
    leading zeros and ``+``), and its MC and private key come as a pair."""
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


def limits_config(
    t: Table, inside: SideConfig, outside: SideConfig, media: MediaConfig
) -> LimitsConfig:
    """``[limits]``; ``max_calls`` is checked against the port range, because a limit
    the ports can never reach is a mistake in the file, better reported at start-up."""
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


def admin_config(t: Table, inside: SideConfig, outside: SideConfig) -> AdminConfig:
    """``[admin]``: the token only as ``@path`` (never the secret itself), and a listen
    address that neither SIP side uses."""
    t.check_keys(("listen", "token"))
    token = t.string("token", "") or None
    if token is not None and (not token.startswith("@") or len(token) < 2):
        # A secret written into the config file would be readable wherever the config is.
        raise t.error("token", 'expected "@path" of a file holding the token')
    if not t.has("listen"):
        return AdminConfig(token=token)
    host, port = t.parse("listen", host_port)
    for name, side in (("inside", inside), ("outside", outside)):
        if same_socket(host, port, side):
            raise t.error("listen", f"same address and port as {name}.listen")
    return AdminConfig(listen_host=host, listen_port=port, token=token)


def run_config(t: Table) -> RunConfig:
    """``[run]``: ``drain_s`` bounded to an hour, so a stop always ends."""
    t.check_keys(("drain_s",))
    return RunConfig(drain_s=t.integer("drain_s", 30, minimum=0, maximum=3600))


def xsipura_config(t: Table) -> XsipuraConfig:
    """``[xsipura]``: the secure-call settings, ``*_ms`` keys converted to seconds."""
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
