"""x-sipura in the sans-IO B2BUA: the proxy secures the outside leg for its lines.

The phones and the PBX are played by hand as in ``test_core``; the far x-sipura peer
is played by the protocol's own handshake machines (:mod:`proxy.xsipura.handshake`).
That is deliberate: this file tests the *core's* integration (which INFO goes where,
what the media engine is told, what the phone perceives, policies and failure
reasons); interop with an independent implementation is covered by tests/interop.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from callflows import CALLEE, PHONE_CONTACT, PHONE_SDP, UP_CONTACT, UP_SDP
from sipfake import (
    LINE1,
    LINE2,
    PHONE,
    PHONE2,
    UPSTREAM,
    FakeSession,
    PeerDialog,
    Wire,
    World,
    build_request,
    build_response,
    only,
    parse,
    pick,
    sdp,
    summary,
    tag,
    uac_dialog,
    uas_dialog,
    via_for,
)

from proxy.b2bua.config import Config, parse_config
from proxy.b2bua.line_keys import load_security
from proxy.media.commands import (
    EVENT_TYPES,
    AcceptSrtp,
    ClearSrtp,
    MediaFlowing,
    PlayTone,
    SetRemote,
    SetTxSsrc,
    SwitchSrtp,
)
from proxy.media.engine import Side
from proxy.media.srtp import SrtpContext
from proxy.media.tones import SECURE_CALL_TONE, Tone
from proxy.sip.headers import CSeq, NameAddr
from proxy.sip.message import Request, Response
from proxy.sip.transaction import Address
from proxy.xsipura import handshake as hs
from proxy.xsipura import messages as msg
from proxy.xsipura import rsa
from proxy.xsipura.keyfiles import generate_ca_key
from proxy.xsipura.mc import encode_private_key_param
from proxy.xsipura.provision import LineCredentials, issue_line
from proxy.xsipura.trust import TrustStore

IN, OUT = Side.INSIDE, Side.OUTSIDE
NOW_UTC = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
"""The proxy's wall clock (MC expiry); every MC here is valid then unless made not to."""
LINE3 = "14085550000"
"""A line without a Mini Certificate: its calls are plain."""
PHONE3 = Address("10.0.0.30", 5060)
FAR_ID = "18005550199"
FAR_SSRC = 0x0BADF00D
XS = "application/x-sipura"
SUPPORTED = (("Supported", "x-sipura"),)
RTP = bytes([0x80, 0x00, 0x00, 0x01, 0, 0, 0, 160]) + FAR_SSRC.to_bytes(4, "big") + b"\xd5" * 160


# --- key material -------------------------------------------------------------------------


Party = LineCredentials
"""A subscriber: ``key``, ``param`` and its ``certificate``."""


@dataclass(frozen=True)
class Pki:
    ca: rsa.PrivateKey
    line1: Party
    line2: Party
    far: Party
    """The outside peer, user id FAR_ID (the number the phone dials)."""
    far_untrusted: Party
    far_expired: Party
    far_wrong_number: Party

    @property
    def trust(self) -> TrustStore:
        return TrustStore([self.ca.public])


def issue(
    ca: rsa.PrivateKey,
    name: str,
    user_id: str,
    expires: datetime = datetime(2031, 1, 1, tzinfo=UTC),
) -> Party:
    return issue_line(ca, name, user_id, expires)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def make_pki() -> Pki:
    ca = generate_ca_key()
    other = generate_ca_key()
    return Pki(
        ca=ca,
        line1=issue(ca, "Joe Smith", LINE1),
        line2=issue(ca, "Jane Doe", LINE2),
        far=issue(ca, "Far End", FAR_ID),
        far_untrusted=issue(other, "Far End", FAR_ID),
        far_expired=issue(ca, "Far End", FAR_ID, datetime(2030, 5, 31, tzinfo=UTC)),
        far_wrong_number=issue(ca, "Somebody Else", "18005550100"),
    )


@pytest.fixture(autouse=True, scope="module")
def fake_dns() -> Iterator[None]:
    with mock.patch.dict(sipfake.NAMES, {"itsp.example.net": "203.0.113.5"}):
        yield


# --- the world ----------------------------------------------------------------------------


def toml_bool(value: bool) -> str:
    return "true" if value else "false"


def secure_config(
    pki: Pki,
    *,
    xsipura: str = "",
    secure_by_default: bool = True,
    require_secure: bool = False,
    line2_require_secure: bool = False,
) -> Config:
    text = f"""\
[inside]
listen = "10.0.0.1:5060"
media_ip = "10.0.0.1"
[outside]
listen = "192.0.2.1:5060"
media_ip = "192.0.2.1"
upstream = "sip:203.0.113.5:5060"
[media]
port_min = 20000
port_max = 20999
[sip]
user_agent = ""
[xsipura]
{xsipura}
[[line]]
user_id = "+{LINE1}"
allowed_sources = ["10.0.0.10"]
mini_certificate = "{pki.line1.param.to_base64()}"
srtp_private_key = "{encode_private_key_param(pki.line1.key)}"
secure_by_default = {toml_bool(secure_by_default)}
require_secure = {toml_bool(require_secure)}
[[line]]
user_id = "{LINE2}"
contact = "sip:10.0.0.20:5062"
mini_certificate = "{pki.line2.param.to_base64()}"
srtp_private_key = "{encode_private_key_param(pki.line2.key)}"
require_secure = {toml_bool(line2_require_secure)}
[[line]]
user_id = "{LINE3}"
contact = "sip:10.0.0.30:5060"
"""
    return parse_config(text, "secure.toml")


def make_world(pki: Pki, **kwargs: Any) -> World:
    config = secure_config(pki, **kwargs)
    security = load_security(config)
    assert security.warnings == ()
    return World(config, security=security, utc_now=lambda: NOW_UTC)


def check_clean(w: World) -> None:
    """After every timer ran: media is held only by live calls."""
    live = [c for c in w.core.calls.values() if c.media is not None]
    assert len(w.media.active) == len(live)
    if not w.core.calls:
        assert w.media.all_returned()


@pytest.fixture
def w(pki: Pki) -> Iterator[World]:
    world = make_world(pki)
    yield world
    world.settle()
    check_clean(world)


def session_of(w: World) -> FakeSession:
    assert len(w.media.active) == 1, w.media.active
    return w.media.active[0]


def secure_state(w: World) -> dict[str, Any]:
    (call,) = w.core.active_calls()
    secure = call["secure"]
    assert isinstance(secure, dict), call
    return secure


def methods(wires: list[Wire], side: Side) -> list[str]:
    return [x.request.method for x in wires if x.side is side and isinstance(x.msg, Request)]


# --- the caller role: a phone calls out ---------------------------------------------------


@dataclass
class Outcall:
    a_invite: Request
    b_invite: Request
    phone: PeerDialog
    pbx: PeerDialog
    a_ok: Response
    session: FakeSession


def call_out(
    w: World,
    *,
    uri: str = CALLEE,
    supported: bool = True,
    from_user: str = f"+{LINE1}",
    source: Address = PHONE,
    media_flows: bool = True,
) -> Outcall:
    """Phone INVITE, upstream 200 (advertising x-sipura or not), phone ACK."""
    contact = f"<sip:{from_user.removeprefix('+')}@{source.host}:{source.port}>"
    data = build_request(
        "INVITE",
        uri,
        via=via_for(source),
        from_=f'"Joe" <sip:{from_user}@10.0.0.1>;tag={tag()}',
        to=f"<{uri}>",
        call_id=f"{tag()}@phone",
        cseq=101,
        contact=contact,
        body=PHONE_SDP,
    )
    a_invite = parse(data)
    assert isinstance(a_invite, Request)
    out = w.phone(data, source)
    b = only(pick(out, OUT, method="INVITE"), "B-leg INVITE")
    up_tag = tag()
    ok_data = build_response(
        b.request,
        200,
        to_tag=up_tag,
        contact=UP_CONTACT,
        body=UP_SDP,
        headers=SUPPORTED if supported else (),
    )
    out = w.upstream(ok_data)
    a_ok = only(pick(out, IN, status=200), "200 to the phone")
    phone = uac_dialog(source, a_invite, a_ok.response, contact)
    out = w.phone(phone.request("ACK"), source)
    assert methods(out, OUT) == ["ACK"], [summary(x) for x in out]
    assert methods(out, IN) == []  # nothing before the start delay
    session = w.media.sessions[-1]
    if media_flows:
        session.packets_in += 1  # the phone's first RTP packet
    pbx = uas_dialog(UPSTREAM, b.request, up_tag, UP_CONTACT)
    return Outcall(a_invite, b.request, phone, pbx, a_ok.response, session)


def far_callee(pki: Pki, party: Party | None = None, ssrc: int = FAR_SSRC) -> hs.CalleeHandshake:
    party = party or pki.far
    return hs.CalleeHandshake(
        certificate=party.certificate, private_key=party.key, trust=pki.trust, local_ssrc=ssrc
    )


def respond(
    w: World, request: Request, status: int, body: str | bytes = b"", **kw: Any
) -> list[Wire]:
    """The outside peer answers a request of the proxy's."""
    data = body.encode("ascii") if isinstance(body, str) else body
    return w.upstream(build_response(request, status, body=data, content_type=XS, **kw))


def answer_info(w: World, info: Wire, event: hs.Event) -> list[Wire]:
    assert isinstance(event, hs.SendResponse), event
    return respond(w, info.request, event.status, event.body or b"", reason=event.reason)


def hello_of(w: World) -> Wire:
    """Run the start delay; the proxy's Caller Hello goes to the outside peer."""
    out = w.advance(0.2)
    info = only(pick(out, OUT, method="INFO"), "Caller Hello")
    assert methods(out, IN) == []
    return info


@dataclass
class Secured:
    call: Outcall
    callee: hs.CalleeHandshake
    hello: Wire
    final: Wire
    indication: list[Wire]
    """What the proxy sent when the Callee Final arrived (the caller-ID refresh)."""


def secure_outbound(w: World, pki: Pki, **kwargs: Any) -> Secured:
    call = call_out(w, **kwargs)
    hello = hello_of(w)
    callee = far_callee(pki)
    events = callee.receive_request(hello.request.body, w.now, NOW_UTC)
    assert [type(e) for e in events] == [hs.SendResponse]
    out = answer_info(w, hello, events[0])
    final = only(pick(out, OUT, method="INFO"), "Caller Final")
    events = callee.receive_request(final.request.body, w.now, NOW_UTC)
    assert [type(e) for e in events] == [hs.SendResponse, hs.Secured]
    indication = answer_info(w, final, events[0])
    return Secured(call, callee, hello, final, indication)


def test_caller_role_secures_the_outside_leg(w: World, pki: Pki) -> None:
    call = call_out(w)
    assert ("Supported", "x-sipura") in [
        (n, v.strip().lower()) for n, v in call.b_invite.headers if n.lower() == "supported"
    ]
    session = call.session
    assert secure_state(w)["state"] == "waiting" and secure_state(w)["role"] == "caller"
    # step 1: the Caller Hello, in the outside dialog, with the line's MC
    hello = hello_of(w)
    req = hello.request
    assert hello.dest == UPSTREAM
    assert req.content_type == XS and req.call_id == call.b_invite.call_id
    assert req.to.tag == call.pbx.local_tag and req.from_.tag == call.b_invite.from_.tag
    assert req.cseq == CSeq(2, "INFO") and req.uri == "sip:pbx@203.0.113.5:5060"
    caller_hello = msg.decode_body(req.body)
    assert isinstance(caller_hello, msg.CallerHello)
    assert caller_hello.mc == pki.line1.certificate.raw
    assert session.recorded(SetTxSsrc) == [SetTxSsrc(session.id, OUT, caller_hello.ssrc)]
    assert secure_state(w)["state"] == "handshaking"
    # step 2: the far end's Callee Hello -> Caller Final, and SRTP accepted already
    callee = far_callee(pki)
    events = callee.receive_request(req.body, w.now, NOW_UTC)
    out = answer_info(w, hello, events[0])
    final = only(pick(out, OUT, method="INFO"), "Caller Final")
    assert methods(out, IN) == []
    assert final.request.content_type == XS and final.request.cseq == CSeq(3, "INFO")
    assert isinstance(msg.decode_body(final.request.body), msg.CallerFinal)
    (accept,) = session.recorded(AcceptSrtp)
    assert accept.side is OUT and session.recorded(SwitchSrtp) == []
    assert OUT in session.watched
    # step 4: the Callee Final -> switch-over, tone, caller-ID refresh
    events = callee.receive_request(final.request.body, w.now, NOW_UTC)
    assert [type(e) for e in events] == [hs.SendResponse, hs.Secured]
    far_session = events[1].session  # type: ignore[union-attr]
    assert far_session.peer_ssrc == caller_hello.ssrc
    out = answer_info(w, final, events[0])
    (switch,) = session.recorded(SwitchSrtp)
    assert switch.side is OUT and switch.grace_s == 2.0
    assert switch.keys == accept.keys  # the relay keeps the accepted context's libsrtp state
    assert session.recorded(PlayTone) == [PlayTone(session.id, IN, 0, SECURE_CALL_TONE)]
    assert session.recorded(ClearSrtp) == []
    # both ends hold the same key: the far end's SRTP unprotects with the proxy's context
    far_ctx = SrtpContext(far_session.keys.master_key, far_session.keys.master_salt)
    proxy_ctx = SrtpContext.from_keys(switch.keys)
    assert isinstance(proxy_ctx, SrtpContext)
    assert proxy_ctx.unprotect(far_ctx.protect(RTP)) == RTP
    # the phone learns who it talks to: "$" + the MC's name, the MC's user id
    update = only(pick(out, IN, method="UPDATE"), "caller-ID refresh")
    assert methods(out, OUT) == []
    assert update.dest == PHONE
    upd = update.request
    assert upd.call_id == call.a_invite.call_id
    assert upd.to.tag == call.a_invite.from_.tag and upd.from_.tag == call.a_ok.to.tag
    assert upd.uri == "sip:14085551234@10.0.0.10:5060"
    pai = NameAddr.parse(upd.get("p-asserted-identity") or "")
    assert pai.display == '"$Far End"'
    assert pai.sip_uri().user == FAR_ID and pai.sip_uri().host == "10.0.0.1"
    rpid = upd.get("remote-party-id") or ""
    assert '"$Far End"' in rpid and "party=called" in rpid
    # /calls and the counters
    state = secure_state(w)
    assert state["state"] == "secure" and state["reason"] is None
    assert state["peer_name"] == "Far End" and state["peer_user_id"] == FAR_ID
    assert state["peer_sample_ca"] is False and state["generation"] == 0
    assert w.core.stats.secured == 1 and w.core.stats.clear_reasons == {}
    # the phone accepts the refresh; nothing else happens
    out = w.phone(build_response(upd, 200))
    assert out == []
    # hang-up from the phone still works and releases media
    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    respond(w, bye.request, 200)
    assert w.core.calls == {}


def test_caller_role_media_callbacks_and_late_responses(w: World, pki: Pki) -> None:
    secured = secure_outbound(w, pki)
    session = secured.call.session
    # retransmitted 200s of both INFOs change nothing
    before = list(session.calls)
    for info in (secured.hello, secured.final):
        out = respond(w, info.request, 200, "AAAABA==")
        assert out == []
    assert session.calls == before
    assert w.core.stats.secured == 1
    # an SRTP-authenticated report after the switch is harmless
    session.authenticate(OUT)
    assert w.advance(0) == []
    assert secure_state(w)["state"] == "secure"


def test_no_caller_id_refresh_when_off(pki: Pki) -> None:
    w = make_world(pki, xsipura='callerid_refresh = "off"')
    secured = secure_outbound(w, pki)
    assert secured.indication == []
    session = secured.call.session
    assert session.recorded(PlayTone) == [PlayTone(session.id, IN, 0, SECURE_CALL_TONE)]
    assert w.core.stats.secured == 1
    w.advance(50)  # (before the RTP timeout hangs the silent call up)
    assert [x for x in w.sent if x.side is IN and isinstance(x.msg, Request)] == []


def test_custom_tone_and_no_tone(pki: Pki) -> None:
    w = make_world(pki, xsipura='tone = "350@-19;10(*/0/1)"')
    secured = secure_outbound(w, pki)
    session = secured.call.session
    assert session.recorded(PlayTone) == [
        PlayTone(session.id, IN, 0, Tone.parse("350@-19;10(*/0/1)"))
    ]
    w = make_world(pki, xsipura="tone = false")
    secured = secure_outbound(w, pki)
    assert secured.call.session.recorded(PlayTone) == []
    assert only(pick(secured.indication, IN, method="UPDATE"))


def test_caller_id_refresh_by_reinvite(pki: Pki) -> None:
    w = make_world(pki, xsipura='callerid_refresh = "reinvite"')
    secured = secure_outbound(w, pki)
    reinvite = only(pick(secured.indication, IN, method="INVITE"), "re-INVITE")
    assert methods(secured.indication, OUT) == []
    req = reinvite.request
    call = secured.call
    assert reinvite.dest == PHONE
    assert req.call_id == call.a_invite.call_id and req.to.tag == call.a_invite.from_.tag
    assert req.body == call.a_ok.body  # the last SDP the phone was given, unchanged
    assert req.content_type == "application/sdp"
    assert NameAddr.parse(req.get("p-asserted-identity") or "").display == '"$Far End"'
    assert req.get_all("contact")
    # the phone answers; the proxy ACKs that 2xx itself, and nothing reaches the outside
    phone_answer = sdp("10.0.0.10", 4000)
    ok = build_response(req, 200, contact=PHONE_CONTACT, body=phone_answer)
    out = w.phone(ok)
    ack = only(pick(out, IN, method="ACK"), "ACK to the phone")
    assert methods(out, OUT) == []
    assert ack.dest == PHONE
    assert ack.request.cseq == CSeq(req.cseq.number, "ACK")
    assert ack.request.call_id == req.call_id and ack.request.to.tag == req.to.tag
    # a retransmitted 2xx gets the same ACK again
    out = w.phone(ok)
    again = only(pick(out, IN, method="ACK"), "re-sent ACK")
    assert again.request.cseq == ack.request.cseq
    # the dialog goes on: a BYE from the phone after the re-INVITE
    bye = call.phone.request("BYE", cseq=call.phone.cseq + 1)
    out = w.phone(bye)
    respond(w, only(pick(out, OUT, method="BYE")).request, 200)
    w.settle()
    assert w.core.calls == {}
    check_clean(w)


def test_caller_id_refresh_refused_by_the_phone_is_harmless(w: World, pki: Pki) -> None:
    secured = secure_outbound(w, pki)
    update = only(pick(secured.indication, IN, method="UPDATE")).request
    out = w.phone(build_response(update, 501, "Not Implemented"))
    assert out == []
    assert secure_state(w)["state"] == "secure"


# --- lost Callee Final, SRTP authentication -----------------------------------------------


def to_final(w: World, pki: Pki, **kwargs: Any) -> tuple[Outcall, Wire, hs.CalleeHandshake]:
    call = call_out(w, **kwargs)
    hello = hello_of(w)
    callee = far_callee(pki)
    events = callee.receive_request(hello.request.body, w.now, NOW_UTC)
    out = answer_info(w, hello, events[0])
    final = only(pick(out, OUT, method="INFO"), "Caller Final")
    return call, final, callee


def test_lost_callee_final_caller_switches_on_authenticated_srtp(w: World, pki: Pki) -> None:
    call, final, _ = to_final(w, pki)
    session = call.session
    out = w.advance(1.0)  # the Final is retransmitted; its 200 never arrives
    assert [x.request.method for x in out] == ["INFO"] * len(out) and out
    assert session.recorded(SwitchSrtp) == []
    session.authenticate(OUT)  # the far end's SRTP authenticated under our key
    assert session.recorded(SwitchSrtp)  # acted on at once, not at a later deadline
    out = w.advance(0)
    (switch,) = session.recorded(SwitchSrtp)
    assert switch.keys == session.recorded(AcceptSrtp)[0].keys
    assert only(pick(out, IN, method="UPDATE"))
    assert session.recorded(PlayTone)
    assert secure_state(w)["state"] == "secure" and w.core.stats.secured == 1
    # the late Callee Final changes nothing
    assert respond(w, final.request, 200, "AAAABA==") == []
    assert len(session.recorded(SwitchSrtp)) == 1 and w.core.stats.secured == 1


def test_lost_callee_final_without_srtp_stays_clear(w: World, pki: Pki) -> None:
    call, _, _ = to_final(w, pki)
    w.advance(5.0)  # the handshake timeout: the Final is "lost"
    assert secure_state(w)["state"] == "handshaking"
    w.advance(2.1)  # ...and no SRTP authenticated within the grace window
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "timeout"
    session = call.session
    assert session.recorded(SwitchSrtp) == []
    assert session.recorded(ClearSrtp) == [ClearSrtp(session.id, OUT)]
    assert session.recorded(SetTxSsrc)[-1] == SetTxSsrc(session.id, OUT, None)
    assert w.core.stats.clear_reasons == {"timeout": 1} and w.core.stats.secured == 0
    # a report for the old key after the fallback does nothing
    session.authenticate(OUT)
    w.advance(0)
    assert session.recorded(SwitchSrtp) == []


# --- the callee role: a call to a line ----------------------------------------------------


@dataclass
class Incall:
    pbx: PeerDialog
    """The outside caller's dialog (sends INFOs to the proxy)."""
    phone_invite: Request
    phone_tag: str
    session: FakeSession


def call_in(w: World, *, line: str = LINE2, phone: Address = PHONE2) -> Incall:
    uri = f"sip:{line}@192.0.2.1"
    data = build_request(
        "INVITE",
        uri,
        via=via_for(UPSTREAM),
        from_=f'"Far" <sip:+{FAR_ID}@itsp.example.net>;tag={tag()}',
        to=f"<{uri}>",
        call_id=f"{tag()}@itsp",
        cseq=7,
        contact=UP_CONTACT,
        headers=SUPPORTED,
        body=UP_SDP,
    )
    out = w.upstream(data)
    inv = only(pick(out, IN, method="INVITE"), "INVITE to the phone")
    assert inv.dest == phone
    phone_tag = tag()
    phone_contact = f"<sip:{line}@{phone.host}:{phone.port}>"
    out = w.phone(
        build_response(inv.request, 200, to_tag=phone_tag, contact=phone_contact, body=PHONE_SDP),
        phone,
    )
    ok = only(pick(out, OUT, status=200), "200 upstream")
    a_invite = parse(data)
    assert isinstance(a_invite, Request)
    pbx = uac_dialog(UPSTREAM, a_invite, ok.response, UP_CONTACT)
    out = w.upstream(pbx.request("ACK"))
    assert methods(out, IN) == ["ACK"]
    w.media.sessions[-1].packets_in += 1
    return Incall(pbx, inv.request, phone_tag, w.media.sessions[-1])


def far_caller(
    pki: Pki, *, dialled: str = LINE2, party: Party | None = None, ssrc: int = FAR_SSRC
) -> hs.CallerHandshake:
    party = party or pki.far
    return hs.CallerHandshake(
        certificate=party.certificate, trust=pki.trust, dialled_user_id=dialled, local_ssrc=ssrc
    )


def send_info(w: World, call: Incall, body: str | bytes, content_type: str = XS) -> list[Wire]:
    data = body.encode("ascii") if isinstance(body, str) else body
    return w.upstream(call.pbx.request("INFO", body=data, content_type=content_type))


def run_peer_caller(
    w: World, call: Incall, caller: hs.CallerHandshake, start: list[hs.Event]
) -> tuple[list[Wire], list[Wire], list[hs.Event]]:
    """Hello and Final from the far caller; returns what the proxy sent for each."""
    (send,) = start
    assert isinstance(send, hs.SendInfo)
    first = send_info(w, call, send.body)
    hello_ok = only(pick(first, OUT, status=200), "Callee Hello")
    events = caller.receive_response(200, hello_ok.response.body, w.now, NOW_UTC)
    assert [type(e) for e in events] == [hs.ExpectSrtp, hs.SendInfo], events
    final = events[1]
    assert isinstance(final, hs.SendInfo)
    second = send_info(w, call, final.body)
    final_ok = only(pick(second, OUT, status=200), "Callee Final")
    done = caller.receive_response(200, final_ok.response.body, w.now, NOW_UTC)
    return first, second, done


def test_callee_role_answers_x_sipura_infos_itself(w: World, pki: Pki) -> None:
    call = call_in(w)
    session = call.session
    assert secure_state(w)["role"] == "callee" and secure_state(w)["state"] == "waiting"
    caller = far_caller(pki)
    start = caller.start(w.now)
    first, second, done = run_peer_caller(w, call, caller, start)
    # the Hello: answered with the line's MC, never relayed to the phone
    assert methods(first, IN) == []
    hello_ok = only(pick(first, OUT, status=200)).response
    assert hello_ok.content_type == XS
    callee_hello = msg.decode_body(hello_ok.body)
    assert isinstance(callee_hello, msg.CalleeHello)
    assert callee_hello.mc == pki.line2.certificate.raw
    assert callee_hello.ssrc != FAR_SSRC
    assert {(c.side, c.ssrc) for c in session.recorded(SetTxSsrc)} == {(OUT, callee_hello.ssrc)}
    assert hello_ok.to.tag == call.pbx.remote_tag
    # the Final: 200 Callee Final, switch-over at once, then tone and caller-ID refresh
    final_ok = only(pick(second, OUT, status=200)).response
    assert isinstance(msg.decode_body(final_ok.body), msg.CalleeFinal)
    assert [type(e) for e in done] == [hs.Secured]
    (switch,) = session.recorded(SwitchSrtp)
    assert switch.side is OUT and switch.grace_s == 2.0
    assert session.recorded(AcceptSrtp) == []
    far_keys = done[0].session.keys  # type: ignore[union-attr]
    far_ctx = SrtpContext(far_keys.master_key, far_keys.master_salt)
    assert SrtpContext.from_keys(switch.keys).unprotect(far_ctx.protect(RTP)) == RTP
    assert session.recorded(PlayTone) == [PlayTone(session.id, IN, 0, SECURE_CALL_TONE)]
    update = only(pick(second, IN, method="UPDATE"), "caller-ID refresh").request
    assert update.to.tag == call.phone_tag and update.call_id == call.phone_invite.call_id
    pai = NameAddr.parse(update.get("p-asserted-identity") or "")
    assert pai.display == '"$Far End"' and pai.sip_uri().user == FAR_ID
    assert "party=calling" in (update.get("remote-party-id") or "")
    state = secure_state(w)
    assert state["state"] == "secure" and state["peer_name"] == "Far End"
    assert w.core.stats.secured == 1
    # SRTP from the caller authenticates: no fallback after the grace window
    session.authenticate(OUT)
    w.advance(5.0)
    assert secure_state(w)["state"] == "secure"
    assert session.recorded(ClearSrtp) == []


def test_callee_role_relays_other_infos(w: World, pki: Pki) -> None:
    call = call_in(w)
    # DTMF: relayed to the phone as usual
    dtmf = b"Signal=5\r\nDuration=160\r\n"
    out = send_info(w, call, dtmf, "application/dtmf-relay")
    relayed = only(pick(out, IN, method="INFO"), "DTMF INFO to the phone")
    assert relayed.request.body == dtmf
    assert relayed.request.content_type == "application/dtmf-relay"
    assert pick(out, OUT) == []
    out = w.phone(build_response(relayed.request, 200), PHONE2)
    assert only(pick(out, OUT, status=200))
    # an empty INFO: 200 from the proxy, not relayed
    out = send_info(w, call, b"")
    assert only(pick(out, OUT, status=200)) and pick(out, IN) == []
    out = send_info(w, call, b"\r\n  \r\n")
    assert only(pick(out, OUT, status=200)) and pick(out, IN) == []
    # media_control+xml (a video fast update) is not x-sipura either
    xml = b'<?xml version="1.0"?><media_control/>'
    out = send_info(w, call, xml, "application/media_control+xml")
    assert only(pick(out, IN, method="INFO")).request.body == xml
    assert secure_state(w)["state"] == "waiting"
    assert call.session.recorded(SetTxSsrc) == []


def test_callee_role_garbage_is_x_sipura_and_answered_400(w: World, pki: Pki) -> None:
    call = call_in(w)
    out = send_info(w, call, "not base64 at all", "text/plain")
    assert only(pick(out, OUT, status=400)) and pick(out, IN) == []
    assert secure_state(w)["reason"] == "bad_message"
    # a Final without a Hello is out of order
    caller = far_caller(pki)
    (hello,) = caller.start(w.now)
    callee = far_callee(pki, pki.line2, ssrc=1234)  # to build a Final that would decrypt
    events = callee.receive_request(hello.body, w.now, NOW_UTC)  # type: ignore[union-attr]
    reply = caller.receive_response(200, events[0].body, w.now, NOW_UTC)  # type: ignore[union-attr]
    out = send_info(w, call, reply[1].body)  # type: ignore[union-attr]
    assert only(pick(out, OUT, status=400)) and pick(out, IN) == []
    assert w.core.stats.secured == 0
    assert w.core.stats.clear_reasons == {"bad_message": 1, "out_of_order": 1}


def test_callee_role_untrusted_caller_488(w: World, pki: Pki) -> None:
    call = call_in(w)
    caller = far_caller(pki, party=pki.far_untrusted)
    (hello,) = caller.start(w.now)
    out = send_info(w, call, hello.body)  # type: ignore[union-attr]
    refused = only(pick(out, OUT, status=488))
    assert pick(out, IN) == []
    events = caller.receive_response(488, refused.response.body, w.now, NOW_UTC)
    assert events == [
        hs.StayClear(hs.ClearReason.PEER_REJECTED, "peer answered the Caller Hello with 488")
    ]
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "untrusted_ca"
    assert w.core.stats.clear_reasons == {"untrusted_ca": 1}
    assert call.session.recorded(SwitchSrtp) == []


def test_callee_role_require_secure_hangs_up_on_refusal(pki: Pki) -> None:
    w = make_world(pki, line2_require_secure=True)
    call = call_in(w)
    caller = far_caller(pki, party=pki.far_expired)
    (hello,) = caller.start(w.now)
    out = send_info(w, call, hello.body)  # type: ignore[union-attr]
    assert only(pick(out, OUT, status=488))
    bye_out = only(pick(out, OUT, method="BYE"))
    bye_in = only(pick(out, IN, method="BYE"))
    for bye in (bye_out, bye_in):
        assert "x-sipura: expired" in (bye.request.get("reason") or "")
    assert w.core.stats.clear_reasons == {"expired": 1}
    respond(w, bye_out.request, 200)
    w.phone(build_response(bye_in.request, 200), PHONE2)
    assert w.core.calls == {}
    w.settle()
    check_clean(w)


def test_callee_role_falls_back_without_authenticated_srtp(w: World, pki: Pki) -> None:
    call = call_in(w)
    caller = far_caller(pki)
    run_peer_caller(w, call, caller, caller.start(w.now))
    assert secure_state(w)["state"] == "secure"
    w.advance(2.1)  # the grace window passes, no SRTP from the caller authenticated
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "no_authenticated_srtp"
    assert call.session.recorded(ClearSrtp) == [ClearSrtp(call.session.id, OUT)]
    assert w.core.stats.clear_reasons == {"no_authenticated_srtp": 1}


def test_callee_role_half_done_handshake_times_out(w: World, pki: Pki) -> None:
    call = call_in(w)
    caller = far_caller(pki)
    (hello,) = caller.start(w.now)
    assert only(pick(send_info(w, call, hello.body), OUT, status=200))  # type: ignore[union-attr]
    assert secure_state(w)["state"] == "handshaking"
    w.advance(31.0)
    assert secure_state(w)["state"] == "handshaking"
    w.advance(1.5)
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "timeout"


def test_callee_role_rekey_switches_again_without_a_second_indication(w: World, pki: Pki) -> None:
    call = call_in(w)
    caller = far_caller(pki)
    run_peer_caller(w, call, caller, caller.start(w.now))
    call.session.authenticate(OUT)
    w.advance(1.0)
    first, second, done = run_peer_caller(w, call, caller, caller.rekey(w.now))
    assert [type(e) for e in done] == [hs.Secured]
    assert done[0].session.generation == 1  # type: ignore[union-attr]
    keys = [c.keys for c in call.session.recorded(SwitchSrtp)]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert pick(first + second, IN) == []  # no second tone/caller-ID refresh
    assert len(call.session.recorded(PlayTone)) == 1
    assert w.core.stats.secured == 1
    assert secure_state(w)["generation"] == 1


def test_x_sipura_info_from_the_callee_side_of_a_caller_role_call(w: World, pki: Pki) -> None:
    """Only the dialog's caller starts stage 2: an outside callee's Hello gets 400."""
    call = call_out(w)
    caller = far_caller(pki, dialled=LINE1)
    (hello,) = caller.start(w.now)
    out = w.upstream(
        call.pbx.request("INFO", body=hello.body.encode(), content_type=XS)  # type: ignore[union-attr]
    )
    assert only(pick(out, OUT, status=400)) and pick(out, IN) == []
    # DTMF from the outside is still relayed to the phone
    out = w.upstream(
        call.pbx.request("INFO", body=b"Signal=1\r\n", content_type="application/dtmf")
    )
    assert only(pick(out, IN, method="INFO"))


# --- failures: the call stays clear, with a counted reason --------------------------------


def test_peer_without_supported_gets_no_info(w: World, pki: Pki) -> None:
    call = call_out(w, supported=False)
    out = w.advance(10.0)
    assert pick(out, OUT, method="INFO") == []
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "peer_unsupported"
    assert w.core.stats.clear_reasons == {"peer_unsupported": 1}
    assert call.session.recorded(SetTxSsrc) == []
    assert call.session.recorded(ClearSrtp) == []


def test_probing_an_unadvertised_peer(pki: Pki) -> None:
    w = make_world(pki, xsipura="probe_unadvertised = true")
    call_out(w, supported=False)
    assert hello_of(w)


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (501, "", "peer_unsupported"),
        (415, "", "peer_unsupported"),
        (481, "", "peer_unsupported"),
        (200, "", "peer_unsupported"),
        (488, "", "peer_rejected"),
        (200, "AAAABA==", "bad_message"),
        (200, "%%%", "bad_message"),
    ],
)
def test_hello_answered_without_a_callee_hello(
    w: World, pki: Pki, status: int, body: str, reason: str
) -> None:
    call = call_out(w)
    hello = hello_of(w)
    out = respond(w, hello.request, status, body)
    assert pick(out, OUT, method="INFO") == [] and pick(out, IN) == []
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == reason
    assert w.core.stats.clear_reasons == {reason: 1} and w.core.stats.secured == 0
    session = call.session
    assert session.recorded(AcceptSrtp) == [] and session.recorded(SwitchSrtp) == []
    assert session.recorded(ClearSrtp) == [ClearSrtp(session.id, OUT)]
    assert session.recorded(SetTxSsrc)[-1] == SetTxSsrc(session.id, OUT, None)
    assert session.recorded(PlayTone) == []


@pytest.mark.parametrize(
    ("party", "reason"),
    [
        ("far_untrusted", "untrusted_ca"),
        ("far_expired", "expired"),
        ("far_wrong_number", "user_id_mismatch"),
    ],
)
def test_callee_hello_contents_refused(w: World, pki: Pki, party: str, reason: str) -> None:
    call = call_out(w)
    hello = hello_of(w)
    callee = far_callee(pki, getattr(pki, party))
    events = callee.receive_request(hello.request.body, w.now, NOW_UTC)
    out = answer_info(w, hello, events[0])
    assert pick(out, OUT, method="INFO") == []
    assert secure_state(w)["reason"] == reason
    assert w.core.stats.clear_reasons == {reason: 1}
    assert call.session.recorded(AcceptSrtp) == []


def test_ssrc_clash(w: World, pki: Pki) -> None:
    call_out(w)
    hello = hello_of(w)
    ours = msg.decode_body(hello.request.body)
    assert isinstance(ours, msg.CallerHello)
    callee = far_callee(pki, ssrc=ours.ssrc)
    events = callee.receive_request(hello.request.body, w.now, NOW_UTC)
    # the far end itself refuses a Hello with its own SSRC: build the clash by hand
    assert isinstance(events[0], hs.SendResponse) and events[0].status == 488
    clash = msg.CalleeHello(ssrc=ours.ssrc, mc=pki.far.certificate.raw)
    respond(w, hello.request, 200, msg.encode_body(clash))
    assert secure_state(w)["reason"] == "ssrc_clash"


def test_expired_by_the_injected_wall_clock(pki: Pki) -> None:
    """MC expiry is read from the core's utc_now, not the system clock (the line's own
    MC still valid then, the peer's not: it expired on 2030-05-31)."""
    config = secure_config(pki)
    w = World(
        config, security=load_security(config), utc_now=lambda: datetime(2030, 12, 1, tzinfo=UTC)
    )
    call_out(w)
    hello = hello_of(w)
    callee = far_callee(pki, pki.far_expired)
    events = callee.receive_request(hello.request.body, w.now, datetime(2030, 1, 1, tzinfo=UTC))
    answer_info(w, hello, events[0])
    assert secure_state(w)["reason"] == "expired"


def test_no_answer_to_the_hello_handshake_timeout(w: World, pki: Pki) -> None:
    call_out(w)
    hello_of(w)
    out = w.advance(4.9)
    assert [x.request.method for x in out] == ["INFO"] * len(out)  # retransmissions
    assert secure_state(w)["state"] == "handshaking"
    w.advance(0.2)
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "timeout"
    assert w.core.stats.clear_reasons == {"timeout": 1}


def test_info_transaction_timeout(pki: Pki) -> None:
    """With a long handshake timeout, Timer F of the INFO (64*T1) ends stage 2."""
    w = make_world(pki, xsipura="handshake_timeout_ms = 120000")
    call_out(w)
    hello_of(w)
    w.advance(31.0)
    assert secure_state(w)["state"] == "handshaking"
    w.advance(1.5)
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "timeout"
    assert w.core.stats.clear_reasons == {"timeout": 1}
    # the call itself goes on
    assert w.core.active_calls()[0]["state"] == "confirmed"


def test_require_secure_hangs_up_both_legs(pki: Pki) -> None:
    w = make_world(pki, require_secure=True)
    call = call_out(w)
    hello = hello_of(w)
    out = respond(w, hello.request, 488, reason="Not Acceptable Here")
    bye_out = only(pick(out, OUT, method="BYE"), "BYE upstream")
    bye_in = only(pick(out, IN, method="BYE"), "BYE to the phone")
    for bye in (bye_out, bye_in):
        reason = bye.request.get("reason") or ""
        assert reason.startswith("SIP;") and "x-sipura: peer_rejected" in reason
    assert bye_out.request.call_id == call.b_invite.call_id
    assert bye_in.request.call_id == call.a_invite.call_id and bye_in.dest == PHONE
    assert w.core.stats.clear_reasons == {"peer_rejected": 1}
    respond(w, bye_out.request, 200)
    w.phone(build_response(bye_in.request, 200))
    assert w.core.calls == {}
    w.settle()
    check_clean(w)


def test_require_secure_with_an_unsupporting_peer_hangs_up_at_once(pki: Pki) -> None:
    w = make_world(pki, require_secure=True)
    contact = PHONE_CONTACT
    data = build_request(
        "INVITE",
        CALLEE,
        via=via_for(PHONE),
        from_=f'"Joe" <sip:+{LINE1}@10.0.0.1>;tag={tag()}',
        to=f"<{CALLEE}>",
        call_id=f"{tag()}@phone",
        cseq=101,
        contact=contact,
        body=PHONE_SDP,
    )
    b = only(pick(w.phone(data), OUT, method="INVITE"))
    out = w.upstream(build_response(b.request, 200, to_tag=tag(), contact=UP_CONTACT, body=UP_SDP))
    ok = only(pick(out, IN, status=200))
    a_invite = parse(data)
    assert isinstance(a_invite, Request)
    phone = uac_dialog(PHONE, a_invite, ok.response, contact)
    out = w.phone(phone.request("ACK"))
    assert methods(out, OUT) == ["ACK", "BYE"]
    assert methods(out, IN) == ["BYE"]
    for bye in pick(out, method="BYE"):
        assert "x-sipura: peer_unsupported" in (bye.request.get("reason") or "")
    w.settle()
    assert w.core.calls == {}
    check_clean(w)


# --- *18 / *19 ----------------------------------------------------------------------------


def test_star18_secures_a_call_on_a_clear_by_default_line(pki: Pki) -> None:
    w = make_world(pki, secure_by_default=False)
    # without *18: plain
    call_out(w)
    assert pick(w.advance(1.0), OUT, method="INFO") == []
    assert w.core.active_calls()[0]["secure"] is None
    # with *18: the prefix is removed before dialling, and the call is secured
    secured = secure_outbound(w, pki, uri=f"sip:*18{FAR_ID}@itsp.example.net")
    b_invite = secured.call.b_invite
    assert b_invite.uri == CALLEE
    assert b_invite.to.uri == CALLEE and "*18" not in b_invite.serialize().decode()
    assert w.core.stats.secured == 1
    assert only(pick(secured.indication, IN, method="UPDATE"))


def test_star19_forces_a_clear_call(w: World, pki: Pki) -> None:
    call = call_out(w, uri=f"sip:*19{FAR_ID}@itsp.example.net")
    assert call.b_invite.uri == CALLEE and call.b_invite.to.uri == CALLEE
    out = w.advance(10.0)
    assert pick(out, OUT, method="INFO") == []
    assert w.core.active_calls()[0]["secure"] is None
    assert call.session.recorded(SetTxSsrc) == []
    assert w.core.stats.clear_reasons == {} and w.core.stats.secured == 0
    # and an outside INFO is just relayed
    out = w.upstream(call.pbx.request("INFO", body=b"AAAAAQ==", content_type=XS))
    assert only(pick(out, IN, method="INFO"))


@pytest.mark.parametrize(
    "uri", ["sip:*18@itsp.example.net", "sip:*20" + FAR_ID + "@itsp.example.net"]
)
def test_not_a_star_code(w: World, uri: str) -> None:
    call = call_out(w, uri=uri)
    assert call.b_invite.uri == uri


def test_star_code_responses_keep_the_phones_to(pki: Pki) -> None:
    w = make_world(pki, secure_by_default=False)
    uri = f"sip:*18{FAR_ID}@itsp.example.net"
    call = call_out(w, uri=uri)
    assert call.a_invite.to.uri == uri
    assert call.a_ok.to.uri == uri


# --- a line without a Mini Certificate ----------------------------------------------------


def test_line_without_mc_plain_outbound(w: World) -> None:
    call = call_out(w, from_user=LINE3, source=PHONE3)
    out = w.advance(10.0)
    assert pick(out, OUT, method="INFO") == []
    assert w.core.active_calls()[0]["secure"] is None
    out = w.upstream(call.pbx.request("INFO", body=b"AAAAAQ==", content_type=XS))
    relayed = only(pick(out, IN, method="INFO"), "INFO relayed to the phone")
    assert relayed.dest == PHONE3 and relayed.request.body == b"AAAAAQ=="
    assert relayed.request.content_type == XS
    out = w.phone(build_response(relayed.request, 200), PHONE3)
    assert only(pick(out, OUT, status=200))
    assert call.session.calls == call.session.recorded(SetRemote)


def test_line_without_mc_plain_inbound(w: World, pki: Pki) -> None:
    call = call_in(w, line=LINE3, phone=PHONE3)
    assert w.core.active_calls()[0]["secure"] is None
    caller = far_caller(pki, dialled=LINE3)
    (hello,) = caller.start(w.now)
    out = send_info(w, call, hello.body)  # type: ignore[union-attr]
    relayed = only(pick(out, IN, method="INFO"), "INFO relayed to the phone")
    assert relayed.request.body == hello.body.encode()  # type: ignore[union-attr]
    assert pick(out, OUT) == []
    # the phone does not understand it; its answer goes back to the far caller
    out = w.phone(build_response(relayed.request, 415, "Unsupported Media Type"), PHONE3)
    assert only(pick(out, OUT, status=415))
    assert w.core.stats.secured == 0 and w.core.stats.clear_reasons == {}


def test_no_security_config_at_all_is_a_plain_b2bua(pki: Pki) -> None:
    config = secure_config(pki)
    w = World(config)  # the core without a Security: every line is plain
    call = call_out(w)
    assert pick(w.advance(5.0), OUT, method="INFO") == []
    assert w.core.active_calls()[0]["secure"] is None
    out = w.upstream(call.pbx.request("INFO", body=b"AAAAAQ==", content_type=XS))
    assert only(pick(out, IN, method="INFO"))


# --- timing around stage 2 ----------------------------------------------------------------


def test_hello_waits_for_the_start_delay(pki: Pki) -> None:
    w = make_world(pki, xsipura="start_delay_ms = 1000")
    call_out(w)
    assert pick(w.advance(0.9), OUT, method="INFO") == []
    assert only(pick(w.advance(0.2), OUT, method="INFO"))


def test_hello_waits_for_media(pki: Pki) -> None:
    w = make_world(pki)
    call = call_out(w, media_flows=False)
    assert pick(w.advance(2.0), OUT, method="INFO") == []
    call.session.packets_in += 1
    assert only(pick(w.advance(0.5), OUT, method="INFO"))


def test_hello_waits_for_a_media_flowing_event_without_polling(pki: Pki) -> None:
    """An engine that reports first packets (the worker pool): once the start delay has
    passed without the phone's RTP, the call has no deadline at all until the engine
    says the RTP flows, and then the Caller Hello leaves at once."""
    w = make_world(pki)
    w.media.reports_flowing = True
    call = call_out(w, media_flows=False)
    assert pick(w.advance(0.3), OUT, method="INFO") == []
    polled: list[float] = []
    poll = w.core.poll
    w.core.poll = lambda now: polled.append(now) or poll(now)  # type: ignore[method-assign]
    assert pick(w.advance(5.0), OUT, method="INFO") == []
    assert len(polled) <= 2, polled  # the end of advance() itself, no 100 ms checks
    session = call.session
    w.media.report(MediaFlowing(session.id, OUT))  # the far end's packets do not count
    assert pick(w.advance(0.0), OUT, method="INFO") == []
    session.packets_in += 1
    w.media.report(MediaFlowing(session.id, IN))
    hello = only(pick(w.advance(0.0), OUT, method="INFO"), "Caller Hello")
    assert isinstance(msg.decode_body(hello.request.body), msg.CallerHello)
    assert secure_state(w)["state"] == "handshaking"
    w.media.report(MediaFlowing(session.id, IN))  # a late duplicate changes nothing
    assert pick(w.advance(0.0), OUT, method="INFO") == []


def test_media_flowing_before_the_start_delay_changes_nothing(pki: Pki) -> None:
    w = make_world(pki)
    w.media.reports_flowing = True
    call = call_out(w)
    w.media.report(MediaFlowing(call.session.id, IN))
    assert pick(w.advance(0.1), OUT, method="INFO") == []
    assert only(pick(w.advance(0.15), OUT, method="INFO"), "Caller Hello at the start delay")


def test_security_deadline_of_a_hung_up_call_does_not_spin(pki: Pki) -> None:
    w = make_world(pki)
    call = call_out(w)
    out = w.phone(call.phone.request("BYE"))  # before the start delay; upstream is slow
    assert only(pick(out, OUT, method="BYE"))
    now = w.now + 0.5
    w.core.poll(now)
    deadline = w.core.next_deadline()
    assert deadline is None or deadline > now


def test_hung_up_during_the_handshake(w: World, pki: Pki) -> None:
    call = call_out(w)
    hello = hello_of(w)
    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE"))
    respond(w, bye.request, 200)
    assert w.core.calls == {}
    # the Callee Hello arriving now is ignored
    callee = far_callee(pki)
    events = callee.receive_request(hello.request.body, w.now, NOW_UTC)
    assert answer_info(w, hello, events[0]) == []
    assert w.core.stats.secured == 0


def test_two_calls_secured_independently(w: World, pki: Pki) -> None:
    first = secure_outbound(w, pki)
    second = secure_outbound(w, pki)
    assert w.core.stats.secured == 2
    keys1 = first.call.session.recorded(SwitchSrtp)[0].keys
    keys2 = second.call.session.recorded(SwitchSrtp)[0].keys
    assert keys1 != keys2
    ssrc1 = first.call.session.recorded(SetTxSsrc)[0].ssrc
    ssrc2 = second.call.session.recorded(SetTxSsrc)[0].ssrc
    assert ssrc1 != ssrc2 or ssrc1 is None
    assert [c["secure"]["state"] for c in w.core.active_calls()] == ["secure", "secure"]  # type: ignore[index]


def test_callee_role_require_secure_hangs_up_a_peer_that_never_starts(pki: Pki) -> None:
    w = make_world(pki, line2_require_secure=True)
    call_in(w)
    assert not pick(w.advance(4.9), method="BYE")  # handshake_timeout_ms: 5000 by default
    byes = pick(w.advance(0.2), method="BYE")
    assert {b.side for b in byes} == {IN, OUT}
    assert all("peer_unsupported" in (b.request.get("reason") or "") for b in byes)
    assert w.core.stats.clear_reasons == {"peer_unsupported": 1}


def test_callee_role_without_require_secure_waits_for_the_peer(w: World, pki: Pki) -> None:
    call_in(w)
    assert not pick(w.advance(60), method="BYE")
    assert w.core.stats.clear_reasons == {}


def test_star19_cannot_defeat_require_secure(pki: Pki) -> None:
    w = make_world(pki, require_secure=True)
    call = call_out(w, uri=f"sip:*19{FAR_ID}@itsp.example.net")
    assert call.b_invite.uri == CALLEE  # the prefix is still removed
    assert w.core.active_calls()[0]["secure"] is not None  # ...but the call is secured


def test_the_core_handles_every_media_event(w: World) -> None:
    assert set(w.core._media_events) == set(EVENT_TYPES)
