"""The sans-IO B2BUA driven in memory: fake clock, fake media engine, hand-played peers.

Each test plays the phones (inside) and the PBX/ITSP (outside): it feeds SIP text to
:meth:`B2BUA.receive`, parses what the proxy sent, and answers it. Timers run on a fake
clock (:meth:`World.advance`), so retransmissions and timeouts are exact and instant.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from callflows import (
    CALLEE,
    IN,
    OUT,
    PHONE_CONTACT,
    PHONE_SDP,
    UP_CONTACT,
    UP_SDP,
    answer,
    outbound_call,
    phone_invite,
    register_locally,
    start_call,
    upstream_invite,
)
from sipfake import (
    LINE1,
    LINE2,
    PHONE,
    PHONE2,
    PHONE_TCP,
    PROXY_IN,
    PROXY_OUT,
    UPSTREAM,
    UPSTREAM_TCP,
    FakeMedia,
    FakeSession,
    World,
    branch,
    build_request,
    build_response,
    make_config,
    only,
    parse,
    pick,
    sdp,
    tag,
    uac_dialog,
    uas_dialog,
    uri_of,
    via_for,
)

from proxy.b2bua.core import B2BUA
from proxy.media.engine import Side
from proxy.sip.headers import CSeq, NameAddr, SipUri, Via
from proxy.sip.message import Request, Response, canonical
from proxy.sip.transaction import Address

T1 = 0.5


# --- fixtures and flows ------------------------------------------------------------------

NAMES = {
    "pbx.example.net": "203.0.113.5",
    "cafe": "203.0.113.77",
    "itsp.example.net": "203.0.113.5",
}


@pytest.fixture(autouse=True, scope="module")
def fake_dns() -> Iterator[None]:
    """The edge resolves names for the core: the fake edge knows these."""
    with mock.patch.dict(sipfake.NAMES, NAMES):
        yield


def check_invariants(w: World) -> None:
    """Media is held exactly by live calls, and every indexed leg belongs to one."""
    live = [c for c in w.core.calls.values() if c.media is not None]
    assert len(w.media.active) == len(live), (w.media.active, live)
    for call, _leg in w.core.table.indexed():
        assert call.id in w.core.calls
    if not w.core.calls:
        assert w.media.all_returned()


@pytest.fixture
def w() -> Iterator[World]:
    world = World()
    yield world
    world.settle()
    check_invariants(world)


def head_text(msg: Request | Response) -> str:
    return msg.serialize().split(b"\r\n\r\n", 1)[0].decode()


# --- a basic call, and what each leg may see --------------------------------------------


def test_outbound_call_end_to_end(w: World) -> None:
    a_invite, b = start_call(w)
    assert b.dest == UPSTREAM
    inv = b.request
    assert inv.uri == CALLEE  # R-URI untouched (digest covers it)
    vias = inv.vias
    assert len(vias) == 1
    assert (vias[0].host, vias[0].port) == ("192.0.2.1", 5060)
    assert vias[0].param("rport") is not None and str(vias[0].branch).startswith("z9hG4bK")
    assert inv.cseq == CSeq(1, "INVITE")
    assert inv.get("max-forwards") == "69"
    assert NameAddr.parse(inv.get_all("contact")[0]).sip_uri().host == "192.0.2.1"
    assert inv.from_.uri == a_invite.from_.uri and inv.from_.display == '"Joe"'
    assert inv.to.uri == CALLEE and inv.to.tag is None
    assert "x-sipura" in [v.lower() for v in inv.get_all("supported")]
    # media anchored: the SDP sent upstream points at the proxy's outside port
    session = only_session(w)
    assert b"c=IN IP4 192.0.2.1" in inv.body and b"10.0.0.10 " not in inv.body.split(b"c=")[1]
    assert f"m=audio {session.local(OUT, 0)[1]} ".encode() in inv.body
    assert session.remotes[(IN, 0)] == ("10.0.0.10", 4000, 4001, False)

    call = answer(w, a_invite, b)
    ok = call.a_ok
    assert ok.to.tag and ok.to.tag != NameAddr.parse(inv.get("from") or "").tag
    assert uri_of(ok.get_all("contact")[0]).startswith("sip:sipura@10.0.0.1")
    assert b"c=IN IP4 10.0.0.1" in ok.body
    assert f"m=audio {session.local(IN, 0)[1]} ".encode() in ok.body
    assert session.remotes[(OUT, 0)] == ("203.0.113.50", 7000, 7001, False)
    assert ok.call_id == a_invite.call_id and ok.cseq == a_invite.cseq
    assert w.core.stats.calls_answered == 1
    assert [c["state"] for c in w.core.active_calls()] == ["confirmed"]

    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    assert bye.dest == UPSTREAM
    assert bye.request.uri == uri_of(UP_CONTACT)
    assert bye.request.call_id == inv.call_id
    assert bye.request.to.tag == call.pbx.local_tag
    assert bye.request.cseq == CSeq(2, "BYE")
    out = w.upstream(build_response(bye.request, 200))
    only(pick(out, IN, status=200))
    assert w.core.calls == {}
    assert session.released


def only_session(w: World) -> FakeSession:
    assert len(w.media.active) == 1, w.media.active
    return w.media.active[-1]


def test_b_leg_leaks_nothing_of_the_a_leg(w: World) -> None:
    a_invite, b = start_call(
        w,
        via=f"SIP/2.0/UDP 192.168.1.33:5060;branch={branch()};rport",
        headers=(("Record-Route", "<sip:10.0.0.99;lr>"), ("Route", "<sip:10.0.0.1;lr>")),
    )
    text = head_text(b.request)
    assert a_invite.call_id not in text
    assert (a_invite.from_.tag or "") not in text
    assert "192.168.1.33" not in text and str(a_invite.top_via.branch) not in text
    assert "10.0.0.10" not in text  # the phone's Contact and source address
    assert "10.0.0.99" not in text and "Route" not in text  # RR/Route are per leg
    call = answer(w, a_invite, b, record_route=("<sip:203.0.113.9;lr>",))
    text = head_text(call.a_ok)
    assert call.b_invite.call_id not in text and call.pbx.local_tag not in text
    assert "203.0.113" not in text and "192.0.2.1" not in text
    assert "10.0.0.99" in text  # the A leg's own Record-Route comes back to the phone


def test_headers_not_owned_pass_through_in_order(w: World) -> None:
    extra = (
        ("X-Custom", "one"),
        ("Alert-Info", "<http://ring.example/1>"),
        ("P-Asserted-Identity", '"Joe" <sip:+14085551234@example.com>'),
        ("k", "100rel, timer"),
        ("Session-Expires", "1800;refresher=uac"),
        ("Diversion", "<sip:100@example.com>;reason=unconditional"),
        ("x-custom", "two"),
        ("User-Agent", "Cisco/SPA504G-7.6.2"),
        ("Allow", "INVITE, ACK, BYE, CANCEL"),
    )
    _, b = start_call(w, headers=extra)
    passed = [(n, v) for n, v in b.request.headers if canonical(n) not in OWNED]
    expected = [*extra, ("Content-Type", "application/sdp")]
    assert [p for p in passed if p in expected] == expected
    # the only header added besides owned ones is our x-sipura advertisement
    assert [p for p in passed if p not in expected] == [("Supported", "x-sipura")]


OWNED = {
    "via",
    "route",
    "record-route",
    "contact",
    "call-id",
    "from",
    "to",
    "cseq",
    "content-length",
    "max-forwards",
}


def test_response_headers_pass_through_and_owned_ones_do_not(w: World) -> None:
    a_invite, b = start_call(w)
    up_tag = tag()
    extra = [("X-Trace", "abc"), ("Alert-Info", "<urn:alert:tone:internal>"), ("Server", "PBX")]
    out = w.upstream(
        build_response(
            b.request,
            180,
            to_tag=up_tag,
            contact=UP_CONTACT,
            headers=extra,
            record_route=["<sip:203.0.113.9;lr>"],
        )
    )
    ringing = only(pick(out, IN, status=180)).response
    passed = [(n, v) for n, v in ringing.headers if canonical(n) not in OWNED]
    assert passed == extra
    assert "203.0.113" not in head_text(ringing) and up_tag not in head_text(ringing)
    assert ringing.top_via == a_invite.top_via.with_param("received", "10.0.0.10").with_param(
        "rport", "5060"
    )


def test_via_rport_responses_follow_the_source_not_the_via(w: World) -> None:
    nat = Address("10.0.0.10", 61000)
    a_invite, b = start_call(
        w, source=nat, via=f"SIP/2.0/UDP 192.168.1.33:5060;branch={branch()};rport"
    )
    trying = w.sent[0]
    assert trying.dest == nat
    top = trying.response.top_via
    assert top.param("received") == "10.0.0.10" and top.param("rport") == "61000"
    call = answer(w, a_invite, b, phone_source=nat)
    out = w.upstream(call.pbx.request("BYE"))
    assert only(pick(out, IN, method="BYE")).dest == nat  # symmetric signalling


def test_max_forwards_decremented_and_zero_rejected(w: World) -> None:
    _, b = start_call(w, max_forwards=5)
    assert b.request.get("max-forwards") == "4"
    out = w.phone(phone_invite(max_forwards=0))
    assert only(pick(out, IN, status=483))
    assert not pick(out, OUT)
    # no Max-Forwards (RFC 2543): the proxy's own default
    _, b2 = start_call(w, max_forwards=None)
    assert b2.request.get("max-forwards") == "70"


def test_max_forwards_zero_in_dialog_rejected(w: World) -> None:
    call = outbound_call(w)
    out = w.phone(call.phone.request("INFO", max_forwards=0))
    assert only(pick(out, IN, status=483))
    assert not pick(out, OUT)
    out = w.phone(call.phone.request("INFO", max_forwards=1))
    assert only(pick(out, OUT, method="INFO")).request.get("max-forwards") == "0"


@pytest.mark.parametrize("side", [IN, OUT])
def test_options_out_of_dialog_answered_locally(w: World, side: Side) -> None:
    source = PHONE if side is IN else UPSTREAM
    data = build_request(
        "OPTIONS",
        "sip:10.0.0.1",
        via=via_for(source),
        from_=f"<sip:ping@x>;tag={tag()}",
        to="<sip:10.0.0.1>",
        call_id=f"{tag()}@x",
        cseq=1,
        max_forwards=0,
    )
    ok = only(w.send(side, data, source)).response
    assert ok.status == 200 and ok.to.tag
    assert "INVITE" in (ok.get("allow") or "")
    advertised = "x-sipura" in [v.lower() for v in ok.get_all("supported")]
    assert advertised is (side is OUT)


@pytest.mark.parametrize("method", ["SUBSCRIBE", "FOO", "REFER"])
def test_unknown_methods_out_of_dialog_get_501(w: World, method: str) -> None:
    data = build_request(
        method,
        CALLEE,
        via=via_for(PHONE),
        from_=f"<sip:{LINE1}@10.0.0.1>;tag={tag()}",
        to=f"<{CALLEE}>",
        call_id=f"{tag()}@x",
        cseq=1,
    )
    rejected = only(w.phone(data)).response
    assert rejected.status == 501 and rejected.get("allow")


def test_out_of_dialog_message_relayed_as_one_shot(w: World) -> None:
    data = build_request(
        "MESSAGE",
        CALLEE,
        via=via_for(PHONE),
        from_=f"<sip:{LINE1}@10.0.0.1>;tag=ft1",
        to=f"<{CALLEE}>",
        call_id="m1@phone",
        cseq=4,
        body=b"hello",
        content_type="text/plain",
    )
    msg = only(w.phone(data)).request
    assert msg.method == "MESSAGE" and msg.body == b"hello"
    assert msg.call_id != "m1@phone" and msg.from_.tag != "ft1"
    out = w.upstream(build_response(msg, 202, "Accepted", to_tag="x"))
    relayed = only(pick(out, IN, status=202)).response
    assert relayed.call_id == "m1@phone" and relayed.to.tag != "x"


# --- routing -----------------------------------------------------------------------------


def call_line(w: World) -> object:
    return w.core.active_calls()[-1]["line"]


@pytest.mark.parametrize("user", ["+14085551234", "14085551234"])
def test_caller_line_by_from_user(w: World, user: str) -> None:
    start_call(w, from_user=user)
    assert call_line(w) == "+14085551234"


def test_caller_line_by_source_contact(w: World) -> None:
    register_locally(w, user="14085551234")
    start_call(w, from_user="joe")  # not digits: matched by where it comes from
    assert call_line(w) == "+14085551234"
    start_call(w, from_user="anyone", source=PHONE2)  # the static contact of line 2
    assert call_line(w) == LINE2


def test_unknown_inside_user_relayed_by_default(w: World) -> None:
    start_call(w, from_user="999", source=Address("10.0.0.77", 5060))
    assert call_line(w) is None


def test_unknown_inside_user_rejected_when_configured() -> None:
    w = World(make_config(unknown_users="reject"))
    out = w.phone(
        phone_invite(from_user="999", source=Address("10.0.0.77", 5060)),
        Address("10.0.0.77", 5060),
    )
    assert only(pick(out, IN, status=403))
    assert not pick(out, OUT)
    start_call(w)  # a known line still gets through
    w.settle()
    check_invariants(w)


def test_without_upstream_the_request_uri_host_is_the_next_hop() -> None:
    w = World(make_config(upstream=None))
    _, b = start_call(w, uri="sip:bob@198.51.100.7:5070")
    assert b.dest == Address("198.51.100.7", 5070)
    _, b = start_call(w, uri="sip:bob@198.51.100.8;transport=tcp")
    assert b.dest == Address("198.51.100.8", 5060, "tcp")
    assert b.request.top_via.transport == "TCP"


def test_inbound_call_to_registered_phone(w: World) -> None:
    reg = register_locally(w, contact="<sip:14085551234@10.0.0.10:5060;line=abc>")
    assert reg.response.status == 200
    a_data = upstream_invite(uri="sip:+14085551234@192.0.2.1")
    out = w.upstream(a_data)
    assert only(pick(out, OUT, status=100))
    inv = only(pick(out, IN, method="INVITE"))
    assert inv.dest == PHONE
    assert inv.request.uri == "sip:14085551234@10.0.0.10:5060;line=abc"
    assert "x-sipura" not in (inv.request.get("supported") or "")
    assert b"c=IN IP4 10.0.0.1" in inv.request.body
    a_invite = parse(a_data)
    assert isinstance(a_invite, Request)
    assert a_invite.call_id not in head_text(inv.request)
    # the phone answers; the 200 upstream advertises x-sipura
    phone_tag = tag()
    out = w.phone(build_response(inv.request, 180, to_tag=phone_tag, contact=PHONE_CONTACT))
    assert only(pick(out, OUT, status=180))
    out = w.phone(
        build_response(inv.request, 200, to_tag=phone_tag, contact=PHONE_CONTACT, body=PHONE_SDP)
    )
    ok = only(pick(out, OUT, status=200))
    assert ok.dest == UPSTREAM
    assert "x-sipura" in [v.lower() for v in ok.response.get_all("supported")]
    assert b"c=IN IP4 192.0.2.1" in ok.response.body
    pbx = uac_dialog(UPSTREAM, a_invite, ok.response, UP_CONTACT)
    out = w.upstream(pbx.request("ACK"))
    ack = only(pick(out, IN, method="ACK"))
    assert ack.dest == PHONE and ack.request.to.tag == phone_tag
    # BYE from the outside
    out = w.upstream(pbx.request("BYE"))
    bye = only(pick(out, IN, method="BYE"))
    assert bye.request.cseq == CSeq(2, "BYE") and bye.request.uri == uri_of(PHONE_CONTACT)
    out = w.phone(build_response(bye.request, 200))
    assert only(pick(out, OUT, status=200))
    assert w.core.calls == {}


def test_inbound_call_to_static_contact(w: World) -> None:
    out = w.upstream(upstream_invite(uri=f"sip:{LINE2}@192.0.2.1"))
    inv = only(pick(out, IN, method="INVITE"))
    assert inv.dest == PHONE2 and inv.request.uri == "sip:10.0.0.20:5062"


def test_inbound_unknown_user_404_unreachable_480(w: World) -> None:
    out = w.upstream(upstream_invite(uri="sip:5551212@192.0.2.1"))
    assert only(pick(out, OUT, status=404))
    out = w.upstream(upstream_invite(uri=f"sip:{LINE1}@192.0.2.1"))  # never registered
    assert only(pick(out, OUT, status=480))
    register_locally(w, expires=60)
    w.advance(61)  # the binding expired
    out = w.upstream(upstream_invite(uri=f"sip:{LINE1}@192.0.2.1"))
    assert only(pick(out, OUT, status=480))
    assert w.core.calls == {}


def test_port_exhaustion_answers_503() -> None:
    w = World(media=FakeMedia(pairs=2))
    start_call(w)  # takes both pairs
    out = w.phone(phone_invite())
    rejected = only(pick(out, IN, status=503)).response
    assert rejected.get("retry-after")
    assert not pick(out, OUT)
    w.settle()
    check_invariants(w)


def test_max_calls_answers_503() -> None:
    w = World(make_config(max_calls=1))
    start_call(w)
    assert only(pick(w.phone(phone_invite()), IN, status=503))


# --- CANCEL ------------------------------------------------------------------------------


def cancel_for(invite: Request, source: Address = PHONE) -> bytes:
    return build_request(
        "CANCEL",
        invite.uri,
        via=str(invite.top_via),
        from_=invite.get("from") or "",
        to=invite.get("to") or "",
        call_id=invite.call_id,
        cseq=invite.cseq.number,
    )


def test_cancel_after_ringing(w: World) -> None:
    a_invite, b = start_call(w)
    w.upstream(build_response(b.request, 180, to_tag="up1", contact=UP_CONTACT))
    out = w.phone(cancel_for(a_invite))
    ok = only(pick(out, IN, status=200)).response
    assert ok.cseq.method == "CANCEL"
    terminated = only(pick(out, IN, status=487)).response
    assert ok.to.tag == terminated.to.tag
    cancel = only(pick(out, OUT, method="CANCEL")).request
    assert cancel.top_via == b.request.top_via and cancel.uri == b.request.uri
    assert cancel.cseq == CSeq(1, "CANCEL") and cancel.call_id == b.request.call_id
    w.upstream(build_response(cancel, 200))
    out = w.upstream(build_response(b.request, 487, "Request Terminated", to_tag="up1"))
    ack = only(pick(out, OUT, method="ACK")).request  # the transaction layer's ACK
    assert ack.top_via.branch == b.request.top_via.branch
    assert not pick(out, IN)  # the phone already had its 487
    assert w.core.calls == {} and w.media.all_returned()
    # the phone ACKs its 487: absorbed
    ack_487 = build_request(
        "ACK",
        a_invite.uri,
        via=str(a_invite.top_via),
        from_=a_invite.get("from") or "",
        to=terminated.get("to") or "",
        call_id=a_invite.call_id,
        cseq=101,
    )
    assert w.phone(ack_487) == []


def test_cancel_before_any_response_waits_for_a_provisional(w: World) -> None:
    a_invite, b = start_call(w)
    out = w.phone(cancel_for(a_invite))
    assert only(pick(out, IN, status=487))
    assert not pick(out, OUT)  # §9.1: no CANCEL before a provisional response
    out = w.upstream(build_response(b.request, 180, to_tag="up1"))
    assert not pick(out, IN)
    cancel = only(pick(out, OUT, method="CANCEL")).request
    w.upstream(build_response(cancel, 200))
    w.upstream(build_response(b.request, 487, to_tag="up1"))
    assert w.core.calls == {}


def test_cancel_after_100_trying(w: World) -> None:
    a_invite, b = start_call(w)
    w.upstream(build_response(b.request, 100))
    out = w.phone(cancel_for(a_invite))
    assert only(pick(out, IN, status=487))
    cancel = only(pick(out, OUT, method="CANCEL")).request
    w.upstream(build_response(cancel, 200))
    w.upstream(build_response(b.request, 487, to_tag="up1"))
    assert w.core.calls == {}


def test_cancel_when_upstream_never_answers(w: World) -> None:
    a_invite, _ = start_call(w)
    w.phone(cancel_for(a_invite))
    w.advance(64 * T1 + 1)
    assert w.core.calls == {} and w.media.all_returned()


def test_cancel_racing_a_200(w: World) -> None:
    a_invite, b = start_call(w)
    w.upstream(build_response(b.request, 180, to_tag="up1", contact=UP_CONTACT))
    out = w.phone(cancel_for(a_invite))
    assert only(pick(out, OUT, method="CANCEL"))
    # the callee answered before the CANCEL reached it
    out = w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    assert not pick(out, IN)  # the phone has its 487 and never hears of the answer
    ack = only(pick(out, OUT, method="ACK")).request
    bye = only(pick(out, OUT, method="BYE")).request
    assert ack.to.tag == "up1" and bye.to.tag == "up1"
    assert ack.cseq == CSeq(1, "ACK") and bye.cseq.number > 1
    assert ack.uri == bye.uri == uri_of(UP_CONTACT)
    out = w.upstream(build_response(bye, 200))
    assert w.core.calls == {} and w.media.all_returned()


def test_cancel_after_the_200_has_no_effect(w: World) -> None:
    a_invite, b = start_call(w)
    out = w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    assert only(pick(out, IN, status=200))
    out = w.phone(cancel_for(a_invite))
    assert only(pick(out, IN, status=200)).response.cseq.method == "CANCEL"
    assert not pick(out, IN, status=487) and not pick(out, OUT)
    assert len(w.core.calls) == 1


def test_cancel_for_no_transaction_481(w: World) -> None:
    a_invite = parse(phone_invite())
    assert isinstance(a_invite, Request)
    assert only(pick(w.phone(cancel_for(a_invite)), IN, status=481))


# --- early media, 100rel -----------------------------------------------------------------


def test_early_media_183_with_sdp(w: World) -> None:
    a_invite, b = start_call(w)
    out = w.upstream(build_response(b.request, 183, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    early = only(pick(out, IN, status=183)).response
    session = w.media.active[0]
    assert b"c=IN IP4 10.0.0.1" in early.body
    assert f"m=audio {session.local(IN, 0)[1]} ".encode() in early.body
    assert session.remotes[(OUT, 0)][0] == "203.0.113.50"
    assert w.core.active_calls()[0]["state"] == "early"
    # the answer may repeat the SDP; the call goes on normally
    answer(w, a_invite, b, ring=False)


def test_prack_relayed_in_the_early_dialog(w: World) -> None:
    a_invite, b = start_call(w, headers=(("Supported", "100rel"),))
    out = w.upstream(
        build_response(
            b.request,
            183,
            to_tag="up1",
            contact=UP_CONTACT,
            body=UP_SDP,
            headers=[("Require", "100rel"), ("RSeq", "4711")],
        )
    )
    early = only(pick(out, IN, status=183)).response
    assert early.get("require") == "100rel" and early.get("rseq") == "4711"
    phone = uac_dialog(PHONE, a_invite, early, PHONE_CONTACT)
    out = w.phone(phone.request("PRACK", headers=[("RAck", "4711 101 INVITE")]))
    prack = only(pick(out, OUT, method="PRACK")).request
    assert prack.to.tag == "up1" and prack.call_id == b.request.call_id
    assert prack.cseq == CSeq(2, "PRACK")
    # RAck names the B leg's INVITE (CSeq 1), not the phone's (101)
    assert prack.get("rack") == "4711 1 INVITE"
    out = w.upstream(build_response(prack, 200))
    assert only(pick(out, IN, status=200)).response.cseq == CSeq(102, "PRACK")
    answer(w, a_invite, b, ring=False)


# --- BYE, re-INVITE and other in-dialog requests ------------------------------------------


def test_bye_from_upstream(w: World) -> None:
    call = outbound_call(w)
    out = w.upstream(call.pbx.request("BYE", headers=[("Reason", "Q.850;cause=16")]))
    bye = only(pick(out, IN, method="BYE"))
    assert bye.dest == PHONE and bye.request.uri == uri_of(PHONE_CONTACT)
    assert bye.request.call_id == call.a_invite.call_id
    assert bye.request.from_.tag == call.phone.remote_tag
    assert bye.request.to.tag == call.phone.local_tag
    assert bye.request.get("reason") == "Q.850;cause=16"
    out = w.phone(build_response(bye.request, 200))
    ok = only(pick(out, OUT, status=200))
    assert ok.dest == UPSTREAM and ok.response.to.tag == call.pbx.remote_tag
    assert w.core.calls == {} and w.media.all_returned()


def test_bye_unanswered_still_ends_the_call(w: World) -> None:
    call = outbound_call(w)
    out = w.phone(call.phone.request("BYE"))
    assert only(pick(out, OUT, method="BYE"))
    out = w.advance(64 * T1 + 1)
    assert len(pick(out, OUT, method="BYE")) >= 5  # timer E retransmissions
    assert only(pick(out, IN, status=408))
    assert w.core.calls == {} and w.media.all_returned()


@pytest.mark.parametrize("hold", ["sendonly", "zero"])
def test_reinvite_hold_and_resume_from_the_phone(w: World, hold: str) -> None:
    call = outbound_call(w)
    session = w.media.active[0]
    body = sdp("0.0.0.0", 4000) if hold == "zero" else sdp("10.0.0.10", 4000, direction="sendonly")
    out = w.phone(call.phone.request("INVITE", body=body))
    assert only(pick(out, IN, status=100))
    reinv = only(pick(out, OUT, method="INVITE")).request
    assert reinv.cseq == CSeq(2, "INVITE") and reinv.to.tag == call.pbx.local_tag
    assert reinv.call_id == call.b_invite.call_id and reinv.uri == uri_of(UP_CONTACT)
    if hold == "zero":
        assert b"c=IN IP4 0.0.0.0" in reinv.body
        assert session.remotes[(IN, 0)][0] == "0.0.0.0"
    else:
        assert b"a=sendonly" in reinv.body and b"c=IN IP4 192.0.2.1" in reinv.body
    out = w.upstream(
        build_response(
            reinv,
            200,
            to_tag=call.pbx.local_tag,
            contact=UP_CONTACT,
            body=sdp("203.0.113.50", 7000, direction="recvonly"),
        )
    )
    ok = only(pick(out, IN, status=200)).response
    assert ok.cseq == CSeq(102, "INVITE") and b"a=recvonly" in ok.body
    out = w.phone(call.phone.request("ACK"))
    ack = only(pick(out, OUT, method="ACK")).request
    assert ack.cseq == CSeq(2, "ACK")
    # resume
    out = w.phone(call.phone.request("INVITE", body=PHONE_SDP))
    reinv = only(pick(out, OUT, method="INVITE")).request
    assert reinv.cseq == CSeq(3, "INVITE") and b"a=sendonly" not in reinv.body
    assert session.remotes[(IN, 0)][0] == "10.0.0.10"
    out = w.upstream(
        build_response(reinv, 200, to_tag=call.pbx.local_tag, contact=UP_CONTACT, body=UP_SDP)
    )
    assert only(pick(out, IN, status=200))
    out = w.phone(call.phone.request("ACK"))
    assert only(pick(out, OUT, method="ACK")).request.cseq == CSeq(3, "ACK")
    assert len(w.media.sessions) == 1  # one allocation for the whole call


def test_reinvite_from_upstream_with_new_target(w: World) -> None:
    call = outbound_call(w)
    call.pbx.contact = "<sip:pbx@203.0.113.6:5060>"
    out = w.upstream(call.pbx.request("INVITE", body=sdp("203.0.113.51", 7100)))
    reinv = only(pick(out, IN, method="INVITE"))
    assert reinv.dest == PHONE
    first = reinv.request.cseq.number  # the proxy's first request to the phone: any number
    assert reinv.request.from_.tag == call.phone.remote_tag
    assert w.media.active[0].remotes[(OUT, 0)][:2] == ("203.0.113.51", 7100)
    out = w.phone(build_response(reinv.request, 200, contact=PHONE_CONTACT, body=PHONE_SDP))
    ok = only(pick(out, OUT, status=200)).response
    assert ok.cseq == CSeq(501, "INVITE") and b"c=IN IP4 192.0.2.1" in ok.body
    out = w.upstream(call.pbx.request("ACK"))
    ack = only(pick(out, IN, method="ACK"))
    assert ack.request.cseq == CSeq(first, "ACK") and ack.dest == PHONE
    # the target refresh moved the B leg: the phone's BYE goes to the new contact
    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    assert bye.request.uri == "sip:pbx@203.0.113.6:5060"
    assert bye.dest == Address("203.0.113.6", 5060)
    w.upstream(build_response(bye.request, 200))
    assert w.core.calls == {}


@pytest.mark.parametrize("method", ["INFO", "UPDATE", "NOTIFY", "REFER", "MESSAGE", "XFOO"])
@pytest.mark.parametrize("side", [IN, OUT])
def test_in_dialog_requests_relayed(w: World, method: str, side: Side) -> None:
    call = outbound_call(w)
    peer, src = (call.phone, PHONE) if side is IN else (call.pbx, UPSTREAM)
    other = OUT if side is IN else IN
    headers = {
        "INFO": [("Content-Type", "application/dtmf-relay")],
        "NOTIFY": [("Event", "refer;id=3"), ("Subscription-State", "active")],
        "REFER": [("Refer-To", "<sip:300@example.com>"), ("Referred-By", "<sip:x@y>")],
    }.get(method, [])
    body = b"Signal=5\r\nDuration=160\r\n" if method == "INFO" else b""
    out = w.send(
        side,
        peer.request(method, headers=headers, body=body, content_type="application/dtmf-relay"),
        src,
    )
    relayed = only(pick(out, other, method=method)).request
    for pair in headers:
        assert pair in relayed.headers
    assert relayed.body == body
    out = w.send(
        other,
        build_response(relayed, 200, headers=[("X-Echo", "1")]),
        UPSTREAM if other is OUT else PHONE,
    )
    ok = only(pick(out, side, status=200)).response
    assert ok.cseq == CSeq(peer.cseq, method) and ok.get("x-echo") == "1"


def test_update_in_the_early_dialog_with_sdp(w: World) -> None:
    a_invite, b = start_call(w)
    out = w.upstream(build_response(b.request, 180, to_tag="up1", contact=UP_CONTACT))
    early = only(pick(out, IN, status=180)).response
    phone = uac_dialog(PHONE, a_invite, early, PHONE_CONTACT)
    out = w.phone(phone.request("UPDATE", body=sdp("10.0.0.10", 4100)))
    update = only(pick(out, OUT, method="UPDATE")).request
    assert update.to.tag == "up1" and b"c=IN IP4 192.0.2.1" in update.body
    assert w.media.active[0].remotes[(IN, 0)][1] == 4100
    out = w.upstream(build_response(update, 200, body=sdp("203.0.113.50", 7200)))
    ok = only(pick(out, IN, status=200)).response
    assert b"c=IN IP4 10.0.0.1" in ok.body
    answer(w, a_invite, b, ring=False)


def test_cseq_spaces_are_per_leg_and_monotonic(w: World) -> None:
    call = outbound_call(w)
    for _ in range(2):
        for peer, src, side in ((call.phone, PHONE, IN), (call.pbx, UPSTREAM, OUT)):
            out = w.send(side, peer.request("INFO"), src)
            relayed = only(pick(out, method="INFO")).request
            back = IN if side is OUT else OUT
            w.send(back, build_response(relayed, 200), UPSTREAM if back is OUT else PHONE)
    out = w.phone(call.phone.request("INVITE", body=PHONE_SDP))
    reinv = only(pick(out, OUT, method="INVITE")).request
    w.upstream(build_response(reinv, 200, contact=UP_CONTACT, body=UP_SDP))
    w.phone(call.phone.request("ACK"))
    out = w.upstream(call.pbx.request("BYE"))
    by_leg: dict[tuple[Side, str], list[int]] = {}
    for wire in w.sent:
        if isinstance(wire.msg, Request) and wire.msg.method not in ("ACK", "CANCEL"):
            by_leg.setdefault((wire.side, wire.msg.call_id), []).append(wire.msg.cseq.number)
    assert by_leg[(OUT, call.b_invite.call_id)] == [1, 2, 3, 4]
    a_leg = by_leg[(IN, call.a_invite.call_id)]
    assert a_leg == list(range(a_leg[0], a_leg[0] + 3))
    bye = only(pick(out, IN, method="BYE"))
    w.phone(build_response(bye.request, 200))


def test_in_dialog_request_with_old_cseq_rejected(w: World) -> None:
    call = outbound_call(w)
    out = w.phone(call.phone.request("INFO", cseq=50))
    assert only(pick(out, IN, status=500)).response.get("retry-after")
    assert not pick(out, OUT)


def test_in_dialog_request_for_unknown_dialog_481(w: World) -> None:
    call = outbound_call(w)
    call.phone.remote = call.phone.remote.replace(call.phone.remote_tag, "nosuchtag")
    assert only(pick(w.phone(call.phone.request("BYE")), IN, status=481))


# --- digest authentication ---------------------------------------------------------------


def test_digest_challenge_and_credentials_pass_through(w: World) -> None:
    a_invite, b = start_call(w, cseq=1, from_tag="ft", call_id="auth@phone")
    challenge = 'Digest realm="itsp", nonce="abc123", qop="auth", algorithm=MD5'
    out = w.upstream(
        build_response(
            b.request,
            407,
            "Proxy Authentication Required",
            to_tag="up1",
            headers=[("Proxy-Authenticate", challenge)],
        )
    )
    ack = only(pick(out, OUT, method="ACK")).request
    assert ack.uri == b.request.uri
    relayed = only(pick(out, IN, status=407)).response
    assert relayed.get("proxy-authenticate") == challenge
    assert w.core.calls == {} and w.media.all_returned()
    # the phone ACKs and retries with credentials over the unchanged R-URI
    w.phone(
        build_request(
            "ACK",
            CALLEE,
            via=str(a_invite.top_via),
            from_=a_invite.get("from") or "",
            to=relayed.get("to") or "",
            call_id="auth@phone",
            cseq=1,
        )
    )
    credentials = (
        f'Digest username="{LINE1}", realm="itsp", nonce="abc123", uri="{CALLEE}", '
        'response="0123456789abcdef0123456789abcdef", qop=auth, nc=00000001, cnonce="xyz"'
    )
    a_retry, b2 = start_call(
        w,
        cseq=2,
        from_tag="ft",
        call_id="auth@phone",
        headers=(("Proxy-Authorization", credentials),),
    )
    assert b2.request.uri == CALLEE
    assert b2.request.get("proxy-authorization") == credentials
    assert b2.request.call_id != b.request.call_id
    answer(w, a_retry, b2)


def parse_request(data: bytes) -> Request:
    msg = parse(data)
    assert isinstance(msg, Request)
    return msg


# --- REGISTER ----------------------------------------------------------------------------


def test_register_kept_locally_without_registrar(w: World) -> None:
    ok = register_locally(w, expires=120).response
    assert ok.status == 200
    assert NameAddr.parse(ok.get_all("contact")[0]).param("expires") == "120"
    assert [b.flow for b in w.core.bindings.live(LINE1, w.now)] == [PHONE]
    register_locally(w, expires=0)
    assert not w.core.bindings.live(LINE1, w.now)


def test_register_unknown_user_rejected_when_configured() -> None:
    w = World(make_config(unknown_users="reject"))
    assert register_locally(w, user="999").response.status == 403


def test_register_from_outside_not_allowed(w: World) -> None:
    data = build_request(
        "REGISTER",
        "sip:192.0.2.1",
        via=via_for(UPSTREAM),
        from_=f"<sip:x@y>;tag={tag()}",
        to="<sip:x@y>",
        call_id="r@x",
        cseq=1,
        contact="<sip:x@203.0.113.5>",
    )
    assert only(w.upstream(data)).response.status == 405


def test_register_relayed_with_own_contact_and_challenge() -> None:
    w = World(make_config(registrar="sip:203.0.113.8:5060"))
    registrar = Address("203.0.113.8", 5060)

    def phone_register(cseq: int, headers: list[tuple[str, str]], expires: str) -> bytes:
        return build_request(
            "REGISTER",
            "sip:itsp.example.net",
            via=via_for(PHONE),
            from_="<sip:+14085551234@itsp.example.net>;tag=regtag",
            to="<sip:+14085551234@itsp.example.net>",
            call_id="reg1@10.0.0.10",
            cseq=cseq,
            contact='<sip:14085551234@10.0.0.10:5060>;+sip.instance="<urn:x>"',
            headers=[*headers, ("Expires", expires)],
        )

    reg = only(w.phone(phone_register(1, [], "3600")))
    assert reg.side is OUT and reg.dest == registrar
    first = reg.request
    assert first.uri == "sip:itsp.example.net"
    contact = NameAddr.parse(first.get_all("contact")[0])
    assert contact.sip_uri().host == "192.0.2.1" and contact.param("+sip.instance")
    assert "10.0.0.10" not in head_text(first) and "reg1@10.0.0.10" not in head_text(first)
    assert first.get("max-forwards") == "69" and first.get("expires") == "3600"
    challenge = 'Digest realm="itsp", nonce="n1"'
    out = w.upstream(
        build_response(
            first, 401, "Unauthorized", to_tag="r1", headers=[("WWW-Authenticate", challenge)]
        ),
        registrar,
    )
    relayed = only(out).response
    assert relayed.status == 401 and relayed.get("www-authenticate") == challenge
    assert relayed.call_id == "reg1@10.0.0.10"
    assert not w.core.bindings.live(LINE1, w.now)
    auth = f'Digest username="{LINE1}", realm="itsp", nonce="n1", uri="sip:itsp.example.net"'
    second = only(w.phone(phone_register(2, [("Authorization", auth)], "3600"))).request
    assert second.get("authorization") == auth
    assert second.call_id == first.call_id  # one registration, one Call-ID upstream
    assert second.cseq.number > first.cseq.number
    out = w.upstream(
        build_response(
            second, 200, to_tag="r1", contact=f"{second.get_all('contact')[0]};expires=600"
        ),
        registrar,
    )
    ok = only(out).response
    assert ok.status == 200
    confirmed = NameAddr.parse(ok.get_all("contact")[0])
    assert confirmed.sip_uri().host == "10.0.0.10" and confirmed.param("expires") == "600"
    assert [b.flow for b in w.core.bindings.live(LINE1, w.now)] == [PHONE]
    # calls for the line now reach the phone
    out = w.upstream(upstream_invite())
    assert only(pick(out, IN, method="INVITE")).dest == PHONE
    # un-register with Expires: 0 (the registrar lists no contact any more)
    third = only(w.phone(phone_register(3, [("Authorization", auth)], "0"))).request
    assert third.get("expires") == "0"
    w.upstream(build_response(third, 200, to_tag="r1"), registrar)
    assert not w.core.bindings.live(LINE1, w.now)
    w.settle()


# --- malformed input ---------------------------------------------------------------------


def test_malformed_request_gets_400(w: World) -> None:
    data = phone_invite().replace(b"CSeq: 101 INVITE", b"CSeq: 101 BYE")
    rejected = only(w.phone(data)).response
    assert rejected.status == 400 and rejected.call_id
    assert w.phone(b"\x00\xffgarbage\r\n\r\n") == []
    assert w.upstream(b"SIP/2.0 200 OK\r\nVia: nonsense\r\n\r\n") == []
    assert w.core.stats.bad_messages == 3
    assert w.core.calls == {}


def test_bad_sdp_in_invite_488_and_nothing_held(w: World) -> None:
    out = w.phone(phone_invite(body=b"v=0\r\nm=audio notaport RTP/AVP 0\r\n"))
    assert only(pick(out, IN, status=488))
    assert w.core.calls == {} and w.media.all_returned()


MUTATIONS = [
    b"Via:",
    b"From:",
    b"To:",
    b"Call-ID:",
    b"CSeq:",
    b"Contact:",
    b"tag=",
    b"sip:",
    b"<",
    b">",
    b";",
    b"\r\n",
    b"0",
    b"1",
    b"INVITE",
    b"BYE",
    b"Content-Length: ",
    b"@",
    b"c=IN",
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stage=st.integers(0, 4),
    cut=st.integers(0, 2000),
    junk=st.sampled_from([b"", b"\x00", b"\xff\xfe", b" ", b";", b"<>", b"\r\n \r\n", b"99"]),
    target=st.sampled_from(MUTATIONS),
)
def test_mutated_messages_never_crash(stage: int, cut: int, junk: bytes, target: bytes) -> None:
    w = World()
    a_invite, b = start_call(w)
    pbx_msgs = [
        build_response(b.request, 180, to_tag="up1", contact=UP_CONTACT),
        build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP),
    ]
    victim = pbx_msgs[stage % 2] if stage < 2 else None
    if stage >= 2:
        call = answer(w, a_invite, b)
        victim = [
            call.pbx.request("BYE"),
            call.pbx.request("INFO"),
            call.pbx.request("INVITE", body=UP_SDP),
        ][stage - 2]
    assert victim is not None
    index = victim.find(target)
    if index < 0:
        index = cut % len(victim)
    mutated = victim[:index] + junk + victim[index + len(target) :]
    mutated = mutated[: max(cut, 40)] if cut % 7 == 0 else mutated
    w.upstream(mutated)
    w.phone(mutated)
    w.settle()
    check_invariants(w)


# --- retransmissions and timers ----------------------------------------------------------


def test_invite_retransmission_does_not_duplicate_the_b_leg(w: World) -> None:
    data = phone_invite()
    out = w.phone(data)
    assert len(pick(out, OUT, method="INVITE")) == 1
    again = w.phone(data)
    assert [x.response.status for x in again] == [100]  # the server transaction answers
    b = pick(w.sent, OUT, method="INVITE")[0]
    w.upstream(build_response(b.request, 180, to_tag="up1", contact=UP_CONTACT))
    again = w.phone(data)
    assert [x.response.status for x in again] == [180]
    assert len(pick(w.sent, OUT, method="INVITE")) == 1
    assert len(w.core.calls) == 1


def test_b_leg_invite_retransmitted_over_udp(w: World) -> None:
    _, b = start_call(w)
    out = w.advance(4 * T1 + 0.01)  # A fires at T1, 3*T1 (and 7*T1 later)
    assert [x.msg.serialize() for x in pick(out, OUT, method="INVITE")] == [b.msg.serialize()] * 2
    w.upstream(build_response(b.request, 100))
    assert not pick(w.advance(10), OUT, method="INVITE")


def test_2xx_retransmitted_to_the_phone_until_ack(w: World) -> None:
    a_invite, b = start_call(w)
    out = w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    ok = only(pick(out, IN, status=200))
    out = w.advance(3 * T1 + 0.01)
    retransmitted = pick(out, IN, status=200)
    assert len(retransmitted) == 2
    assert all(x.msg.serialize() == ok.msg.serialize() for x in retransmitted)
    # the upstream retransmits its 200 too: not relayed again, nor ACKed before the phone
    out = w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    assert not pick(out, IN) and not pick(out, OUT)
    phone = uac_dialog(PHONE, a_invite, ok.response, PHONE_CONTACT)
    assert only(pick(w.phone(phone.request("ACK")), OUT, method="ACK"))
    assert not pick(w.advance(10), IN, status=200)


def test_retransmitted_2xx_from_upstream_is_re_acked(w: World) -> None:
    a_invite, b = start_call(w)
    call = answer(w, a_invite, b, ring=False)
    first_ack = pick(w.sent, OUT, method="ACK")[-1]
    ok = build_response(b.request, 200, to_tag=call.pbx.local_tag, contact=UP_CONTACT, body=UP_SDP)
    # while the client transaction is still in RFC 6026 "Accepted"
    out = w.upstream(ok)
    assert [x.msg.serialize() for x in out] == [first_ack.msg.serialize()]
    # and after it ended (a stray 2xx)
    w.advance(64 * T1 + 1)
    out = w.upstream(ok)
    assert [x.msg.serialize() for x in out] == [first_ack.msg.serialize()]
    assert out[0].dest == UPSTREAM


def test_no_answer_408_to_the_caller_and_media_released(w: World) -> None:
    start_call(w)
    out = w.advance(64 * T1 + 0.1)
    timeout = only(pick(out, IN, status=408)).response
    assert timeout.to.tag
    assert w.core.calls == {} and w.media.all_returned()
    assert w.core.stats.calls_failed == 1


def test_no_ack_from_the_phone_hangs_up_both_legs(w: World) -> None:
    _, b = start_call(w)
    w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    out = w.advance(64 * T1 + 0.1)
    assert len(pick(out, IN, status=200)) >= 5
    up = [x for x in pick(out, OUT) if isinstance(x.msg, Request)]
    assert [x.request.method for x in up][:2] == ["ACK", "BYE"]  # the 2xx is ACKed first
    bye_up = pick(out, OUT, method="BYE")[0].request
    bye_phone = pick(out, IN, method="BYE")[0].request
    assert bye_up.to.tag == "up1" and bye_up.call_id == b.request.call_id
    w.upstream(build_response(bye_up, 200))
    w.phone(build_response(bye_phone, 481, "Call/Transaction Does Not Exist"))
    assert w.core.calls == {} and w.media.all_returned()


def test_no_ack_and_silent_peers_still_release_media(w: World) -> None:
    _, b = start_call(w)
    w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    w.settle()
    assert w.core.calls == {} and w.media.all_returned()


@pytest.mark.parametrize("status", [404, 486, 503, 603])
def test_error_answer_relayed_and_media_released(w: World, status: int) -> None:
    _, b = start_call(w)
    out = w.upstream(
        build_response(b.request, status, "No", to_tag="up1", headers=[("Retry-After", "30")])
    )
    relayed = only(pick(out, IN, status=status)).response
    assert relayed.get("retry-after") == "30"
    assert only(pick(out, OUT, method="ACK"))
    assert w.core.calls == {} and w.media.all_returned()


# --- TCP ---------------------------------------------------------------------------------


def test_tcp_phone_gets_everything_on_its_connection(w: World) -> None:
    a_invite, b = start_call(w, source=PHONE_TCP)
    assert w.sent[0].dest == PHONE_TCP  # 100 Trying on the same connection
    call = answer(w, a_invite, b, phone_source=PHONE_TCP)
    assert uri_of(call.a_ok.get_all("contact")[0]).endswith(";transport=tcp")
    assert not pick(w.advance(5), IN, status=200)  # no retransmission over TCP
    out = w.upstream(call.pbx.request("BYE"))
    assert only(pick(out, IN, method="BYE")).dest == PHONE_TCP


def test_tcp_upstream() -> None:
    w = World(make_config(upstream="sip:203.0.113.5:5060;transport=tcp"))
    a_invite, b = start_call(w)
    assert b.dest.transport == "tcp" and (b.dest.host, b.dest.port) == ("203.0.113.5", 5060)
    assert b.request.top_via.transport == "TCP"
    assert uri_of(b.request.get_all("contact")[0]).endswith(";transport=tcp")
    assert not pick(w.advance(2), OUT, method="INVITE")  # no timer A over TCP
    call = answer(w, a_invite, b, source=UPSTREAM_TCP)
    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    assert bye.dest.transport == "tcp"
    w.upstream(build_response(bye.request, 200), UPSTREAM_TCP)
    assert w.core.calls == {}


def test_inbound_call_to_a_tcp_registered_phone_reuses_its_connection(w: World) -> None:
    register_locally(w, source=PHONE_TCP, contact="<sip:14085551234@10.0.0.10:5060;transport=tcp>")
    a_data = upstream_invite()
    out = w.upstream(a_data)
    inv = only(pick(out, IN, method="INVITE"))
    assert inv.dest == PHONE_TCP
    out = w.phone(
        build_response(
            inv.request,
            200,
            to_tag="ph1",
            contact="<sip:14085551234@10.0.0.10:5060;transport=tcp>",
            body=PHONE_SDP,
        ),
        PHONE_TCP,
    )
    ok = only(pick(out, OUT, status=200)).response
    pbx = uac_dialog(UPSTREAM, parse_request(a_data), ok, UP_CONTACT)
    out = w.upstream(pbx.request("ACK"))
    assert only(pick(out, IN, method="ACK")).dest == PHONE_TCP
    out = w.upstream(pbx.request("BYE"))
    bye = only(pick(out, IN, method="BYE"))
    assert bye.dest == PHONE_TCP
    w.phone(build_response(bye.request, 200), PHONE_TCP)
    assert w.core.calls == {}


# --- late offer --------------------------------------------------------------------------


def test_late_offer_offer_in_200_answer_in_ack(w: World) -> None:
    a_invite, b = start_call(w, body=b"")
    assert b.request.body == b"" and not w.media.sessions
    out = w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    ok = only(pick(out, IN, status=200)).response
    session = w.media.active[0]
    assert b"c=IN IP4 10.0.0.1" in ok.body
    assert f"m=audio {session.local(IN, 0)[1]} ".encode() in ok.body
    phone = uac_dialog(PHONE, a_invite, ok, PHONE_CONTACT)
    out = w.phone(phone.request("ACK", body=PHONE_SDP))
    ack = only(pick(out, OUT, method="ACK")).request
    assert ack.content_type == "application/sdp"
    assert b"c=IN IP4 192.0.2.1" in ack.body
    assert f"m=audio {session.local(OUT, 0)[1]} ".encode() in ack.body
    assert session.remotes[(IN, 0)][:2] == ("10.0.0.10", 4000)
    w.phone(phone.request("BYE"))
    bye = pick(w.sent, OUT, method="BYE")[-1]
    w.upstream(build_response(bye.request, 200))
    assert w.core.calls == {} and w.media.all_returned()


def test_late_offer_without_ports_is_refused() -> None:
    w2 = World(media=FakeMedia(pairs=0))
    _, b = start_call(w2, body=b"")
    out = w2.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    assert only(pick(out, IN, status=503))
    assert pick(out, OUT, method="ACK") and pick(out, OUT, method="BYE")
    bye = pick(out, OUT, method="BYE")[0]
    w2.upstream(build_response(bye.request, 200))
    w2.settle()
    check_invariants(w2)
    assert w2.core.calls == {}


# --- stats and the public surface --------------------------------------------------------


def test_stats_and_active_calls(w: World) -> None:
    call = outbound_call(w)
    (info,) = w.core.active_calls()
    assert info["direction"] == "inside->outside"
    assert info["a_call_id"] == call.a_invite.call_id
    assert info["b_call_id"] == call.b_invite.call_id
    assert info["media"] is not None
    assert w.core.stats.calls_total == 1 and w.core.stats.responses[200] >= 1
    assert isinstance(w.core, B2BUA)
    assert SipUri.parse(call.b_invite.uri).host == "itsp.example.net"
    assert Via.parse(str(call.b_invite.top_via)).host == PROXY_OUT.host
    assert NameAddr.parse(call.a_ok.get_all("contact")[0]).sip_uri().host == PROXY_IN.host


# --- more routing, redirects, early hang-ups, re-INVITE failures -------------------------


@pytest.mark.parametrize(
    ("upstream", "dest"),
    [
        ("sip:pbx.example.net", ("203.0.113.5", 5060)),
        ("sip:cafe:5080", ("203.0.113.77", 5080)),  # a name that looks like hex is a name
        ("sip:[2001:db8::5]:5090", ("2001:db8::5", 5090)),
    ],
)
def test_upstream_resolution(upstream: str, dest: tuple[str, int]) -> None:
    w = World(make_config(upstream=upstream))
    _, b = start_call(w)
    assert (b.dest.host, b.dest.port) == dest


def test_unresolvable_upstream_502_and_nothing_held() -> None:
    w = World(make_config(upstream="sip:nowhere.invalid"))
    out = w.phone(phone_invite())
    assert only(pick(out, IN, status=502))
    assert not pick(out, OUT)
    assert w.core.calls == {} and w.media.all_returned()


def test_record_route_loose_routing_on_the_outside(w: World) -> None:
    a_invite, b = start_call(w)
    rr = ["<sip:203.0.113.9;lr>", "<sip:203.0.113.10:5070;lr>"]
    call = answer(w, a_invite, b, record_route=tuple(rr))
    ack = pick(w.sent, OUT, method="ACK")[-1]
    assert ack.request.get_all("route") == list(reversed(rr))
    assert ack.request.uri == uri_of(UP_CONTACT)  # loose routing: the R-URI is the target
    assert ack.dest == Address("203.0.113.10", 5070)
    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    assert bye.request.get_all("route") == list(reversed(rr))
    assert bye.dest == ack.dest
    w.upstream(build_response(bye.request, 200))


def test_record_route_of_an_inbound_call_routes_the_outside_a_leg(w: World) -> None:
    register_locally(w)
    data = upstream_invite(headers=(("Record-Route", "<sip:203.0.113.9:5066;lr>"),))
    inv = only(pick(w.upstream(data), IN, method="INVITE"))
    assert "Record-Route" not in head_text(inv.request)
    out = w.phone(
        build_response(inv.request, 200, to_tag="ph1", contact=PHONE_CONTACT, body=PHONE_SDP)
    )
    ok = only(pick(out, OUT, status=200)).response
    assert ok.get_all("record-route") == ["<sip:203.0.113.9:5066;lr>"]
    phone = uas_dialog(PHONE, inv.request, "ph1", PHONE_CONTACT)
    out = w.phone(phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    assert bye.request.get_all("route") == ["<sip:203.0.113.9:5066;lr>"]
    assert bye.dest == Address("203.0.113.9", 5066)
    assert bye.request.uri == uri_of(UP_CONTACT)
    w.upstream(build_response(bye.request, 200), bye.dest)
    assert w.core.calls == {}


def test_redirect_contacts_pass_through(w: World) -> None:
    _, b = start_call(w)
    out = w.upstream(
        build_response(
            b.request,
            302,
            "Moved Temporarily",
            to_tag="up1",
            contact="<sip:alt@203.0.113.77>;q=0.5",
        )
    )
    moved = only(pick(out, IN, status=302)).response
    assert moved.get_all("contact") == ["<sip:alt@203.0.113.77>;q=0.5"]
    assert w.core.calls == {} and w.media.all_returned()


def test_early_bye_from_the_caller_ends_the_invite(w: World) -> None:
    a_invite, b = start_call(w)
    out = w.upstream(build_response(b.request, 180, to_tag="up1", contact=UP_CONTACT))
    phone = uac_dialog(PHONE, a_invite, only(pick(out, IN, status=180)).response, PHONE_CONTACT)
    out = w.phone(phone.request("BYE"))
    assert only(pick(out, IN, status=200)).response.cseq.method == "BYE"
    assert only(pick(out, IN, status=487))  # the INVITE gets its final response
    cancel = only(pick(out, OUT, method="CANCEL")).request
    w.upstream(build_response(cancel, 200))
    # the callee had answered already: confirmed and hung up, nothing reaches the phone
    out = w.upstream(build_response(b.request, 200, to_tag="up1", contact=UP_CONTACT, body=UP_SDP))
    assert not pick(out, IN)
    assert [x.request.method for x in out] == ["ACK", "BYE"]
    w.upstream(build_response(out[1].request, 200))
    assert w.core.calls == {} and w.media.all_returned()


def test_crossing_byes(w: World) -> None:
    call = outbound_call(w)
    bye_up = only(pick(w.phone(call.phone.request("BYE")), OUT, method="BYE")).request
    out = w.upstream(call.pbx.request("BYE"))
    assert only(pick(out, OUT, status=200))  # answered at once, not relayed to the phone
    assert not pick(out, IN)
    w.upstream(build_response(bye_up, 200))
    assert w.core.calls == {} and w.media.all_returned()


def test_rejected_reinvite_keeps_the_call(w: World) -> None:
    call = outbound_call(w)
    out = w.phone(call.phone.request("INVITE", body=sdp("10.0.0.10", 4100)))
    reinv = only(pick(out, OUT, method="INVITE")).request
    out = w.upstream(build_response(reinv, 491, "Request Pending"))
    assert only(pick(out, IN, status=491))
    assert only(pick(out, OUT, method="ACK")).request.top_via == reinv.top_via
    assert len(w.core.calls) == 1
    out = w.upstream(call.pbx.request("INFO"))
    assert only(pick(out, IN, method="INFO"))


def test_upstream_reinvite_without_sdp_offer_in_phone_200(w: World) -> None:
    call = outbound_call(w)
    out = w.upstream(call.pbx.request("INVITE"))
    reinv = only(pick(out, IN, method="INVITE")).request
    assert reinv.body == b""
    out = w.phone(build_response(reinv, 200, contact=PHONE_CONTACT, body=sdp("10.0.0.10", 4200)))
    ok = only(pick(out, OUT, status=200)).response
    assert b"c=IN IP4 192.0.2.1" in ok.body
    assert w.media.active[0].remotes[(IN, 0)][1] == 4200
    out = w.upstream(call.pbx.request("ACK", body=sdp("203.0.113.50", 7300)))
    ack = only(pick(out, IN, method="ACK")).request
    assert b"c=IN IP4 10.0.0.1" in ack.body
    assert w.media.active[0].remotes[(OUT, 0)][1] == 7300


VALUES = [
    "", " ", "<>", "<sip:>", ";tag=", "sip:x@", "a, b", "<sip:x@[::1]>", "1 INVITE",
    "99999999999", "SIP/2.0/UDP", "<tel:123>", "*", "0", "<sip:a@b>;tag=x, <sip:c@d>",
    "SIP/2.0/TCP 1.2.3.4;branch=z9hG4bKx", "sip:cafe;lr", "<sip:nowhere.invalid;lr>",
]  # fmt: skip


def _mutate_header(data: bytes, index: int, value: str) -> bytes:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    i = 1 + index % (len(lines) - 1)
    name = lines[i].split(b":", 1)[0]
    lines[i] = name + b": " + value.encode()
    return b"\r\n".join(lines) + sep + body


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stage=st.integers(0, 11), index=st.integers(0, 40), value=st.sampled_from(VALUES))
def test_mutated_headers_never_crash(stage: int, index: int, value: str) -> None:
    w = World()
    if stage == 0:
        w.phone(_mutate_header(phone_invite(), index, value))
        check_settled(w)
        return
    if stage == 1:
        register_locally(w)
        w.upstream(_mutate_header(upstream_invite(), index, value))
        check_settled(w)
        return
    if stage == 10:  # a phone's answer to an inbound call
        register_locally(w)
        inv = only(pick(w.upstream(upstream_invite()), IN, method="INVITE")).request
        ok = build_response(inv, 200, to_tag="ph1", contact=PHONE_CONTACT, body=PHONE_SDP)
        w.phone(_mutate_header(ok, index, value))
        check_settled(w)
        return
    if stage == 11:  # a registrar's answer
        w = World(make_config(registrar="sip:203.0.113.8"))
        register_locally(w)
        reg = pick(w.sent, OUT, method="REGISTER")[0].request
        ok = build_response(reg, 200, to_tag="r1", contact=f"{reg.get('contact')};expires=60")
        w.upstream(_mutate_header(ok, index, value), Address("203.0.113.8", 5060))
        check_settled(w)
        return
    a_invite, b = start_call(w)
    if stage in (2, 3):
        status = 183 if stage == 2 else 200
        resp = build_response(b.request, status, to_tag="up1", contact=UP_CONTACT, body=UP_SDP)
        w.upstream(_mutate_header(resp, index, value))
        check_settled(w)
        return
    call = answer(w, a_invite, b)
    peer, src, side = (call.phone, PHONE, IN) if stage % 2 else (call.pbx, UPSTREAM, OUT)
    method = ["BYE", "INVITE", "INFO", "PRACK", "UPDATE", "ACK"][stage - 4]
    body = b"" if method in ("BYE", "INFO") else (PHONE_SDP if side is IN else UP_SDP)
    w.send(side, _mutate_header(peer.request(method, body=body), index, value), src)
    check_settled(w)


def check_settled(w: World) -> None:
    w.settle()
    for call in list(w.core.calls.values()):
        assert call.state.value in ("inviting", "early", "confirmed", "answered")
    check_invariants(w)


def test_rtp_timeout_hangs_up_a_silent_call() -> None:
    w = World(make_config(media_extra="rtp_timeout_s = 10"))
    outbound_call(w)
    session = w.media.active[0]
    session.packets_in = 50
    assert not pick(w.advance(8), method="BYE")  # media flowing: counters moved
    session.packets_in = 400
    assert not pick(w.advance(8), method="BYE")
    byes = pick(w.advance(11), method="BYE")  # silent for 10 s: both legs hung up
    assert {b.side for b in byes} == {IN, OUT}
    assert all("RTP timeout" in (b.request.get("reason") or "") for b in byes)


def test_rtp_timeout_is_60_s_by_default(w: World) -> None:
    outbound_call(w)
    assert not pick(w.advance(59), method="BYE")
    byes = pick(w.advance(2), method="BYE")
    assert {bye.side for bye in byes} == {IN, OUT}
    assert all(bye.request.get("reason") == 'SIP;cause=200;text="RTP timeout"' for bye in byes)


def test_a_uri_naming_the_proxy_is_retargeted_to_the_upstream(w: World) -> None:
    _, b = start_call(w, uri="sip:2002@10.0.0.1:5060;user=phone")
    assert b.request.uri == "sip:2002@203.0.113.5:5060;user=phone"
    _, b = start_call(w, uri="sip:2002@pbx.example.com")  # a real domain: untouched
    assert b.request.uri == "sip:2002@pbx.example.com"
