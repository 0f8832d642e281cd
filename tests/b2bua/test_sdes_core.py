"""SDES on the outside leg, in the sans-IO core: offers carry keys toward the peer,
answers with keys make the leg SRTP, the phone never sees a=crypto or RTP/SAVP, and
"require" refuses calls the far end will not encrypt."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from callflows import (
    IN,
    OUT,
    UP_CONTACT,
    UP_SDP,
    answer,
    start_call,
    upstream_invite,
)
from sipfake import World, build_response, only, pick, tag

from proxy.b2bua.config import parse_config
from proxy.sip.sdp import parse_sdp
from proxy.sip.sdp_crypto import Crypto, crypto_of, format_crypto

LINE2_URI = "sip:14085555678@192.0.2.1"
PEER_KEY = Crypto(1, "AES_CM_128_HMAC_SHA1_80", b"K" * 16, b"S" * 14)


def world(sdes: str = "offer") -> World:
    text = sipfake.CONFIG.format(
        unknown_users="relay",
        outside_extra='upstream = "sip:203.0.113.5:5060"\n'
        f'sdes = "{sdes}"\nsdes_over_insecure_transport = true',
        max_calls=0,
        sip_extra="",
    )
    return World(parse_config(text, "test.toml"))


def with_crypto(body: bytes, *lines: Crypto, protocol: str = "RTP/AVP") -> bytes:
    text = body.decode().replace("RTP/AVP", protocol)
    extra = "".join(format_crypto(c) + "\r\n" for c in lines)
    return (text + extra).encode()


def test_an_outbound_offer_carries_keys_and_the_answer_keys_the_leg() -> None:
    w = world()
    a_invite, b = start_call(w)
    media = parse_sdp(b.request.body).media[0]
    offered, _ = crypto_of(media)
    assert media.protocol == "RTP/AVP"
    assert [c.suite for c in offered] == ["AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"]
    assert offered[0].key != offered[1].key
    assert "x-sipura" in b.request.get_all("supported")
    answer_key = Crypto(1, "AES_CM_128_HMAC_SHA1_80", b"k" * 16, b"s" * 14)
    call = answer(w, a_invite, b, body=with_crypto(UP_SDP, answer_key))
    ok_body = call.a_ok.body
    assert b"a=crypto" not in ok_body and b"RTP/SAVP" not in ok_body  # the phone sees none
    [state] = w.core.calls.values()
    assert state.sdes is not None and state.sdes.active
    assert w.core.active_calls()[0]["method"] == "sdes"
    assert state.media is not None
    keys = state.media.sdes_keys[0]
    assert (keys.send, keys.receive) == (offered[0], answer_key)
    assert state.security is None  # no x-sipura on top


def test_no_keys_in_the_answer_leaves_the_call_plain_with_offer() -> None:
    w = world()
    a_invite, b = start_call(w)
    answer(w, a_invite, b)
    [state] = w.core.calls.values()
    assert state.sdes is not None and not state.sdes.active
    assert w.core.active_calls()[0]["method"] == "clear"


def test_require_offers_savp_and_refuses_an_answer_without_keys() -> None:
    w = world("require")
    _, b = start_call(w)
    assert parse_sdp(b.request.body).media[0].protocol == "RTP/SAVP"
    up_tag = tag()
    out = w.upstream(build_response(b.request, 200, to_tag=up_tag, contact=UP_CONTACT,
                                    body=UP_SDP))  # fmt: skip
    assert only(pick(out, IN, status=488))
    assert only(pick(out, OUT, method="ACK"))
    bye = only(pick(out, OUT, method="BYE"))
    assert "SRTP required" in (bye.request.get("reason") or "")
    assert w.core.stats.calls_failed == 1


def test_an_inbound_savp_offer_is_answered_with_our_key_and_bridged_plain() -> None:
    w = world()
    offer = with_crypto(UP_SDP, PEER_KEY, protocol="RTP/SAVP")
    out = w.upstream(upstream_invite(uri=LINE2_URI, body=offer))
    to_phone = only(pick(out, IN, method="INVITE"))
    assert b"a=crypto" not in to_phone.request.body
    assert parse_sdp(to_phone.request.body).media[0].protocol == "RTP/AVP"
    phone_answer = sipfake.sdp("10.0.0.20", 4002)
    ok = w.phone(build_response(to_phone.request, 200, to_tag=tag(),
                                contact="<sip:14085555678@10.0.0.20:5062>",
                                body=phone_answer), sipfake.PHONE2)  # fmt: skip
    up_ok = only(pick(ok, OUT, status=200))
    media = parse_sdp(up_ok.response.body).media[0]
    assert media.protocol == "RTP/SAVP"
    [ours] = crypto_of(media)[0]
    assert (ours.tag, ours.suite) == (1, PEER_KEY.suite) and ours.key != PEER_KEY.key
    [state] = w.core.calls.values()
    assert state.media is not None and state.media.sdes_keys[0].receive == PEER_KEY


def test_an_inbound_savp_offer_without_sdes_gets_488() -> None:
    w = World()  # the default: SDES off
    offer = with_crypto(UP_SDP, PEER_KEY, protocol="RTP/SAVP")
    out = w.upstream(upstream_invite(uri=LINE2_URI, body=offer))
    assert only(pick(out, OUT, status=488))
    assert w.media.all_returned()


def test_a_best_effort_offer_without_sdes_is_answered_plain() -> None:
    w = World()
    out = w.upstream(upstream_invite(uri=LINE2_URI, body=with_crypto(UP_SDP, PEER_KEY)))
    to_phone = only(pick(out, IN, method="INVITE"))
    assert b"a=crypto" not in to_phone.request.body


def test_a_reinvite_with_the_same_key_keeps_ours_and_a_new_key_gets_a_new_one() -> None:
    w = world()
    out = w.upstream(upstream_invite(uri=LINE2_URI, body=with_crypto(UP_SDP, PEER_KEY)))
    to_phone = only(pick(out, IN, method="INVITE"))
    phone_tag = tag()
    ok = w.phone(build_response(to_phone.request, 200, to_tag=phone_tag,
                                contact="<sip:14085555678@10.0.0.20:5062>",
                                body=sipfake.sdp("10.0.0.20", 4002)), sipfake.PHONE2)  # fmt: skip
    first = crypto_of(parse_sdp(only(pick(ok, OUT, status=200)).response.body).media[0])[0][0]
    [state] = w.core.calls.values()
    assert state.sdes is not None
    same = state.sdes.toward_inside(with_crypto(UP_SDP, PEER_KEY), offer=True)
    again, keys = state.sdes.toward_outside(sipfake.sdp("10.0.0.20", 4002), offer=False)
    assert crypto_of(parse_sdp(again).media[0])[0][0] == first and same[1] == []
    assert keys[0].send == first
    new_peer = Crypto(1, PEER_KEY.suite, b"N" * 16, b"M" * 14)
    state.sdes.toward_inside(with_crypto(UP_SDP, new_peer), offer=True)
    renewed, keys = state.sdes.toward_outside(sipfake.sdp("10.0.0.20", 4002), offer=False)
    assert crypto_of(parse_sdp(renewed).media[0])[0][0].key != first.key
    assert keys[0].receive == new_peer


def test_over_tls_via_and_contact_name_the_tls_listener() -> None:
    """A peer reached over TLS sends its ACK and BYE to our Contact, opening a connection
    there if it does not reuse ours (baresip does not): it must be the TLS listener's
    port, not the UDP/TCP one with ``;transport=tls`` (found by the baresip interop test:
    its BYE never arrived)."""
    text = sipfake.CONFIG.format(
        unknown_users="relay",
        outside_extra='upstream = "sip:203.0.113.5:5061;transport=tls"\n'
        'tls_listen = "192.0.2.1:5071"',
        max_calls=0,
        sip_extra='transports = ["udp", "tls"]\n[tls]\ncertificate = "proxy.crt"\n'
        'private_key = "@proxy.key"',
    )
    w = World(parse_config(text, "test.toml"))
    _, b = start_call(w)
    assert b.dest.transport == "tls"
    assert b.request.get("via").startswith("SIP/2.0/TLS 192.0.2.1:5071;")
    assert b.request.get("contact").endswith("@192.0.2.1:5071;transport=tls>")
    assert b"a=crypto" in b.request.body  # sdes defaults to "offer" over TLS
