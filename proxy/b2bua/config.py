"""The B2BUA's configuration file: TOML in, typed frozen dataclasses out.

The file format is a contract: operators write it by hand, and tests and provisioning
tooling generate it (see ``conf/proxy.example.toml`` for every key). Every table and key,
``[xsipura]`` and the per-line x-sipura keys included, becomes a typed field, so the rest
of the code never sees raw TOML. The loader is strict and loud:

* every value is type-checked (a quoted ``"500"`` where an integer is wanted is an error,
  never silently coerced), and every semantic rule is checked before anything binds a
  socket, so a bad file fails at start-up, not on the first call;
* unknown tables and keys are errors, because a typo (``lisen``) that is ignored turns
  into a proxy that runs with a default nobody asked for;
* every failure is a :class:`ConfigError` whose text is one line,
  ``FILE: KEY: what is wrong``, so the CLI can print it and exit 2 (it is a
  :class:`~proxy.errors.UsageError`) and scripts can grep it.

Units are converted once, while parsing: the file's keys keep their unit in their name
(``t1_ms``, ``grace_ms``, ``rtp_timeout_s``), and every duration in the dataclasses is
seconds as a float (``t1_s``, ``grace_s``). File paths (``trusted_ca``, ``@path`` key
material) are resolved against the config file's directory; they are read later by
:mod:`proxy.b2bua.line_keys`, which loads the key material.

The schema is split by what a reader comes for, and this module is its one entry point
(every public name of the schema is importable from here):

* :mod:`proxy.b2bua.config_schema`: what a configuration holds (the dataclasses and
  their defaults, the allowed choices);
* :mod:`proxy.b2bua.config_tables`: how each table is read and checked (one parser per
  table, with its error messages);
* :mod:`proxy.b2bua.config_transport`: ``[tls]``, ``[dns]``, SDES and failover;
* :mod:`proxy.b2bua.config_reader`: the reading machinery (:class:`Table`, host and URI
  syntax) every key goes through;
* here: the file and its TOML syntax, the order the tables are built in (it decides
  which error a file with several gets), and the rules that join tables.

Nothing here touches the network: host names are checked for syntax only, because
resolving them belongs to start-up, where a failure can be retried or reported with
the resolver's own reason.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

from proxy.b2bua.config_reader import ConfigError, Table, quote
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
    Config,
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
from proxy.b2bua.config_tables import (
    admin_config,
    limits_config,
    lines_config,
    log_config,
    media_config,
    run_config,
    same_socket,
    side_config,
    sip_config,
    xsipura_config,
)
from proxy.b2bua.config_transport import (
    SDES_CHOICES,
    DnsConfig,
    TlsConfig,
    dns_config,
    tls_config,
    uses_tls,
)

# The schema's names are re-exported so `proxy.b2bua.config` stays the one import of the
# whole configuration for callers (and the constants the same objects as before the split).
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

_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$")


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
    """Every table, in a fixed order: the sides first (most tables are checked against
    them), SDES after ``[tls]`` (its default depends on it). The order decides which
    error a file with several mistakes reports, so it is part of the contract."""
    root.check_keys(
        ("inside", "outside", "media", "sip", "line", "log", "limits", "admin", "xsipura",
         "tls", "dns", "run")
    )  # fmt: skip
    inside = side_config(root.table(name="inside", required=True), inside=True)
    outside = side_config(root.table(name="outside", required=True), inside=False)
    _check_distinct_listen(root.source, inside, outside)
    media = media_config(root.table("media"), root.table("limits"))
    sip = sip_config(root.table("sip"))
    tls = tls_config(root.table("tls"))
    _check_tls(root, sip, tls, inside, outside)
    outside = _sdes(root.table("outside"), outside)
    return Config(
        inside=inside,
        outside=outside,
        media=media,
        sip=sip,
        lines=lines_config(root, outside),
        log=log_config(root.table("log")),
        limits=limits_config(root.table("limits"), inside, outside, media),
        admin=admin_config(root.table("admin"), inside, outside),
        xsipura=xsipura_config(root.table("xsipura")),
        tls=tls,
        dns=dns_config(root.table("dns")),
        run=run_config(root.table("run")),
        source=root.source,
    )


# --------------------------------------------------------------------------- rules across tables


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
            if same_socket(host, port, other):  # TCP and TLS listeners share TCP ports
                raise table.error("tls_listen", f"same address and port as {other_name}.listen")
    if inside.tls_listen is not None and outside.tls_listen is not None:
        as_listen = replace(inside, listen_host=inside.tls_listen[0],
                            listen_port=inside.tls_listen[1])  # fmt: skip
        if same_socket(*outside.tls_listen, as_listen):
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


def _check_distinct_listen(source: str, inside: SideConfig, outside: SideConfig) -> None:
    # One socket cannot serve both sides: the side a message came from is the socket it
    # arrived on, so sharing an address would merge the trust boundary.
    if same_socket(inside.listen_host, inside.listen_port, outside):
        raise ConfigError(source, "outside.listen", "same address and port as inside.listen")


def _outside_tls(outside: SideConfig) -> bool:
    """The outside leg runs over TLS: a TLS listener there, or a TLS upstream."""
    return outside.tls_listen is not None or any(uses_tls(u) for u in outside.upstream_uris)
