#!/usr/bin/env python3
"""CPU of the sans-IO call core per call set-up, secured and plain, in memory.

The part of ``bench/setup_cost.py``'s figure that is the call core's own work, without
sockets, the media worker channel or the event loop: whole calls driven through
:class:`proxy.b2bua.core.B2BUA` as the edge drives it (``receive`` then
``next_deadline`` per message, ``poll`` at deadlines, media events), with a phone
(inside), an x-sipura peer played by the protocol's own
:class:`~proxy.xsipura.handshake.CalleeHandshake` (outside, as
``tests/b2bua/test_secure_core.py`` does) and a media engine that only counts. ``--window``
calls are in flight at once, as in the closed-loop bench. Only the core's calls are
timed (``time.process_time``); building and parsing the peers' messages is not.

    python bench/setup_core.py [--calls 2000] [--window 300] [--profile secured]

``--profile KIND`` runs cProfile around the core's calls only and prints the functions
with the most time. Run it in any checkout (it uses that tree's ``proxy`` and
``tests/b2bua/sipfake.py``) to compare two trees on one machine.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "b2bua")]

from sipfake import (  # noqa: E402
    PHONE,
    UPSTREAM,
    FakeResolver,
    Wire,
    build_request,
    build_response,
    parse,
    sdp,
    tag,
    uac_dialog,
    via_for,
    wires,
)

from proxy.b2bua.config import parse_config  # noqa: E402
from proxy.b2bua.core import B2BUA, Outbound  # noqa: E402
from proxy.b2bua.line_keys import load_security  # noqa: E402
from proxy.media.commands import MediaCommand, MediaEvent, SrtpAuthenticated  # noqa: E402
from proxy.media.counters import COUNTERS, stats_from  # noqa: E402
from proxy.media.engine import Side, StreamStats  # noqa: E402
from proxy.media.ports import PortsExhausted  # noqa: E402
from proxy.sip.message import Request  # noqa: E402
from proxy.xsipura import handshake as hs  # noqa: E402
from proxy.xsipura.keyfiles import generate_ca_key  # noqa: E402
from proxy.xsipura.mc import encode_private_key_param  # noqa: E402
from proxy.xsipura.provision import issue_line  # noqa: E402
from proxy.xsipura.trust import TrustStore  # noqa: E402
from testkit.machine import describe  # noqa: E402

IN, OUT = Side.INSIDE, Side.OUTSIDE
LINE = "14085551234"
PLAIN = "14085550000"
FAR = "18005550199"
NOW_UTC = datetime.now(UTC)
XS = "application/x-sipura"


class CountingSession:
    """A media session that keeps only what the core reads back: ports, counters."""

    __slots__ = ("_ports", "call_id", "id", "packets_in", "streams")

    def __init__(self, sid: int, call_id: str, ports: tuple[int, int]) -> None:
        self.id, self.call_id, self.streams, self._ports = sid, call_id, 1, ports
        self.packets_in = 0

    def local(self, side: Side, index: int) -> tuple[str, int]:
        return ("10.0.0.1", self._ports[0]) if side is IN else ("192.0.2.1", self._ports[1])

    def stats(self) -> dict[Side, list[StreamStats]]:
        # what a media worker's session gives: its last report, rebuilt (counters.py)
        counters = [0] * (2 * len(COUNTERS))
        counters[0] = self.packets_in
        return stats_from(tuple(counters), 1)


class CountingMedia:
    """Allocates from a port counter and counts the commands it is given."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._ports = itertools.count(20000, 4)
        self.live: dict[int, CountingSession] = {}
        self.commands = 0
        self.on_event: Callable[[MediaEvent], None] | None = None
        self.reports_flowing = False  # the phone's RTP flows before stage 2 is due
        self.sessions = 0
        self.pooled = 0

    def allocate(self, call_id: str, streams: int) -> CountingSession:
        if streams != 1:
            raise PortsExhausted("one stream only here")
        port = next(self._ports)
        session = CountingSession(next(self._ids), call_id, (port, port + 2))
        self.live[session.id] = session
        return session

    def apply(self, command: MediaCommand) -> None:
        self.commands += 1
        if type(command).__name__ == "Release":
            self.live.pop(command.session, None)

    def pooled_ports(self) -> list[int]:
        return []

    def workers(self) -> list[dict[str, Any]]:
        return []

    def close_now(self) -> None:
        self.live.clear()


@dataclass
class Call:
    secure: bool
    a_invite: Request | None = None
    b_invite: Request | None = None
    up_tag: str = ""
    callee: hs.CalleeHandshake | None = None
    phone_bye: Request | None = None


class Harness:
    """The core and the two peers; ``timed`` accumulates the core's CPU seconds."""

    def __init__(self, profile: cProfile.Profile | None) -> None:
        ca = generate_ca_key()
        line = issue_line(ca, "Bench Line", LINE, NOW_UTC + timedelta(days=30))
        self.far = issue_line(ca, "Far End", FAR, NOW_UTC + timedelta(days=30))
        self.trust = TrustStore([ca.public])
        config = parse_config(
            f"""\
[inside]
listen = "10.0.0.1:5060"
media_ip = "10.0.0.1"
unknown_users = "relay"
[outside]
listen = "192.0.2.1:5060"
media_ip = "192.0.2.1"
upstream = "sip:203.0.113.5:5060"
[media]
port_min = 20000
port_max = 29999
[log]
level = "warning"
[xsipura]
tone = false
[[line]]
user_id = "{LINE}"
mini_certificate = "{line.param.to_base64()}"
srtp_private_key = "{encode_private_key_param(line.key)}"
secure_by_default = true
allowed_sources = ["10.0.0.10"]
""",
            "bench.toml",
        )
        self.media = CountingMedia()
        self.core = B2BUA(
            config, self.media, load_security(config), lambda: NOW_UTC, resolver=FakeResolver()
        )  # the upstream is an address: never asked
        self.media.on_event = self._event
        self.events: list[MediaEvent] = []
        self.now = 1000.0
        self.timed = 0.0
        self.profile = profile
        self.ssrc = itertools.count(0x10000)

    def _event(self, event: MediaEvent) -> None:
        self.events.append(event)

    def _timed(self, work: Callable[[], list[Outbound]]) -> list[Wire]:
        """One edge turn: the core's work, then ``next_deadline`` (as the server arms
        its timer after every message)."""
        profile = self.profile
        # The harness allocates far more than the core (it builds and parses every
        # message of both peers); a collection it triggered must not land in the core's
        # time, so the young generation starts empty. The proxy's own collections are
        # left out (~0.1 ms per call in the SIP process, gc.callbacks).
        gc.collect(0)
        t0 = time.process_time()
        if profile is not None:
            profile.enable()
        out = work()
        self.core.next_deadline()
        if profile is not None:
            profile.disable()
        self.timed += time.process_time() - t0
        return wires(out)

    def receive(self, side: Side, data: bytes, source: Any) -> list[Wire]:
        return self._timed(lambda: self.core.receive(side, data, source, self.now))

    def advance(self, seconds: float) -> list[Wire]:
        """Move the clock, polling at every deadline on the way, as the edge's timer."""
        end, out = self.now + seconds, []
        while (deadline := self.core.next_deadline()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            out += self._timed(lambda: self.core.poll(self.now))
        self.now = end
        return out

    # --- one step of a call -------------------------------------------------------

    def invite(self, call: Call) -> Wire:
        user = LINE if call.secure else PLAIN
        uri = f"sip:{FAR}@203.0.113.5"
        data = build_request(
            "INVITE", uri, via=via_for(PHONE), from_=f"<sip:{user}@10.0.0.1>;tag={tag()}",
            to=f"<{uri}>", call_id=f"{tag()}@phone", cseq=1,
            contact=f"<sip:{user}@10.0.0.10:5060>", body=sdp("10.0.0.10", 4000),
        )  # fmt: skip
        request = parse(data)
        assert isinstance(request, Request)
        call.a_invite = request
        out = self.receive(IN, data, PHONE)
        (b,) = [w for w in out if w.side is OUT]
        call.b_invite = b.request
        return b

    def answer(self, call: Call) -> None:
        assert call.b_invite is not None and call.a_invite is not None
        call.up_tag = tag()
        ok = build_response(call.b_invite, 200, to_tag=call.up_tag,
                            contact="<sip:far@203.0.113.5:5060>", body=sdp("203.0.113.50", 7000),
                            headers=(("Supported", "x-sipura"),))  # fmt: skip
        out = self.receive(OUT, ok, UPSTREAM)
        (a_ok,) = [w for w in out if w.side is IN]
        phone = uac_dialog(PHONE, call.a_invite, a_ok.response, "<sip:x@10.0.0.10:5060>")
        self.receive(IN, phone.request("ACK"), PHONE)
        call.phone_bye = parse(phone.request("BYE"))  # type: ignore[assignment]
        for session in self.media.live.values():
            session.packets_in = 1  # the phone's RTP flows (profile §2)

    def handshake(self, calls: list[Call], infos: list[Wire]) -> None:
        """Answer each call's Caller Hello and Caller Final as the far x-sipura callee;
        the phones answer the caller-ID UPDATE."""
        by_call = {c.b_invite.call_id: c for c in calls if c.b_invite is not None}
        pending = infos
        while pending:
            nxt: list[Wire] = []
            for info in pending:
                call = by_call[info.request.call_id]
                if call.callee is None:
                    call.callee = hs.CalleeHandshake(
                        certificate=self.far.certificate, private_key=self.far.key,
                        trust=self.trust, local_ssrc=next(self.ssrc),
                    )  # fmt: skip
                events = call.callee.receive_request(info.request.body, self.now, NOW_UTC)
                answer = events[0]
                assert isinstance(answer, hs.SendResponse), events
                body = (answer.body or "").encode()
                data = build_response(info.request, answer.status, reason=answer.reason,
                                      body=body, content_type=XS)  # fmt: skip
                for wire in self.receive(OUT, data, UPSTREAM):
                    if wire.side is OUT and isinstance(wire.msg, Request):
                        nxt.append(wire)  # the Caller Final
                    elif isinstance(wire.msg, Request) and wire.msg.method == "UPDATE":
                        self.receive(IN, build_response(wire.msg, 200), PHONE)
            pending = nxt
        while self.events:  # what the edge does with media events
            event = self.events.pop(0)
            self._timed(lambda event=event: self.core.on_media_event(event, self.now))

    def bye(self, call: Call) -> None:
        assert call.phone_bye is not None
        out = self.receive(IN, call.phone_bye.serialize(), PHONE)
        for wire in out:
            if wire.side is OUT and isinstance(wire.msg, Request):
                self.receive(OUT, build_response(wire.msg, 200), UPSTREAM)


def run(kind: str, calls: int, window: int, profile: cProfile.Profile | None) -> float:
    """µs of core CPU per call for ``calls`` calls of ``kind``, ``window`` at a time."""
    h = Harness(profile)
    gc.collect()
    gc.freeze()  # as the proxy does after start-up (proxy/runtime.py)
    gc.set_threshold(20000, 20, 100)
    done = 0
    while done < calls:
        batch = [Call(kind == "secured") for _ in range(min(window, calls - done))]
        for call in batch:
            h.invite(call)
        for call in batch:
            h.answer(call)
        infos = [w for w in h.advance(0.25) if w.side is OUT and isinstance(w.msg, Request)]
        if kind == "secured":
            assert len(infos) == len(batch), (len(infos), len(batch))
            h.handshake(batch, infos)
            # a media event per call (first SRTP authenticated), as the relay reports
            for session in list(h.media.live.values()):
                h.events.append(SrtpAuthenticated(session.id, OUT))
            h.handshake(batch, [])
        for call in batch:
            h.bye(call)
        h.advance(40.0)  # every transaction and call timer runs out
        assert not h.core.calls, len(h.core.calls)
        done += len(batch)
        if kind == "secured":
            assert h.core.stats.secured == done, (h.core.stats.secured, done)
    return h.timed / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--window", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", choices=("secured", "plain"))
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if args.calls < 1 or args.window < 1 or args.rounds < 1:
        print("setup_core: --calls, --window and --rounds must be >= 1", file=sys.stderr)
        return 2
    print(f"# {describe()}, tree {ROOT}")
    if args.profile:
        profile = cProfile.Profile()
        cost = run(args.profile, args.calls, args.window, profile)
        stream = io.StringIO()
        stats = pstats.Stats(profile, stream=stream)
        stats.sort_stats("tottime").print_stats(args.top)
        print(f"{args.profile}: {cost:.0f} µs per call under cProfile")
        print(stream.getvalue())
        return 0
    print(f"{'kind':<8} {'µs core CPU per call (best of ' + str(args.rounds) + ')':>40}")
    for kind in ("secured", "plain"):
        best = min(run(kind, args.calls, args.window, None) for _ in range(args.rounds))
        print(f"{kind:<8} {best:>40.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
