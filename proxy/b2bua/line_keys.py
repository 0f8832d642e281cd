"""The secure-call key material: trust anchors and each line's MC and SRTP private key.

:mod:`proxy.b2bua.config` parses and checks every key of the file, ``[xsipura]`` and the
per-line x-sipura keys included, and resolves their file paths; this module only LOADS
what those keys point at: the ``trusted_ca`` files, each line's Mini Certificate param
and SRTP private key (inline or ``@path``), and checks that they are what they claim
(a readable anchor, a well-formed MC, a key that belongs to that MC), reporting every
problem as a one-line :class:`ConfigError` naming the key, at start-up, never mid-call.
What is legal but unwise (the public sample CA, an MC for another user id) is a warning.
Private keys are never part of an error message or a repr.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy.b2bua.config import Config, ConfigError, KeySource, LineConfig, XsipuraConfig
from proxy.keyperms import holds_private_ca_key, too_open
from proxy.xsipura.keyfiles import KeyFileError, extract_param_text, load_trust_anchor
from proxy.xsipura.mc import (
    MalformedCertificate,
    MiniCertificateParam,
    decode_private_key_param,
)
from proxy.xsipura.rsa import PrivateKey, PublicKey
from proxy.xsipura.trust import TrustStore, is_sample_ca

__all__ = ["LineSecurity", "Security", "load_security"]


@dataclass(frozen=True, slots=True)
class LineSecurity:
    """One line's loaded identity: what the proxy presents as that line's SPA."""

    user_key: str
    param: MiniCertificateParam
    private_key: PrivateKey = field(repr=False)
    trust: TrustStore = field(repr=False)
    """The configured anchors plus the line's own CA (appended to its MC), as on an SPA."""
    secure_by_default: bool = True
    require_secure: bool = False


@dataclass(frozen=True, slots=True)
class Security:
    xsipura: XsipuraConfig
    """The ``[xsipura]`` settings, as :mod:`proxy.b2bua.config` parsed them."""
    lines: Mapping[str, LineSecurity]
    """By line ``user_key``; a line without a Mini Certificate is not here."""
    warnings: tuple[str, ...] = ()
    trust_anchors: tuple[PublicKey, ...] = ()
    """The keys loaded from ``xsipura.trusted_ca``, in the file's order."""
    expired: Mapping[str, LineSecurity] = field(default_factory=dict)
    """Lines whose own Mini Certificate has expired, by ``user_key`` (not in ``lines``):
    ``run`` keeps their calls in the clear (``local_mc_expired``) so one line cannot
    take a site down; ``run --check`` refuses them (:attr:`errors`)."""
    errors: tuple[str, ...] = ()
    """What ``run --check`` refuses but ``run`` starts with (logged as warnings)."""

    def mc_expiry(self) -> dict[str, datetime]:
        """When each line's Mini Certificate expires, by ``user_key``."""
        both = {**self.lines, **self.expired}
        return {key: line.param.certificate.expires for key, line in both.items()}


EXPIRY_WARNING_DAYS = 30
"""A line's Mini Certificate expiring sooner than this is a start-up warning."""


_PRIVATE_TAG = re.compile(r"<SRTP[ _]Private[ _]Key[^>]*>\s*([A-Za-z0-9+/]+={0,2})")


def load_security(config: Config, now: datetime | None = None) -> Security:
    """Load and check every trust anchor and line key the configuration names; ``now``
    (UTC wall clock, default the current time) judges the lines' MC expiry."""
    now = now or datetime.now(UTC)
    source = config.source
    warnings: list[str] = []
    anchors: list[PublicKey] = []
    for index, path in enumerate(config.xsipura.trusted_ca):
        key = f"xsipura.trusted_ca[{index}]"
        anchor = _anchor(path, source, key)
        if is_sample_ca(anchor):
            warnings.append(f"{key}: the public sample CA is trusted: secure calls are NOT secure")
        anchors.append(anchor)
    lines: dict[str, LineSecurity] = {}
    expired: dict[str, LineSecurity] = {}
    errors: list[str] = []
    for index, line in enumerate(config.lines):
        if line.mini_certificate is None:
            continue
        prefix = f"line[{index}]"
        secured = _line(line, prefix, anchors, source, warnings)
        expires = secured.param.certificate.expires
        when = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        if expires <= now:
            expired[line.user_key] = secured
            errors.append(f"{source}: {prefix}.mini_certificate: expired on {when}: calls on "
                          f"line {line.user_id} stay in the clear (local_mc_expired)")  # fmt: skip
            continue
        if expires - now < timedelta(days=EXPIRY_WARNING_DAYS):
            days = (expires - now).days
            warnings.append(f"{prefix}.mini_certificate: expires on {when}, in {days} days")
        lines[line.user_key] = secured
    return Security(config.xsipura, lines, tuple(warnings), tuple(anchors), expired, tuple(errors))


def _anchor(path: Path, source: str, key: str) -> PublicKey:
    try:
        data = path.read_bytes()
        if holds_private_ca_key(data) and (reason := too_open(path)) is not None:
            raise ConfigError(source, key, f"a CA private key, and {reason}")
        return load_trust_anchor(data)
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.strerror or exc}") from None
    except KeyFileError as exc:
        raise ConfigError(source, key, f"{path}: {exc}") from None


def _text(where: KeySource, source: str, key: str, *, private: bool = False) -> str:
    """The key material. A private one is refused from a file that group or others can
    access, including the configuration file itself when the key is written inline."""
    if where.path is None:
        assert where.inline is not None  # the parser sets exactly one
        if private and not source.startswith("<") and (reason := too_open(source)):
            raise ConfigError(source, key, f"inline private key, but {reason}")
        return where.inline
    if private and (reason := too_open(where.path)) is not None:
        raise ConfigError(source, key, reason)
    try:
        return where.path.read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(source, key, f"cannot read {where.path}: {reason}") from None


def _line(
    line: LineConfig, prefix: str, anchors: list[PublicKey], source: str, warnings: list[str]
) -> LineSecurity:
    assert line.mini_certificate is not None and line.srtp_private_key is not None
    mc_key = f"{prefix}.mini_certificate"
    text = _text(line.mini_certificate, source, mc_key)
    try:
        param = MiniCertificateParam.from_base64(extract_param_text(text) or text)
    except MalformedCertificate as exc:
        raise ConfigError(source, mc_key, f"not a Mini Certificate param: {exc}") from None
    if param.certificate.user_id.removeprefix("+") != line.user_key:
        warnings.append(f"{mc_key}: the MC's user id {param.certificate.user_id!r} differs from "
                        f"the line's user_id: peers checking caller ID will refuse it")  # fmt: skip
    key_name = f"{prefix}.srtp_private_key"
    key_text = _text(line.srtp_private_key, source, key_name, private=True)
    tagged = _PRIVATE_TAG.search(key_text)
    try:
        private = decode_private_key_param(
            tagged.group(1) if tagged else key_text, param.certificate
        )
    except MalformedCertificate as exc:
        # The message never contains the key (decode_private_key_param's texts don't).
        raise ConfigError(source, key_name, str(exc)) from None
    if is_sample_ca(param.ca_key):
        warnings.append(f"{mc_key}: issued under the public sample CA: NOT secure")
    trust = TrustStore([*anchors, param.ca_key])  # the line's own CA, as on an SPA
    return LineSecurity(
        line.user_key, param, private, trust, line.secure_by_default, line.require_secure
    )
