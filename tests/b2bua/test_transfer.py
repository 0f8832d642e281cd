"""Attended transfer across the sans-IO B2BUA: Replaces mapped onto the other leg.

The phone (line 1) has two calls through the proxy to the PBX. Each leg is its own
dialog, so a Replaces written on one side must name the dialog of the other side when
it crosses: embedded in a REFER's Refer-To (both directions), or as the header of an
INVITE; the replaced call then ends on both legs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import (
    IN,
    OUT,
    PHONE_SDP,
    UP_SDP,
    Established,
    outbound_call,
    phone_invite,
    upstream_invite,
)
from fieldflows import register
from sipfake import LINE1, PHONE, PeerDialog, World, build_response, only, pick, tag
from test_secure_core import Pki, call_out, make_pki, make_world

from proxy.sip.headers import NameAddr
from proxy.sip.replaces import Replaces, refer_to_replaces, with_refer_to_replaces


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def named(dialog: PeerDialog) -> str:
    """A dialog named as ``dialog``'s end knows it (the receiving UA's tag is to-tag)."""
    return f"{dialog.call_id};to-tag={dialog.remote_tag};from-tag={dialog.local_tag}"


def two_calls(w: World) -> tuple[Established, Established]:
    return outbound_call(w), outbound_call(w, uri="sip:18005550142@itsp.example.net")


def embedded(value: str) -> Replaces:
    found = refer_to_replaces(value)
    assert found is not None, value
    return found


def refer_to(target: str, replaces: str) -> str:
    return f"<{target}?Replaces={quote(replaces, safe='')}>"


# --- the helper in proxy/sip ----------------------------------------------------------


def test_replaces_parse_and_format() -> None:
    value = Replaces.parse("abc@host ; to-tag=7743 ;from-tag=6472;early-only;x=1")
    assert (value.call_id, value.to_tag, value.from_tag, value.early_only) == (
        "abc@host", "7743", "6472", True,
    )  # fmt: skip
    assert str(value) == "abc@host;to-tag=7743;from-tag=6472;early-only;x=1"
    for bad in ("abc@host;to-tag=1", "abc@host;from-tag=1", ";to-tag=1;from-tag=2", "a, b"):
        with pytest.raises(ValueError):
            Replaces.parse(bad)
    target = '"Bob" <sip:bob@pbx?Replaces=abc%40host%3Bto-tag%3D1%3Bfrom-tag%3D2&X=y>;p=1'
    assert embedded(target) == Replaces("abc@host", "1", "2")
    moved = with_refer_to_replaces(target, Replaces("new@h", "3", "4"))
    assert moved == '"Bob" <sip:bob@pbx?Replaces=new%40h%3Bto-tag%3D3%3Bfrom-tag%3D4&X=y>;p=1'
    assert refer_to_replaces("<sip:bob@pbx>") is None
    assert refer_to_replaces("<tel:+1555>") is None


# --- REFER ---------------------------------------------------------------------------


def test_refer_from_the_phone_names_the_outside_dialog() -> None:
    w = World()
    call1, call2 = two_calls(w)
    # The phone names call 2 as it knows it: its Call-ID, the proxy's tag, its own tag.
    value = refer_to("sip:18005550142@itsp.example.net", named(call2.phone))
    headers = [("Refer-To", value), ("Referred-By", "<sip:x@y>")]
    out = w.phone(call1.phone.request("REFER", headers=headers))
    refer = only(pick(out, OUT, method="REFER")).request
    mapped = embedded(refer.get("refer-to") or "")
    # ... and the PBX receives it as the PBX knows call 2.
    assert mapped == Replaces(call2.pbx.call_id, call2.pbx.local_tag, call2.pbx.remote_tag)
    assert NameAddr.parse(refer.get("refer-to") or "").uri.startswith(
        "sip:18005550142@itsp.example.net?"
    )
    assert refer.get("referred-by") == "<sip:x@y>"
    assert w.core.features()["replaces_mapped"] == 1


def test_refer_from_the_pbx_names_the_inside_dialog() -> None:
    w = World()
    call1, call2 = two_calls(w)
    value = refer_to("sip:x@203.0.113.5", named(call2.pbx))
    out = w.upstream(call1.pbx.request("REFER", headers=[("Refer-To", value)]))
    refer = only(pick(out, IN, method="REFER")).request
    assert embedded(refer.get("refer-to") or "") == Replaces(
        call2.phone.call_id, call2.phone.local_tag, call2.phone.remote_tag
    )


def test_refer_naming_an_unknown_dialog_passes_unchanged() -> None:
    w = World()
    call1, _ = two_calls(w)
    value = refer_to("sip:bob@pbx", "elsewhere@pbx;to-tag=1;from-tag=2")
    out = w.phone(call1.phone.request("REFER", headers=[("Refer-To", value)]))
    assert only(pick(out, OUT, method="REFER")).request.get("refer-to") == value


# --- INVITE with Replaces --------------------------------------------------------------


def test_invite_with_replaces_from_the_pbx_replaces_the_call_on_the_phone() -> None:
    w = World()
    register(w, PHONE, user=LINE1)
    _, call2 = two_calls(w)
    out = w.upstream(upstream_invite(headers=(("Replaces", named(call2.pbx)),)))
    new = only(pick(out, IN, method="INVITE"), "the replacing INVITE")
    assert Replaces.parse(new.request.get("replaces") or "") == Replaces(
        call2.phone.call_id, call2.phone.local_tag, call2.phone.remote_tag
    )
    assert new.dest == PHONE  # the device of the replaced dialog
    (_, replaced, state) = w.core.active_calls()
    assert state["replaces"] == replaced["id"]
    # the phone accepts: the replaced call ends on both legs
    ok = build_response(new.request, 200, to_tag=tag(), contact="<sip:p@10.0.0.10>",
                        body=PHONE_SDP)  # fmt: skip
    out = w.phone(ok)
    assert only(pick(out, OUT, status=200))
    byes = pick(out, method="BYE")
    assert {(b.side, b.request.call_id) for b in byes} == {
        (IN, call2.phone.call_id), (OUT, call2.pbx.call_id),
    }  # fmt: skip
    assert all("replaced by call" in (b.request.get("reason") or "") for b in byes)
    for bye in byes:
        w.send(bye.side, build_response(bye.request, 200), bye.dest)
    assert len(w.core.calls) == 2  # call 1 and the new one


def test_invite_with_replaces_from_the_phone_goes_out_naming_the_pbx_dialog() -> None:
    w = World()
    _, call2 = two_calls(w)
    out = w.phone(phone_invite(headers=(("Replaces", named(call2.phone)),)))
    new = only(pick(out, OUT, method="INVITE")).request
    assert Replaces.parse(new.get("replaces") or "") == Replaces(
        call2.pbx.call_id, call2.pbx.local_tag, call2.pbx.remote_tag
    )
    out = w.upstream(build_response(new, 200, to_tag=tag(), body=UP_SDP,
                                    contact="<sip:pbx@203.0.113.5>"))  # fmt: skip
    assert {b.side for b in pick(out, method="BYE")} == {IN, OUT}


def test_invite_naming_our_own_call_id_that_matches_nothing_gets_481() -> None:
    w = World()
    _, call2 = two_calls(w)
    wrong = f"{call2.pbx.call_id};to-tag=nope;from-tag={call2.pbx.local_tag}"
    out = w.upstream(upstream_invite(headers=(("Replaces", wrong),)))
    assert only(pick(out, OUT, status=481))
    assert len(w.core.calls) == 2


def test_invite_replacing_a_dialog_the_proxy_does_not_bridge_passes_unchanged() -> None:
    w = World()
    out = w.phone(phone_invite(headers=(("Replaces", "far@pbx;to-tag=1;from-tag=2"),)))
    assert only(pick(out, OUT, method="INVITE")).request.get("replaces") == (
        "far@pbx;to-tag=1;from-tag=2"
    )


def test_the_replacing_call_is_secured_like_any_other(pki: Pki) -> None:
    w = make_world(pki)
    call2 = call_out(w)
    out = w.phone(phone_invite(headers=(("Replaces", named(call2.phone)),)))
    assert only(pick(out, OUT, method="INVITE"))
    new = [c for c in w.core.calls.values() if c.replaces is not None]
    assert len(new) == 1 and new[0].security is not None
    assert new[0].line is not None and new[0].line.user_key == LINE1
