"""Bounds on the TCP connections of one SIP listener, sans-IO.

Every connection holds a descriptor, and descriptors are what a SIP process runs out of
first: at the common 1,024 limit, 1,100 idle connections made every call fail (no
descriptor left for a media socket) and nothing was logged. :class:`ConnectionTable`
decides, with time passed in and no socket in sight, which connection may be accepted
and which must be closed:

* admission: at most ``max_connections`` accepted connections, and at most
  ``max_per_source`` from one IP address (connections holding a registration do not
  count toward their address's share: a NAT with many registered phones is not an
  attack); as many connections opened by the proxy itself, counted apart so that a
  flood of accepted ones can never stop the proxy reaching its upstream;
* message timeout: a message must be complete within ``message_timeout_s`` of its first
  byte (slow headers and slow bodies alike), and an accepted connection must deliver its
  first message within as long of being accepted (a connection that says nothing has no
  flow worth keeping);
* idle timeout: no byte either way for ``idle_timeout_s`` closes a connection, unless it
  is *held*: the core holds the flow of a live registration (RFC 5626: responses and
  inbound calls go down the connection the phone registered on) and releases it with
  the binding.

The edge closes what :meth:`ConnectionTable.expired` returns and reports every
connection that ends with :meth:`ConnectionTable.remove`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Closing",
    "ConnectionTable",
    "Refusal",
    "TcpLimits",
    "auto_max_connections",
]

DEFAULT_MAX_PER_SOURCE = 50
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_MESSAGE_TIMEOUT_S = 10.0
RESERVED_DESCRIPTORS = 256
"""Descriptors :func:`auto_max_connections` leaves for everything but SIP over TCP."""


def auto_max_connections(descriptor_limit: int) -> int:
    """``[limits] max_tcp_connections = "auto"``: a quarter of the descriptors left after
    :data:`RESERVED_DESCRIPTORS`, between 16 and 10,000. Accepted and opened connections
    may each reach the cap, so SIP over TCP never takes more than half the descriptors,
    and media sockets (four per call with the in-process relay) keep the other half:
    192 at a 1,024 limit, 10,000 at the 1,048,576 of most containers."""
    return max(16, min(10_000, (descriptor_limit - RESERVED_DESCRIPTORS) // 4))


@dataclass(frozen=True, slots=True)
class TcpLimits:
    max_connections: int = 1000
    max_per_source: int = DEFAULT_MAX_PER_SOURCE
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    message_timeout_s: float = DEFAULT_MESSAGE_TIMEOUT_S


class Refusal(StrEnum):
    """Why a connection was not admitted (the config key that refused it)."""

    MAX_CONNECTIONS = "max_tcp_connections"
    MAX_PER_SOURCE = "max_tcp_connections_per_source"


class Closing(StrEnum):
    """Why the table asks for a connection to be closed."""

    IDLE = "idle_timeout"
    MESSAGE = "message_timeout"


@dataclass(slots=True)
class _Entry:
    source: str
    inbound: bool
    active_at: float
    """Last byte received or sent."""
    message_since: float | None
    """When the unfinished message began (accept time for a silent new connection)."""
    held: bool = False
    closing: bool = False


@dataclass(slots=True)
class TableStats:
    refused: Counter[str] = field(default_factory=Counter)
    closed: Counter[str] = field(default_factory=Counter)


class ConnectionTable:
    """The TCP connections of one listener, by connection id."""

    def __init__(self, limits: TcpLimits) -> None:
        self.limits = limits
        self._entries: dict[int, _Entry] = {}
        self._per_source: Counter[str] = Counter()
        """Accepted, not held connections per source address."""
        self._inbound = 0
        self.stats = TableStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conn: int) -> bool:
        return conn in self._entries

    def admit(self, conn: int, source: str, now: float, *, inbound: bool = True) -> Refusal | None:
        """Register a new connection, or say why it must be closed at once."""
        limits = self.limits
        opened = len(self._entries) - self._inbound
        if (self._inbound if inbound else opened) >= limits.max_connections:
            return self._refuse(Refusal.MAX_CONNECTIONS)
        if inbound and self._per_source[source] >= limits.max_per_source:
            return self._refuse(Refusal.MAX_PER_SOURCE)
        self._entries[conn] = _Entry(source, inbound, now, now if inbound else None)
        if inbound:
            self._inbound += 1
            self._per_source[source] += 1
        return None

    def _refuse(self, refusal: Refusal) -> Refusal:
        self.stats.refused[refusal.value] += 1
        return refusal

    def received(self, conn: int, now: float, pending: int) -> None:
        """Bytes arrived; ``pending`` is what the framer holds of an unfinished message."""
        entry = self._entries.get(conn)
        if entry is None:
            return
        entry.active_at = now
        if not pending:
            entry.message_since = None
        elif entry.message_since is None:
            entry.message_since = now

    def sent(self, conn: int, now: float) -> None:
        entry = self._entries.get(conn)
        if entry is not None:
            entry.active_at = now

    def hold(self, conn: int, held: bool) -> bool:
        """Exempt a connection from the idle timeout and from its source's share (a
        registration's flow), or end that. False when the connection is gone."""
        entry = self._entries.get(conn)
        if entry is None:
            return False
        if entry.held != held and entry.inbound:
            self._per_source[entry.source] += -1 if held else 1
        entry.held = held
        return True

    def remove(self, conn: int) -> None:
        entry = self._entries.pop(conn, None)
        if entry is None:
            return
        if entry.inbound:
            self._inbound -= 1
            if not entry.held:
                self._per_source[entry.source] -= 1
                if self._per_source[entry.source] <= 0:
                    del self._per_source[entry.source]

    def expired(self, now: float) -> list[tuple[int, Closing]]:
        """Connections to close now, each reported once (until :meth:`remove`)."""
        limits = self.limits
        due: list[tuple[int, Closing]] = []
        for conn, entry in self._entries.items():
            if entry.closing:
                continue
            if entry.message_since is not None and (
                now - entry.message_since >= limits.message_timeout_s
            ):
                reason = Closing.MESSAGE
            elif not entry.held and now - entry.active_at >= limits.idle_timeout_s:
                reason = Closing.IDLE
            else:
                continue
            entry.closing = True
            self.stats.closed[reason.value] += 1
            due.append((conn, reason))
        return due

    def next_deadline(self) -> float | None:
        """The earliest instant :meth:`expired` can return something."""
        limits = self.limits
        deadlines = [
            entry.message_since + limits.message_timeout_s
            if entry.message_since is not None
            else entry.active_at + limits.idle_timeout_s
            for entry in self._entries.values()
            if not entry.closing and (entry.message_since is not None or not entry.held)
        ]
        return min(deadlines) if deadlines else None

    def snapshot(self) -> dict[str, object]:
        """For ``/status``."""
        held = sum(1 for entry in self._entries.values() if entry.held)
        return {
            "connections": len(self._entries),
            "accepted": self._inbound,
            "opened": len(self._entries) - self._inbound,
            "held": held,
            "sources": len(self._per_source),
            "refused": dict(self.stats.refused),
            "closed": dict(self.stats.closed),
        }
