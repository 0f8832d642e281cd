"""What the signalling process knows of a session whose media a worker process relays.

A :class:`WorkerSession` is the ``MediaSession`` the call core holds when the relay runs
in a worker (:mod:`proxy.media.worker_pool`): its ports (bound here, so known at
allocation), the latest counters the worker reported, and per side the keys and the
``WatchSrtp`` count that let the pool check a command as the relay would (at once, in
this process) and tell a stale "authenticated" report from a current one.
:data:`CHECKS` is the pool's dispatch table: a check per command type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from proxy.media.channel import unpack_counters
from proxy.media.commands import (
    COMMAND_TYPES,
    AcceptSrtp,
    ClearSrtp,
    MediaCommand,
    PlayTone,
    SetRemote,
    SetSrtp,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.counters import COUNTERS, stats_from
from proxy.media.engine import Side, StreamStats, check_remote

if TYPE_CHECKING:
    from proxy.media.worker_link import WorkerSlot

__all__ = ["CHECKS", "WorkerSession"]


class WorkerSession:
    """One call's media in a worker process (implements ``MediaSession``): what this
    process knows of it (ports, latest counters, keys and watches per side)."""

    __slots__ = (
        "_call_id",
        "_counters",
        "_local",
        "_rx",
        "_streams",
        "_watch",
        "dead",
        "id",
        "worker",
    )

    def __init__(
        self,
        worker: WorkerSlot,
        sid: int,
        call_id: str,
        streams: int,
        local: dict[Side, list[tuple[str, int]]],
    ) -> None:
        self.worker = worker
        self.id = sid
        self._call_id = call_id
        self._streams = streams
        self._local = local
        self._counters: Sequence[int] = ()
        self._rx: dict[Side, SrtpKeys | None] = {Side.INSIDE: None, Side.OUTSIDE: None}
        """The keys each side's packets are tried with first (None: plain)."""
        self._watch: dict[Side, tuple[int, bool]] = {
            Side.INSIDE: (0, False),
            Side.OUTSIDE: (0, False),
        }
        """Per side: WatchSrtp commands sent so far, and whether the last one may still
        fire (no key change since)."""
        self.dead = False
        """Its worker died: commands go nowhere, counters stay as last reported."""

    def __repr__(self) -> str:
        state = "dead" if self.dead else "live"
        return (
            f"WorkerSession({self.id}, {self._call_id!r}, streams={self._streams}, "
            f"worker {self.worker.index}, {state})"
        )

    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def streams(self) -> int:
        return self._streams

    @property
    def worker_index(self) -> int:
        return self.worker.index

    def local(self, side: Side, index: int) -> tuple[str, int]:
        if index < 0:
            raise IndexError(f"no stream {index}")
        return self._local[Side(side)][index]

    def stats(self) -> dict[Side, list[StreamStats]]:
        return stats_from(self._counters, self._streams)

    def update(self, packed: bytes) -> list[Side]:
        """New counters from the worker (packed, :class:`~proxy.media.channel.Stats`);
        the sides whose stream 0 saw its first packet."""
        old = self._counters
        self._counters = counters = unpack_counters(packed)
        width = len(COUNTERS)
        started: list[Side] = []
        for side, base in ((Side.INSIDE, 0), (Side.OUTSIDE, self._streams * width)):
            at = base + _INSIDE_PACKETS
            before = old[at] if len(old) > at else 0
            after = counters[at] if len(counters) > at else 0
            if before == 0 and after > 0:
                started.append(side)
        return started

    def fired(self, side: Side, watch: int) -> bool:
        """The worker reports that watch number ``watch`` of ``side`` fired: True if it
        is the watch still armed here (no later watch, no key change since)."""
        count, armed = self._watch[side]
        if not armed or watch != count:
            return False
        self._watch[side] = (count, False)
        return True

    # --- the checks of _CHECKS: what the relay would refuse, and the key bookkeeping --

    def _keys(self, side: Side, keys: SrtpKeys | None) -> None:
        """Mirror of the relay's rule: other keys than now on ``side`` forget its watch."""
        if self._rx[side] != keys:
            self._rx[side] = keys
            count, _ = self._watch[side]
            self._watch[side] = (count, False)

    def check_set_remote(self, command: SetRemote) -> None:
        check_remote(self.local(command.side, command.index)[0], command.ip,
                     command.rtp_port, command.rtcp_port)  # fmt: skip

    def check_set_srtp(self, command: SetSrtp) -> None:
        self._keys(Side(command.side), command.keys)

    def check_accept_srtp(self, command: AcceptSrtp) -> None:
        self._keys(Side(command.side), command.keys)

    def check_switch_srtp(self, command: SwitchSrtp) -> None:
        if not 0 <= command.grace_s < math.inf:
            raise ValueError(f"grace_s must be a finite number >= 0, not {command.grace_s}")
        self._keys(Side(command.side), command.keys)

    def check_clear_srtp(self, command: ClearSrtp) -> None:
        self._keys(Side(command.side), None)

    def check_play_tone(self, command: PlayTone) -> None:
        self.local(command.side, command.index)  # IndexError for a stream that does not exist

    def check_watch_srtp(self, command: WatchSrtp) -> None:
        side = Side(command.side)
        if self._rx[side] is None:
            raise ValueError(f"no SRTP key to authenticate on the {side} side")
        count, _ = self._watch[side]
        self._watch[side] = (count + 1, True)

    def check_nothing(self, command: MediaCommand) -> None:
        """Nothing this process could refuse or must note: the worker's relay decides."""


_INSIDE_PACKETS = COUNTERS.index("packets_in")

CHECKS: Final[dict[type[MediaCommand], Callable[[WorkerSession, Any], None]]] = {
    **dict.fromkeys(COMMAND_TYPES, WorkerSession.check_nothing),
    SetRemote: WorkerSession.check_set_remote,
    SetSrtp: WorkerSession.check_set_srtp,
    AcceptSrtp: WorkerSession.check_accept_srtp,
    SwitchSrtp: WorkerSession.check_switch_srtp,
    ClearSrtp: WorkerSession.check_clear_srtp,
    PlayTone: WorkerSession.check_play_tone,
    WatchSrtp: WorkerSession.check_watch_srtp,
}
"""What :meth:`WorkerPool.apply <proxy.media.worker_pool.WorkerPool.apply>` checks of
each command type (and notes) before sending it. A command with nothing to check here
(``SetTxSsrc``, ``Release``, a new one) is sent as it is: adding a media operation
needs a dataclass in :mod:`proxy.media.commands` and a handler in the relay, nothing
in the pool unless the pool must refuse or remember something of it."""
