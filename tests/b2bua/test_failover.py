"""Failover in the sans-IO core: an INVITE or relayed REGISTER whose target answers
503/408 or times out goes to the next target (RFC 3263 §4.3, upstream lists), as a new
client transaction the phone never notices; failed targets are held down."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from callflows import IN, OUT, PHONE_SDP, UP_CONTACT, UP_SDP, phone_invite, start_call
from sipfake import (
    NAMES,
    World,
    build_request,
    build_response,
    only,
    pick,
    tag,
    via_for,
)

from proxy.sip.transaction import Address

A1 = Address("203.0.113.11", 5060)
A2 = Address("203.0.113.12", 5070)
B1 = Address("198.51.100.7", 5060)


@pytest.fixture(autouse=True)
def names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(NAMES, "pbx.test", [A1, A2])


def world(hold: int = 30) -> World:
    text = sipfake.CONFIG.format(
        unknown_users="relay",
        outside_extra=f'upstream = ["sip:pbx.test", "sip:198.51.100.7"]\n'
        f"failover_hold_down_s = {hold}",
        max_calls=0,
        sip_extra="",
    )
    return World(sipfake.parse_config(text, "test.toml"))


def test_503_then_timeout_then_the_next_uri_answers() -> None:
    w = world(hold=120)
    _, first = start_call(w)
    assert first.dest == A1
    out = w.upstream(build_response(first.request, 503, "Service Unavailable", to_tag=tag()), A1)
    assert pick(out, IN) == []  # the phone hears nothing of it
    second = only(pick(out, OUT, method="INVITE"))
    assert second.dest == A2
    assert second.request.call_id == first.request.call_id
    assert second.request.cseq.number == first.request.cseq.number + 1
    assert second.request.top_via.branch != first.request.top_via.branch
    assert second.request.body == first.request.body
    assert pick(out, OUT, method="ACK")  # the 503 is ACKed on its own transaction
    out = w.advance(40)  # A2 never answers: timer B
    retries = pick(out, OUT, method="INVITE")
    assert {x.dest for x in retries} == {A2, B1}  # A2's retransmissions, then B1
    third = next(x for x in retries if x.dest == B1)
    assert third.request.uri.startswith("sip:18005550199@")
    assert pick(out, IN) == []
    out = w.upstream(build_response(third.request, 200, to_tag=tag(), contact=UP_CONTACT,
                                    body=UP_SDP), B1)  # fmt: skip
    assert only(pick(out, IN, status=200)).dest.host == "10.0.0.10"
    assert w.core.stats.calls_failed == 0
    # Both failed targets are held down: the next call goes straight to the one that works.
    _, fresh = start_call(w)
    assert fresh.dest == B1


def test_without_hold_down_the_order_is_kept() -> None:
    w = world(hold=0)
    _, first = start_call(w)
    w.upstream(build_response(first.request, 503, to_tag=tag()), A1)
    _, again = start_call(w)
    assert again.dest == A1


def test_every_target_failing_relays_the_last_failure() -> None:
    w = world()
    _, first = start_call(w)
    out = w.upstream(build_response(first.request, 503, to_tag=tag()), A1)
    second = only(pick(out, OUT, method="INVITE"))
    out = w.upstream(build_response(second.request, 408, "Request Timeout", to_tag=tag()), A2)
    third = only(pick(out, OUT, method="INVITE"))
    out = w.upstream(build_response(third.request, 503, to_tag=tag()), B1)
    assert only(pick(out, IN, status=503))
    assert w.core.stats.calls_failed == 1
    w.settle()
    assert w.media.all_returned()


def test_no_failover_once_a_target_rang_or_for_other_failures() -> None:
    w = world()
    _, first = start_call(w)
    up_tag = tag()
    w.upstream(build_response(first.request, 180, to_tag=up_tag, contact=UP_CONTACT), A1)
    out = w.upstream(build_response(first.request, 503, to_tag=up_tag), A1)
    assert only(pick(out, IN, status=503)) and not pick(out, OUT, method="INVITE")
    _, other = start_call(w)
    out = w.upstream(build_response(other.request, 486, "Busy Here", to_tag=tag()), other.dest)
    assert only(pick(out, IN, status=486)) and not pick(out, OUT, method="INVITE")


def test_a_cancel_after_failover_cancels_the_new_target() -> None:
    w = world()
    a_invite, first = start_call(w)
    out = w.upstream(build_response(first.request, 503, to_tag=tag()), A1)
    second = only(pick(out, OUT, method="INVITE"))
    cancel = build_request("CANCEL", a_invite.uri, via=a_invite.get("via") or "",
                           from_=a_invite.get("from") or "", to=a_invite.get("to") or "",
                           call_id=a_invite.call_id, cseq=a_invite.cseq.number)  # fmt: skip
    out = w.phone(cancel)
    assert only(pick(out, IN, status=487))
    out = w.upstream(build_response(second.request, 100), A2)
    assert only(pick(out, OUT, method="CANCEL")).dest == A2


def test_a_relayed_register_fails_over() -> None:
    text = sipfake.CONFIG.format(
        unknown_users="relay",
        outside_extra='registrar = ["sip:pbx.test", "sip:198.51.100.7"]',
        max_calls=0,
        sip_extra="",
    )
    w = World(sipfake.parse_config(text, "test.toml"))
    register = build_request(
        "REGISTER", "sip:10.0.0.1", via=via_for(sipfake.PHONE),
        from_=f"<sip:+14085551234@10.0.0.1>;tag={tag()}", to="<sip:+14085551234@10.0.0.1>",
        call_id=f"{tag()}@phone", cseq=1, contact="<sip:+14085551234@10.0.0.10:5060>",
        headers=[("Expires", "600")],
    )  # fmt: skip
    out = w.phone(register)
    first = only(pick(out, OUT, method="REGISTER"))
    assert first.dest == A1
    out = w.upstream(build_response(first.request, 503, to_tag=tag()), A1)
    second = only(pick(out, OUT, method="REGISTER"))
    assert second.dest == A2
    assert second.request.cseq.number == first.request.cseq.number + 1
    assert second.request.call_id == first.request.call_id
    assert pick(out, IN) == []
    out = w.advance(40)
    third = next(x for x in pick(out, OUT, method="REGISTER") if x.dest == B1)
    reply = build_response(third.request, 200, to_tag=tag(),
                           contact=third.request.get("contact"))  # fmt: skip
    assert only(pick(w.upstream(reply, B1), IN, status=200))
    assert "14085551234" in w.core.bindings


def test_the_phone_invite_is_unchanged_by_failover() -> None:
    w = world()
    data = phone_invite(body=PHONE_SDP)
    out = w.phone(data)
    assert only(pick(out, OUT, method="INVITE")).dest == A1
