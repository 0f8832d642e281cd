"""A bad re-key must not silence a call: the proxy as x-sipura callee, a real process.

The independent UA calls a line and runs stage 2 by hand: Caller Hello, Caller Final
(the proxy switches to SRTP and answers its Callee Final), but the UA behaves as if that
answer were lost and never switches (profile §2a, lost Callee Final: it keeps sending
plain RTP). Inside the proxy's grace window it sends a bad re-key Hello. Before the fix
the bad Hello cancelled the lost-Final fallback: the proxy kept encrypting toward a
peer that never switched and dropped its plain RTP, and the call went silent both ways.
Now the proxy answers 400, keeps the keys it has, and when no SRTP authenticates within
the grace window it falls back to clear: the phone hears the peer again.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from secure_setup import (
    HOST,
    Line,
    PhoneSpec,
    Pki,
    ProxyProc,
    Watcher,
    audio_report,
    dump_on_failure,
)
from xsipura_ua import (
    MSG_CALLEE_HELLO,
    MSG_CALLER_HELLO,
    McFields,
    Subscriber,
    XsipuraUA,
    caller_final,
    decode_body,
    encode_body,
    hello,
    parse_hello,
    pattern_source,
)

from testkit.processes import processes, until
from testkit.proxy import start_proxies

UA_TAG = 0x77
GRACE_S = 1.0


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_bad_rekey_hello_during_grace_falls_back_to_clear(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    spec = PhoneSpec("Rita Rekey", "14155550101", 0x51)
    proxy = ProxyProc("R", tmp_path)
    line = Line(spec.user, pki.line_mc(spec.name, spec.user), contact=spec.contact)
    proxy.configure([line], xsipura={"grace_ms": int(GRACE_S * 1000), "tone": False})
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    identity = Subscriber.issue(pki.ca, "Uma Agent", "16505550100", expires)
    try:
        with processes() as procs, dump_on_failure(proxy):
            start_proxies(procs, proxy)
            run(_scenario(proxy, spec, identity, pki))
    finally:
        spec.close()


async def _scenario(proxy: ProxyProc, spec: PhoneSpec, identity: Subscriber, pki: Pki) -> None:
    phone = spec.make(peer_tag=UA_TAG)
    ua = XsipuraUA(name="ua", user="16505550100", identity=identity, trusted_ca=[pki.ca.n],
                   payload_source=pattern_source(UA_TAG), secure=False, grace=GRACE_S)  # fmt: skip
    async with ua, Watcher(proxy) as watcher:
        await phone.start()
        try:
            call = await ua.call(f"sip:{spec.user}@{HOST}:{proxy.outside}",
                                 dest=(HOST, proxy.outside))  # fmt: skip
            assert call.status == 200, call.status
            await asyncio.sleep(0.5)  # plain media both ways first
            own_ssrc = call.media.ssrc
            reply = await call.send_info(
                encode_body(hello(MSG_CALLER_HELLO, own_ssrc, identity.mc))
            )
            assert reply is not None and reply.status == 200
            _, _, proxy_mc = parse_hello(decode_body(reply.body), MSG_CALLEE_HELLO)
            final = caller_final(McFields.parse(proxy_mc).n, secrets.token_bytes(16),
                                 secrets.token_bytes(16))  # fmt: skip
            reply = await call.send_info(encode_body(final))
            assert reply is not None and reply.status == 200  # the proxy switched...
            switched = time.monotonic()
            # ...but the UA acts as if that 200 were lost: it never switches, and sends a
            # re-key Hello the proxy cannot accept (an SSRC change) inside the grace window.
            bad = encode_body(hello(MSG_CALLER_HELLO, own_ssrc ^ 1, identity.mc))
            reply = await call.send_info(bad)
            assert reply is not None and reply.status == 488, reply and reply.status
            assert time.monotonic() - switched < GRACE_S
            state = await until(lambda: _clear(watcher, spec.user), GRACE_S + 3,
                                "the lost-Final fallback to clear")  # fmt: skip
            assert state["reason"] == "no_authenticated_srtp", state
            since = time.monotonic()
            await asyncio.sleep(1.0)
            heard = audio_report(phone, since=since)
            assert heard["packets"] >= 30 and heard["altered"] == 0, heard  # the UA again
            plain = [p for p in call.media.received if p.at >= since and not p.secure]
            assert len(plain) >= 30  # and the phone reaches the UA in the clear
            assert await call.hangup(timeout=5) == 200
        finally:
            phone.close()


def _clear(watcher: Watcher, line: str) -> dict[str, Any] | None:
    call = watcher.call(line)
    secure = (call or {}).get("secure") or {}
    return secure if secure.get("state") == "clear" else None
