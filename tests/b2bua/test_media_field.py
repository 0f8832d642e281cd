"""Media decisions of the core: NAT detection per leg (``[media] latch``), every m-line
of an offer anchored (T.38 re-INVITEs), non-RTP streams marked, and the T.38 policy on
secured calls (``[xsipura] t38``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import IN, OUT, UP_CONTACT, answer, outbound_call, start_call
from fieldflows import field_config
from sipfake import World, build_response, only, pick, sdp
from test_secure_core import Pki, make_pki, make_world, secure_outbound

from proxy.b2bua.fax import stream_kind, t38_offer
from proxy.b2bua.media import latch_mode
from proxy.media.commands import SetRemote
from proxy.sip.sdp import parse_sdp


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def t38(ip: str, port: int) -> bytes:
    lines = [
        "v=0", f"o=- 1 2 IN IP4 {ip}", "s=fax", f"c=IN IP4 {ip}", "t=0 0",
        "m=audio 0 RTP/AVP 0", f"m=image {port} udptl t38", "a=T38FaxVersion:0",
        "a=T38FaxRateManagement:transferredTCF", "a=T38FaxUdpEC:t38UDPRedundancy",
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n").encode()


# --- NAT detection --------------------------------------------------------------------


def test_latch_rule() -> None:
    assert latch_mode("auto", "10.0.0.77", "10.0.0.10") == "any"
    assert latch_mode("auto", "10.0.0.10", "10.0.0.10") == "sdp"
    assert latch_mode("auto", "10.0.0.10", None) == "sdp"
    assert latch_mode("sdp", "10.0.0.77", "10.0.0.10") == "sdp"
    assert latch_mode("any", "10.0.0.10", "10.0.0.10") == "any"


def test_nat_detected_per_leg() -> None:
    w = World()
    a_invite, b = start_call(w, body=sdp("10.0.0.77", 4000))  # private c=, SIP from .10
    answer(w, a_invite, b, body=sdp("203.0.113.5", 7000))  # the PBX: same address
    (state,) = w.core.active_calls()
    assert state["nat"] == ["inside"]
    assert state["latch"] == {"inside": ["any"], "outside": ["sdp"]}
    # ... and the media engine is told so, with the address the SDP gave.
    remotes = [c for c in w.media.sessions[0].calls if isinstance(c, SetRemote)]
    assert [(c.side, c.ip, c.latch, c.kind) for c in remotes] == [
        (IN, "10.0.0.77", "any", "rtp"), (OUT, "203.0.113.5", "sdp", "rtp"),
    ]  # fmt: skip


@pytest.mark.parametrize("setting", ["sdp", "any"])
def test_a_fixed_latch_setting_applies_to_every_leg(setting: str) -> None:
    w = World(field_config(media=f'latch = "{setting}"'))
    a_invite, b = start_call(w, body=sdp("10.0.0.77", 4000))
    answer(w, a_invite, b, body=sdp("203.0.113.5", 7000))
    (state,) = w.core.active_calls()
    assert state["nat"] == []
    assert state["latch"] == {"inside": [setting], "outside": [setting]}


def test_latch_setting_is_checked() -> None:
    from proxy.b2bua.config import ConfigError

    with pytest.raises(ConfigError, match=r"media\.latch"):
        field_config(media='latch = "nat"')


# --- every m-line anchored; T.38 on a plain call -----------------------------------------


def test_stream_kinds() -> None:
    assert [stream_kind(p) for p in ("RTP/AVP", "RTP/SAVPF", "UDP/TLS/RTP/SAVP")] == ["rtp"] * 3
    assert stream_kind("udptl") == "udptl" and stream_kind("UDP") == "udp"
    assert t38_offer("application/sdp", t38("10.0.0.10", 4002))
    assert not t38_offer("application/sdp", sdp("10.0.0.10", 4000))


def test_t38_reinvite_on_a_plain_call_anchors_every_m_line() -> None:
    w = World()
    call = outbound_call(w)
    out = w.phone(call.phone.request("INVITE", body=t38("10.0.0.10", 4002)))
    relayed = only(pick(out, OUT, method="INVITE")).request
    offer = parse_sdp(relayed.body)
    assert offer.media[0].port == 0
    image = offer.media[1]
    assert (image.media, image.protocol) == ("image", "udptl")
    sessions = w.media.active
    assert len(sessions) == 2  # the call's first session, and one for the fax stream
    assert image.port == sessions[1].local(OUT, 0)[1]
    assert sessions[1].remotes[(IN, 0)][:2] == ("10.0.0.10", 4002)
    out = w.upstream(build_response(relayed, 200, contact=UP_CONTACT,
                                    body=t38("203.0.113.5", 9002)))  # fmt: skip
    ok = only(pick(out, IN, status=200)).response
    assert parse_sdp(ok.body).media[1].port == sessions[1].local(IN, 0)[1]
    assert sessions[1].remotes[(OUT, 0)][:2] == ("203.0.113.5", 9002)
    handle = w.core.calls[max(w.core.calls)].media
    assert handle is not None and handle.kind(1) == "udptl" and handle.kind(0) == "rtp"
    fax = [c for c in sessions[1].calls if isinstance(c, SetRemote)]
    assert {c.kind for c in fax} == {"udptl"}
    w.phone(call.phone.request("BYE"))
    w.settle()
    assert w.media.all_returned()  # both sessions released


# --- T.38 on a secured call --------------------------------------------------------------


def test_t38_on_a_secured_call_is_refused_by_default(
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = make_world(pki)
    secured = secure_outbound(w, pki)
    with caplog.at_level(logging.WARNING, "sipura.b2bua"):
        out = w.phone(secured.call.phone.request("INVITE", body=t38("10.0.0.10", 4002)))
    refused = only(pick(out, IN, status=488)).response
    assert "T.38" in (refused.get("warning") or "")
    assert not pick(out, OUT, method="INVITE")
    assert "refused (488)" in caplog.text
    assert w.core.features()["fax_refused"] == 1
    assert w.core.active_calls()[0]["fax_clear"] is False


def test_t38_on_a_secured_call_relayed_in_the_clear_when_configured(
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = make_world(pki, xsipura='t38 = "clear"')
    secured = secure_outbound(w, pki)
    with caplog.at_level(logging.WARNING, "sipura.b2bua"):
        out = w.phone(secured.call.phone.request("INVITE", body=t38("10.0.0.10", 4002)))
    assert only(pick(out, OUT, method="INVITE"))
    assert "IN THE CLEAR" in caplog.text
    (state,) = w.core.active_calls()
    assert state["fax_clear"] is True
    assert w.core.features()["fax_clear"] == 1
