"""An SPA-style peer keeps x-sipura when the proxy's offer also carries SDES keys.

With ``[outside] sdes = "offer"`` every outbound INVITE carries ``a=crypto`` lines
(best-effort ``RTP/AVP``) beside ``Supported: x-sipura``. An SPA answers without
``a=crypto`` (it knows nothing of SDES) and with ``Supported: x-sipura``: the answer
decides, so x-sipura runs as before and the call is secured end to end with the Mini
Certificates (the phone gets the ``$`` caller ID). The peer is the independent x-sipura
UA (``xsipura_ua.py``, written from the wire profile, importing nothing of the proxy),
over UDP; SDES keys over UDP need ``sdes_over_insecure_transport`` (the test's only
reason for it: the UA has no TLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from secure_setup import HOST, Line, PhoneSpec, Pki, ProxyProc, Watcher, dump_on_failure
from test_secure import (
    SECURE_SECONDS,
    SHORT_TONE,
    UA_NAME,
    UA_NUMBER,
    UA_TAG,
    _check_secured_with_ua,
    _incoming,
    future,
    run,
    ua_rx,
)
from xsipura_ua import Subscriber, XsipuraUA, pattern_source

from testkit.ports import reserve_udp
from testkit.processes import processes, until

LINE_NAME, LINE_NUMBER = "Sara Sdes", "14155550077"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Pki, ProxyProc, PhoneSpec, int]]:
    pki = Pki(tmp_path)
    ua_socket = reserve_udp()
    spec = PhoneSpec(LINE_NAME, LINE_NUMBER, 0xD1)
    proxy = ProxyProc("S", tmp_path)
    line = Line(LINE_NUMBER, pki.line_mc(LINE_NAME, LINE_NUMBER), contact=spec.contact)
    proxy.write_config(
        upstream=int(ua_socket.getsockname()[1]), lines=[line.table()],
        sip={"transports": ["udp"]},
        outside={"sdes": "offer", "sdes_over_insecure_transport": True},
        xsipura={"grace_ms": 1000, "handshake_timeout_ms": 3000, "tone": SHORT_TONE},
    )  # fmt: skip
    with processes() as procs:
        proxy.run(procs)
        port = int(ua_socket.getsockname()[1])
        ua_socket.close()  # the UA binds it now
        try:
            yield pki, proxy, spec, port
        finally:
            spec.close()


def test_an_spa_answering_without_crypto_gets_x_sipura(
    rig: tuple[Pki, ProxyProc, PhoneSpec, int],
) -> None:
    pki, proxy, spec, ua_port = rig
    with dump_on_failure(proxy):
        run(_call(pki, proxy, spec, ua_port))


async def _call(pki: Pki, proxy: ProxyProc, spec: PhoneSpec, ua_port: int) -> None:
    identity = Subscriber.issue(pki.ca, UA_NAME, UA_NUMBER, future())
    phone = spec.make(peer_tag=UA_TAG)
    options = {
        "name": "spa",
        "port": ua_port,
        "user": UA_NUMBER,
        "identity": identity,
        "trusted_ca": [pki.ca.n],
        "payload_source": pattern_source(UA_TAG),
        "grace": 1.0,
    }
    async with XsipuraUA(**options) as ua, Watcher(proxy) as watcher:  # type: ignore[arg-type]
        await phone.start()
        try:
            phone.dial(f"sip:{UA_NUMBER}@{HOST}:{proxy.inside}", (HOST, proxy.inside))
            call = await _incoming(ua, spec.user)
            # The offer carried both: SDES keys and the x-sipura option tag.
            (invite,) = ua_rx(ua, "INVITE", call.call_id)
            assert "x-sipura" in invite.tokens("supported")
            assert b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" in invite.body
            assert b"a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:" in invite.body
            assert b" RTP/AVP " in invite.body  # best effort: the SPA can read it
            state = (await watcher.wait_secure_state(spec.user))["secure"]
            assert (state["state"], state["role"], state["reason"]) == ("secure", "caller", None)
            assert (state["peer_name"], state["peer_user_id"]) == (UA_NAME, UA_NUMBER)
            assert await call.wait_outcome(5) == "secure", call.reason
            await asyncio.sleep(SECURE_SECONDS)
            snap = await watcher.fresh_call(spec.user)
            phone.hang_up()
            await until(lambda: call.state == "terminated", 5, "the UA to get the BYE")
        finally:
            phone.close()
    assert snap is not None
    assert snap["method"] == "x-sipura", snap
    _check_secured_with_ua(snap, ua, call, phone, spec)
