"""The admin endpoint's routes, and its token.

``GET /health`` (public: load balancers, Docker's HEALTHCHECK and Kamailio-style
probes poll it without credentials) is 200 ``ok``, or 503 with the reason while
draining or when no media worker is alive. ``GET /status`` and ``GET /calls`` are the
JSON documents ``sipura-proxy calls`` reads, ``GET /metrics`` is Prometheus text, and
``POST /reload`` reloads the configuration file as SIGHUP does. All but ``/health``
need the bearer token when ``[admin] token`` is set.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from proxy.admin.exporter import CONTENT_TYPE, Exporter, Snapshot
from proxy.admin.http import Reply, Route
from proxy.b2bua.config import Config, ConfigError
from proxy.keyperms import too_open

__all__ = ["AdminTarget", "build_routes", "load_token", "warn_if_exposed"]

log = logging.getLogger("sipura.admin")

GET = frozenset({"GET"})
POST = frozenset({"POST"})
MAX_TOKEN_BYTES = 4096


class AdminTarget(Protocol):
    """What the routes read from the running proxy (``ProxyServer``)."""

    def status(self) -> dict[str, Any]: ...
    def health(self) -> str | None:
        """None when healthy, else why not (the 503's body)."""

    def metrics_snapshot(self) -> Snapshot: ...
    def reload(self) -> tuple[bool, str]:
        """Reload the configuration file: (applied, one-line summary or errors)."""


def _json(value: Any) -> Reply:
    return Reply(200, json.dumps(value, default=str).encode(), "application/json")


def build_routes(target: AdminTarget) -> dict[str, Route]:
    exporter = Exporter(target.metrics_snapshot)

    def health() -> Reply:
        why = target.health()
        return Reply(200, b"ok") if why is None else Reply(503, why.encode() + b"\n")

    def reload() -> Reply:
        applied, summary = target.reload()
        return Reply(200 if applied else 422, summary.encode() + b"\n")

    def metrics() -> Reply:
        return Reply(200, exporter.render(), CONTENT_TYPE)

    handlers: dict[str, tuple[frozenset[str], Callable[[], Reply], bool]] = {
        "/health": (GET, health, True),
        "/status": (GET, lambda: _json(target.status()), False),
        "/calls": (GET, lambda: _json(target.status()["calls"]), False),
        "/metrics": (GET, metrics, False),
        "/reload": (POST, reload, False),
    }
    return {path: Route(methods, fn, public) for path, (methods, fn, public) in handlers.items()}


def load_token(config: Config) -> str | None:
    """The bearer token from ``[admin] token = "@path"``, or None when unset.

    The path is relative to the configuration file's directory; the file must not be
    accessible by group or others (as a private key); surrounding whitespace (the final
    newline of ``echo ... > file``) is not part of the token."""
    raw = config.admin.token
    if raw is None:
        return None
    source = config.source
    path = Path(raw[1:]).expanduser()
    if not path.is_absolute() and not source.startswith("<"):
        path = Path(source).parent / path
    if (reason := too_open(path)) is not None:
        raise ConfigError(source, "admin.token", reason)
    try:
        data = path.read_bytes()[: MAX_TOKEN_BYTES + 1]
    except OSError as exc:
        raise ConfigError(source, "admin.token", f"cannot read {path}: {exc.strerror}") from exc
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(source, "admin.token", f"{path}: not ASCII text") from None
    if not token or len(data) > MAX_TOKEN_BYTES or not token.isprintable() or " " in token:
        raise ConfigError(
            source, "admin.token", f"{path}: expected one printable word of at most 4096 bytes"
        )
    return token


def warn_if_exposed(config: Config, token: str | None) -> None:
    """A non-loopback admin listener without a token serves call data to anyone who can
    reach it: allowed (a private management network), but said at start."""
    host = config.admin.listen_host
    if host is None or token is not None:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning(
            "admin endpoint listens on %s:%s without [admin] token: anyone who can reach it "
            "can read calls and registrations and reload the configuration",
            host,
            config.admin.listen_port,
        )
