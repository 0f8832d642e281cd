"""The configuration schema's transport part: SIP over TLS, SDES, DNS and failover.

:mod:`proxy.b2bua.config` is the one entry point of the schema; it hands the tables
that say how the proxy *reaches* peers and protects what it sends them to this module,
so the schema stays one file per concern: ``[tls]`` (certificate, key, trust store,
peer verification, mutual TLS), ``[dns]`` (the servers RFC 3263 lookups go to) and the
``[outside]`` keys that choose SDES-SRTP (``sdes``, ``sdes_over_insecure_transport``)
and failover (``upstream`` as a list, ``failover_hold_down_s``). Like the rest of the
schema it checks syntax and consistency only: certificates and keys are read by
:mod:`proxy.b2bua.tls_keys` at start-up (and by ``run --check``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.b2bua.config_reader import ConfigError, InvalidValue, Table, host_port, show, sip_uri

__all__ = [
    "SDES_CHOICES",
    "DnsConfig",
    "DnsServer",
    "TlsConfig",
    "dns_config",
    "sip_uri_list",
    "tls_config",
    "uses_tls",
]

SDES_CHOICES: Final = ("off", "offer", "require")
"""``[outside] sdes``: never offer SDES keys, offer them beside plain RTP (best-effort,
RFC 4568 with ``RTP/AVP``), or offer ``RTP/SAVP`` only."""

DEFAULT_DNS_PORT: Final = 53


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: what the proxy presents and whom it trusts on SIP over TLS.

    Paths are resolved against the config file's directory; nothing is read here.
    ``private_key`` is the ``@path`` of a PEM key (0600, checked when it is loaded).
    ``client_certificate``: present a certificate when the proxy connects out (mutual
    TLS): False (default) none, True the ``certificate`` / ``private_key`` pair, or the
    path of a PEM file holding a client certificate chain and its key."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca: Path | None = None
    """A PEM bundle (file) or a hashed directory of CA certificates; None: the system
    store."""
    verify_peer: bool = True
    client_certificate: bool | Path = False
    handshake_timeout_s: float = 5.0

    @property
    def has_identity(self) -> bool:
        return self.certificate is not None and self.private_key is not None


@dataclass(frozen=True, slots=True)
class DnsServer:
    host: str
    port: int = DEFAULT_DNS_PORT


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[dns]``: where RFC 3263 lookups (NAPTR, SRV, A/AAAA) are sent."""

    servers: tuple[DnsServer, ...] = ()
    """Empty: the system's resolvers (``/etc/resolv.conf``)."""
    timeout_s: float = 2.0
    """One lookup (all its queries) gives up after this long: the name counts as failed."""


def tls_config(t: Table) -> TlsConfig:
    t.check_keys(
        ("certificate", "private_key", "ca", "verify_peer", "client_certificate",
         "handshake_timeout_ms")
    )  # fmt: skip
    certificate = _path(t, "certificate")
    private_key = _key_path(t)
    if (certificate is None) != (private_key is None):
        missing = "private_key" if private_key is None else "certificate"
        raise t.error(missing, "required with " + ("certificate" if certificate else "private_key"))
    client: bool | Path = False
    if t.has("client_certificate"):
        value = t.data["client_certificate"]
        if isinstance(value, bool):
            client = value
        elif isinstance(value, str) and value.strip():
            client = t.file_path(value.removeprefix("@"), t.key("client_certificate"))
        else:
            raise t.error(
                "client_certificate", f"expected true, false or a file path, got {show(value)}"
            )
    if client is True and certificate is None:
        raise t.error("client_certificate", "true needs tls.certificate and tls.private_key")
    return TlsConfig(
        certificate=certificate,
        private_key=private_key,
        ca=_path(t, "ca"),
        verify_peer=t.boolean("verify_peer", True),
        client_certificate=client,
        handshake_timeout_s=t.milliseconds("handshake_timeout_ms", 5000, minimum=1),
    )


def _path(t: Table, name: str) -> Path | None:
    if not t.has(name):
        return None
    value = t.data[name]
    if not isinstance(value, str):
        raise t.error(name, f"expected a file path, got {show(value)}")
    return t.file_path(value.removeprefix("@"), t.key(name))


def _key_path(t: Table) -> Path | None:
    """``private_key``: ``@path`` only. Key material is never written inline here: a PEM
    key in the config file would put the key wherever the config is copied."""
    if not t.has("private_key"):
        return None
    value = t.data["private_key"]
    if not isinstance(value, str) or not value.startswith("@") or len(value) < 2:
        raise t.error("private_key", 'expected "@path" of a PEM private key file')
    return t.file_path(value[1:], t.key("private_key"))


def dns_config(t: Table) -> DnsConfig:
    t.check_keys(("servers", "timeout_ms"))
    servers: list[DnsServer] = []
    if t.has("servers"):
        for index, item in enumerate(t.array("servers")):
            key = f"{t.key('servers')}[{index}]"
            if not isinstance(item, str):
                raise ConfigError(t.source, key, f"expected a string, got {show(item)}")
            servers.append(_dns_server(t.source, key, item))
    return DnsConfig(tuple(servers), t.milliseconds("timeout_ms", 2000, minimum=1))


def _dns_server(source: str, key: str, text: str) -> DnsServer:
    """``ip`` or ``ip:port`` (``[v6]:port``): a resolver is named by address, never by
    a name that would itself need resolving."""
    try:
        return DnsServer(str(ipaddress.ip_address(text)))
    except ValueError:
        pass
    try:
        host, port = host_port(text)
        ipaddress.ip_address(host)
    except (InvalidValue, ValueError):
        reason = f'expected an IP address or "ip:port", got {show(text)}'
        raise ConfigError(source, key, reason) from None
    return DnsServer(host, port)


def sip_uri_list(t: Table, name: str) -> tuple[str, ...]:
    """A SIP URI, or a non-empty list of them (tried in order: failover)."""
    value = t.data[name]
    if isinstance(value, str):
        return (t.parse(name, sip_uri),)
    if not isinstance(value, list) or not value:
        raise t.error(name, f"expected a SIP URI or a non-empty array of them, got {show(value)}")
    uris: list[str] = []
    for index, item in enumerate(value):
        key = f"{t.key(name)}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(t.source, key, f"expected a SIP URI, got {show(item)}")
        try:
            uris.append(sip_uri(item))
        except InvalidValue as exc:
            raise ConfigError(t.source, key, str(exc)) from None
    return tuple(uris)


def uses_tls(uri: str) -> bool:
    """A ``sips:`` URI or one with ``;transport=tls`` (RFC 3261 §26.2, RFC 5630)."""
    lowered = uri.lower()
    return lowered.startswith("sips:") or ";transport=tls" in lowered
