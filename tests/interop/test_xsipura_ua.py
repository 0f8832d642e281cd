"""Self-test of the independent x-sipura test UA (xsipura_ua.py).

The UA must reproduce the profile's vectors on its own, and two instances of it must secure
a call between themselves; only then is it a meaningful referee for the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from xsipura_ua import (
    LOST_RESPONSE,
    OTHER_INFO_TYPES,
    CaKey,
    Call,
    McFields,
    Subscriber,
    XsipuraUA,
    _srtp_session,
    build_mc,
    callee_final,
    check_pattern,
    decode_body,
    decrypt_type2,
    dialled_user_id,
    encrypt_type2,
    generate_subscriber_key,
    hello,
    parse_expiry,
    parse_hello,
    pattern_source,
    srtp_policy_key,
    verify_mc,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VECTORS = json.loads((ROOT / "tests" / "data" / "xsipura_vectors.json").read_text("utf-8"))
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
"""Every vector MC is valid at this instant."""


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def sample_ca() -> CaKey:
    return CaKey.from_key_file(VECTORS["ca"]["ca_key_file"])


def vector_user(name: str) -> Subscriber:
    user = VECTORS["users"][name]
    return Subscriber.from_params(
        user["mini_certificate_param_b64"], user["srtp_private_key_param_b64"]
    )


# --- PKI and messages against the vectors ---------------------------------------------------


def test_pki_reproduces_vector_mcs_and_params() -> None:
    ca = sample_ca()
    assert ca.n == int(VECTORS["ca"]["n_hex"], 16)
    assert ca.d == int(VECTORS["ca"]["d_hex"], 16)
    assert ca.key_file().split() == VECTORS["ca"]["ca_key_file"].split()
    for name in ("joe", "jane"):
        user = VECTORS["users"][name]
        n, d = int(user["n_hex"], 16), int(user["d_hex"], 16)
        mc = build_mc(ca, user["name"], user["user_id"], user["expiry"], n)
        assert mc.hex() == user["mc_hex"]
        sub = Subscriber(mc, d, ca.n)
        assert sub.mini_certificate_param() == user["mini_certificate_param_b64"]
        assert sub.srtp_private_key_param() == user["srtp_private_key_param_b64"]
        assert vector_user(name) == sub
        assert (sub.name, sub.user_id) == (user["name"], user["user_id"])
        # Issuing from a datetime gives the same bytes as from the digits.
        assert build_mc(ca, user["name"], user["user_id"], parse_expiry(user["expiry"]), n) == mc


def test_mc_verification_vectors() -> None:
    trusted = [sample_ca().n]
    joe = bytes.fromhex(VECTORS["users"]["joe"]["mc_hex"])
    assert verify_mc(joe, trusted, NOW) is None
    negative = {k: bytes.fromhex(v) for k, v in VECTORS["mc_negative"].items()}
    assert "signature" in (verify_mc(negative["tampered_name_hex"], trusted, NOW) or "")
    assert "expired" in (verify_mc(negative["expired_2005_hex"], trusted, NOW) or "")
    assert "signature" in (verify_mc(negative["signed_by_other_ca_hex"], trusted, NOW) or "")
    assert "length" in (verify_mc(negative["truncated_hex"], trusted, NOW) or "")
    assert verify_mc(joe, [CaKey.generate().n], NOW) is not None  # untrusted CA
    expiry = parse_expiry(VECTORS["users"]["joe"]["expiry"])
    assert expiry == datetime(2034, 1, 1, tzinfo=UTC)
    assert verify_mc(joe, trusted, expiry) is None  # the expiry instant is still valid
    assert verify_mc(joe, trusted, expiry + timedelta(seconds=1)) is not None


def test_stage2_message_vectors() -> None:
    msgs = VECTORS["messages"]
    joe, jane = vector_user("joe"), vector_user("jane")
    assert hello(1, 0x11223344, joe.mc).hex() == msgs["caller_hello"]["bytes_hex"]
    assert hello(2, 0x55667788, jane.mc).hex() == msgs["callee_hello"]["bytes_hex"]
    assert base64.b64encode(callee_final()).decode() == msgs["callee_final"]["body_b64"]
    assert decode_body(b"\r\n " + msgs["caller_hello"]["body_b64"].encode() + b"\r\n") == (
        bytes.fromhex(msgs["caller_hello"]["bytes_hex"])
    )
    final = bytes.fromhex(msgs["caller_final"]["bytes_hex"])
    assert (
        decrypt_type2(jane.n, jane.d, final[4:68]).hex() == msgs["caller_final"]["master_key_hex"]
    )
    assert (
        decrypt_type2(jane.n, jane.d, final[68:132]).hex()
        == msgs["caller_final"]["master_salt_hex"]
    )
    bad = bytes.fromhex(msgs["caller_final_bad_padding"]["bytes_hex"])
    assert decrypt_type2(jane.n, jane.d, bad[4:68]) is None
    with pytest.raises(ValueError, match="version"):
        parse_hello(bytes.fromhex(msgs["caller_hello_version_2"]["bytes_hex"]), 1)
    flags, ssrc, _ = parse_hello(bytes.fromhex(msgs["caller_hello_unknown_flags"]["bytes_hex"]), 1)
    assert (flags, ssrc) == (0x0001ABCD, 0x11223344)


def test_srtp_vectors() -> None:
    srtp = VECTORS["srtp"]
    key = bytes.fromhex(VECTORS["messages"]["caller_final"]["master_key_hex"])
    salt = bytes.fromhex(VECTORS["messages"]["caller_final"]["master_salt_hex"])
    assert srtp_policy_key(key, salt).hex() == srtp["libsrtp_key_hex"]
    tx, rx = _srtp_session(key, salt, True), _srtp_session(key, salt, False)
    for packet in srtp["packets"]:
        protected = tx.protect(bytes.fromhex(packet["rtp_hex"]))
        assert protected.hex() == packet["srtp_hex"]
        assert rx.unprotect(protected).hex() == packet["rtp_hex"]


def test_generated_subscriber_keys_and_dialled_number() -> None:
    ca = CaKey.generate()
    assert ca.n.bit_length() == 1024
    sub = Subscriber.issue(ca, "Alice", "15550001111", NOW + timedelta(days=1))
    assert sub.n.bit_length() == 512
    assert verify_mc(sub.mc, [ca.n], NOW) is None
    assert Subscriber.from_params(sub.mini_certificate_param(), sub.srtp_private_key_param()) == sub
    secret = bytes(range(16))
    assert decrypt_type2(sub.n, sub.d, encrypt_type2(sub.n, secret)) == secret
    n, d = generate_subscriber_key()
    assert n.bit_length() == 512 and pow(pow(7, 65537, n), d, n) == 7
    assert McFields.parse(sub.mc).expiry == (NOW + timedelta(days=1)).strftime("%H%M%S%m%d30")
    for dialled in ("15550001111", "+15550001111", "*1815550001111", "*19+15550001111"):
        assert dialled_user_id(dialled) == "15550001111"
    assert dialled_user_id("++1555") == "+1555"


def test_ua_does_not_import_proxy() -> None:
    source = (HERE / "xsipura_ua.py").read_text("utf-8")
    assert "from proxy" not in source and "import proxy" not in source
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import xsipura_ua; "
        "bad = [m for m in sys.modules if m == 'proxy' or m.startswith('proxy.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(HERE)], check=True, cwd="/")


# --- two UAs on loopback -----------------------------------------------------------------------

CALLER_TAG, CALLEE_TAG = 0x41, 0x42


def check_received(call: Call, tag: int, peer_ssrc: int) -> None:
    """Every received payload is the peer's pattern, exact, in order, none missing; plain
    packets (before the switch-over) precede secure ones."""
    received = call.media.received
    assert received, "no media received"
    indices = [check_pattern(p.payload, tag) for p in received]
    assert None not in indices, "a payload arrived damaged"
    assert indices == list(range(len(received))), "payloads missing, duplicated or reordered"
    assert all(p.pt == 0 and p.ssrc == peer_ssrc for p in received)
    flags = [p.secure for p in received]
    assert flags == sorted(flags), "plain RTP after SRTP"


def make_pair(
    caller_ca: CaKey, callee_ca: CaKey, trusted_by_callee: list[int], grace: float = 0.5
) -> tuple[XsipuraUA, XsipuraUA]:
    expires = datetime.now(UTC) + timedelta(days=30)
    alice = Subscriber.issue(caller_ca, "Alice Caller", "15550001111", expires)
    bob = Subscriber.issue(callee_ca, "Bob Callee", "15550002222", expires)
    caller = XsipuraUA(
        name="alice",
        user="15550001111",
        identity=alice,
        trusted_ca=[callee_ca.n],
        payload_source=pattern_source(CALLER_TAG),
        grace=grace,
        info_timeout=2.0,
        stage2_delay=0.1,
    )
    callee = XsipuraUA(
        name="bob",
        user="15550002222",
        identity=bob,
        trusted_ca=trusted_by_callee,
        payload_source=pattern_source(CALLEE_TAG),
        grace=grace,
        info_timeout=2.0,
    )
    return caller, callee


def test_two_uas_secure_a_call_and_media_is_intact() -> None:
    ca = CaKey.generate()

    async def scenario() -> None:
        caller, callee = make_pair(ca, ca, [ca.n])
        async with caller, callee:
            out = await caller.call(f"sip:+15550002222@127.0.0.1:{callee.port}")
            inc = await callee.wait_call()
            assert out.status == 200 and out.provisional == [100, 180]
            assert out.peer_supported and inc.peer_supported
            assert await out.wait_secured(5) and await inc.wait_secured(5)
            assert (out.outcome, inc.outcome) == ("secure", "secure"), (out.reason, inc.reason)
            assert out.srtp_keys is not None and out.srtp_keys == inc.srtp_keys
            assert out.info_codes == [200, 200] and inc.info_codes == [200, 200]
            assert (out.peer_name, out.peer_user_id) == ("Bob Callee", "15550002222")
            assert (inc.peer_name, inc.peer_user_id) == ("Alice Caller", "15550001111")
            # Media both ways for a while, past the grace window.
            assert await out.wait_rx(40, 3, secure=True)
            assert await inc.wait_rx(40, 3, secure=True)
            await asyncio.sleep(0.3)
            assert await out.hangup() == 200
            assert await inc.wait_state("terminated", 2)
            await asyncio.sleep(0.05)  # let packets in flight land
            for call, tag, peer in ((out, CALLEE_TAG, inc), (inc, CALLER_TAG, out)):
                check_received(call, tag, peer.media.ssrc)
                c = call.counters
                assert c["srtp_auth_fail"] == 0 and c["rx_malformed"] == 0, c
                assert c["srtp_rx_ok"] == sum(p.secure for p in call.media.received) >= 40
                assert c["tx_srtp"] >= 40, c
                assert call.secured

    run(scenario())


def test_untrusted_caller_ca_gets_488_and_call_stays_clear() -> None:
    ca, other_ca = CaKey.generate(), CaKey.generate()

    async def scenario() -> None:
        caller, callee = make_pair(other_ca, ca, [ca.n])  # callee does not trust other_ca
        async with caller, callee:
            out = await caller.call(f"sip:15550002222@127.0.0.1:{callee.port}")
            inc = await callee.wait_call()
            assert await out.wait_outcome(5) == "clear"
            assert out.info_codes == [488] and inc.info_codes == [488]
            assert "488" in out.reason
            assert inc.outcome == "clear" and "caller MC invalid" in inc.reason
            assert await out.wait_rx(25, 3) and await inc.wait_rx(25, 3)
            for call, tag, peer in ((out, CALLEE_TAG, inc), (inc, CALLER_TAG, out)):
                assert not call.secured
                check_received(call, tag, peer.media.ssrc)
                c = call.counters
                assert c["tx_srtp"] == c["srtp_rx_ok"] == c["srtp_auth_fail"] == 0, c
                assert c["rtp_plain_rx"] >= 25 and c["tx_plain"] >= 25, c
            await out.hangup()

    run(scenario())


def test_callee_answers_vector_messages_per_section_2a() -> None:
    msgs = VECTORS["messages"]
    ca = sample_ca()

    async def scenario() -> None:
        callee = XsipuraUA(name="jane", identity=vector_user("jane"), clock=lambda: NOW)
        caller = XsipuraUA(name="raw", secure=False, info_timeout=2.0)
        assert ca.n == callee.trusted_ca[0]
        async with caller, callee:
            out = await caller.call(f"sip:14085559876@127.0.0.1:{callee.port}")
            inc = await callee.wait_call()
            assert out.outcome == "clear"  # secure=False: no stage 2 of its own

            async def info(body: str, ctype: str = "application/x-sipura") -> int:
                resp = await out.send_info(body, ctype)
                assert resp is not None
                return resp.status

            assert await info(msgs["caller_final"]["body_b64"]) == 400  # no Hello yet
            assert await info(msgs["callee_final"]["body_b64"]) == 400  # msg_id 4 in a request
            assert await info("not base64!") == 400
            assert await info(msgs["caller_hello"]["body_b64"][:-8]) == 400  # truncated
            v2 = base64.b64encode(bytes.fromhex(msgs["caller_hello_version_2"]["bytes_hex"]))
            assert await info(v2.decode()) == 400
            assert await info("") == 200  # empty INFO: 200, ignored
            for ctype in sorted(OTHER_INFO_TYPES):
                assert await info("Signal=5\r\nDuration=160\r\n", ctype) == 200
            assert len(inc.other_infos) == len(OTHER_INFO_TYPES)

            resp = await out.send_info(msgs["caller_hello"]["body_b64"] + "\r\n", "text/plain")
            assert resp is not None and resp.status == 200
            assert resp.content_type == "application/x-sipura"
            assert "x-sipura" in resp.tokens("supported")
            flags, ssrc, mc = parse_hello(decode_body(resp.body), 2)
            assert (flags, ssrc, mc) == (0x00010000, inc.media.ssrc, vector_user("jane").mc)
            assert inc.peer_user_id == "14085551234"

            assert await info(msgs["caller_final_bad_padding"]["body_b64"]) == 400
            assert not inc.secured
            assert await info(msgs["caller_hello"]["body_b64"]) == 200
            resp = await out.send_info(msgs["caller_final"]["body_b64"])
            assert resp is not None and resp.status == 200
            assert resp.body.decode() == msgs["callee_final"]["body_b64"]
            assert inc.secured and inc.outcome == "secure"
            assert inc.srtp_keys == (
                bytes.fromhex(msgs["caller_final"]["master_key_hex"]),
                bytes.fromhex(msgs["caller_final"]["master_salt_hex"]),
            )
            await out.hangup()

    run(scenario())


@pytest.mark.parametrize(
    ("info_response", "codes", "secure"),
    [(501, [501], False), ({3: LOST_RESPONSE}, [200, None], True)],
    ids=["callee-answers-501", "callee-final-lost"],
)
def test_callee_misbehaviour_modes(
    info_response: Any, codes: list[int | None], secure: bool
) -> None:
    """501: the call stays clear. A lost Callee Final: the callee has switched, the caller
    switches on the first SRTP that authenticates under its key (profile 2a)."""
    ca = CaKey.generate()

    async def scenario() -> None:
        caller, callee = make_pair(ca, ca, [ca.n], grace=1.0)
        callee.info_response = info_response
        caller.info_timeout = 1.0
        async with caller, callee:
            out = await caller.call(f"sip:15550002222@127.0.0.1:{callee.port}")
            inc = await callee.wait_call()
            assert await out.wait_for(lambda: len(out.info_codes) == len(codes), 5)
            assert out.info_codes == codes and inc.info_codes == codes
            assert (out.secured, inc.secured) == (secure, secure), (out.reason, inc.reason)
            await asyncio.sleep(1.2)  # past the callee's grace window: nobody falls back
            assert (out.secured, inc.secured) == (secure, secure), (out.reason, inc.reason)
            assert out.srtp_keys == inc.srtp_keys
            assert out.counters["srtp_auth_fail"] == inc.counters["srtp_auth_fail"] == 0
            await out.hangup()

    run(scenario())
