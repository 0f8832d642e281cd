"""What a configuration reload (SIGHUP, ``POST /reload``) may change in a running proxy.

The new file is loaded and validated in full first (an invalid one is rejected and the
running configuration stays). Then :func:`plan_reload` merges it with the running one:
everything a *new call* reads is taken from the new file (lines, their Mini Certificates
and keys, trusted CAs and the other ``[xsipura]`` keys, upstream/registrar/advertise,
``unknown_users``, limits, log level, the admin token, ``drain_s``); what is bound to
sockets and processes made at start (listen addresses, transports, the media port range,
media addresses and workers, the admin listener, SIP timers, TLS listeners, ``[tls]``
certificates and ``[dns]`` servers) keeps its running value and
is reported, so the operator knows a restart is needed. Active calls hold their own line
and security objects, so nothing here touches them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.b2bua.config import Config, SideConfig

__all__ = ["ReloadPlan", "plan_reload"]


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: Config
    """The configuration to run with from now on."""
    restart_needed: tuple[str, ...]
    """Keys whose new value was not applied, as ``section.key``."""
    changed: tuple[str, ...]
    """Sections whose applied value differs from the running one."""


def _side(old: SideConfig, new: SideConfig, name: str, restart: list[str]) -> SideConfig:
    for key in ("listen_host", "listen_port", "media_ip", "tls_listen_host", "tls_listen_port"):
        if getattr(old, key) != getattr(new, key):
            shown = key.removesuffix("_host").removesuffix("_port")
            if f"{name}.{shown}" not in restart:
                restart.append(f"{name}.{shown}")
    return replace(
        new, listen_host=old.listen_host, listen_port=old.listen_port, media_ip=old.media_ip,
        tls_listen_host=old.tls_listen_host, tls_listen_port=old.tls_listen_port,
    )  # fmt: skip


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    restart: list[str] = []
    inside = _side(old.inside, new.inside, "inside", restart)
    outside = _side(old.outside, new.outside, "outside", restart)
    if old.media != new.media:
        restart.append("media")
    if old.sip != new.sip:
        restart.append("sip")
    if (old.admin.listen_host, old.admin.listen_port) != (
        new.admin.listen_host,
        new.admin.listen_port,
    ):
        restart.append("admin.listen")
    if old.log.format != new.log.format:
        restart.append("log.format")
    for table in ("tls", "dns"):  # contexts and the resolver are built at start
        if getattr(old, table) != getattr(new, table):
            restart.append(table)
    merged = replace(
        new,
        inside=inside,
        outside=outside,
        media=old.media,
        sip=old.sip,
        admin=replace(
            new.admin, listen_host=old.admin.listen_host, listen_port=old.admin.listen_port
        ),
        log=replace(new.log, format=old.log.format),
        tls=old.tls,
        dns=old.dns,
    )
    changed = tuple(
        name
        for name in ("inside", "outside", "lines", "log", "limits", "admin", "run", "xsipura")
        if getattr(old, name) != getattr(merged, name)
    )
    return ReloadPlan(merged, tuple(restart), changed)
