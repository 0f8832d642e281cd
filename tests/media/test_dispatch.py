"""Every media command has a handler in every engine's dispatch table: the in-process
relay (which a worker process runs too), the worker pool's checks, the worker process's
routing. Adding a command type to ``proxy.media.commands`` without a handler fails
here, not in a call. (That the call core handles every media event is checked in
``tests/b2bua/test_secure_core.py``.)"""

from __future__ import annotations

import asyncio
import socket

from proxy.media.commands import (
    COMMAND_TYPES,
    AcceptSrtp,
    ClearSrtp,
    MediaCommand,
    MediaEvent,
    PlayTone,
    Release,
    SetRemote,
    SetSrtp,
    SetTxSsrc,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.engine import Side
from proxy.media.relay import RelayEngine
from proxy.media.relay_session import HANDLERS
from proxy.media.tones import SECURE_CALL_TONE
from proxy.media.worker_process import WorkerProcess
from proxy.media.worker_session import CHECKS

HOST = "127.0.0.1"
KEYS = SrtpKeys(bytes(range(16)), bytes(range(16, 32)))


def test_the_relay_has_a_handler_for_every_command() -> None:
    assert set(HANDLERS) == set(COMMAND_TYPES)


def test_the_worker_pool_checks_every_command() -> None:
    assert set(CHECKS) == set(COMMAND_TYPES)


def test_the_worker_process_routes_every_command_to_its_relay() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        worker = WorkerProcess(theirs, RelayEngine(HOST, HOST, 46000, 46007, pool_pairs=0), 0)
        assert set(COMMAND_TYPES) <= set(worker.handlers)
    finally:
        ours.close()
        theirs.close()


def test_every_command_type_applies_on_the_relay() -> None:
    """One of each, in an order that is valid: the table runs them all without error,
    and a command for a released session is ignored."""

    async def scenario() -> None:
        engine = RelayEngine(HOST, HOST, 46000, 46007, pool_pairs=0)
        events: list[MediaEvent] = []
        engine.on_event = events.append
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
        for sock in sockets:
            sock.bind((HOST, 0))  # any free port: handed over, as to a worker
        session = engine.allocate("c", 1, [(sockets[0], sockets[1]), (sockets[2], sockets[3])])
        sid = session.id
        commands: list[MediaCommand] = [
            SetRemote(sid, Side.INSIDE, 0, HOST, 4000, 4001),
            SetSrtp(sid, Side.OUTSIDE, KEYS),
            AcceptSrtp(sid, Side.OUTSIDE, KEYS),
            SwitchSrtp(sid, Side.OUTSIDE, KEYS, 2.0),
            WatchSrtp(sid, Side.OUTSIDE),
            SetTxSsrc(sid, Side.OUTSIDE, 1),
            PlayTone(sid, Side.INSIDE, 0, SECURE_CALL_TONE),
            ClearSrtp(sid, Side.OUTSIDE),
            Release(sid),
        ]
        assert {type(c) for c in commands} == set(COMMAND_TYPES)
        for command in commands:
            engine.apply(command)
        assert engine.sessions == 0
        for command in commands:  # all ignored now, even those that would raise
            engine.apply(command)
        engine.apply(WatchSrtp(sid + 1, Side.OUTSIDE))  # never allocated: ignored too
        await engine.close()
        assert events == []

    asyncio.run(scenario())
