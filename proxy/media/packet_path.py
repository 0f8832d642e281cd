"""Which code handles the relay's packets: the Python path or the compiled one.

Both paths run the same relay (:mod:`proxy.media.relay`): the same allocation, command
table, pool and counters. They differ in the objects that hold a leg's state and in who
reads the sockets: :class:`PythonPath` makes :class:`~proxy.media.relay_leg.RelayLeg`
legs and asyncio datagram protocols (:mod:`proxy.media.relay_packets`), pylibsrtp
contexts and :class:`~proxy.media.tones.ToneMixer` tones; the compiled path
(:mod:`proxy.media.fast_path`) makes their C counterparts, which keep the same attribute
names and rules. ``[media] fast_path``: ``"auto"`` (the compiled path where it was built,
else Python), ``"on"`` (the compiled path or an error), ``"off"`` (Python).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.media.channel import pack_counters
from proxy.media.commands import SrtpKeys
from proxy.media.counters import counters_of
from proxy.media.engine import FAST_PATH_MODES, Side
from proxy.media.relay_leg import Clock, RelayLeg
from proxy.media.relay_packets import Owner, take_pair
from proxy.media.srtp import SrtpContext
from proxy.media.tones import Tone, ToneMixer

if TYPE_CHECKING:
    from proxy.media.fast_path import FastPath

__all__ = [
    "FAST_PATH_MODES",
    "PacketPath",
    "PythonPath",
    "built_paths",
    "fast_path_unavailable",
    "make_path",
    "resolve",
]

log = logging.getLogger("sipura.media")

default_mode = "auto"
"""The mode of an engine made without one (``RelayEngine(fast_path=None)``): a process
sets it once from its configuration (a media worker from its command line), the relay
tests to run every test on each path."""


class PacketPath(Protocol):
    """What the relay asks of a packet path."""

    name: str
    """``"python"`` or ``"fast"`` (``/status``)."""

    before_packets: Callable[[], object] | None
    """Called before each batch of packets is read, where a path reads a batch at once
    (a media worker applies the commands already on its channel here): see
    :class:`~proxy.media.fast_path.FastPath`."""

    def new_leg(
        self, side: Side, index: int, ip: str, family: socket.AddressFamily, clock: Clock
    ) -> RelayLeg:
        """A fresh leg: no peer, no key, no tone, counters at zero."""
        ...

    def take_pair(
        self, leg: RelayLeg, owner: Owner, port: int, rtp: socket.socket, rtcp: socket.socket
    ) -> None:
        """``leg`` owns a freshly bound RTP/RTCP pair for ``owner``."""
        ...

    def context(self, keys: SrtpKeys) -> SrtpContext:
        """A fresh SRTP context (ROC 0, new replay windows) for ``keys``."""
        ...

    def mixer(self, tone: Tone) -> ToneMixer:
        """``tone``, to be mixed into one stream from its start."""
        ...

    def counters_of(self, leg: RelayLeg) -> tuple[int, ...]:
        """``leg``'s counters in :data:`~proxy.media.counters.COUNTERS` order."""
        ...

    def packed_counters(self, leg: RelayLeg) -> bytes:
        """The same, packed as native 64-bit ints (a worker's counter report)."""
        ...

    def close(self) -> None:
        """The engine is closed: stop whatever watches its sockets."""
        ...

    def stats(self) -> dict[str, int]:
        """Figures for ``/status`` (may be empty)."""
        ...


class PythonPath:
    """The Python packet path: asyncio datagram protocols, pylibsrtp, ``ToneMixer``."""

    name = "python"

    def __init__(self) -> None:
        self.before_packets: Callable[[], object] | None = None
        """Never called: each socket is its own reader of the event loop, and the loop
        runs readers in the order they became readable, so a command that arrived
        before a packet is read before it anyway."""

    def new_leg(
        self, side: Side, index: int, ip: str, family: socket.AddressFamily, clock: Clock
    ) -> RelayLeg:
        return RelayLeg(side, index, ip, family, clock)

    def take_pair(
        self, leg: RelayLeg, owner: Owner, port: int, rtp: socket.socket, rtcp: socket.socket
    ) -> None:
        take_pair(leg, owner, port, rtp, rtcp)

    def context(self, keys: SrtpKeys) -> SrtpContext:
        return SrtpContext.from_keys(keys)

    def mixer(self, tone: Tone) -> ToneMixer:
        return ToneMixer(tone)

    def counters_of(self, leg: RelayLeg) -> tuple[int, ...]:
        counters: tuple[int, ...] = counters_of(leg)
        return counters

    def packed_counters(self, leg: RelayLeg) -> bytes:
        return pack_counters(counters_of(leg))

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


def fast_path_unavailable() -> str | None:
    """Why the compiled path cannot run here (the extension was not built or does not
    load), or None when it can."""
    try:
        import proxy.media.fast_path  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def built_paths() -> tuple[str, ...]:
    """The paths that can run here: ``("python", "fast")``, or ``("python",)``."""
    return ("python", "fast") if fast_path_unavailable() is None else ("python",)


def resolve(mode: str) -> str:
    """The path ``[media] fast_path = mode`` runs: ``"fast"`` or ``"python"``. Raises
    ``ValueError`` for an unknown mode, or for ``"on"`` where the compiled path cannot
    run."""
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"fast_path must be one of {', '.join(FAST_PATH_MODES)}, not {mode!r}")
    if mode == "off":
        return "python"
    why = fast_path_unavailable()
    if why is None:
        return "fast"
    if mode == "on":
        raise ValueError(f'fast_path = "on" but the compiled packet path cannot run: {why}')
    return "python"


def make_path(name: str) -> PacketPath:
    """A packet path by its resolved name (:func:`resolve`)."""
    if name == "python":
        return PythonPath()
    if name != "fast":
        raise ValueError(f"no packet path {name!r}")
    from proxy.media.fast_path import FastPath

    path: FastPath = FastPath()
    return path
