"""Secure calls end to end: real ``sipura-proxy run`` processes, plain phones, SRTP on the wire.

* Two proxies back to back (phone -> proxy A -> proxy B -> phone, both directions at
  once): both sites secure, tshark on ``lo`` shows SRTP between the proxies, the far
  phone hears exactly what was sent (only the secure-call tone alters packets).
* Against the independent x-sipura UA (``xsipura_ua.py``, written from the profile and
  importing nothing of the proxy): the proxy as x-sipura caller and as callee.
* Every reason for staying clear, with and without ``require_secure``; ``*18``/``*19``;
  hold and resume (re-INVITEs from the phone) on a secured call.

Every MC the proxies use is issued by the proxy's code (``mc issue`` / ``proxy.xsipura``)
from a CA key file written by the test UA's own PKI helper; the UA's MCs come from that
helper. Scenarios against one proxy run concurrently where they are independent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from secure_setup import (
    HOST,
    UA_NAME,
    UA_NUMBER,
    UA_TAG,
    Capture,
    Line,
    PhoneSpec,
    Pki,
    ProxyProc,
    TestPhone,
    UpstreamRig,
    Watcher,
    audio_report,
    classify_outside_flows,
    dump_on_failure,
    leg_stats,
)
from xsipura_ua import (
    MSG_CALLEE_HELLO,
    MSG_CALLER_HELLO,
    NO_RESPONSE,
    Call,
    Subscriber,
    XsipuraUA,
    decode_body,
    parse_hello,
    pattern_source,
    uri_user,
)

from proxy.demo.phone import payload_for
from testkit.ports import media_range, reserve_udp
from testkit.processes import processes, until
from testkit.proxy import start_proxies

SRTP_DROPS = ("srtp_auth", "srtp_replay", "srtp_protect")
SECURE_SECONDS = 1.5
"""How long each secured call runs before it is measured and hung up (50 packets/s)."""
SHORT_TONE = "397@-19,507@-19;0.4(.2/.1/1,.1/0/2)"
"""The factory tone's beep pair without its 2 s lead-in: over before a call is measured.
(The back-to-back test keeps the factory tone and runs its calls past its first pair.)"""
FACTORY_TONE_FIRST_PAIR_S = 2.4


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def future(days: int = 30) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def srtp_drops(stats: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in stats.get("drops", {}).items() if k in SRTP_DROPS and v}


def check_audio(phone: TestPhone, sent: int, tone: int, who: str) -> None:
    """``phone`` heard the far end's audio exactly: every packet intact but the ones the
    proxy mixed the secure-call tone into, no gap, no duplicate, (almost) all of it."""
    report = audio_report(phone)
    assert report["contiguous"], f"{who}: gaps/duplicates in what it heard: {report}"
    assert report["altered"] == tone, f"{who}: altered {report['altered']} != tone {tone}"
    assert report["tone_only"] == tone, f"{who}: altered by more than a tone: {report}"
    assert report["packets"] >= sent - 10, f"{who}: heard {report['packets']} of {sent}"
    if phone.peer_tag is None:  # the demo phone's own Reception counters agree
        assert (phone.rx.packets, phone.rx.altered) == (report["packets"], tone), phone.rx


# ======================================================================================
# 1. Two proxies back to back
# ======================================================================================

SITE_A = [("Alice Smith", "14085551001"), ("Carol White", "14085551002")]
SITE_B = [("Bob Jones", "14085552001"), ("Dave Brown", "14085552002")]


def test_two_proxies_secure_both_directions_srtp_on_the_wire(pki: Pki, tmp_path: Path) -> None:
    """A1 calls B1 (proxy A is the x-sipura caller) while B2 calls A2 (proxy B is)."""
    phones = {user: PhoneSpec(name, user, 0xA0 + i)
              for i, (name, user) in enumerate(SITE_A + SITE_B)}  # fmt: skip
    (a1, a2), (b1, b2) = ([phones[u] for _, u in site] for site in (SITE_A, SITE_B))
    proxy_a, proxy_b = ProxyProc("A", tmp_path), ProxyProc("B", tmp_path)
    tshark = shutil.which("tshark")
    with processes() as procs, contextlib.ExitStack() as cleanup:
        for spec in phones.values():
            cleanup.callback(spec.close)
        capture = None
        if tshark:
            bpf = (f"udp and (portrange {proxy_a.media[0]}-{proxy_a.media[1]} or "
                   f"portrange {proxy_b.media[0]}-{proxy_b.media[1]})")  # fmt: skip
            capture = Capture(tmp_path / "media.pcapng", bpf)
            capture.start(procs)
        mcs = pki.issue_with_cli(procs, tmp_path, SITE_A + SITE_B)  # the `mc` CLI
        settings = {"grace_ms": 1000, "handshake_timeout_ms": 3000}
        for proxy, site, other in ((proxy_a, (a1, a2), proxy_b), (proxy_b, (b1, b2), proxy_a)):
            lines = [Line(p.user, mcs[p.user], contact=p.contact) for p in site]
            proxy.configure(lines, upstream=other.outside, xsipura=settings)
        start_proxies(procs, proxy_a, proxy_b)
        if capture is not None:
            capture.wait_ready()
        with dump_on_failure(proxy_a, proxy_b):
            run(_back_to_back(proxy_a, proxy_b, a1, a2, b1, b2))
            if capture is not None:
                capture.stop()
                flows = classify_outside_flows(
                    capture.packets(), proxy_a.media, proxy_b.media,
                    [p.marker for p in phones.values()], [p.rtp_port for p in phones.values()],
                )  # fmt: skip
                _check_wire(flows)
    if capture is None:
        pytest.skip("tshark is not installed: the calls were checked, the wire was not")


async def _back_to_back(
    proxy_a: ProxyProc, proxy_b: ProxyProc, a1: PhoneSpec, a2: PhoneSpec, b1: PhoneSpec,
    b2: PhoneSpec,
) -> None:  # fmt: skip
    p_a1, p_b1 = a1.make(peer_marker=b1.marker), b1.make(peer_marker=a1.marker)
    p_b2, p_a2 = b2.make(peer_marker=a2.marker), a2.make(peer_marker=b2.marker)
    phones = (p_a1, p_a2, p_b1, p_b2)
    for phone in phones:
        await phone.start()
    try:
        async with Watcher(proxy_a) as wa, Watcher(proxy_b) as wb:
            p_a1.dial(f"sip:{b1.user}@{HOST}:{proxy_a.inside}", (HOST, proxy_a.inside))
            p_b2.dial(f"sip:{a2.user}@{HOST}:{proxy_b.inside}", (HOST, proxy_b.inside))
            await until(lambda: all(p.answered.is_set() for p in phones), 5, "both calls up")
            expected = [  # watcher, line, role, peer (name, number)
                (wa, a1, "caller", b1), (wb, b1, "callee", a1),
                (wb, b2, "caller", a2), (wa, a2, "callee", b2),
            ]  # fmt: skip
            for watcher, line, role, peer in expected:
                call = await watcher.wait_secure_state(line.user)
                secure = call["secure"]
                assert (secure["state"], secure["role"], secure["reason"]) == (
                    "secure", role, None
                ), f"{watcher.proxy.name} line {line.user}: {secure}"  # fmt: skip
                assert (secure["peer_name"], secure["peer_user_id"]) == (peer.name, peer.user)
            await asyncio.sleep(FACTORY_TONE_FIRST_PAIR_S + 0.4)
            snapshot = {}
            for watcher, line, _, _ in expected:
                snapshot[line.user] = await watcher.fresh_call(line.user)
            p_a1.hang_up()
            p_b2.hang_up()
            await until(lambda: all(p.ended.is_set() for p in phones), 5, "both calls ended")
            await until(lambda: not wa.status["calls"] and not wb.status["calls"], 5,
                        "the proxies to drop the calls")  # fmt: skip
            for watcher in (wa, wb):
                status = await watcher.refresh()
                stats = status["stats"]
                assert stats["secured"] == 2, stats
                assert stats["clear_reasons"] == {}, stats
                # each proxy checked two peer MCs (one per role), once each
                cache = status["xsipura"]["mc_cache"]
                assert cache["entries"] == 2 and cache["misses"] == 2, cache
    finally:
        for phone in phones:
            phone.close()
    for line, call in snapshot.items():
        assert call is not None, line
        outside = leg_stats(call, "outside")
        assert outside["packets_encrypted"] >= 50, (line, outside)
        assert outside["packets_decrypted"] >= 50, (line, outside)
        assert srtp_drops(outside) == {}, (line, outside)
    # Each phone heard the far phone exactly; the tone is mixed in by its own proxy.
    for phone, far in ((p_b1, p_a1), (p_a1, p_b1), (p_a2, p_b2), (p_b2, p_a2)):
        tone = leg_stats(snapshot[phone.user], "inside")["tone_packets"]
        assert tone > 0, f"no secure-call tone toward {phone.name}"
        check_audio(phone, far.sent, tone, phone.name)
        assert any(f'"${far.name}"' in i for i in phone.identities), phone.identities


def _check_wire(flows: dict[tuple[int, int], list[str]]) -> None:
    """Four RTP flows between the proxies (two calls, both ways): plain RTP until the
    sender's switch-over, SRTP from then on, and plenty of it."""
    secured = {flow: kinds for flow, kinds in flows.items() if "srtp" in kinds}
    assert len(secured) == 4, {flow: Counter(kinds) for flow, kinds in flows.items()}
    for flow, kinds in flows.items():
        others = [k for k in kinds if k not in ("plain", "srtp")]
        assert not others, f"flow {flow}: not RTP/SRTP as expected: {others[:5]}"
        first = kinds.index("srtp")
        assert "plain" not in kinds[first:], f"flow {flow}: plain RTP after SRTP: {kinds}"
        assert kinds.count("srtp") >= 50, f"flow {flow}: {Counter(kinds)}"


# ======================================================================================
# 2, 4, 5. One proxy against the independent UA (the proxy's upstream)
# ======================================================================================

U_LINES = {  # scenario: (name, number, secure_by_default)
    "caller": ("Paul Caller", "14155550001", True),
    "callee": ("Quinn Callee", "14155550002", True),
    "star18": ("Rita Eighteen", "14155550003", False),
    "star19": ("Sam Nineteen", "14155550004", True),
    "hold": ("Tina Hold", "14155550005", True),
}


@pytest.fixture(scope="module")
def upstream(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRig]:
    directory = tmp_path_factory.mktemp("upstream")
    rig = UpstreamRig(pki, ProxyProc("U", directory), reserve_udp(),
                      Subscriber.issue(pki.ca, UA_NAME, UA_NUMBER, future()))  # fmt: skip
    lines = []
    for index, (key, (name, number, by_default)) in enumerate(U_LINES.items()):
        spec = rig.phones[key] = PhoneSpec(name, number, 0xC0 + index)
        lines.append(Line(number, pki.line_mc(name, number), contact=spec.contact,
                          secure_by_default=by_default))  # fmt: skip
    settings = {"grace_ms": 1000, "handshake_timeout_ms": 3000, "tone": SHORT_TONE}
    rig.proxy.configure(lines, upstream=rig.ua_port, xsipura=settings)
    with processes() as procs:
        start_proxies(procs, rig.proxy)
        yield rig
    rig.ua_socket.close()
    for spec in rig.phones.values():
        spec.close()


def ua_received(call: Call, marker: int, *, secure: bool | None = None, since: float = 0.0
                ) -> tuple[int, int]:  # fmt: skip
    """(packets, intact) the UA received in ``call``: intact = exactly a payload the phone
    (``marker``) sent. The phone's sequence number is read from the payload itself: the
    proxy may renumber packets on the SRTP leg (a phone that restarts its stream)."""
    got = [p for p in call.media.received
           if p.at >= since and (secure is None or p.secure == secure)]  # fmt: skip
    return len(got), sum(1 for p in got if phone_payload(p.payload, marker))


def phone_payload(payload: bytes, marker: int) -> bool:
    if len(payload) < 4:
        return False
    return payload == payload_for(int.from_bytes(payload[2:4], "big"), marker)


def ua_rx(ua: XsipuraUA, method: str, call_id: str | None = None) -> list[Any]:
    return [m for kind, _, m in ua.sip_log if kind == "rx" and m.is_request
            and m.method == method and (call_id is None or m.call_id == call_id)]  # fmt: skip


async def _incoming(ua: XsipuraUA, user: str, timeout: float = 5.0) -> Call:
    """The UA's incoming call from the line ``user`` (concurrent calls are told apart)."""

    def find() -> Call | None:
        for call in ua.calls.values():
            invite = call.invite
            if call.role == "callee" and f"sip:{user}@" in ((invite and invite.get("from")) or ""):
                return call
        return None

    found: Call = await until(find, timeout, f"the UA to receive the call from {user}")
    return found


def test_proxy_as_xsipura_caller_against_independent_ua(upstream: UpstreamRig) -> None:
    """Inside phone -> proxy (x-sipura caller) -> the UA (callee, MC of the dialled number)."""
    with dump_on_failure(upstream.proxy):
        run(_proxy_caller(upstream))


async def _proxy_caller(rig: UpstreamRig) -> None:
    spec = rig.phones["caller"]
    phone = spec.make(peer_tag=UA_TAG)
    async with rig.ua() as ua, Watcher(rig.proxy) as watcher:
        await phone.start()
        try:
            phone.dial(f"sip:{UA_NUMBER}@{HOST}:{rig.proxy.inside}", (HOST, rig.proxy.inside))
            call = await _incoming(ua, spec.user)
            state = (await watcher.wait_secure_state(spec.user))["secure"]
            assert (state["state"], state["role"], state["reason"]) == ("secure", "caller", None)
            assert (state["peer_name"], state["peer_user_id"]) == (UA_NAME, UA_NUMBER)
            assert await call.wait_outcome(5) == "secure", call.reason
            assert (call.peer_name, call.peer_user_id) == (spec.name, spec.user)
            await asyncio.sleep(SECURE_SECONDS)
            snap = await watcher.fresh_call(spec.user)
            phone.hang_up()
            await until(lambda: call.state == "terminated", 5, "the UA to get the BYE")
        finally:
            phone.close()
    assert snap is not None
    _check_secured_with_ua(snap, ua, call, phone, spec)


def proxy_hello_ssrc(ua: XsipuraUA, call: Call) -> int:
    """The SSRC the proxy announced in its Hello: the Caller Hello (an INFO the UA got) or
    the Callee Hello (in the 200 to the UA's first INFO)."""
    for kind, _, message in ua.sip_log:
        if kind != "rx" or message.call_id != call.call_id or not message.body.strip():
            continue
        if message.is_request and message.method == "INFO":
            return parse_hello(decode_body(message.body), MSG_CALLER_HELLO)[1]
        if not message.is_request and message.cseq[1] == "INFO" and message.status == 200:
            return parse_hello(decode_body(message.body), MSG_CALLEE_HELLO)[1]
    raise AssertionError("no Hello from the proxy in the UA's SIP log")


def _check_secured_with_ua(snap: dict[str, Any], ua: XsipuraUA, call: Call, phone: TestPhone,
                           spec: PhoneSpec) -> None:  # fmt: skip
    # Profile §2: the SSRC in the Hello is the one the sender's SRTP stream uses.
    ssrc = proxy_hello_ssrc(ua, call)
    wire = {p.ssrc for p in call.media.received if p.secure}
    assert wire == {ssrc}, f"SRTP SSRCs {wire} != announced {ssrc:08x}"
    outside = leg_stats(snap, "outside")
    assert outside["packets_encrypted"] >= 50 and outside["packets_decrypted"] >= 50, outside
    assert srtp_drops(outside) == {}, outside
    media = call.media
    assert media.srtp_auth_fail == 0 and media.rx_malformed == 0, media.counters
    packets, intact = ua_received(call, spec.marker, secure=True)
    assert packets >= 50 and intact == packets, (packets, intact, media.counters)
    packets, intact = ua_received(call, spec.marker, secure=False)
    assert intact == packets, "plain RTP before the switch-over was not the phone's audio"
    tone = leg_stats(snap, "inside")["tone_packets"]
    assert tone > 0
    check_audio(phone, media.tx_plain + media.tx_srtp, tone, spec.name)
    assert any(f'"${UA_NAME}"' in i for i in phone.identities), phone.identities


def test_proxy_as_xsipura_callee_against_independent_ua(upstream: UpstreamRig) -> None:
    """The UA calls the line's number on the proxy's outside port; the phone answers."""
    with dump_on_failure(upstream.proxy):
        run(_proxy_callee(upstream))


async def _proxy_callee(rig: UpstreamRig) -> None:
    spec = rig.phones["callee"]
    phone = spec.make(peer_tag=UA_TAG)
    async with rig.ua(name="ua-caller") as ua, Watcher(rig.proxy) as watcher:
        await phone.start()
        try:
            call = await ua.call(f"sip:{spec.user}@{HOST}:{rig.proxy.outside}",
                                 dest=(HOST, rig.proxy.outside))  # fmt: skip
            assert call.status == 200, call.status
            assert await call.wait_outcome(5) == "secure", call.reason
            assert call.reason == "Callee Final received", call.reason
            assert (call.peer_name, call.peer_user_id) == (spec.name, spec.user)
            state = (await watcher.wait_secure_state(spec.user))["secure"]
            assert (state["state"], state["role"], state["reason"]) == ("secure", "callee", None)
            assert (state["peer_name"], state["peer_user_id"]) == (UA_NAME, UA_NUMBER)
            await asyncio.sleep(SECURE_SECONDS)
            snap = await watcher.fresh_call(spec.user)
            assert await call.hangup(timeout=5) == 200
            await until(phone.ended.is_set, 5, "the phone to get the BYE")
        finally:
            phone.close()
    assert snap is not None
    _check_secured_with_ua(snap, ua, call, phone, spec)


def test_star18_secures_a_call_from_a_clear_by_default_line(upstream: UpstreamRig) -> None:
    with dump_on_failure(upstream.proxy):
        run(_star_code(upstream, "star18", "*18"))


def test_star19_keeps_a_call_from_a_secure_by_default_line_clear(upstream: UpstreamRig) -> None:
    with dump_on_failure(upstream.proxy):
        run(_star_code(upstream, "star19", "*19"))


async def _star_code(rig: UpstreamRig, key: str, prefix: str) -> None:
    spec = rig.phones[key]
    phone = spec.make(peer_tag=UA_TAG)
    async with rig.ua() as ua, Watcher(rig.proxy) as watcher:
        await phone.start()
        try:
            uri = f"sip:{prefix}{UA_NUMBER}@{HOST}:{rig.proxy.inside}"
            phone.dial(uri, (HOST, rig.proxy.inside))
            call = await _incoming(ua, spec.user)
            assert call.invite is not None
            # The prefix is the phone's instruction to the proxy: the peer never sees it.
            assert uri_user(call.invite.uri) == UA_NUMBER, call.invite.uri
            assert prefix not in (call.invite.get("to") or ""), call.invite.get("to")
            await until(phone.answered.is_set, 5, "the answer")
            if prefix == "*18":
                state = (await watcher.wait_secure_state(spec.user))["secure"]
                assert (state["state"], state["role"]) == ("secure", "caller"), state
                assert state["peer_user_id"] == UA_NUMBER  # dialled number without *18
                assert await call.wait_outcome(5) == "secure", call.reason
            await asyncio.sleep(SECURE_SECONDS)
            snap = await watcher.fresh_call(spec.user)
            phone.hang_up()
            await until(lambda: call.state == "terminated", 5, "the UA to get the BYE")
        finally:
            phone.close()
    assert snap is not None
    outside = leg_stats(snap, "outside")
    if prefix == "*18":
        assert outside["packets_encrypted"] >= 50, outside
        packets, intact = ua_received(call, spec.marker, secure=True)
        assert packets >= 50 and intact == packets
        return
    secure = snap["secure"]
    assert secure is None or secure["state"] == "clear", secure
    assert ua_rx(ua, "INFO", call.call_id) == [], "an INFO was sent on a *19 call"
    assert call.outcome is None and not call.secured
    assert outside["packets_encrypted"] == 0 and outside["packets_decrypted"] == 0, outside
    packets, intact = ua_received(call, spec.marker, secure=False)
    assert packets >= 50 and intact == packets, (packets, intact)
    assert call.media.srtp_rx_ok == 0
    report = audio_report(phone)
    assert report["altered"] == 0 and report["packets"] >= 50, report


def test_hold_and_resume_keep_a_secured_call_secure(upstream: UpstreamRig) -> None:
    """The inside phone holds and resumes the secured call twice, by re-INVITE: first
    ``a=sendonly`` (it keeps sending, music on hold) then ``a=sendrecv``; then
    ``a=inactive`` (it stops sending) and ``a=sendrecv`` with a new RTP stream (new SSRC
    and sequence number, as many phones do on resume). The re-INVITEs pass through; the
    call stays secure under the same key and SRTP keeps flowing both ways."""
    with dump_on_failure(upstream.proxy):
        run(_hold_resume(upstream))


async def _hold_resume(rig: UpstreamRig) -> None:
    spec = rig.phones["hold"]
    phone = spec.make(peer_tag=UA_TAG)
    steps = ("sendonly", "sendrecv", "inactive", "sendrecv")
    async with rig.ua() as ua, Watcher(rig.proxy) as watcher:
        before = (await watcher.refresh())["stats"]
        await phone.start()
        try:
            phone.dial(f"sip:{UA_NUMBER}@{HOST}:{rig.proxy.inside}", (HOST, rig.proxy.inside))
            call = await _incoming(ua, spec.user)
            await watcher.wait_secure_state(spec.user)
            assert await call.wait_outcome(5) == "secure", call.reason
            await asyncio.sleep(0.5)
            snaps = [await watcher.fresh_call(spec.user)]
            marks = []
            for step, direction in enumerate(steps):
                if direction == "inactive":
                    phone.pause_media()
                response = await phone.reinvite(direction)
                assert response.status == 200, response.status
                if step == 3:  # resume with a new stream, its sequence numbers far behind
                    phone.restart_media(ssrc=phone.ssrc ^ 0x5A5A5A5A,
                                        seq=(phone.last_sent_seq - 20000) & 0xFFFF)  # fmt: skip
                marks.append(time.monotonic())
                reinvites = [m for m in ua_rx(ua, "INVITE", call.call_id) if m.body]
                assert f"a={direction}" in reinvites[-1].body.decode(), reinvites[-1].body
                snaps.append(await _grown(watcher, spec.user, snaps[-1], direction))
            phone.hang_up()
            await until(lambda: call.state == "terminated", 5, "the UA to get the BYE")
            after = (await watcher.refresh())["stats"]
        finally:
            phone.close()
    assert len(ua_rx(ua, "INVITE", call.call_id)) == 1 + len(steps)
    for snap in snaps:
        assert snap is not None
        secure = snap["secure"]
        assert (secure["state"], secure["reason"], secure["generation"]) == (
            "secure", None, snaps[0]["secure"]["generation"]), secure  # fmt: skip
        assert srtp_drops(leg_stats(snap, "outside")) == {}, leg_stats(snap, "outside")
    outside = [leg_stats(s, "outside") for s in snaps if s is not None]
    for name in ("packets_encrypted", "packets_decrypted"):
        values = [o[name] for o in outside]
        grew = [b - a for a, b in itertools.pairwise(values)]
        if name == "packets_encrypted":
            grew.pop(2)  # the phone sent nothing while inactive
        assert all(n >= 25 for n in grew), (name, values)
    assert after["secured"] == before["secured"] + 1
    assert after["clear_reasons"] == before["clear_reasons"]
    media = call.media
    assert media.srtp_auth_fail == 0 and media.rx_malformed == 0, media.counters
    packets, intact = ua_received(call, spec.marker, secure=True, since=marks[-1])
    assert packets >= 25 and intact == packets, (packets, intact, media.counters)
    assert ua_received(call, spec.marker, secure=False, since=marks[0])[0] == 0
    report = audio_report(phone, since=marks[-1])
    assert report["packets"] >= 25 and report["altered"] == 0, report
    assert audio_report(phone)["contiguous"], audio_report(phone)


async def _grown(
    watcher: Watcher, user: str, last: dict[str, Any] | None, direction: str
) -> dict[str, Any] | None:
    """The call's state once SRTP has flowed 25+ packets each way since ``last`` (the
    phone sends nothing while inactive), waiting at least 0.8 s and at most 8 s: a busy
    machine delays the workers' counter reports, not what they count."""
    wanted = ("packets_decrypted",) if direction == "inactive" else (
        "packets_encrypted", "packets_decrypted")  # fmt: skip
    start = time.monotonic()
    await asyncio.sleep(0.8)
    while True:
        snap = await watcher.fresh_call(user)
        if snap is None or last is None or time.monotonic() - start > 8:
            return snap
        now, before = leg_stats(snap, "outside"), leg_stats(last, "outside")
        if all(now[name] - before[name] >= 25 for name in wanted):
            return snap
        await asyncio.sleep(0.1)


# ======================================================================================
# 3. Every reason to stay clear, with and without require_secure
# ======================================================================================


@dataclass(frozen=True)
class Case:
    ua: str
    """Which misbehaving UA: its MC, its answers."""
    reason: str | None
    """The proxy's ClearReason; None: no verdict (the peer never started stage 2)."""
    require: bool
    proxy_role: str = "caller"

    @property
    def id(self) -> str:
        kind = "require" if self.require else "clear"
        return f"{self.ua}-{self.proxy_role}-{kind}"


UA_KINDS = {  # kind: (reason, proxy roles it is tried in)
    "untrusted_ca": ("untrusted_ca", ("caller", "callee")),
    "expired": ("expired", ("caller", "callee")),
    "mismatch": ("user_id_mismatch", ("caller",)),
    "info_501": ("peer_unsupported", ("caller",)),
    "unadvertised": ("peer_unsupported", ("caller",)),
    "no_response": ("timeout", ("caller",)),
    "silent": ("peer_unsupported", ("callee",)),  # a plain SIP caller: never starts stage 2
}
CASES = [
    Case(kind, None if kind == "silent" and not require else reason, require, role)
    for kind, (reason, roles) in UA_KINDS.items()
    for role in roles
    for require in (False, True)
]


@dataclass
class MatrixRig:
    proxy: ProxyProc
    results: dict[str, BaseException | None]
    status: dict[str, Any]


@pytest.fixture(scope="module")
def matrix(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MatrixRig]:
    """Proxy M (no upstream: each phone dials its UA's URI) with one line per case; all
    cases run at once, each against the UA of its kind."""
    directory = tmp_path_factory.mktemp("matrix")
    proxy = ProxyProc("M", directory, media=media_range(2 * len(CASES) + 8))
    specs = {case.id: PhoneSpec(f"Line {i}", f"1212555{i:04d}", 0x10 + i)
             for i, case in enumerate(CASES)}  # fmt: skip
    lines = [Line(spec.user, pki.line_mc(spec.name, spec.user), contact=spec.contact,
                  require_secure=case.require) for case, spec in zip(CASES, specs.values(),
                                                                    strict=True)]  # fmt: skip
    proxy.configure(
        lines, xsipura={"grace_ms": 1000, "handshake_timeout_ms": 1500, "tone": SHORT_TONE}
    )
    with processes() as procs:
        start_proxies(procs, proxy)
        try:
            results, status = run(_run_matrix(pki, proxy, specs), timeout=40)
        finally:
            for spec in specs.values():
                spec.close()
        yield MatrixRig(proxy, results, status)


async def _run_matrix(pki: Pki, proxy: ProxyProc, specs: dict[str, PhoneSpec]
                      ) -> tuple[dict[str, BaseException | None], dict[str, Any]]:  # fmt: skip
    good = future()
    expired = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    identities = {  # kind: (MC's CA, user id, expiry), and UA options
        "untrusted_ca": (Subscriber.issue(pki.other_ca, "Ursula Untrusted", "13105550001", good),
                         {}),
        "expired": (Subscriber.issue(pki.ca, "Ed Expired", "13105550002", expired), {}),
        "mismatch": (Subscriber.issue(pki.ca, "Mallory Mismatch", "13105559999", good), {}),
        "info_501": (Subscriber.issue(pki.ca, "Nina Five-Oh-One", "13105550004", good),
                     {"info_response": 501}),
        "unadvertised": (Subscriber.issue(pki.ca, "Oscar Quiet", "13105550005", good),
                         {"supported": False}),
        "no_response": (Subscriber.issue(pki.ca, "Sid Silent", "13105550006", good),
                        {"info_response": NO_RESPONSE}),
        "silent": (None, {}),
    }  # fmt: skip
    dialled = {kind: identity.user_id if identity else "13105550007"
               for kind, (identity, _) in identities.items()}  # fmt: skip
    dialled["mismatch"] = "13105550003"  # the number dialled is not the MC's
    uas = {
        kind: XsipuraUA(name=kind, user=dialled[kind], identity=identity,
                        trusted_ca=[pki.ca.n], payload_source=pattern_source(0x60 + i),
                        grace=1.0, **options)
        for i, (kind, (identity, options)) in enumerate(identities.items())
    }  # fmt: skip
    for ua in uas.values():
        await ua.start()
    try:
        async with Watcher(proxy) as watcher:
            runs = [
                _run_case(case, specs[case.id], uas[case.ua], dialled[case.ua], proxy, watcher)
                for case in CASES
            ]
            outcomes = await asyncio.gather(*runs, return_exceptions=True)
            with contextlib.suppress(AssertionError):  # test_clear_reasons_are_counted checks
                await until(lambda: not watcher.status["calls"], 3, "every call to end")
            status = await watcher.refresh()
    finally:
        for ua in uas.values():
            await ua.close()
    results: dict[str, BaseException | None] = {
        case.id: outcome if isinstance(outcome, BaseException) else None
        for case, outcome in zip(CASES, outcomes, strict=True)
    }
    return results, status


async def _run_case(case: Case, spec: PhoneSpec, ua: XsipuraUA, number: str, proxy: ProxyProc,
                    watcher: Watcher) -> None:  # fmt: skip
    assert ua.payload_source is not None
    phone = spec.make(peer_tag=ua.payload_source(0)[4])  # pattern_source(tag): byte 4
    await phone.start()
    try:
        if case.proxy_role == "caller":
            phone.dial(f"sip:{number}@{HOST}:{ua.port}", (HOST, proxy.inside))
            call = await _incoming(ua, spec.user)
            await until(phone.answered.is_set, 5, "the answer")
        else:
            call = await ua.call(f"sip:{spec.user}@{HOST}:{proxy.outside}",
                                 dest=(HOST, proxy.outside))  # fmt: skip
            assert call.status == 200, call.status
        if case.require:
            await _check_hung_up(case, phone, ua, call, watcher, spec)
        else:
            await _check_stays_clear(case, phone, ua, call, watcher, spec)
    finally:
        phone.close()
    _check_ua_view(case, ua, call)


async def _check_hung_up(case: Case, phone: TestPhone, ua: XsipuraUA, call: Call,
                         watcher: Watcher, spec: PhoneSpec) -> None:  # fmt: skip
    """require_secure: both legs get a BYE carrying the reason; the call is gone."""
    await until(lambda: call.state == "terminated" and phone.ended.is_set(), 6, "both BYEs")
    expected = f'text="x-sipura: {case.reason}"'
    byes = ua_rx(ua, "BYE", call.call_id)
    assert len(byes) >= 1 and expected in (byes[0].get("reason") or ""), [
        b.get("reason") for b in byes]  # fmt: skip
    phone_byes = phone.requests_named("BYE")
    assert phone_byes and expected in (phone_byes[0].get("reason") or ""), [
        b.get("reason") for b in phone_byes]  # fmt: skip
    await until(lambda: watcher.call(spec.user) is None, 3, "the call to be dropped")


async def _check_stays_clear(case: Case, phone: TestPhone, ua: XsipuraUA, call: Call,
                             watcher: Watcher, spec: PhoneSpec) -> None:  # fmt: skip
    """No require_secure: the call carries on in the clear, media flowing both ways."""
    if case.reason is None:  # the caller never starts stage 2: the call simply stays clear
        await asyncio.sleep(2.0)  # longer than handshake_timeout_ms
        secure = (await watcher.fresh_call(spec.user) or {}).get("secure") or {}
        assert (secure.get("state"), secure.get("reason")) == ("waiting", None), secure
    else:
        secure = (await watcher.wait_secure_state(spec.user))["secure"]
        assert (secure["state"], secure["reason"], secure["role"]) == (
            "clear", case.reason, case.proxy_role), secure  # fmt: skip
    first = await watcher.fresh_call(spec.user)
    since = time.monotonic()
    await asyncio.sleep(1.0)
    last = await watcher.fresh_call(spec.user)
    assert first is not None and last is not None, "the call ended"
    assert last["state"] == "confirmed", last["state"]
    for side in ("inside", "outside"):
        a, b = leg_stats(first, side), leg_stats(last, side)
        for name in ("packets_in", "packets_out"):
            assert b[name] >= a[name] + 30, (side, name, a[name], b[name])
        assert b["packets_encrypted"] == 0 and b["packets_decrypted"] == 0, (side, b)
        assert b["tone_packets"] == 0, (side, b)
    assert not call.secured and call.media.srtp_rx_ok == 0
    packets, intact = ua_received(call, spec.marker, secure=False, since=since)
    assert packets >= 30 and intact == packets, (packets, intact)
    report = audio_report(phone, since=since)
    assert report["packets"] >= 30 and report["altered"] == 0, report
    assert not phone.requests_named("BYE")
    if case.proxy_role == "caller":
        phone.hang_up()
        await until(lambda: call.state == "terminated", 5, "the UA to get the BYE")
    else:
        assert await call.hangup(timeout=5) == 200
        await until(phone.ended.is_set, 5, "the phone to get the BYE")


def _check_ua_view(case: Case, ua: XsipuraUA, call: Call) -> None:
    """What the independent peer saw of the handshake."""
    infos = ua_rx(ua, "INFO", call.call_id)
    if case.ua == "silent":
        assert infos == [] and call.info_codes == [], "the plain caller got/sent an INFO"
        return
    if case.proxy_role == "callee":  # the UA was the caller; the proxy refused its MC
        assert call.info_codes[:1] == [488], call.info_codes
        return
    if case.ua == "unadvertised":
        assert infos == [], "an INFO went to a peer that did not advertise x-sipura"
        return
    assert infos, "no Caller Hello reached the UA"
    first = {"info_501": 501, "no_response": None}.get(case.ua, 200)
    assert call.info_codes[:1] == [first], call.info_codes
    assert len(call.info_codes) == 1, "a Caller Final after a failed check"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_clear_reason_end_to_end(matrix: MatrixRig, case: Case) -> None:
    error = matrix.results[case.id]
    if error is not None:
        with dump_on_failure(matrix.proxy):
            raise error


def test_clear_reasons_are_counted(matrix: MatrixRig) -> None:
    expected = Counter(case.reason for case in CASES if case.reason)
    stats = matrix.status["stats"]
    with dump_on_failure(matrix.proxy):
        assert matrix.status["calls"] == [], "calls left over after every case hung up"
        assert stats["clear_reasons"] == dict(expected), stats
        assert stats["secured"] == 0, stats
