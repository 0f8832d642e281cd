"""Fuzzing the sans-IO core with mutated SIP: the RFC 4475 torture corpus and the
tests' own traffic (a phone's INVITE, REGISTER and OPTIONS, the PBX's INVITE and
answers, requests inside an answered call), each mutated a few times, fed from either
side over UDP or TCP.

Asserted for every message: no exception escapes :meth:`B2BUA.receive` or
:meth:`B2BUA.poll`; every request that can be answered (it has a request line and the
five headers a response copies, and is not an ACK) gets a final response back at its
source; and once the timers have run, no transaction, call or media port is left.
Bounded: ``max_examples`` keeps the whole module well under 30 s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, UP_CONTACT, UP_SDP, answer, phone_invite, start_call, upstream_invite
from sipfake import (
    PHONE,
    PHONE_TCP,
    UPSTREAM,
    UPSTREAM_TCP,
    World,
    build_request,
    build_response,
    tag,
    via_for,
)
from test_hostile_core import FINAL, dialog_key, record_raw, register

from proxy.media.engine import Side
from proxy.sip.stateless import stateless_response
from proxy.sip.transaction import Address

CORPUS = Path(__file__).resolve().parent.parent / "data" / "rfc4475"
TORTURE = [
    (CORPUS / f"{entry['name']}.dat").read_bytes()
    for entry in json.loads((CORPUS / "INDEX.json").read_text("utf-8"))
]
OWN_TRAFFIC = [
    phone_invite(),
    phone_invite(body=b""),
    upstream_invite(),
    register(),
    register(expires="0"),
    build_request(
        "OPTIONS",
        "sip:10.0.0.1",
        via=via_for(PHONE),
        from_=f"<sip:a@b>;tag={tag()}",
        to="<sip:10.0.0.1>",
        call_id=f"{tag()}@o",
        cseq=1,
    ),
    build_request(
        "MESSAGE",
        "sip:18005550199@10.0.0.1",
        via=via_for(PHONE),
        from_=f"<sip:+14085551234@10.0.0.1>;tag={tag()}",
        to="<sip:18005550199@10.0.0.1>",
        call_id=f"{tag()}@m",
        cseq=1,
        body=b"hello",
        content_type="text/plain",
    ),
]
IN_CALL = ["BYE", "INFO", "INVITE", "UPDATE", "PRACK", "CANCEL", "ACK", "200", "180"]
"""Messages taken from an answered call (or its set-up) instead of a fixed seed."""
INTERESTING = [b"\x00", b"\xff", b"\r\n", b"\n", b" ", b"\t", b":", b";", b",", b"<", b">",
               b'"', b"\\", b"0", b"9", b"-1", "²".encode(), b"4294967296", b"sip:", b"tag=",
               b"z9hG4bK", b"Content-Length: 99999", b"Expires: ", b"\r\n\r\n", b"*"]  # fmt: skip


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup_line", "truncate", "value"]))
        # Positions are drawn independently of the length: seeds carry random tags,
        # so their length varies from run to run and Hypothesis must draw the same.
        at = draw(st.integers(0, 1 << 16)) % max(1, len(buffer))
        if kind == "flip" and buffer:
            buffer[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            buffer[at:at] = draw(st.sampled_from(INTERESTING))
        elif kind == "delete":
            del buffer[at : at + draw(st.integers(1, 20))]
        elif kind == "dup_line":
            start = buffer.rfind(b"\n", 0, at) + 1
            end = buffer.find(b"\n", at)
            if end > start:
                buffer[start:start] = buffer[start : end + 1]
        elif kind == "truncate":
            del buffer[max(at, 20) :]
        else:  # a header's value replaced by something hostile
            colon = buffer.find(b":", at)
            end = buffer.find(b"\r\n", colon)
            if colon > 0 and end > colon:
                buffer[colon + 1 : end] = b" " + draw(st.sampled_from(INTERESTING))
    return bytes(buffer)


def in_call_message(w: World, which: str) -> tuple[bytes, Side, Address]:
    """Set a call up in ``w`` and return one of its messages (unsent)."""
    a_invite, b = start_call(w)
    if which in ("200", "180"):
        status = int(which)
        body = UP_SDP if status == 200 else b""
        return build_response(b.request, status, to_tag="up", contact=UP_CONTACT,
                              body=body), OUT, UPSTREAM  # fmt: skip
    if which == "CANCEL":
        cancel = a_invite.serialize().replace(b"INVITE sip", b"CANCEL sip", 1)
        return cancel.replace(b" INVITE\r\n", b" CANCEL\r\n"), IN, PHONE
    call = answer(w, a_invite, b)
    if which in ("PRACK", "ACK"):
        return call.phone.request(which), IN, PHONE
    body = UP_SDP if which in ("INVITE", "UPDATE") else b""
    return call.pbx.request(which, body=body), OUT, UPSTREAM


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), tcp=st.booleans())
def test_mutated_sip_never_escapes_leaves_nothing_unanswered_or_behind(
    data: st.DataObject, tcp: bool
) -> None:
    w = World()
    raw = record_raw(w)
    source_kind = data.draw(st.sampled_from(["torture", "own", "call"]))
    if source_kind == "call":
        seed, side, source = in_call_message(w, data.draw(st.sampled_from(IN_CALL)))
    else:
        pool = TORTURE if source_kind == "torture" else OWN_TRAFFIC
        seed = data.draw(st.sampled_from(pool))
        side = data.draw(st.sampled_from([IN, OUT]))
        source = PHONE if side is IN else UPSTREAM
    if tcp:
        source = PHONE_TCP if side is IN else UPSTREAM_TCP
    mutated = data.draw(mutations(seed))
    sent_before = len(raw)
    w.send(side, mutated, source)
    w.advance(40.0)
    answerable = stateless_response(mutated, 400) is not None and not mutated.startswith(b"ACK")
    if answerable:
        key = dialog_key(mutated)
        finals = [d for s, dest, d in raw[sent_before:] if s is side and dest == source
                  and FINAL.match(d) and dialog_key(d) == key]  # fmt: skip
        assert finals, f"unanswered: {mutated[:300]!r}"
    # An answered call lives until a BYE: hang up what is left, then let time run out.
    for call in list(w.core.calls.values()):
        w.core.teardown.hang_up(call, w.now, "fuzz")
    w.advance(400.0)
    assert all(len(layer) == 0 for layer in w.core.layers.values()), "transactions left"
    assert w.core.calls == {}, "calls left"
    assert w.media.all_returned(), "media ports left"
    assert w.core.lookups.next_deadline() is None
