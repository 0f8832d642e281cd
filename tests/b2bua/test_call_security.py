"""The secure-call policy of one call (:class:`CallSecurity`), tested directly.

The in-memory core tests drive it through SIP; these drive it with the far end's
handshake machine only, so each policy rule (when stage 2 starts, what a failure does
under ``require_secure``, the callee's timeout, re-keying, what ``describe`` shows) is
checked without a B2BUA around it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.b2bua import secure as sec
from proxy.b2bua.config import XsipuraConfig
from proxy.b2bua.line_keys import LineSecurity
from proxy.xsipura import handshake as hs
from proxy.xsipura.trust import TrustStore
from testkit.pki import NOW_UTC, Party, Pki

SETTINGS = XsipuraConfig(grace_s=2.0, handshake_timeout_s=5.0, start_delay_s=0.2)
T0 = 100.0
OUR_SSRC = 0x11111111
FAR_SSRC = 0x22222222


def line_of(party: Party, pki: Pki, **policy: bool) -> LineSecurity:
    return LineSecurity(
        user_key=party.certificate.user_id,
        param=party.param,
        private_key=party.key,
        trust=TrustStore([pki.ca.public]),
        **policy,
    )


def caller(pki: Pki, *, require: bool = False, dialled: str | None = None) -> sec.CallSecurity:
    """The proxy calls out as Alice's line, toward Bob."""
    return sec.CallSecurity(
        role=sec.Role.CALLER,
        line=line_of(pki.alice, pki, require_secure=require),
        settings=SETTINGS,
        label="1 (test)",
        dialled_user_id=dialled if dialled is not None else pki.bob.certificate.user_id,
    )


def callee(pki: Pki, *, require: bool = False) -> sec.CallSecurity:
    """A call comes in to Bob's line; the far end (Alice) starts stage 2."""
    return sec.CallSecurity(
        role=sec.Role.CALLEE,
        line=line_of(pki.bob, pki, require_secure=require),
        settings=SETTINGS,
        label="2 (test)",
    )


def far_callee(pki: Pki, party: Party | None = None) -> hs.CalleeHandshake:
    party = party or pki.bob
    return hs.CalleeHandshake(certificate=party.certificate, private_key=party.key,
                              trust=pki.trust, local_ssrc=FAR_SSRC)  # fmt: skip


def far_caller(pki: Pki) -> hs.CallerHandshake:
    return hs.CallerHandshake(certificate=pki.alice.certificate, trust=pki.trust,
                              dialled_user_id=pki.bob.certificate.user_id,
                              local_ssrc=FAR_SSRC)  # fmt: skip


def types(actions: list[sec.Action]) -> list[type]:
    return [type(a) for a in actions]


def started(security: sec.CallSecurity) -> sec.SendInfo:
    security.arm(T0)
    assert not security.ready_to_start(T0)  # start_delay_s first
    assert security.next_deadline() == pytest.approx(T0 + 0.2)
    assert security.ready_to_start(T0 + 0.2)
    (hello,) = security.start(T0 + 0.2, OUR_SSRC)
    assert isinstance(hello, sec.SendInfo)
    assert security.state is sec.SecureState.HANDSHAKING
    return hello


def answer(far: hs.CalleeHandshake, info: sec.SendInfo, now: float) -> hs.SendResponse:
    events = far.receive_request(info.body, now, NOW_UTC)
    response = events[0]
    assert isinstance(response, hs.SendResponse)
    return response


def test_caller_secures_and_reports_the_peer(pki: Pki) -> None:
    security = caller(pki)
    assert security.state is sec.SecureState.WAITING
    hello = started(security)
    far = far_callee(pki)
    ok = answer(far, hello, T0 + 0.3)
    actions = security.on_info_response(ok.status, ok.body.encode(), T0 + 0.3, NOW_UTC)
    assert types(actions) == [sec.AcceptSrtp, sec.SendInfo]  # accept first, then Final
    final = actions[1]
    assert isinstance(final, sec.SendInfo)
    done = answer(far, final, T0 + 0.4)
    actions = security.on_info_response(done.status, done.body.encode(), T0 + 0.4, NOW_UTC)
    assert types(actions) == [sec.SwitchSrtp, sec.Secured]
    switch, secured = actions
    assert isinstance(switch, sec.SwitchSrtp) and switch.grace_s == SETTINGS.grace_s
    assert switch.srtcp is SETTINGS.srtcp
    assert isinstance(secured, sec.Secured) and not secured.rekey
    assert secured.peer.user_id == pki.bob.certificate.user_id
    described = security.describe()
    assert described["state"] == "secure" and described["role"] == "caller"
    assert described["peer_name"] == pki.bob.certificate.name and described["reason"] is None


def test_caller_waits_for_media_by_postponing(pki: Pki) -> None:
    security = caller(pki)
    security.arm(T0)
    security.postpone(T0 + 0.2)
    assert not security.ready_to_start(T0 + 0.25)
    assert security.next_deadline() == pytest.approx(T0 + 0.2 + sec.MEDIA_CHECK_INTERVAL)


def test_caller_id_mismatch_stays_clear_and_require_secure_hangs_up(pki: Pki) -> None:
    for require in (False, True):
        security = caller(pki, require=require, dialled="18005550100")
        hello = started(security)
        ok = answer(far_callee(pki), hello, T0 + 0.3)
        actions = security.on_info_response(ok.status, ok.body.encode(), T0 + 0.3, NOW_UTC)
        expected: list[type] = [sec.Cleared, sec.ClearSrtp]
        assert types(actions) == ([*expected, sec.HangUp] if require else expected)
        cleared = actions[0]
        assert isinstance(cleared, sec.Cleared)
        assert cleared.reason is hs.ClearReason.USER_ID_MISMATCH
        assert security.describe()["reason"] == "user_id_mismatch"


def test_a_peer_that_does_not_answer_times_out(pki: Pki) -> None:
    security = caller(pki)
    started(security)
    actions = security.on_info_timeout(T0 + 32)
    assert types(actions)[0] is sec.Cleared
    assert security.state is sec.SecureState.CLEAR
    assert security.reason is hs.ClearReason.TIMEOUT


def test_give_up_is_counted_as_the_reason_given(pki: Pki) -> None:
    security = caller(pki, require=True)
    actions = security.give_up(hs.ClearReason.PEER_UNSUPPORTED, "no Supported: x-sipura")
    assert types(actions) == [sec.Cleared, sec.HangUp]  # never switched: no ClearSrtp
    hang_up = actions[1]
    assert isinstance(hang_up, sec.HangUp) and hang_up.reason == "x-sipura: peer_unsupported"


def test_callee_answers_hello_and_final(pki: Pki) -> None:
    security = callee(pki)
    security.arm(T0)
    assert security.next_deadline() is None  # not required: nothing to wait for
    far = far_caller(pki)
    (hello,) = far.start(T0)
    assert isinstance(hello, hs.SendInfo)
    actions = security.on_info(hello.body.encode(), T0, NOW_UTC, OUR_SSRC)
    assert types(actions) == [sec.RespondInfo]
    response = actions[0]
    assert isinstance(response, sec.RespondInfo) and response.status == 200
    assert response.body and response.content_type == "application/x-sipura"
    events = far.receive_response(200, response.body.encode(), T0 + 0.1, NOW_UTC)
    final = next(e for e in events if isinstance(e, hs.SendInfo))
    actions = security.on_info(final.body.encode(), T0 + 0.1, NOW_UTC, OUR_SSRC)
    assert types(actions) == [sec.RespondInfo, sec.SwitchSrtp, sec.Secured]
    assert security.describe()["role"] == "callee" and security.state is sec.SecureState.SECURE
    # No authenticated SRTP within the grace window: the callee falls back (profile §2a).
    actions = security.poll(T0 + 0.1 + SETTINGS.grace_s + 0.01)
    assert types(actions) == [sec.Cleared, sec.ClearSrtp]
    assert security.reason is hs.ClearReason.NO_AUTHENTICATED_SRTP


def test_callee_with_authenticated_srtp_stays_secure(pki: Pki) -> None:
    security = callee(pki)
    far = far_caller(pki)
    (hello,) = far.start(T0)
    assert isinstance(hello, hs.SendInfo)
    (response,) = security.on_info(hello.body.encode(), T0, NOW_UTC, OUR_SSRC)
    assert isinstance(response, sec.RespondInfo) and response.body
    events = far.receive_response(200, response.body.encode(), T0, NOW_UTC)
    final = next(e for e in events if isinstance(e, hs.SendInfo))
    security.on_info(final.body.encode(), T0, NOW_UTC, OUR_SSRC)
    assert security.srtp_authenticated(T0 + 0.5) == []
    assert security.poll(T0 + 10) == []
    assert security.state is sec.SecureState.SECURE


def test_callee_garbage_is_answered_400_and_stays_clear(pki: Pki) -> None:
    security = callee(pki)
    actions = security.on_info(b"not base64 at all!", T0, NOW_UTC, OUR_SSRC)
    response = actions[0]
    assert isinstance(response, sec.RespondInfo) and response.status == 400
    assert security.state is not sec.SecureState.SECURE


def test_required_callee_hangs_up_a_peer_that_never_starts(pki: Pki) -> None:
    security = callee(pki, require=True)
    security.arm(T0)
    assert security.next_deadline() == pytest.approx(T0 + SETTINGS.handshake_timeout_s)
    assert security.poll(T0 + 1) == []
    actions = security.poll(T0 + SETTINGS.handshake_timeout_s)
    assert types(actions) == [sec.Cleared, sec.HangUp]
    assert security.reason is hs.ClearReason.PEER_UNSUPPORTED


def test_rekey_only_from_a_secure_caller(pki: Pki) -> None:
    security = caller(pki)
    assert security.rekey(T0) == []  # nothing to re-key yet
    hello = started(security)
    far = far_callee(pki)
    ok = answer(far, hello, T0 + 0.3)
    actions = security.on_info_response(ok.status, ok.body.encode(), T0 + 0.3, NOW_UTC)
    final = actions[1]
    assert isinstance(final, sec.SendInfo)
    done = answer(far, final, T0 + 0.4)
    security.on_info_response(done.status, done.body.encode(), T0 + 0.4, NOW_UTC)
    (again,) = security.rekey(T0 + 10)
    assert isinstance(again, sec.SendInfo)
    ok = answer(far, again, T0 + 10.1)
    actions = security.on_info_response(ok.status, ok.body.encode(), T0 + 10.1, NOW_UTC)
    final = actions[1]
    assert isinstance(final, sec.SendInfo)
    done = answer(far, final, T0 + 10.2)
    actions = security.on_info_response(done.status, done.body.encode(), T0 + 10.2, NOW_UTC)
    secured = actions[-1]
    assert isinstance(secured, sec.Secured) and secured.rekey


def test_the_settings_drive_the_deadlines(pki: Pki) -> None:
    slow = replace(SETTINGS, start_delay_s=1.5)
    security = sec.CallSecurity(role=sec.Role.CALLER, line=line_of(pki.alice, pki),
                                settings=slow, label="3", dialled_user_id="x")  # fmt: skip
    security.arm(T0)
    assert security.next_deadline() == pytest.approx(T0 + 1.5)
