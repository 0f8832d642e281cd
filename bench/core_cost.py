"""CPU per SIP message of the sans-IO call core, against the number of calls up.

The I/O edge hands the core every message and then asks it for its next deadline, so
the cost of one message is ``receive`` + ``next_deadline``. A core that scans its
calls on either path costs more per message the more calls are up; one that keeps its
deadlines on heaps does not. This measures it in memory (the tests' fake media engine
and clock, no sockets): N calls are set up and confirmed (``[media] rtp_timeout_s``
on, so every call has a deadline), then M out-of-dialog OPTIONS from the outside are
timed, each followed by ``next_deadline()``.

    python bench/core_cost.py [--calls 0,500,2000] [--messages 5000]

Run it in any checkout (it uses that tree's ``proxy`` and ``tests/b2bua/sipfake.py``),
so two trees can be compared on the same machine in the same minute.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "b2bua")]

import sipfake  # noqa: E402
from sipfake import (  # noqa: E402
    PHONE,
    UPSTREAM,
    FakeMedia,
    World,
    build_request,
    build_response,
    make_config,
    pick,
    sdp,
    tag,
    uac_dialog,
    via_for,
)

from proxy.media.engine import Side  # noqa: E402
from testkit.machine import describe  # noqa: E402


def world(calls: int) -> World:
    config = make_config(media_extra="rtp_timeout_s = 60")
    media = FakeMedia(pairs=2 * calls + 8)
    if "media" in inspect.signature(World).parameters:
        return World(config, media)
    return World(config)  # pragma: no cover - an older tree


def set_up(w: World, calls: int) -> None:
    for n in range(calls):
        call_id = f"{tag()}-{n}@bench"
        invite = build_request(
            "INVITE",
            "sip:18005550199@203.0.113.5",
            via=via_for(PHONE),
            from_=f"<sip:+14085551234@10.0.0.1>;tag={tag()}",
            to="<sip:18005550199@203.0.113.5>",
            call_id=call_id,
            cseq=1,
            contact="<sip:14085551234@10.0.0.10:5060>",
            body=sdp("10.0.0.10", 4000),
        )
        out = w.phone(invite)
        (b,) = pick(out, Side.OUTSIDE, method="INVITE")
        ok = build_response(b.request, 200, to_tag=tag(), contact="<sip:pbx@203.0.113.5>",
                            body=sdp("203.0.113.50", 7000))  # fmt: skip
        (a_ok,) = pick(w.upstream(ok), Side.INSIDE, status=200)
        phone = uac_dialog(PHONE, parse_invite(invite), a_ok.response, "<sip:x@10.0.0.10>")
        w.phone(phone.request("ACK"))
    assert len(w.core.calls) == calls, (len(w.core.calls), calls)


def parse_invite(data: bytes):  # type: ignore[no-untyped-def]
    return sipfake.parse(data)


def measure(calls: int, messages: int) -> float:
    w = world(calls)
    set_up(w, calls)
    options = [
        build_request(
            "OPTIONS",
            "sip:192.0.2.1:5060",
            via=via_for(UPSTREAM),
            from_=f"<sip:probe@203.0.113.5>;tag={tag()}",
            to="<sip:192.0.2.1>",
            call_id=f"{tag()}-{i}@probe",
            cseq=1,
        )
        for i in range(messages)
    ]
    core, now = w.core, w.now
    gc.collect()
    gc.freeze()  # as the proxy does after start-up (proxy/runtime.py)
    start = time.process_time()
    for data in options:
        core.receive(Side.OUTSIDE, data, UPSTREAM, now)
        core.next_deadline()
    return (time.process_time() - start) / messages * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="0,500,2000")
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    print(f"# {describe()}, tree {ROOT}")
    print(f"{'calls up':>9} {'µs CPU per message':>20}")
    for calls in (int(c) for c in args.calls.split(",")):
        best = min(measure(calls, args.messages) for _ in range(3))
        print(f"{calls:>9} {best:>20.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
