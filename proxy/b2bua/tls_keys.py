"""SIP over TLS key material: the proxy's certificate and key, the trust store, loaded
and checked once at start-up (and by ``run --check``), turned into ``ssl`` contexts.

:mod:`proxy.b2bua.config` resolves the ``[tls]`` paths; this module reads them, as
:mod:`proxy.b2bua.line_keys` does for the x-sipura keys, so every problem is a one-line
:class:`ConfigError` naming the key before any socket is bound: an unreadable or
malformed certificate, an expired one, a private key that does not belong to it, a key
file readable by group or others (:mod:`proxy.keyperms`). The contexts use the standard
library's ``ssl`` (OpenSSL) with TLS 1.2 as the floor (RFC 3261 §26.3.1 names TLS; RFC
8996 retired 1.0 and 1.1). Outgoing connections check the server's certificate against
the host name of the URI (RFC 5922) unless ``verify_peer = false``; the listener asks
no client certificate (phones rarely have one: SIP digest authenticates them).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.b2bua.config import Config, ConfigError, TlsConfig
from proxy.keyperms import too_open

__all__ = ["TlsMaterial", "load_tls"]

EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What the TLS edge needs: a server context (None: no TLS listener configured) and
    a client context (None: "tls" is not a transport), plus start-up warnings."""

    server: ssl.SSLContext | None
    client: ssl.SSLContext | None
    subject: str | None = None
    """The proxy certificate's subject, for ``run --check``'s summary."""
    warnings: tuple[str, ...] = ()


def load_tls(config: Config, now: datetime | None = None) -> TlsMaterial:
    """Load and check everything ``[tls]`` names; contexts for what is configured."""
    now = now or datetime.now(UTC)
    tls, source = config.tls, config.source
    warnings: list[str] = []
    if config.outside.sdes_over_insecure_transport and config.outside.sdes != "off":
        warnings.append("outside.sdes_over_insecure_transport: SDES keys may be sent in SDP "
                        "over plain UDP/TCP, readable by anyone on the path")  # fmt: skip
    if "tls" not in config.sip.transports:
        return TlsMaterial(None, None, None, tuple(warnings))
    subject = None
    if tls.certificate is not None and tls.private_key is not None:
        subject = _check_pair(tls.certificate, tls.private_key, source, "tls", now, warnings)
    listening = config.inside.tls_listen is not None or config.outside.tls_listen is not None
    server = _server_context(tls, source) if listening else None
    return TlsMaterial(server, _client_context(tls, source), subject, tuple(warnings))


def _base(purpose: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _server_context(tls: TlsConfig, source: str) -> ssl.SSLContext:
    assert tls.certificate is not None and tls.private_key is not None
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, tls.certificate, tls.private_key, source, "tls.certificate")
    return context


def _client_context(tls: TlsConfig, source: str) -> ssl.SSLContext:
    context = _base(ssl.PROTOCOL_TLS_CLIENT)
    if tls.verify_peer:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        _load_trust(context, tls.ca, source)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_certificate is True:
        assert tls.certificate is not None and tls.private_key is not None
        _load_chain(context, tls.certificate, tls.private_key, source, "tls.client_certificate")
    elif isinstance(tls.client_certificate, Path):
        path = tls.client_certificate
        _private_file(path, source, "tls.client_certificate")
        _load_chain(context, path, path, source, "tls.client_certificate")
    return context


def _load_trust(context: ssl.SSLContext, ca: Path | None, source: str) -> None:
    if ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return
    try:
        if ca.is_dir():
            context.load_verify_locations(capath=str(ca))
        else:
            context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, "tls.ca", f"cannot load {ca}: {_reason(exc)}") from None


def _load_chain(
    context: ssl.SSLContext, certificate: Path, key: Path, source: str, name: str
) -> None:
    try:
        context.load_cert_chain(str(certificate), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, name, f"cannot use {certificate}: {_reason(exc)}") from None


def _private_file(path: Path, source: str, name: str) -> None:
    reason = too_open(path)
    if reason is not None:
        raise ConfigError(source, name, reason)


def _check_pair(
    cert_path: Path, key_path: Path, source: str, prefix: str, now: datetime,
    warnings: list[str],
) -> str:  # fmt: skip
    """The certificate parses, is within its validity, and the key belongs to it."""
    _private_file(key_path, source, f"{prefix}.private_key")
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except OSError as exc:
        raise ConfigError(source, f"{prefix}.certificate", f"cannot read {cert_path}: "
                          f"{exc.strerror or exc}") from None  # fmt: skip
    except ValueError:
        raise ConfigError(source, f"{prefix}.certificate",
                          f"{cert_path}: not a PEM certificate") from None  # fmt: skip
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(source, f"{prefix}.private_key", f"cannot read {key_path}: "
                          f"{exc.strerror or exc}") from None  # fmt: skip
    except (ValueError, TypeError):
        # Never the key's text: only that it could not be used.
        raise ConfigError(source, f"{prefix}.private_key",
                          f"{key_path}: not an unencrypted PEM private key") from None  # fmt: skip
    leaf = chain[0]
    if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
        raise ConfigError(source, f"{prefix}.private_key",
                          f"{key_path} does not belong to the certificate {cert_path}")  # fmt: skip
    not_after = leaf.not_valid_after_utc
    when = not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    if not_after <= now:
        raise ConfigError(source, f"{prefix}.certificate", f"{cert_path} expired on {when}")
    if leaf.not_valid_before_utc > now:
        raise ConfigError(source, f"{prefix}.certificate", f"{cert_path} is not valid yet")
    if not_after - now < timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.append(f"{prefix}.certificate: {cert_path} expires on {when}")
    return leaf.subject.rfc4514_string()


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
