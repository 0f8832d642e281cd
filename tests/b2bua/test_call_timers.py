"""Calls that never end and calls that never answer: Timer C, RFC 4028 session timers
enforced, and the RTP timeout with its on-hold variant, all on the fake clock."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, PHONE_SDP, UP_CONTACT, UP_SDP, answer, outbound_call, start_call
from fieldflows import field_config
from sipfake import World, build_response, only, pick, sdp, tag

from proxy.b2bua.calls import CallTimer

EXPIRED = 'SIP;cause=408;text="session timer expired"'


def quiet_media() -> World:
    """No RTP-timeout check: these tests look at the other timers only."""
    return World(field_config(media="rtp_timeout_s = 0"))


def test_timer_c_cancels_a_call_that_rings_for_ever() -> None:
    w = World()
    _, b = start_call(w)
    w.upstream(build_response(b.request, 180, to_tag=tag()))
    assert not pick(w.advance(179), method="CANCEL")
    w.upstream(build_response(b.request, 180, to_tag=tag()))  # a provisional restarts it
    assert not pick(w.advance(179), method="CANCEL")
    out = w.advance(1.2)
    cancel = only(pick(out, OUT, method="CANCEL"))
    assert cancel.request.cseq.number == b.request.cseq.number
    final = only(pick(out, IN, status=408))
    assert final.response.reason == "Request Timeout"
    w.upstream(build_response(b.request, 487, to_tag=tag()))
    w.settle()
    assert not w.core.calls and w.media.all_returned()


def test_timer_c_off() -> None:
    w = World(field_config(sip="timer_c_s = 0"))
    _, b = start_call(w)
    w.upstream(build_response(b.request, 180, to_tag=tag()))
    assert not pick(w.advance(600), method="CANCEL")
    assert len(w.core.calls) == 1


def test_timer_c_stops_when_answered() -> None:
    w = quiet_media()
    call = outbound_call(w)
    assert w.core.table.deadline(w.core.calls[max(w.core.calls)], CallTimer.TIMER_C) is None
    assert not pick(w.advance(400), method="CANCEL")
    w.phone(call.phone.request("BYE"))


def session_call(w: World, interval: int) -> object:
    a_invite, b = start_call(w, headers=(("Session-Expires", f"{interval}"),
                                         ("Supported", "timer")))  # fmt: skip
    assert b.request.get("session-expires") == str(interval)  # passed through end to end
    se = (("Session-Expires", f"{interval};refresher=uac"), ("Require", "timer"))
    up_tag = tag()
    out = w.upstream(build_response(b.request, 200, to_tag=up_tag, contact=UP_CONTACT,
                                    body=UP_SDP, headers=se))  # fmt: skip
    ok = only(pick(out, IN, status=200))
    assert ok.response.get("session-expires") == f"{interval};refresher=uac"
    from sipfake import PHONE, uac_dialog, uas_dialog

    phone = uac_dialog(PHONE, a_invite, ok.response, "<sip:p@10.0.0.10>")
    w.phone(phone.request("ACK"))
    return phone, uas_dialog(b.dest, b.request, up_tag, UP_CONTACT)


def test_session_timer_expiry_hangs_up_both_legs() -> None:
    w = quiet_media()
    session_call(w, 90)
    (state,) = w.core.active_calls(w.now)
    assert state["session_timer"] == {"interval_s": 90.0, "expires_in_s": 90.0}
    assert not pick(w.advance(89.5), method="BYE")
    byes = pick(w.advance(1), method="BYE")
    assert {b.side for b in byes} == {IN, OUT}
    assert all(b.request.get("reason") == EXPIRED for b in byes)
    assert w.core.features()["sessions_expired"] == 1


def test_a_refresh_restarts_the_session_interval() -> None:
    w = quiet_media()
    phone, pbx = session_call(w, 90)  # type: ignore[misc]
    w.advance(45)
    out = w.phone(phone.request("INVITE", body=PHONE_SDP, headers=[("Session-Expires", "90")]))
    relayed = only(pick(out, OUT, method="INVITE")).request
    w.upstream(build_response(relayed, 200, body=UP_SDP, contact=UP_CONTACT,
                              headers=[("Session-Expires", "90;refresher=uac")]))  # fmt: skip
    assert not pick(w.advance(89), method="BYE")  # 134 s after the call began
    # a refresh by UPDATE counts as well
    out = w.upstream(pbx.request("UPDATE", headers=[("Session-Expires", "120")]))
    relayed = only(pick(out, IN, method="UPDATE")).request
    w.phone(build_response(relayed, 200, headers=[("Session-Expires", "120;refresher=uas")]))
    assert not pick(w.advance(119), method="BYE")
    assert {b.side for b in pick(w.advance(2), method="BYE")} == {IN, OUT}


def test_a_2xx_without_session_expires_turns_the_timer_off() -> None:
    w = quiet_media()
    phone, _ = session_call(w, 90)  # type: ignore[misc]
    out = w.phone(phone.request("INVITE", body=PHONE_SDP))
    relayed = only(pick(out, OUT, method="INVITE")).request
    w.upstream(build_response(relayed, 200, body=UP_SDP, contact=UP_CONTACT))
    assert not pick(w.advance(600), method="BYE")
    assert w.core.active_calls()[0]["session_timer"] is None


def test_no_session_timer_without_negotiation() -> None:
    w = quiet_media()
    outbound_call(w)
    assert not pick(w.advance(3600), method="BYE")


def test_a_held_call_gets_the_on_hold_rtp_timeout() -> None:
    w = World()
    call = outbound_call(w)
    hold = sdp("10.0.0.10", 4000, direction="sendonly")
    out = w.phone(call.phone.request("INVITE", body=hold))
    relayed = only(pick(out, OUT, method="INVITE")).request
    w.upstream(build_response(relayed, 200, contact=UP_CONTACT,
                              body=sdp("203.0.113.50", 7000, direction="recvonly")))  # fmt: skip
    w.phone(call.phone.request("ACK"))
    assert w.core.active_calls()[0]["on_hold"] is True
    assert not pick(w.advance(3599), method="BYE")  # 60 s would have hung it up
    byes = pick(w.advance(2), method="BYE")
    assert {b.side for b in byes} == {IN, OUT}


def test_resume_brings_the_normal_rtp_timeout_back() -> None:
    w = World()
    call = outbound_call(w)
    for direction, answer_direction in (("inactive", "inactive"), ("sendrecv", "sendrecv")):
        out = w.phone(call.phone.request("INVITE", body=sdp("10.0.0.10", 4000,
                                                             direction=direction)))  # fmt: skip
        relayed = only(pick(out, OUT, method="INVITE")).request
        w.upstream(
            build_response(
                relayed,
                200,
                contact=UP_CONTACT,
                body=sdp("203.0.113.50", 7000, direction=answer_direction),
            )
        )
        w.phone(call.phone.request("ACK"))
        w.advance(30)
    assert w.core.active_calls()[0]["on_hold"] is False
    assert {b.side for b in pick(w.advance(31), method="BYE")} == {IN, OUT}


def test_a_null_address_is_hold_too() -> None:
    w = World()
    a_invite, b = start_call(w)
    answer(w, a_invite, b, body=sdp("0.0.0.0", 7000))
    assert w.core.active_calls()[0]["on_hold"] is True
    assert not pick(w.advance(120), method="BYE")
