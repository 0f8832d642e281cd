"""Routing and name lookups in the sans-IO core: the edge resolves, the core waits.

The core never resolves a name itself: it asks the edge (``Resolver.request``), parks
the request that needed the name, and handles it when ``B2BUA.resolved`` delivers the
answer. These tests play the edge by hand (``World.auto_lookups = False``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, UP_SDP, phone_invite
from sipfake import (
    Wire,
    World,
    build_response,
    make_config,
    only,
    parse,
    pick,
    tag,
    wires,
)

from proxy.b2bua.routing import LOOKUP_TIMEOUT_S, MAX_PARKED, ResolveQuery
from proxy.media.engine import Side
from proxy.sip.transaction import Address

NAME = "pbx.slow.example"
PBX = Address("203.0.113.9", 5070)


def slow_world(upstream: str = f"sip:{NAME}:5070") -> World:
    w = World(make_config(upstream=upstream))
    w.auto_lookups = False
    return w


def resolve(w: World, query: ResolveQuery, *targets: Address, ttl: float = 300.0) -> list[Wire]:
    """Play the edge: deliver the answer to ``query`` and collect what the core sends."""
    out = wires(w.core.resolved(query, list(targets), ttl, w.now))
    w.sent.extend(out)
    return out


def test_an_invite_waits_for_its_upstream_name_then_goes_there() -> None:
    w = slow_world()
    data = phone_invite()
    out = w.phone(data)
    assert [x.response.status for x in out] == [100]  # the phone hears Trying, no more
    assert w.resolver.asked == [ResolveQuery(NAME, 5070, "udp")]
    assert w.core.calls == {} and w.media.active == []  # nothing held while waiting
    assert [x.response.status for x in w.phone(data)] == [100]  # a retransmission
    assert w.resolver.asked == [ResolveQuery(NAME, 5070, "udp")]  # asked once
    query = w.resolver.asked.pop()
    invite = only(pick(resolve(w, query, PBX), OUT, method="INVITE"))
    assert invite.dest == PBX
    assert len(w.core.calls) == 1


def test_the_answer_is_cached_until_its_ttl() -> None:
    w = slow_world()
    w.phone(phone_invite())
    resolve(w, w.resolver.asked.pop(), PBX, ttl=60)
    w.phone(phone_invite())  # a second call: no new lookup, straight out
    assert w.resolver.asked == []
    assert len(pick(w.sent, OUT, method="INVITE")) == 2
    w.now += 61
    w.phone(phone_invite())
    assert w.resolver.asked == [ResolveQuery(NAME, 5070, "udp")]  # expired: asked again


def test_a_name_that_fails_gets_502_and_nothing_is_held() -> None:
    w = slow_world()
    w.phone(phone_invite())
    out = resolve(w, w.resolver.asked.pop())
    assert only(pick(out, IN, status=502)).response.get("warning") == (
        f'399 - "cannot resolve {NAME}"'
    )
    assert not pick(out, OUT)
    assert w.core.calls == {} and w.media.all_returned()
    w.phone(phone_invite())  # the failure is remembered for a while: no new lookup
    assert w.resolver.asked == []
    assert len(pick(w.sent, IN, status=502)) == 2


def test_a_lookup_the_edge_never_answers_fails_after_its_timeout() -> None:
    w = slow_world()
    w.phone(phone_invite())
    deadline = w.core.next_deadline()
    assert deadline is not None and deadline <= w.now + LOOKUP_TIMEOUT_S
    out = w.advance(LOOKUP_TIMEOUT_S + 0.1)
    assert only(pick(out, IN, status=502))
    assert w.core.calls == {}


def test_too_many_requests_waiting_on_one_name_get_503() -> None:
    w = slow_world()
    for _ in range(MAX_PARKED):  # late-offer INVITEs: no media ports to run out of
        w.phone(phone_invite(body=b""))
    out = w.phone(phone_invite(body=b""))
    assert only(pick(out, IN, status=503)).response.get("retry-after") == "5"
    answered = resolve(w, w.resolver.asked.pop(), PBX)
    assert len(pick(answered, OUT, method="INVITE")) == MAX_PARKED


def test_ip_literals_need_no_lookup() -> None:
    w = slow_world(upstream="sip:203.0.113.9:5070")
    out = w.phone(phone_invite())
    assert only(pick(out, OUT, method="INVITE")).dest == PBX
    assert w.resolver.asked == []


def test_a_contact_name_in_the_answer_is_resolved_for_later_requests() -> None:
    """The 2xx names its Contact by host name: the ACK goes to the known next hop at
    once, and requests after the answer go to the resolved address."""
    w = World(make_config(upstream="sip:203.0.113.5:5060"))
    a_invite = parse(phone_invite())
    out = w.phone(phone_invite(call_id=a_invite.call_id, from_tag=a_invite.from_.tag))
    b = only(pick(out, OUT, method="INVITE"))
    w.auto_lookups = False
    up_tag = tag()
    ok = build_response(b.request, 200, to_tag=up_tag, contact="<sip:pbx@far.example:5090>",
                        body=UP_SDP)  # fmt: skip
    w.upstream(ok)
    assert w.resolver.asked == [ResolveQuery("far.example", 5090, "udp")]
    resolve(w, w.resolver.asked.pop(), Address("203.0.113.77", 5090))
    assert w.core.calls
    (call,) = w.core.calls.values()
    assert call.leg_on(Side.OUTSIDE).dest == Address("203.0.113.77", 5090)
