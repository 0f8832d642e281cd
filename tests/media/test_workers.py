"""The multi-process media engine with real worker processes, on 127.0.0.1.

Every wait is a bounded poll for a condition (never an assertion on elapsed time); the
engine is closed in ``finally`` so no worker outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.media import channel as ch
from proxy.media.commands import (
    COMMAND_TYPES,
    AcceptSrtp,
    ClearSrtp,
    MediaCommand,
    MediaEvent,
    MediaFlowing,
    MediaReleased,
    PlayTone,
    Release,
    SessionsLost,
    SetRemote,
    SetSrtp,
    SetTxSsrc,
    SrtpAuthenticated,
    SrtpKeys,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.counters import stats_from
from proxy.media.engine import MediaEngine, Side, StreamStats
from proxy.media.packet_path import built_paths
from proxy.media.ports import PortsExhausted
from proxy.media.relay import RelayEngine
from proxy.media.srtp import SrtpContext
from proxy.media.tones import SECURE_CALL_TONE
from proxy.media.worker_link import WorkerSlot
from proxy.media.worker_pool import WorkerPool, WorkerSession
from testkit.ports import free_port_range as free_range

HOST = "127.0.0.1"


def rtp(seq: int, ssrc: int = 0x1234, payload: bytes = b"\xd5" * 160) -> bytes:
    return (
        bytes([0x80, 0])
        + seq.to_bytes(2, "big")
        + (seq * 160).to_bytes(4, "big")
        + (ssrc.to_bytes(4, "big") + payload)
    )


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


class Peer:
    """A UDP endpoint (a phone or the PBX) with an asyncio receive queue."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])

    async def recv(self, timeout: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        self.sock.sendto(data, dest)

    async def recv_after(self, sender: Peer, data: bytes, dest: tuple[str, int]) -> bytes:
        sender.send(data, dest)
        return await self.recv()

    def close(self) -> None:
        self.sock.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))


def connect(engine: MediaEngine, session: WorkerSession, phone: Peer, pbx: Peer) -> None:
    engine.apply(SetRemote(session.id, Side.INSIDE, 0, HOST, phone.port, phone.port + 1))
    engine.apply(SetRemote(session.id, Side.OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))


def lost_sessions(events: list[MediaEvent]) -> list[tuple[int, ...]]:
    """The sessions of each SessionsLost event, in order."""
    assert all(isinstance(event, SessionsLost) and event.reason for event in events)
    return [event.sessions for event in events if isinstance(event, SessionsLost)]


def loaded_fast_path(pid: int) -> bool:
    """Has process ``pid`` loaded the compiled packet path?"""
    return "_fastrelay" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("path", built_paths())
def test_worker_engine_relays_plain_and_srtp_and_reports_counters(path: str) -> None:
    lo, hi = free_range(32)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 2, fast_path="on" if path == "fast" else "off")
        wakeups: list[int] = []
        engine.on_wakeup = lambda: wakeups.append(1)
        engine.start()
        phone, pbx = Peer(), Peer()
        try:
            assert [w["port_min"] for w in engine.workers()] == [lo, lo + 16]
            assert {w["packet_path"] for w in engine.workers()} == {path}
            assert engine.packet_path == path
            session = engine.allocate("call-1", 1)
            other = engine.allocate("call-2", 1)  # least loaded: the other worker
            assert {session.worker_index, other.worker_index} == {0, 1}
            assert engine.sessions == 2
            inside, outside = session.local(Side.INSIDE, 0), session.local(Side.OUTSIDE, 0)
            slice_lo = lo + 16 * session.worker_index
            assert slice_lo <= inside[1] < slice_lo + 16 and slice_lo <= outside[1] < slice_lo + 16
            connect(engine, session, phone, pbx)

            # Plain RTP both ways through the worker.
            phone.send(rtp(1), inside)
            assert await pbx.recv() == rtp(1)
            relaying = engine._workers[session.worker_index].proc  # runs what /status names
            assert relaying is not None and loaded_fast_path(relaying.pid) == (path == "fast")
            pbx.send(rtp(7, 0x99), outside)
            assert await phone.recv() == rtp(7, 0x99)
            # The first packet per side is reported at once, and wakes the B2BUA.
            await until(lambda: session.stats()[Side.OUTSIDE][0]["packets_in"] == 1, "stats")
            assert wakeups
            stats = session.stats()
            assert stats[Side.INSIDE][0]["packets_in"] == 1
            assert stats[Side.INSIDE][0]["bytes_in"] == 172
            assert stats[Side.OUTSIDE][0]["packets_out"] == 1

            # RTP -> SRTP toward the outside; SRTP from the outside -> RTP to the phone.
            key, salt = os.urandom(16), os.urandom(16)
            authenticated: list[MediaEvent] = []
            engine.on_event = authenticated.append
            engine.apply(SwitchSrtp(session.id, Side.OUTSIDE, SrtpKeys(key, salt), 2.0))
            engine.apply(WatchSrtp(session.id, Side.OUTSIDE))
            far_tx, far_rx = SrtpContext(key, salt), SrtpContext(key, salt)
            # Commands are asynchronous: a packet may overtake the switch (relayed plain).
            seq, plain = 2, 0
            while (protected := await pbx.recv_after(phone, rtp(seq), inside)) == rtp(seq):
                seq, plain = seq + 1, plain + 1
                assert plain < 100, "the switch never reached the worker"
                await asyncio.sleep(0.01)
            assert far_rx.unprotect(protected) == rtp(seq)
            for later in range(seq + 1, seq + 10):
                phone.send(rtp(later), inside)
                protected = await pbx.recv()
                assert protected != rtp(later) and len(protected) == 172 + 10
                assert far_rx.unprotect(protected) == rtp(later)
            for seq in range(8, 13):
                pbx.send(far_tx.protect(rtp(seq, 0x99)), outside)
                assert await phone.recv() == rtp(seq, 0x99)
            report = [SrtpAuthenticated(session.id, Side.OUTSIDE)]
            await until(lambda: authenticated == report, "the SRTP-authenticated report")

            def counted() -> bool:
                out = session.stats()[Side.OUTSIDE][0]
                return out["packets_encrypted"] == 10 and out["packets_decrypted"] == 5

            await until(counted, "SRTP counters")
            assert session.stats()[Side.OUTSIDE][0]["packets_in"] == 6
            assert session.stats()[Side.INSIDE][0]["packets_in"] == 11 + plain

            # Release: the ports come back once the worker has closed the sockets.
            owner = engine._workers[session.worker_index]
            capacity = owner.ports.capacity
            assert owner.ports.available == capacity - 2
            engine.apply(Release(session.id))
            engine.apply(Release(session.id))  # idempotent
            assert engine.sessions == 1
            await until(lambda: owner.ports.available == capacity, "ports released")
            for port in (inside[1], inside[1] + 1, outside[1], outside[1] + 1):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind((HOST, port))  # really free
            engine.apply(Release(other.id))
        finally:
            phone.close()
            pbx.close()
            await engine.close()
        assert all(not w["alive"] for w in engine.workers())
        for w in engine._workers:
            assert w.proc is not None and w.proc.poll() is not None

    run(scenario)


def test_worker_reports_the_first_packet_of_each_side_once() -> None:
    """``MediaFlowing`` per side of a session, on its first packet only: what lets an
    x-sipura caller wait for the phone's RTP without polling."""
    lo, hi = free_range(16)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1)
        assert engine.reports_flowing
        events: list[MediaEvent] = []
        engine.on_event = events.append
        engine.start()
        phone, pbx = Peer(), Peer()
        try:
            session = engine.allocate("call-1", 1)
            quiet = engine.allocate("call-2", 1)
            connect(engine, session, phone, pbx)
            inside, outside = session.local(Side.INSIDE, 0), session.local(Side.OUTSIDE, 0)
            assert await pbx.recv_after(phone, rtp(1), inside) == rtp(1)
            await until(lambda: events, "the phone side's first packet reported")
            assert events == [MediaFlowing(session.id, Side.INSIDE)]
            for seq in range(2, 6):
                assert await pbx.recv_after(phone, rtp(seq), inside) == rtp(seq)
            assert await phone.recv_after(pbx, rtp(1, 0x99), outside) == rtp(1, 0x99)
            await until(lambda: len(events) > 1, "the far side's first packet reported")
            await until(lambda: session.stats()[Side.INSIDE][0]["packets_in"] == 5, "stats")
            assert events == [
                MediaFlowing(session.id, Side.INSIDE),
                MediaFlowing(session.id, Side.OUTSIDE),
            ]
            assert quiet.stats()[Side.INSIDE][0]["packets_in"] == 0
        finally:
            phone.close()
            pbx.close()
            await engine.close()

    run(scenario)


def test_in_process_relay_does_not_report_media_flowing() -> None:
    lo, hi = free_range(8)
    assert RelayEngine(HOST, HOST, lo, hi).reports_flowing is False


def test_worker_death_loses_only_its_sessions_and_a_replacement_starts() -> None:
    lo, hi = free_range(16)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 2)
        lost: list[MediaEvent] = []
        engine.on_event = lost.append
        engine.start()
        peers = [Peer() for _ in range(4)]
        try:
            doomed = engine.allocate("doomed", 1)
            survivor = engine.allocate("survivor", 1)
            connect(engine, doomed, peers[0], peers[1])
            connect(engine, survivor, peers[2], peers[3])
            victim = engine._workers[doomed.worker_index]
            assert victim.proc is not None
            old_pid = victim.proc.pid
            os.kill(old_pid, signal.SIGKILL)
            await until(lambda: lost, "the lost sessions reported")
            assert lost_sessions(lost) == [(doomed.id,)]
            # The other worker's call goes on.
            peers[2].send(rtp(1), survivor.local(Side.INSIDE, 0))
            assert await peers[3].recv() == rtp(1)
            # A replacement takes the slice; the dead session's commands go nowhere.
            engine.apply(SetRemote(doomed.id, Side.INSIDE, 0, HOST, 9, 9))
            engine.apply(Release(doomed.id))
            described = engine.workers()[victim.index]
            await until(lambda: engine.workers()[victim.index]["alive"], "a replacement")
            described = engine.workers()[victim.index]
            assert described["pid"] != old_pid and described["restarts"] == 1
            assert described["sessions"] == 0
            fresh = engine.allocate("fresh", 1)
            assert fresh.worker_index == victim.index  # the least loaded again
            connect(engine, fresh, peers[0], peers[1])
            peers[0].send(rtp(5), fresh.local(Side.INSIDE, 0))
            assert await peers[1].recv() == rtp(5)
        finally:
            for peer in peers:
                peer.close()
            await engine.close()

    run(scenario)


def test_a_worker_that_stops_reading_is_killed_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGSTOP: the channel fills, commands queue up to the bound, then the worker is
    treated as dead; nothing blocks and the queue does not grow past the bound."""
    monkeypatch.setattr("proxy.media.worker_link.MAX_QUEUE", 20)
    lo, hi = free_range(8)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1)
        lost: list[MediaEvent] = []
        engine.on_event = lost.append
        engine.start()
        w = engine._workers[0]
        assert w.proc is not None
        stopped = w.proc.pid
        try:
            session = engine.allocate("stuck", 1)
            engine.flush()
            os.kill(stopped, signal.SIGSTOP)
            for round_ in range(100_000):
                if not w.alive:
                    break
                for _ in range(64):
                    port = 1000 + round_ % 1000
                    engine.apply(SetRemote(session.id, Side.INSIDE, 0, HOST, port, 0))
                engine.flush()
                assert len(w.queue) <= 20
            assert not w.alive, "never declared stuck"
            await until(lambda: lost, "the lost session reported")
            assert lost_sessions(lost) == [(session.id,)]
            await until(lambda: engine.workers()[0]["alive"], "a replacement")
            assert engine.workers()[0]["pid"] != stopped
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
            await engine.close()
        assert not Path(f"/proc/{stopped}").exists()

    run(scenario)


def test_every_command_type_reaches_the_worker_and_applies(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """One of each command, as the pool sends it (sent as-is, whatever its table
    checks): the worker's relay applies them all (no "cannot apply" in its log), keeps
    relaying, and the final Release gives the ports back."""
    lo, hi = free_range(8)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1)
        engine.start()
        phone, pbx = Peer(), Peer()
        try:
            session = engine.allocate("every", 1)
            sid, out = session.id, Side.OUTSIDE
            keys = SrtpKeys(os.urandom(16), os.urandom(16))
            commands: list[MediaCommand] = [
                SetRemote(sid, Side.INSIDE, 0, HOST, phone.port, phone.port + 1),
                SetRemote(sid, out, 0, HOST, pbx.port, pbx.port + 1),
                SetSrtp(sid, out, keys),
                AcceptSrtp(sid, out, keys),
                SwitchSrtp(sid, out, keys, 2.0),
                WatchSrtp(sid, out),
                SetTxSsrc(sid, out, 0x5555),
                PlayTone(sid, Side.INSIDE, 0, SECURE_CALL_TONE),
                PlayTone(sid, Side.INSIDE, 0, None),
                ClearSrtp(sid, out),
            ]
            assert {type(c) for c in commands} | {Release} == set(COMMAND_TYPES)
            for command in commands:
                engine.apply(command)
            inside = session.local(Side.INSIDE, 0)
            seq = 1
            while (relayed := await pbx.recv_after(phone, rtp(seq), inside)) != rtp(seq):
                seq += 1  # a packet may overtake the last commands (then it is SRTP)
                assert seq < 100, "the worker never applied ClearSrtp"
            owner = engine._workers[session.worker_index]
            engine.apply(Release(sid))
            await until(lambda: owner.ports.available == owner.ports.capacity, "ports back")
            assert relayed == rtp(seq) and engine.workers()[0]["alive"]
        finally:
            phone.close()
            pbx.close()
            await engine.close()

    run(scenario)
    err = capfd.readouterr().err
    assert "cannot apply" not in err and "unexpected" not in err, err


def test_no_live_worker_means_ports_exhausted() -> None:
    lo, hi = free_range(8)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1)
        with pytest.raises(PortsExhausted):
            engine.allocate("before start", 1)
        engine.start()
        try:
            first = engine.allocate("a", 1)
            second = engine.allocate("b", 1)  # 4 pairs: full now
            with pytest.raises(PortsExhausted):
                engine.allocate("c", 1)
            engine.apply(Release(first.id))
            engine.apply(Release(second.id))
            await until(lambda: engine._workers[0].ports.available == 4, "ports back")
            engine.apply(Release(engine.allocate("d", 1).id))
        finally:
            await engine.close()

    run(scenario)


def test_a_worker_that_cannot_start_is_retried_with_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EACCES on the interpreter: a failed spawn counts as a young death, so retries
    back off (at once, then 2 s, 4 s...) and the failure is one log line, not a storm."""
    lo, hi = free_range(8)
    interpreter = tmp_path / "python3"
    interpreter.write_text("#!/bin/sh\n")
    interpreter.chmod(0o644)  # not executable: Popen raises PermissionError
    real = sys.executable
    caplog.set_level("INFO", logger="sipura.media.workers")

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1)
        monkeypatch.setattr(sys, "executable", str(interpreter))
        engine.start()
        try:
            await asyncio.sleep(1.0)
            (worker,) = engine.workers()
            assert not worker["alive"]
            assert worker["restarts"] == 2, worker  # the first retry at once, the next in 2 s
            slot = engine._workers[0]
            assert slot.restart is not None and slot.young_deaths == 2
            failures = [r for r in caplog.records if "cannot start" in r.getMessage()]
            assert len(failures) == 1, [r.getMessage() for r in caplog.records]
            assert "Permission denied" in failures[0].getMessage()
            assert failures[0].getMessage().endswith("retrying in 0.0 s")
            monkeypatch.setattr(sys, "executable", real)  # fixed: the next retry starts it
            await until(lambda: engine.workers()[0]["alive"], "the worker after the fix", 5)
            started = [r.getMessage() for r in caplog.records if "started: pid" in r.getMessage()]
            assert started and started[-1].endswith("(after 2 failed attempts)"), started
        finally:
            await engine.close()

    run(scenario)


def test_a_malformed_report_marks_the_worker_broken() -> None:
    """The signalling side logs it, kills the worker and reports its sessions."""
    lo, hi = free_range(8)

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1)
        engine._closing = True  # no replacement in this test
        engine._loop = asyncio.get_running_loop()
        lost: list[MediaEvent] = []
        engine.on_event = lost.append
        w: WorkerSlot = engine._workers[0]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        w.sock, w.alive = theirs, True
        w.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        session = WorkerSession(w, 1, "x", 1, {Side.INSIDE: [], Side.OUTSIDE: []})
        w.sessions[1] = session
        ours.send(b"\xff garbage")
        w._readable()
        await until(lambda: lost, "the session reported lost")
        assert lost_sessions(lost) == [(1,)] and not w.alive
        assert w.proc.poll() is not None  # killed and reaped
        ours.close()

    run(scenario)


def test_a_worker_exits_on_a_malformed_command_and_on_end_of_file() -> None:
    for payload in (b"not json", None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.media.worker_process", "--fd", str(theirs.fileno()),
             "--inside-ip", HOST, "--outside-ip", HOST, "--port-min", "40000",
             "--port-max", "40007"],
            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE,
        )  # fmt: skip
        theirs.close()
        if payload is not None:
            ours.send(payload)
        else:
            ours.close()
        try:
            _, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
            ours.close()
        if payload is not None:
            assert process.returncode == 1 and b"bad message" in err, err
        else:
            assert process.returncode == 0 and b"closed the channel" in err, err


def test_relay_engine_adopts_prebound_sockets() -> None:
    lo, _hi = free_range(8)

    async def scenario() -> None:
        engine = RelayEngine(HOST, HOST, 45000, 45007, pool_pairs=0)
        closed: list[object] = []
        engine.on_closed = closed.append
        pairs = []
        for port in range(lo, lo + 8, 2):
            pair = []
            for p in (port, port + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((HOST, p))
                pair.append(sock)
            pairs.append((pair[0], pair[1]))
        with pytest.raises(ValueError, match="socket pairs"):
            engine.allocate("bad", 1, sockets=pairs[:1])
        assert pairs[0][0].fileno() == -1  # refused sockets are closed, not leaked
        session = engine.allocate("c", 1, sockets=pairs[2:])
        assert session.local(Side.INSIDE, 0) == (HOST, lo + 4)
        assert session.local(Side.OUTSIDE, 0) == (HOST, lo + 6)
        phone, pbx = Peer(), Peer()
        try:
            engine.apply(SetRemote(session.id, Side.INSIDE, 0, HOST, phone.port, phone.port + 1))
            engine.apply(SetRemote(session.id, Side.OUTSIDE, 0, HOST, pbx.port, pbx.port + 1))
            phone.send(rtp(3), (HOST, lo + 4))
            assert await pbx.recv() == rtp(3)
            flat = session.counters()
            assert stats_from(flat, 1) == session.stats()
            engine.apply(Release(session.id))
            await session.wait_closed()
            assert closed == [session]
            for port in range(lo + 4, lo + 8):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind((HOST, port))
        finally:
            phone.close()
            pbx.close()
            await engine.close()

    run(scenario)


def test_stats_from_short_counters_is_all_zero() -> None:
    stats = stats_from((), 2)
    assert len(stats[Side.INSIDE]) == len(stats[Side.OUTSIDE]) == 2
    assert stats[Side.OUTSIDE][1]["packets_in"] == 0
    assert stats[Side.OUTSIDE][1]["drops"]["send_error"] == 0


@pytest.mark.parametrize("path", built_paths())
def test_released_session_reports_its_final_counters_exactly(path: str) -> None:
    """Packets sent right before the release are in the session's final counters (the
    ``MediaReleased`` event), not only those of the last periodic report; a session whose
    worker died is answered with its last reported counters."""
    lo, hi = free_range(16)
    sent = 40

    async def scenario() -> None:
        engine = WorkerPool(HOST, HOST, lo, hi, 1, fast_path="on" if path == "fast" else "off")
        events: list[MediaEvent] = []
        engine.on_event = events.append
        engine.start()
        phone, pbx = Peer(), Peer()
        try:
            session = engine.allocate("call-1", 1)
            inside = session.local(Side.INSIDE, 0)
            connect(engine, session, phone, pbx)
            assert await pbx.recv_after(phone, rtp(1), inside) == rtp(1)
            await until(lambda: session.stats()[Side.INSIDE][0]["packets_in"] == 1, "1st")
            for seq in range(2, sent + 1):
                phone.send(rtp(seq), inside)
            for _ in range(2, sent + 1):
                await pbx.recv()  # relayed: counted in the worker, not reported yet
            engine.apply(Release(session.id))
            await until(lambda: any(isinstance(e, MediaReleased) for e in events), "final")
            final = only_released(events, session.id)
            assert final[Side.INSIDE][0]["packets_in"] == sent
            assert final[Side.OUTSIDE][0]["packets_out"] == sent
            assert final[Side.INSIDE][0]["bytes_in"] == sent * len(rtp(1))

            # A worker that dies: its session's release is answered with what it had.
            events.clear()
            lost = engine.allocate("call-2", 1)
            connect(engine, lost, phone, pbx)
            assert await pbx.recv_after(phone, rtp(1), lost.local(Side.INSIDE, 0)) == rtp(1)
            await until(lambda: lost.stats()[Side.INSIDE][0]["packets_in"] == 1, "reported")
            worker = engine._workers[lost.worker_index].proc
            assert worker is not None
            worker.kill()
            await until(lambda: any(isinstance(e, SessionsLost) for e in events), "lost")
            engine.apply(Release(lost.id))
            await until(lambda: any(isinstance(e, MediaReleased) for e in events), "final")
            assert only_released(events, lost.id)[Side.INSIDE][0]["packets_in"] == 1
        finally:
            phone.close()
            pbx.close()
            await engine.close()

    run(scenario)


def only_released(events: list[MediaEvent], sid: int) -> dict[Side, list[StreamStats]]:
    released = [e for e in events if isinstance(e, MediaReleased)]
    assert [e.session for e in released] == [sid]
    return released[0].stats


def test_channel_message_sizes_fit() -> None:
    """A full stats batch stays under the message limit, whatever the sessions' streams
    and however large their counters (the batch is cut by sessions and by counters)."""
    from proxy.media.counters import COUNTERS
    from proxy.media.worker_process import STATS_BATCH, STATS_INTS

    one_stream = 2 * len(COUNTERS)
    for streams in (1, 2, 4, 8):
        width = streams * one_stream
        sessions = max(1, min(STATS_BATCH, STATS_INTS // width))
        counters = ch.pack_counters(2**63 - 1 for _ in range(width))
        batch = ch.Stats(tuple((2**40 + i, counters) for i in range(sessions)))
        assert len(ch.encode(batch)) < ch.MAX_MESSAGE, streams


@pytest.mark.parametrize("path", built_paths())
def test_a_worker_applies_a_command_before_a_packet_that_came_after_it(path: str) -> None:
    """Regression (found by bench/soak.py on the compiled path): the epoll set of the
    compiled path is one descriptor for the event loop, readable as soon as any call's
    packet waits, so it came before the channel and the drain read a packet that had
    arrived *after* a ``SwitchSrtp``: the phone's first packet after the switch-over left
    in the clear. Here the loop is held while another call's packet, the command and the
    phone's packet arrive, in that order; what reaches the far end must be SRTP."""
    from proxy.media.worker_process import WorkerProcess

    lo, _hi = free_range(8)

    def bound_pairs() -> tuple[list[tuple[socket.socket, socket.socket]], list[int]]:
        pairs = []
        for port in range(lo, lo + 8, 2):
            rtp_sock, rtcp_sock = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                                   for _ in range(2))  # fmt: skip
            rtp_sock.bind((HOST, port))
            rtcp_sock.bind((HOST, port + 1))
            pairs.append((rtp_sock, rtcp_sock))
        return pairs, [s.fileno() for pair in pairs for s in pair]

    async def scenario() -> None:
        engine = RelayEngine(HOST, HOST, lo, lo + 7, pool_pairs=0,
                             fast_path="on" if path == "fast" else "off")  # fmt: skip
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        worker = WorkerProcess(theirs, engine, 0)
        running = asyncio.get_running_loop().create_task(worker.run())
        pairs, fds = bound_pairs()
        peers = [Peer() for _ in range(4)]  # call 1: phone, pbx; call 2: phone, pbx
        phone, pbx, other_phone, other_pbx = peers
        try:
            # two calls of one stream: four sockets each
            socket.send_fds(ours, [ch.encode(ch.Allocate(1, "call-1", 1))], fds[:4])
            socket.send_fds(ours, [ch.encode(ch.Allocate(2, "call-2", 1))], fds[4:])
            for sock in (s for pair in pairs for s in pair):
                sock.close()
            for sid, (inside, outside) in ((1, (phone, pbx)), (2, (other_phone, other_pbx))):
                for side, peer in ((Side.INSIDE, inside), (Side.OUTSIDE, outside)):
                    command = SetRemote(sid, side, 0, HOST, peer.port, peer.port + 1)
                    ours.send(ch.encode(command))
            assert await pbx.recv_after(phone, rtp(1), (HOST, lo)) == rtp(1)
            assert await other_pbx.recv_after(other_phone, rtp(1, 0x99), (HOST, lo + 4)) == rtp(
                1, 0x99
            )
            keys = SrtpKeys(bytes(range(16)), bytes(range(16, 32)))
            # The loop is held from here: three arrivals in this order.
            other_phone.send(rtp(2, 0x99), (HOST, lo + 4))
            ours.send(ch.encode(SwitchSrtp(1, Side.OUTSIDE, keys, 2.0, True)))
            phone.send(rtp(2), (HOST, lo))
            await asyncio.sleep(0)
            sent = await pbx.recv()
            assert len(sent) == len(rtp(2)) + 10, "the packet after the switch left in the clear"
            assert SrtpContext(keys.master_key, keys.master_salt).unprotect(sent) == rtp(2)
            assert await other_pbx.recv() == rtp(2, 0x99)
        finally:
            worker.stop()
            await running
            ours.close()
            for peer in peers:
                peer.close()

    run(scenario)
