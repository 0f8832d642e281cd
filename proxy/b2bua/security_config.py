"""The secure-call part of the configuration: ``[xsipura]`` and the per-line MC keys.

:mod:`proxy.b2bua.config` validates the file's shape and keeps these keys raw; this
module gives them meaning: it loads trust anchors, each line's Mini Certificate param
and SRTP private key (inline or ``@path``), checks that key and certificate belong
together, and reports every problem as a one-line :class:`ConfigError` naming the key,
at start-up, never mid-call. Private keys are never part of an error message or a repr.

Relative ``@path`` and ``trusted_ca`` entries are looked up relative to the working
directory first and then to the config file's directory, so both ``conf/ca.pub`` run
from the repository root and ``ca.pub`` next to the config file work.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.b2bua.config import Config, ConfigError
from proxy.keyperms import holds_private_ca_key, too_open
from proxy.media.tones import SECURE_CALL_TONE, Tone
from proxy.xsipura.keyfiles import KeyFileError, extract_param_text, load_trust_anchor
from proxy.xsipura.mc import (
    MalformedCertificate,
    MiniCertificateParam,
    decode_private_key_param,
)
from proxy.xsipura.rsa import PrivateKey, PublicKey
from proxy.xsipura.trust import TrustStore, is_sample_ca

CALLERID_REFRESH = ("update", "reinvite", "off")


@dataclass(frozen=True, slots=True)
class XsipuraConfig:
    trusted_ca: tuple[PublicKey, ...] = ()
    grace_ms: int = 2000
    handshake_timeout_ms: int = 5000
    probe_unadvertised: bool = False
    callerid_refresh: str = "update"
    srtcp: bool = False
    start_delay_ms: int = 200
    """Stage 2 starts once the outside dialog is confirmed *and* media flows (profile
    §2); the proxy waits for the phone's first RTP packet, at least this long."""
    tone: Tone | None = field(default_factory=lambda: SECURE_CALL_TONE)
    """The secure-call indication tone (an SPA ToneScript); None: no tone."""


@dataclass(frozen=True, slots=True)
class LineSecurity:
    user_key: str
    param: MiniCertificateParam
    private_key: PrivateKey = field(repr=False)
    trust: TrustStore = field(repr=False)
    secure_by_default: bool = True
    require_secure: bool = False


@dataclass(frozen=True, slots=True)
class Security:
    xsipura: XsipuraConfig
    lines: Mapping[str, LineSecurity]
    """By line ``user_key``; a line without a Mini Certificate is not here, nor one whose
    Mini Certificate has expired (see ``expired``)."""
    warnings: tuple[str, ...] = ()
    expired: Mapping[str, LineSecurity] = field(default_factory=dict)
    """Lines whose own Mini Certificate has expired, by ``user_key``: ``run`` keeps their
    calls in the clear (``local_mc_expired``) so one line cannot take a site down;
    ``run --check`` refuses them (:attr:`errors`)."""
    errors: tuple[str, ...] = ()
    """What ``run --check`` refuses but ``run`` starts with (logged as warnings)."""

    def mc_expiry(self) -> dict[str, datetime]:
        """When each line's Mini Certificate expires, by the line's ``user_id``."""
        both = {**self.lines, **self.expired}
        return {key: line.param.certificate.expires for key, line in both.items()}


def _resolve(path_text: str, base: Path) -> Path:
    path = Path(path_text).expanduser()
    if path.is_absolute() or path.exists() or not (base / path).exists():
        return path  # as given: an error then names the path the operator wrote
    return base / path


def _read(path_text: str, base: Path, source: str, key: str, *, private: bool = False) -> str:
    path = _resolve(path_text, base)
    if private and (reason := too_open(path)) is not None:
        raise ConfigError(source, key, reason)
    try:
        return path.read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(source, key, f"cannot read {path}: {reason}") from exc


def _inline_or_file(value: Any, base: Path, source: str, key: str, *, private: bool = False) -> str:
    """The value, or the text of the file ``@path`` names. A private value is refused
    from a file that group or others can access, including the configuration file
    itself when the value is written inline."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, "expected a base64 string or @path")
    if value.startswith("@"):
        return _read(value[1:], base, source, key, private=private)
    if private and not source.startswith("<") and (reason := too_open(source)) is not None:
        raise ConfigError(source, key, f"inline private key, but {reason}")
    return value


_PRIVATE_TAG = re.compile(r"<SRTP[ _]Private[ _]Key[^>]*>\s*([A-Za-z0-9+/]+={0,2})")


def _typed(
    table: Mapping[str, Any], name: str, kind: type, default: Any, source: str, key: str
) -> Any:
    value = table.get(name, default)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(source, key, f"expected an integer, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise ConfigError(source, key, f"expected {kind.__name__}, got {value!r}")
    return value


EXPIRY_WARNING_DAYS = 30
"""A line's Mini Certificate expiring sooner than this is a start-up warning."""


def load_security(config: Config, now: datetime | None = None) -> Security:
    """``now`` (UTC wall clock, default the current time) judges the lines' MC expiry."""
    now = now or datetime.now(UTC)
    source = config.source
    base = Path(source).parent if source and not source.startswith("<") else Path()
    raw = dict(config.extra.get("xsipura", {}))
    warnings: list[str] = []
    known = {"trusted_ca", "grace_ms", "handshake_timeout_ms", "probe_unadvertised",
             "callerid_refresh", "srtcp", "start_delay_ms", "tone"}  # fmt: skip
    for name in raw:
        if name not in known:
            raise ConfigError(source, f"xsipura.{name}", "unknown key")
    anchors: list[PublicKey] = []
    trusted = raw.get("trusted_ca", [])
    if isinstance(trusted, str):
        trusted = [trusted]
    if not isinstance(trusted, list | tuple):
        raise ConfigError(source, "xsipura.trusted_ca", "expected a list of file paths")
    for index, item in enumerate(trusted):
        key = f"xsipura.trusted_ca[{index}]"
        if not isinstance(item, str):
            raise ConfigError(source, key, "expected a file path")
        path = _resolve(item, base)
        try:
            data = path.read_bytes()
            if holds_private_ca_key(data) and (reason := too_open(path)) is not None:
                raise ConfigError(source, key, f"a CA private key, and {reason}")
            anchor = load_trust_anchor(data)
        except OSError as exc:
            raise ConfigError(source, key, f"cannot read {path}: {exc.strerror}") from exc
        except KeyFileError as exc:
            raise ConfigError(source, key, f"{path}: {exc}") from exc
        if is_sample_ca(anchor):
            warnings.append(f"{key}: the public sample CA is trusted: secure calls are NOT secure")
        anchors.append(anchor)
    grace = _typed(raw, "grace_ms", int, 2000, source, "xsipura.grace_ms")
    timeout = _typed(raw, "handshake_timeout_ms", int, 5000, source, "xsipura.handshake_timeout_ms")
    delay = _typed(raw, "start_delay_ms", int, 200, source, "xsipura.start_delay_ms")
    for name, value in (
        ("grace_ms", grace),
        ("handshake_timeout_ms", timeout),
        ("start_delay_ms", delay),
    ):
        if value < 0 or (name == "handshake_timeout_ms" and value == 0):
            raise ConfigError(source, f"xsipura.{name}", "must be a positive number of ms")
    refresh = _typed(raw, "callerid_refresh", str, "update", source, "xsipura.callerid_refresh")
    if refresh not in CALLERID_REFRESH:
        raise ConfigError(
            source, "xsipura.callerid_refresh", f"expected one of {', '.join(CALLERID_REFRESH)}"
        )
    tone = _tone(raw.get("tone"), source)
    xsipura = XsipuraConfig(
        trusted_ca=tuple(anchors),
        grace_ms=grace,
        handshake_timeout_ms=timeout,
        probe_unadvertised=_typed(
            raw, "probe_unadvertised", bool, False, source, "xsipura.probe_unadvertised"
        ),
        callerid_refresh=refresh,
        srtcp=_typed(raw, "srtcp", bool, False, source, "xsipura.srtcp"),
        start_delay_ms=delay,
        tone=tone,
    )
    lines: dict[str, LineSecurity] = {}
    expired: dict[str, LineSecurity] = {}
    errors: list[str] = []
    for index, line in enumerate(config.lines):
        extra = line.extra
        prefix = f"line[{index}]"
        if "mini_certificate" not in extra:
            for name in ("srtp_private_key", "require_secure"):
                if name in extra:
                    raise ConfigError(source, f"{prefix}.{name}", "needs mini_certificate too")
            continue
        secured = _line(extra, prefix, line.user_key, anchors, base, source, warnings)
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
    return Security(xsipura, lines, tuple(warnings), expired, tuple(errors))


def _tone(raw: Any, source: str) -> Tone | None:
    """``tone = false`` disables it; a string is an SPA ToneScript (as on the device's
    "Secure Call Indication Tone" setting); default: the SPA factory tone."""
    if raw is None or raw is True:
        return SECURE_CALL_TONE
    if raw is False:
        return None
    if not isinstance(raw, str):
        raise ConfigError(source, "xsipura.tone", "expected a ToneScript string or false")
    try:
        return Tone.parse(raw)
    except ValueError as exc:
        raise ConfigError(source, "xsipura.tone", f"not a ToneScript: {exc}") from exc


def _line(
    extra: Mapping[str, Any], prefix: str, user_key: str, anchors: list[PublicKey], base: Path,
    source: str, warnings: list[str],
) -> LineSecurity:  # fmt: skip
    mc_key = f"{prefix}.mini_certificate"
    text = _inline_or_file(extra["mini_certificate"], base, source, mc_key)
    try:
        param = MiniCertificateParam.from_base64(extract_param_text(text) or text)
    except MalformedCertificate as exc:
        raise ConfigError(source, mc_key, f"not a Mini Certificate param: {exc}") from exc
    if param.certificate.user_id.removeprefix("+") != user_key:
        warnings.append(f"{mc_key}: the MC's user id {param.certificate.user_id!r} differs from "
                        f"the line's user_id: peers checking caller ID will refuse it")  # fmt: skip
    key_name = f"{prefix}.srtp_private_key"
    if "srtp_private_key" not in extra:
        raise ConfigError(source, key_name, "required with mini_certificate")
    key_text = _inline_or_file(extra["srtp_private_key"], base, source, key_name, private=True)
    tagged = _PRIVATE_TAG.search(key_text)
    try:
        private = decode_private_key_param(
            tagged.group(1) if tagged else key_text, param.certificate
        )
    except MalformedCertificate as exc:
        # The message never contains the key (decode_private_key_param's texts don't).
        raise ConfigError(source, key_name, str(exc)) from exc
    if is_sample_ca(param.ca_key):
        warnings.append(f"{mc_key}: issued under the public sample CA: NOT secure")
    secure_by_default = extra.get("secure_by_default", True)
    require = extra.get("require_secure", False)
    for name, value in (("secure_by_default", secure_by_default), ("require_secure", require)):
        if not isinstance(value, bool):
            raise ConfigError(source, f"{prefix}.{name}", "expected true or false")
    trust = TrustStore([*anchors, param.ca_key])  # the line's own CA, as on an SPA
    return LineSecurity(user_key, param, private, trust, secure_by_default, require)
