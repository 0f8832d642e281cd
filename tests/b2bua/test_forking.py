"""Forking and CANCEL in the sans-IO core.

An inbound call to a line with several registered devices rings them all: the first
2xx wins, the others get CANCEL, a 6xx ends the call, and when all fail the best answer
goes back. A second 2xx with another To tag (a forking proxy beyond us) is ACKed then
BYEd; early dialogs are tracked per To tag; a CANCEL of a pending re-INVITE is relayed
and its 487 comes back.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, UP_CONTACT, UP_SDP, outbound_call, start_call
from fieldflows import (
    DECT,
    DESK,
    LINE,
    answered_inbound,
    call_in,
    device_answers,
    pbx_acks,
    register,
)
from sipfake import (
    UPSTREAM,
    World,
    build_request,
    build_response,
    only,
    parse,
    pick,
    tag,
    uac_dialog,
    via_for,
)

from proxy.sip.headers import CSeq
from proxy.sip.message import Request


def two_devices() -> World:
    w = World()
    register(w, DESK)
    register(w, DECT)
    return w


def check_clean(w: World) -> None:
    w.settle()
    assert not w.core.calls
    assert w.media.all_returned()
    assert not w.core.table.indexed()


def test_an_inbound_call_rings_every_device_and_the_first_2xx_wins() -> None:
    w = two_devices()
    call = call_in(w)
    assert set(call.forks) == {DESK, DECT}
    desk, dect = call.forks[DESK].request, call.forks[DECT].request
    assert desk.call_id != dect.call_id  # each branch is its own dialog
    assert desk.uri == f"sip:{LINE}@10.0.0.30:5060" and dect.uri == f"sip:{LINE}@10.0.0.31:5064"
    (state,) = w.core.active_calls()
    assert [f["state"] for f in state["forks"]] == ["pending", "pending"]  # type: ignore[index]
    # both ring; each 180 reaches the PBX
    out = w.phone(build_response(desk, 180, to_tag=tag(), contact="<sip:x@10.0.0.30>"), DESK)
    assert only(pick(out, OUT, status=180))
    out, _ = device_answers(w, call, DECT, ring=True)
    ok = only(pick(out, OUT, status=200), "200 to the PBX")
    cancel = only(pick(out, IN, method="CANCEL"), "CANCEL to the desk phone")
    assert cancel.dest == DESK and cancel.request.call_id == desk.call_id
    assert cancel.request.cseq == CSeq(desk.cseq.number, "CANCEL")
    # the losing branch answers 487: nothing reaches the PBX
    out = w.phone(build_response(desk, 487, reason="Request Terminated", to_tag=tag()), DESK)
    assert not pick(out, OUT)
    pbx = pbx_acks(w, call, ok)
    (state,) = w.core.active_calls()
    assert state["b_call_id"] == dect.call_id
    # the PBX hangs up: only the answering device gets the BYE
    out = w.upstream(pbx.request("BYE"))
    bye = only(pick(out, IN, method="BYE"))
    assert bye.dest == DECT
    w.phone(build_response(bye.request, 200), DECT)
    check_clean(w)


def test_a_device_that_never_rang_gets_its_cancel_after_its_first_answer() -> None:
    w = two_devices()
    call = call_in(w)
    out, _ = device_answers(w, call, DECT)
    # the desk phone sent nothing yet: RFC 3261 §9.1, no CANCEL before a provisional
    assert not pick(out, IN, method="CANCEL")
    desk = call.forks[DESK].request
    out = w.phone(build_response(desk, 100), DESK)
    assert only(pick(out, IN, method="CANCEL")).dest == DESK


def test_a_late_2xx_from_a_losing_branch_is_acked_then_byed() -> None:
    w = two_devices()
    call, pbx, _ = answered_inbound(w, DECT)
    desk = call.forks[DESK].request
    late_tag = tag()
    ok = build_response(desk, 200, to_tag=late_tag, contact="<sip:x@10.0.0.30:5060>",
                        body=UP_SDP)  # fmt: skip
    out = w.phone(ok, DESK)
    assert not pick(out, OUT)  # the PBX's call is untouched
    ack = only(pick(out, IN, method="ACK"))
    bye = only(pick(out, IN, method="BYE"))
    assert ack.dest == bye.dest == DESK
    assert bye.request.call_id == desk.call_id and bye.request.to.tag == late_tag
    assert "call completed elsewhere" in (bye.request.get("reason") or "")
    w.phone(build_response(bye.request, 200), DESK)
    assert len(w.core.calls) == 1
    w.upstream(pbx.request("BYE"))


def test_a_6xx_from_one_branch_ends_the_call() -> None:
    w = two_devices()
    call = call_in(w)
    w.phone(build_response(call.forks[DESK].request, 180, to_tag=tag()), DESK)
    out, _ = device_answers(w, call, DECT, 603)
    assert only(pick(out, OUT, status=603))
    assert only(pick(out, IN, method="CANCEL")).dest == DESK
    check_clean(w)


def test_when_every_branch_fails_the_best_answer_goes_back() -> None:
    w = two_devices()
    call = call_in(w)
    out = w.phone(build_response(call.forks[DESK].request, 503, to_tag=tag()), DESK)
    assert not pick(out, OUT, status=503)  # the other still rings
    out, _ = device_answers(w, call, DECT, 486)
    assert only(pick(out, OUT, status=486))  # 4xx beats 5xx (RFC 3261 §16.7)
    check_clean(w)


def test_caller_cancel_cancels_every_branch() -> None:
    w = two_devices()
    call = call_in(w)
    for device in (DESK, DECT):
        w.phone(build_response(call.forks[device].request, 180, to_tag=tag()), device)
    cancel = build_request(
        "CANCEL", call.invite.uri, via=call.invite.get("via") or "",
        from_=call.invite.get("from") or "", to=call.invite.get("to") or "",
        call_id=call.invite.call_id, cseq=call.invite.cseq.number, cseq_method="CANCEL",
    )  # fmt: skip
    out = w.upstream(cancel)
    assert {x.dest for x in pick(out, IN, method="CANCEL")} == {DESK, DECT}
    assert only(pick(out, OUT, status=487))
    for device in (DESK, DECT):
        w.phone(build_response(call.forks[device].request, 487, to_tag=tag()), device)
    check_clean(w)


def test_timer_c_cancels_every_branch() -> None:
    w = two_devices()
    call = call_in(w)
    for device in (DESK, DECT):
        w.phone(build_response(call.forks[device].request, 180, to_tag=tag()), device)
    out = w.advance(180.2)  # (before the 408 is retransmitted: the PBX does not ACK)
    assert {x.dest for x in pick(out, IN, method="CANCEL")} == {DESK, DECT}
    assert only(pick(out, OUT, status=408))
    assert w.core.features()["timer_c_fired"] == 1
    check_clean(w)


def test_a_branch_that_times_out_leaves_the_others_ringing() -> None:
    w = two_devices()
    call = call_in(w)
    w.phone(build_response(call.forks[DECT].request, 180, to_tag=tag()), DECT)
    out = w.advance(33)  # Timer B on the desk phone's silent branch only
    assert not pick(out, OUT, status=408)
    assert w.core.calls
    out, _ = device_answers(w, call, DECT)
    assert only(pick(out, OUT, status=200))


# --- §6: a forking proxy beyond us -----------------------------------------------------


def test_second_2xx_with_another_to_tag_is_acked_then_byed() -> None:
    w = World()
    a_invite, b = start_call(w)
    first, second = tag(), tag()
    w.upstream(build_response(b.request, 180, to_tag=first, contact=UP_CONTACT))
    w.upstream(build_response(b.request, 183, to_tag=second, contact="<sip:other@203.0.113.6>"))
    (state,) = w.core.active_calls()
    assert state["early_dialogs"] == sorted([first, second])
    out = w.upstream(build_response(b.request, 200, to_tag=first, contact=UP_CONTACT,
                                    body=UP_SDP))  # fmt: skip
    ok = only(pick(out, IN, status=200))
    out = w.upstream(build_response(b.request, 200, to_tag=second, body=UP_SDP,
                                    contact="<sip:other@203.0.113.6:5060>"))  # fmt: skip
    assert not pick(out, IN)  # the phone never hears of the second dialog
    ack = only(pick(out, OUT, method="ACK"))
    bye = only(pick(out, OUT, method="BYE"))
    assert ack.request.to.tag == bye.request.to.tag == second
    assert bye.request.uri == "sip:other@203.0.113.6:5060"
    assert bye.request.call_id == b.request.call_id
    w.upstream(build_response(bye.request, 200))
    # the first dialog is the call, as before
    phone = uac_dialog(a_invite.vias and only(pick(w.sent, IN, status=200)).dest, a_invite,
                       ok.response, "<sip:p@10.0.0.10>")  # fmt: skip
    out = w.phone(phone.request("ACK"))
    assert only(pick(out, OUT, method="ACK")).request.to.tag == first
    assert w.core.features()["dialogs_ended"] == 1


def test_a_request_from_a_dialog_the_call_does_not_keep_gets_481() -> None:
    w = World()
    call = outbound_call(w)
    stray = build_request(
        "INFO", "sip:14085551234@192.0.2.1", via=via_for(UPSTREAM),
        from_=f"<sip:18005550199@itsp.example.net>;tag={tag()}",
        to=call.pbx.remote, call_id=call.pbx.call_id, cseq=900,
    )  # fmt: skip
    out = w.upstream(stray)
    assert only(pick(out, OUT)).response.status == 481
    assert not pick(out, IN)


# --- CANCEL of a pending re-INVITE -------------------------------------------------------


def test_cancel_of_a_pending_reinvite_is_relayed_and_the_487_comes_back() -> None:
    w = World()
    call = outbound_call(w)
    reinvite = call.phone.request("INVITE", body=call.a_invite.body)
    out = w.phone(reinvite)
    relayed = only(pick(out, OUT, method="INVITE")).request
    # The phone CANCELs before the PBX said anything: the CANCEL waits for a provisional.
    phone_reinvite = parse(reinvite)
    assert isinstance(phone_reinvite, Request)
    cancel = build_request(
        "CANCEL", phone_reinvite.uri, via=phone_reinvite.get("via") or "",
        from_=phone_reinvite.get("from") or "", to=phone_reinvite.get("to") or "",
        call_id=phone_reinvite.call_id, cseq=phone_reinvite.cseq.number, cseq_method="CANCEL",
    )  # fmt: skip
    out = w.phone(cancel)
    assert only(pick(out, IN)).response.cseq == CSeq(phone_reinvite.cseq.number, "CANCEL")
    assert not pick(out, OUT)
    out = w.upstream(build_response(relayed, 100))
    up_cancel = only(pick(out, OUT, method="CANCEL")).request
    assert up_cancel.call_id == relayed.call_id
    assert up_cancel.cseq == CSeq(relayed.cseq.number, "CANCEL")
    assert up_cancel.vias[0].branch == relayed.vias[0].branch
    w.upstream(build_response(up_cancel, 200))
    out = w.upstream(build_response(relayed, 487, reason="Request Terminated"))
    final = only(pick(out, IN, status=487)).response
    assert final.cseq == CSeq(phone_reinvite.cseq.number, "INVITE")
    # the call itself goes on
    out = w.phone(call.phone.request("BYE"))
    assert only(pick(out, OUT, method="BYE"))


def test_cancel_of_an_answered_reinvite_has_no_effect() -> None:
    w = World()
    call = outbound_call(w)
    reinvite = call.pbx.request("INVITE", body=UP_SDP)
    out = w.upstream(reinvite)
    relayed = only(pick(out, IN, method="INVITE")).request
    w.phone(build_response(relayed, 200, body=call.a_invite.body, contact="<sip:p@10.0.0.10>"))
    parsed = parse(reinvite)
    assert isinstance(parsed, Request)
    cancel = build_request(
        "CANCEL", parsed.uri, via=parsed.get("via") or "", from_=parsed.get("from") or "",
        to=parsed.get("to") or "", call_id=parsed.call_id, cseq=parsed.cseq.number,
        cseq_method="CANCEL",
    )  # fmt: skip
    out = w.upstream(cancel)
    assert [x.response.status for x in out if x.side is OUT] == [200]
    assert not pick(out, IN, method="CANCEL")
