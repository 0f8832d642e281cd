"""The CLI's side of the admin endpoint (``sipura-proxy calls``, ``sipura-proxy reload``).

Every failure is a :class:`UsageError` (one line, exit 2): unreachable endpoint, a
401, an unreadable token file.
"""

from __future__ import annotations

import http.client
from pathlib import Path

from proxy.errors import UsageError
from proxy.keyperms import check_private_file

__all__ = ["admin_request", "fetch", "parse_endpoint"]

DEFAULT_ENDPOINT = "127.0.0.1:5099"
MAX_BODY = 16 << 20


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port``."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"--admin {text!r}: expected [v6addr]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise UsageError(f"--admin {text!r}: expected host:port or [v6addr]:port")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--admin {text!r}: the port must be 1..65535")
    return host or "127.0.0.1", int(port)


def _target(
    admin: str | None, config_path: str | None, token_file: str | None
) -> tuple[str, int, str | None]:
    token: str | None = None
    host, port = parse_endpoint(admin or DEFAULT_ENDPOINT)
    if config_path is not None:
        from proxy.admin.routes import load_token
        from proxy.b2bua.config import load_config

        config = load_config(config_path)
        token = load_token(config)
        if admin is None and config.admin.listen_host is not None:
            assert config.admin.listen_port is not None
            host, port = config.admin.listen_host, config.admin.listen_port
            if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listener: ask locally
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    if token_file is not None:
        check_private_file(token_file, "--token-file")
        try:
            token = Path(token_file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --token-file {token_file!r}: {exc}") from exc
    return host, port, token


def fetch(
    host: str, port: int, method: str, path: str, *, token: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:  # fmt: skip
    """One request to an admin endpoint: (status, body). Raises OSError or
    ``http.client.HTTPException`` when no answer can be had (the demo's and the tests'
    client, :func:`proxy.demo.loopback.admin_get`, uses it too)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(MAX_BODY)
    finally:
        conn.close()


def admin_request(
    admin: str | None, config_path: str | None, token_file: str | None, method: str, path: str
) -> tuple[int, bytes]:
    host, port, token = _target(admin, config_path, token_file)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        status, body = fetch(host, port, method, path, token=token)
    except (OSError, http.client.HTTPException) as exc:
        raise UsageError(f"cannot reach the admin endpoint {shown}: {exc}") from exc
    if status == 401:
        raise UsageError(
            f"the admin endpoint {shown} wants its token: --config FILE or --token-file FILE"
        )
    if status not in (200, 422):
        raise UsageError(f"the admin endpoint {shown} answered {status} {path}")
    return status, body
