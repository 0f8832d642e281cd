"""x-sipura on a forked inbound call: the proxy answers the far caller's handshake as
the line's SPA whichever device answered, exactly as for a call to one device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, PHONE_SDP, UP_CONTACT, UP_SDP
from fieldflows import register
from sipfake import (
    LINE1,
    UPSTREAM,
    build_request,
    build_response,
    only,
    parse,
    pick,
    tag,
    uac_dialog,
)
from test_secure_core import (
    FAR_ID,
    SUPPORTED,
    Incall,
    Pki,
    far_caller,
    make_pki,
    make_world,
    run_peer_caller,
    secure_state,
    via_for,
)

from proxy.media.commands import SwitchSrtp
from proxy.sip.message import Request
from proxy.sip.transaction import Address
from proxy.xsipura import handshake as hs

DESK = Address("10.0.0.10", 5060)
DECT = Address("10.0.0.10", 5070)
"""Both from LINE1's allowed source (10.0.0.10)."""


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def test_the_winning_branch_is_secured_like_a_single_device(pki: Pki) -> None:
    w = make_world(pki)
    register(w, DESK, user=LINE1)
    register(w, DECT, user=LINE1)
    uri = f"sip:{LINE1}@192.0.2.1"
    data = build_request(
        "INVITE", uri, via=via_for(UPSTREAM), from_=f"<sip:+{FAR_ID}@itsp.example.net>;tag={tag()}",
        to=f"<{uri}>", call_id=f"{tag()}@itsp", cseq=7, contact=UP_CONTACT, headers=SUPPORTED,
        body=UP_SDP,
    )  # fmt: skip
    out = w.upstream(data)
    forks = {x.dest: x.request for x in pick(out, IN, method="INVITE")}
    assert set(forks) == {DESK, DECT}
    w.phone(build_response(forks[DESK], 180, to_tag=tag()), DESK)
    phone_tag = tag()
    out = w.phone(build_response(forks[DECT], 200, to_tag=phone_tag, body=PHONE_SDP,
                                 contact=f"<sip:{LINE1}@10.0.0.10:5070>"), DECT)  # fmt: skip
    ok = only(pick(out, OUT, status=200))
    assert only(pick(out, IN, method="CANCEL")).dest == DESK
    invite = parse(data)
    assert isinstance(invite, Request)
    pbx = uac_dialog(UPSTREAM, invite, ok.response, UP_CONTACT)
    w.upstream(pbx.request("ACK"))
    session = w.media.sessions[-1]
    session.packets_in += 1
    call = Incall(pbx, forks[DECT], phone_tag, session)
    caller = far_caller(pki, dialled=LINE1)
    _, second, done = run_peer_caller(w, call, caller, caller.start(w.now))
    assert [type(e) for e in done] == [hs.Secured]
    assert secure_state(w)["state"] == "secure"
    assert session.recorded(SwitchSrtp)
    update = only(pick(second, IN, method="UPDATE"), "caller-ID refresh")
    assert update.dest == DECT  # the device that answered, not the one cancelled
