"""Registrations and line identity in the sans-IO core.

Several devices per address-of-record (RFC 3261 §10), each with its own expiry; relayed
registrations with one upstream Contact per device; registered users without a line;
keep-alive OPTIONS to contacts behind NAT; and who may speak as a line (a line's MC is
only used for requests from its phone).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, phone_invite, upstream_invite
from fieldflows import DECT, DESK, LINE, NAT, call_in, contacts_of, field_config, register
from sipfake import (
    LINE1,
    LINE2,
    PHONE_TCP,
    UPSTREAM,
    World,
    build_request,
    build_response,
    make_config,
    only,
    pick,
    tag,
    via_for,
)

from proxy.b2bua.bindings import BINDING_PARAM
from proxy.b2bua.config import ConfigError, parse_config
from proxy.b2bua.identity import open_lines
from proxy.b2bua.sources import Source
from proxy.sip.headers import NameAddr, SipUri
from proxy.sip.transaction import Address

LINE3 = LINE
ATTACKER = Address("10.0.0.20", 5999)
"""Another port of LINE2's phone's address (its static contact is 10.0.0.20:5062)."""
REGISTRAR = Address("203.0.113.8", 5060)


def live_contacts(w: World, aor: str = LINE) -> list[str]:
    return [b.contact for b in w.core.bindings.live(aor, w.now)]


# --- several devices per line ---------------------------------------------------------


def test_each_device_has_its_own_binding_and_expiry() -> None:
    w = World()
    first = register(w, DESK, expires=600)
    assert first.response.status == 200
    assert contacts_of(first) == {f"sip:{LINE}@10.0.0.30:5060": 600}
    w.advance(100)
    second = register(w, DECT, expires=300)
    # The 200 lists every current binding with the expiry left to each (§10.3 step 8).
    assert contacts_of(second) == {f"sip:{LINE}@10.0.0.30:5060": 500,
                                   f"sip:{LINE}@10.0.0.31:5064": 300}  # fmt: skip
    w.advance(301)  # the DECT's binding expires on its own
    assert live_contacts(w) == [f"sip:{LINE}@10.0.0.30:5060"]
    w.advance(200)
    assert live_contacts(w) == []
    assert len(w.core.bindings) == 0


def test_expires_zero_removes_only_that_contact() -> None:
    w = World()
    register(w, DESK)
    register(w, DECT)
    gone = register(w, DECT, expires=0)
    assert contacts_of(gone) == {f"sip:{LINE}@10.0.0.30:5060": 3600}
    assert live_contacts(w) == [f"sip:{LINE}@10.0.0.30:5060"]


def test_contact_expires_parameter_wins_over_the_header() -> None:
    w = World()
    answer = register(w, DESK, contact=f"<sip:{LINE}@10.0.0.30:5060>;expires=90", expires=600)
    assert contacts_of(answer) == {f"sip:{LINE}@10.0.0.30:5060": 90}


def test_star_removes_every_binding_and_needs_expires_zero() -> None:
    w = World()
    register(w, DESK)
    register(w, DECT)
    assert register(w, DESK, contacts=["*"], expires=3600).response.status == 400
    assert len(live_contacts(w)) == 2
    cleared = register(w, DESK, contacts=["*"], expires=0)
    assert cleared.response.status == 200 and contacts_of(cleared) == {}
    assert live_contacts(w) == []


def test_bindings_per_aor_are_bounded() -> None:
    w = World(field_config(limits="max_bindings_per_aor = 2"))
    register(w, DESK)
    register(w, DECT)
    third = register(w, NAT)
    assert (third.response.status, third.response.reason) == (503, "Too Many Registered Contacts")
    assert len(live_contacts(w)) == 2
    assert register(w, DECT).response.status == 200  # a refresh is no new binding


def test_registering_unknown_users_with_relay_and_reject() -> None:
    w = World()
    assert register(w, Address("10.0.0.40", 5060), user="alice").response.status == 200
    assert live_contacts(w, "alice") == ["sip:alice@10.0.0.40:5060"]
    w = World(make_config(unknown_users="reject"))
    assert register(w, Address("10.0.0.40", 5060), user="alice").response.status == 403


def test_relayed_user_without_a_line_receives_calls_in_the_clear() -> None:
    w = World()
    alice = Address("10.0.0.40", 5060)
    register(w, alice, user="alice")
    call = call_in(w, uri="sip:alice@192.0.2.1")
    assert list(call.forks) == [alice]
    assert call.forks[alice].request.uri == "sip:alice@10.0.0.40:5060"
    (state,) = w.core.active_calls()
    assert state["line"] is None and state["secure"] is None
    # a user nobody registered is still unknown
    out = w.upstream(upstream_invite(uri="sip:bob@192.0.2.1"))
    assert only(pick(out, OUT, status=404))


def test_uri_headers_of_a_registered_contact_never_reach_a_request() -> None:
    """RFC 4475 "regescrt": a Contact with an escaped header is registered, but calls and
    keep-alives to it use the URI without its headers (a Request-URI may not carry them,
    and the proxy does not turn them into a Route of its own requests)."""
    w = World()
    alice = Address("10.0.0.77", 5060)  # behind NAT: its Contact names another address
    contact = "<sip:alice@10.0.0.41:5060?Route=%3Csip:203.0.113.66%3E>"
    register(w, alice, user="alice", contact=contact)
    call = call_in(w, uri="sip:alice@192.0.2.1")
    request = call.forks[alice].request
    assert request.uri == "sip:alice@10.0.0.41:5060"
    assert request.get("route") is None
    probe = only(pick(w.advance(30), IN, method="OPTIONS"))
    assert probe.request.uri == "sip:alice@10.0.0.41:5060"
    assert probe.request.get("route") is None


# --- relayed upstream: one Contact per device ------------------------------------------


def relayed_world() -> World:
    return World(make_config(registrar=f"sip:{REGISTRAR.host}:{REGISTRAR.port}"))


def test_relayed_registration_gives_each_device_its_own_upstream_contact() -> None:
    w = relayed_world()
    out = w.phone(_register_data(DESK), DESK)
    up1 = only(pick(out, OUT, method="REGISTER")).request
    out = w.phone(_register_data(DECT), DECT)
    up2 = only(pick(out, OUT, method="REGISTER")).request
    uri1 = NameAddr.parse(up1.get_all("contact")[0]).uri
    uri2 = NameAddr.parse(up2.get_all("contact")[0]).uri
    token1 = SipUri.parse(uri1).param(BINDING_PARAM)
    assert token1 and token1 != SipUri.parse(uri2).param(BINDING_PARAM)
    assert SipUri.parse(uri1).host == "192.0.2.1"  # the proxy's own outside address
    # The registrar grants less than asked: the phone's 200 says what was granted.
    granted = f"<{uri1}>;expires=120, <{uri2}>;expires=3600"
    out = w.upstream(build_response(up1, 200, headers=[("Contact", granted)]), REGISTRAR)
    ok = only(pick(out, IN, status=200))
    assert contacts_of(ok) == {f"sip:{LINE}@10.0.0.30:5060": 120}
    assert ok.dest == DESK
    # A call the registrar sends to one device's Contact reaches that device only.
    out = w.phone(_register_data(DECT, cseq=2), DECT)  # (DECT's first REGISTER: unanswered)
    up2 = only(pick(out, OUT, method="REGISTER")).request
    out = w.upstream(build_response(up2, 200, headers=[("Contact", granted)]), REGISTRAR)
    assert contacts_of(only(pick(out, IN, status=200)))[f"sip:{LINE}@10.0.0.31:5064"] == 3600
    call = call_in(w, uri=uri1)
    assert list(call.forks) == [DESK]
    call = call_in(w)  # the AOR itself: both devices
    assert set(call.forks) == {DESK, DECT}


def _register_data(source: Address, *, cseq: int = 1, expires: int = 3600) -> bytes:
    return build_request(
        "REGISTER", "sip:pbx.example.net", via=via_for(source),
        from_=f"<sip:{LINE}@pbx.example.net>;tag={tag()}", to=f"<sip:{LINE}@pbx.example.net>",
        call_id=f"reg-{source.host}-{source.port}", cseq=cseq,
        contact=f"<sip:{LINE}@{source.host}:{source.port}>",
        headers=[("Expires", str(expires))],
    )  # fmt: skip


def test_relayed_unregister_of_one_device_touches_only_its_contact() -> None:
    w = relayed_world()
    for device in (DESK, DECT):
        out = w.phone(_register_data(device), device)
        up = only(pick(out, OUT, method="REGISTER")).request
        listed = ", ".join(f"{c};expires=3600" for c in up.get_all("contact"))
        w.upstream(build_response(up, 200, headers=[("Contact", listed)]), REGISTRAR)
    out = w.phone(_register_data(DECT, cseq=2, expires=0), DECT)
    up = only(pick(out, OUT, method="REGISTER")).request
    (contact,) = up.get_all("contact")
    token = SipUri.parse(NameAddr.parse(contact).uri).param(BINDING_PARAM)
    assert token == w.core.bindings.live(LINE, w.now)[1].token
    w.upstream(build_response(up, 200), REGISTRAR)
    assert live_contacts(w) == [f"sip:{LINE}@10.0.0.30:5060"]


def test_register_ids_are_forgotten_with_the_binding() -> None:
    w = relayed_world()
    out = w.phone(_register_data(DESK, expires=60), DESK)
    up = only(pick(out, OUT, method="REGISTER")).request
    w.upstream(build_response(up, 200, headers=[("Expires", "60")]), REGISTRAR)
    assert len(w.core.registrar._upstream) == 1
    w.advance(61)
    assert live_contacts(w) == [] and len(w.core.registrar._upstream) == 0


# --- keep-alives to contacts behind NAT --------------------------------------------------


def test_keepalive_options_to_a_nated_contact_and_dropping_a_dead_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    register(w, NAT, contact=f"<sip:{LINE}@10.0.0.77:5060>")
    register(w, DESK)  # not behind NAT: never probed
    (binding,) = [b for b in w.core.bindings.live(LINE, w.now) if b.nat]
    assert binding.flow == NAT
    assert not pick(w.advance(29), IN, method="OPTIONS")
    probe = only(pick(w.advance(1), IN, method="OPTIONS"))
    assert probe.dest == NAT  # over the flow it registered on, not its Contact
    assert probe.request.uri == f"sip:{LINE}@10.0.0.77:5060"
    w.phone(build_response(probe.request, 200), NAT)
    probe = only(pick(w.advance(30), IN, method="OPTIONS"))
    w.phone(build_response(probe.request, 405, reason="Method Not Allowed"), NAT)  # alive
    probe = only(pick(w.advance(30), IN, method="OPTIONS"))
    with caplog.at_level(logging.WARNING, "sipura.b2bua"):
        w.advance(40)  # no answer: Timer F (32 s) drops the contact
    assert live_contacts(w) == [f"sip:{LINE}@10.0.0.30:5060"]
    assert "no answer to keep-alive OPTIONS" in caplog.text
    assert w.core.registrations(w.now)["keepalive"] == {"tracked": 0, "sent": 3, "dropped": 1}


def test_keepalive_over_tcp_uses_the_registered_connection() -> None:
    w = World()
    register(w, PHONE_TCP, contact=f"<sip:{LINE}@10.0.0.77:5060;transport=tcp>")
    probe = only(pick(w.advance(30), IN, method="OPTIONS"))
    assert probe.dest == PHONE_TCP and probe.dest.conn == PHONE_TCP.conn


def test_keepalive_off() -> None:
    w = World(field_config(inside="keepalive_s = 0"))
    register(w, NAT, contact=f"<sip:{LINE}@10.0.0.77:5060>")
    assert not pick(w.advance(300), IN, method="OPTIONS")


# --- line identity ------------------------------------------------------------------------


def test_another_source_claiming_a_line_gets_403_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World(make_config(unknown_users="reject"))
    with caplog.at_level(logging.WARNING, "sipura.b2bua"):
        for _ in range(3):
            out = w.phone(phone_invite(source=ATTACKER, from_user=LINE2), ATTACKER)
            assert [x.response.status for x in out if x.side is IN] == [100, 403]
            assert not pick(out, OUT)
    assert not w.media.sessions  # nothing allocated, no x-sipura possible
    refusals = [r for r in caplog.records if "not the line's phone" in r.getMessage()]
    assert len(refusals) == 1  # rate-limited
    assert "10.0.0.20:5999" in refusals[0].getMessage()
    assert w.core.registrations(w.now)["identity_refusals"] == 3


def test_the_registered_flow_may_use_the_line_and_only_it() -> None:
    w = World()
    phone = DESK
    register(w, phone, user=LINE3)
    out = w.phone(phone_invite(source=phone, from_user=LINE3), phone)
    assert pick(out, OUT, method="INVITE")
    other = Address(DESK.host, 5070)
    out = w.phone(phone_invite(source=other, from_user=LINE3), other)
    assert only(pick(out, IN, status=403))


def test_every_binding_flow_of_a_line_may_use_it() -> None:
    w = World()
    register(w, DESK)
    register(w, DECT)
    for device in (DESK, DECT):
        out = w.phone(phone_invite(source=device, from_user=LINE), device)
        assert pick(out, OUT, method="INVITE")


def test_static_contact_is_the_lines_phone() -> None:
    w = World()
    phone2 = Address("10.0.0.20", 5062)
    assert pick(w.phone(phone_invite(source=phone2, from_user=LINE2), phone2), OUT)
    elsewhere = Address("10.0.0.20", 5070)
    out = w.phone(phone_invite(source=elsewhere, from_user=LINE2), elsewhere)
    assert only(pick(out, IN, status=403))


def test_unknown_user_from_a_lines_phone_is_placed_as_that_line() -> None:
    w = World(make_config(unknown_users="reject"))
    phone2 = Address("10.0.0.20", 5062)
    out = w.phone(phone_invite(source=phone2, from_user="somebody"), phone2)
    assert pick(out, OUT, method="INVITE")
    assert w.core.active_calls()[0]["line"] == LINE2


def test_with_reject_an_unregistered_source_gets_403() -> None:
    w = World(make_config(unknown_users="reject"))
    out = w.phone(phone_invite(source=ATTACKER, from_user="somebody"), ATTACKER)
    assert only(pick(out, IN, status=403))


def test_register_for_a_line_with_sources_only_from_them() -> None:
    w = World()
    assert register(w, ATTACKER, user=LINE2).response.status == 403
    assert register(w, Address("10.0.0.20", 5062), user=LINE2).response.status == 200
    assert register(w, Address("10.0.0.10", 6000), user=LINE1).response.status == 200


def test_relayed_register_binds_only_the_flow_that_authenticated() -> None:
    w = relayed_world()
    phone = DESK
    data = _register_data(phone)
    up = only(pick(w.phone(data, phone), OUT, method="REGISTER")).request
    challenge = [("WWW-Authenticate", 'Digest realm="pbx", nonce="n1"')]
    w.upstream(build_response(up, 401, reason="Unauthorized", headers=challenge), REGISTRAR)
    out = w.phone(phone_invite(source=phone, from_user=LINE3), phone)
    assert only(pick(out, IN, status=403))  # challenged, not authenticated yet
    data = _register_data(phone, cseq=2)
    up = only(pick(w.phone(data, phone), OUT, method="REGISTER")).request
    w.upstream(build_response(up, 200, headers=[("Expires", "600")]), REGISTRAR)
    out = w.phone(phone_invite(source=phone, from_user=LINE3), phone)
    assert pick(out, OUT, method="INVITE")


def test_allowed_sources_syntax() -> None:
    assert Source.parse("192.0.2.7").matches("192.0.2.7", 1)
    assert not Source.parse("192.0.2.7:5062").matches("192.0.2.7", 5060)
    assert Source.parse("192.0.2.0/24").matches("192.0.2.200", 9)
    assert Source.parse("[2001:db8::7]:5062").matches("2001:db8::7", 5062)
    for bad in ("192.0.2.0/24:5060", "host.example", "1.2.3.4:0", "[::1"):
        with pytest.raises(ValueError):
            Source.parse(bad)
    with pytest.raises(ConfigError, match=r"limits\.max_bindings_per_aor"):
        field_config(limits="max_bindings_per_aor = 0")
    text = field_config().source
    assert text == "field.toml"
    bad = 'user_id = "14085550000"\nallowed_sources = ["nope"]'
    from sipfake import CONFIG

    with pytest.raises(ConfigError, match=r"line\[2\]\.allowed_sources\[0\]"):
        parse_config(
            CONFIG.replace('user_id = "14085550000"', bad).format(
                unknown_users="relay", outside_extra="", max_calls=0, sip_extra=""
            )
        )


def test_startup_warns_about_lines_anyone_may_register_as() -> None:
    warnings = open_lines(make_config())
    assert [w.split(":")[0] for w in warnings] == [f"line {LINE3}"]
    assert open_lines(make_config(registrar="sip:203.0.113.8")) == []


def test_an_unknown_user_from_an_unknown_source_is_relayed() -> None:
    w = World()
    out = w.phone(phone_invite(source=ATTACKER, from_user="somebody"), ATTACKER)
    assert only(pick(out, OUT, method="INVITE")).dest == UPSTREAM
    assert w.core.active_calls()[0]["line"] is None


def test_an_allowed_source_may_use_a_line_but_is_not_the_lines_phone() -> None:
    """allowed_sources lets a source claim the line; it does not make every request
    from there the line's (an unknown user stays unknown, in the clear)."""
    w = World()
    allowed = Address("10.0.0.10", 7000)  # LINE1's allowed_sources is 10.0.0.10
    out = w.phone(phone_invite(source=allowed, from_user="somebody"), allowed)
    assert pick(out, OUT, method="INVITE")
    assert w.core.active_calls()[0]["line"] is None
