"""Field telephony against SIPp through a real ``sipura-proxy run`` on 127.0.0.1.

One test (or a pair) per feature: registrations and forking to several devices, phones
behind NAT (media latching, keep-alives, the TCP CRLF pong), fax (T.38 re-INVITE with
UDPTL both ways), calls that never end or never answer (Timer C, session timers, the
on-hold RTP timeout), and forking/CANCEL corner cases (a second 2xx, a cancelled
re-INVITE). SIPp does the signalling; media is sent and received by the test's own UDP
sockets, which the SIPp parties announce in their SDP (``-key``), so every assertion is
about what the far end actually received: headers, bytes, source addresses, timings.
NAT is simulated with another loopback address in the SDP (``c=127.0.0.77`` while the
phone sends from 127.0.0.1). Attended transfer is tested with Kamailio in
``test_field_kamailio.py``.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from fieldkit import Peer, find, register, rtp, sdp_ports, trace, udptl, wait_trace

from testkit.ports import HOST, free_port

if TYPE_CHECKING:
    from conftest import Proxy, ProxyFactory, Sipp

TRANSPORTS = ["udp", "tcp"]
NAT_IP = "127.0.0.77"
LINE = "14085550100"


@dataclass
class Field:
    start_proxy: ProxyFactory
    sipp: Sipp
    peers: list[Peer]

    def peer(self) -> Peer:
        peer = Peer()
        self.peers.append(peer)
        return peer

    def proxy(self, upstream_port: int, transport: str = "udp", **tables: Any) -> Proxy:
        upstream = f"sip:{HOST}:{upstream_port}" + (";transport=tcp" if transport == "tcp" else "")
        return self.start_proxy(upstream, **tables)


@pytest.fixture
def field(start_proxy: ProxyFactory, sipp: Sipp) -> Iterator[Field]:
    rig = Field(start_proxy, sipp, [])
    yield rig
    for peer in rig.peers:
        peer.close()


def keys(**values: object) -> list[str]:
    """SIPp ``-key name value`` arguments."""
    args: list[str] = []
    for name, value in values.items():
        args += ["-key", name, str(value)]
    return args


def exchange(sender: Peer, dest: tuple[str, int], receiver: Peer, packets: list[bytes]) -> list:
    """Send ``packets`` (20 ms apart) and return what ``receiver`` got, with sources."""
    got: list[tuple[bytes, tuple[str, int]]] = []
    for packet in packets:
        sender.send(packet, dest)
        got += receiver.drain(0.02)
    return got + receiver.drain(0.3)


# --------------------------------------------------------------------------- 2. NAT


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_phone_behind_nat_gets_audio(field: Field, transport: str) -> None:
    """SDP says 127.0.0.77, the phone sends from 127.0.0.1: NAT detected on the phone's
    leg (latch "any"), the PBX's audio reaches the NAT address, none goes to the SDP's."""
    phone_media, pbx_media = field.peer(), field.peer()
    uas_port = free_port()
    proxy = field.proxy(uas_port, transport)
    callee = field.sipp.uas("field_uas_answer.xml", uas_port, transport,
                            extra=keys(pbx_port=pbx_media.port))  # fmt: skip
    caller = field.sipp.uac("field_uac_media.xml", proxy.inside, transport, extra=[
        "-s", "18005550199", *keys(caller="alice", phone_ip=NAT_IP, phone_port=phone_media.port)
    ])  # fmt: skip
    ok = wait_trace(caller.files["messages"], "received", "SIP/2.0 200")
    invite = wait_trace(callee.files["messages"], "received", "INVITE")
    inside = sdp_ports(ok.text)["audio"]
    outside = sdp_ports(invite.text)["audio"]
    assert inside[0] == outside[0] == HOST  # anchored on the proxy both ways

    # The phone talks (from 127.0.0.1, not the 127.0.0.77 its SDP said) ...
    heard = exchange(phone_media, inside, pbx_media, [rtp(i, 0x1111) for i in range(10)])
    assert [data for data, _ in heard] == [rtp(i, 0x1111) for i in range(10)]
    # ... and the PBX's audio comes back to where the phone's came from.
    back = exchange(pbx_media, outside, phone_media, [rtp(i, 0x2222) for i in range(10)])
    assert [data for data, _ in back] == [rtp(i, 0x2222) for i in range(10)]
    assert {src for _, src in back} == {inside}

    (call,) = proxy.calls()
    assert call["nat"] == ["inside"] and call["latch"]["inside"] == ["any"]
    assert call["media"]["inside"][0]["drops"].get("wrong_source", 0) == 0
    field.sipp.check(caller, callee)
    proxy.wait_idle()


def test_latch_sdp_drops_the_natted_phones_audio(field: Field) -> None:
    """``[media] latch = "sdp"``: today's strict rule, for comparison: the same phone's
    audio is dropped as wrong_source and nothing reaches it."""
    phone_media, pbx_media = field.peer(), field.peer()
    uas_port = free_port()
    proxy = field.proxy(uas_port, media={"latch": "sdp"})
    callee = field.sipp.uas("field_uas_answer.xml", uas_port, "udp",
                            extra=keys(pbx_port=pbx_media.port))  # fmt: skip
    caller = field.sipp.uac("field_uac_media.xml", proxy.inside, "udp", extra=[
        "-s", "18005550199", *keys(caller="alice", phone_ip=NAT_IP, phone_port=phone_media.port)
    ])  # fmt: skip
    inside = sdp_ports(wait_trace(caller.files["messages"], "received", "SIP/2.0 200").text)
    assert not exchange(phone_media, inside["audio"], pbx_media, [rtp(1, 0x1111)])
    (call,) = proxy.calls()
    assert call["nat"] == [] and call["media"]["inside"][0]["drops"]["wrong_source"] == 1
    field.sipp.check(caller, callee)


def test_tcp_keepalive_ping_pong(field: Field) -> None:
    """RFC 5626 §4.4.1 on the proxy's inside TCP listener: CRLF CRLF -> CRLF."""
    proxy = field.proxy(free_port())
    with socket.create_connection((HOST, proxy.inside), timeout=5) as conn:
        for _ in range(3):
            start = time.monotonic()
            conn.sendall(b"\r\n\r\n")
            assert conn.recv(16) == b"\r\n"
            assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_keepalive_options_to_a_natted_contact_then_drop_it(field: Field, transport: str) -> None:
    """A contact registered from behind NAT gets OPTIONS over its flow every keepalive_s;
    once it stops answering (here after two), its binding is dropped and logged."""
    proxy = field.proxy(free_port(), inside={"keepalive_s": 1}, sip={"t1_ms": 100})
    device = free_port()
    registered = register(proxy.inside, device, LINE, contact_host=NAT_IP, transport=transport)
    assert registered.status == 200
    (binding,) = proxy.status()["bindings"][LINE]
    assert binding["nat"] is True and binding["flow"].startswith(f"{HOST}:{device}/")
    phone = field.sipp.uas("field_uas_keepalive.xml", device, transport, calls=2)
    field.sipp.check(phone)
    probes = [m for m in trace(phone.files["messages"]) if m.first_line.startswith("OPTIONS")]
    assert len(probes) == 2
    gap = probes[1].at - probes[0].at
    assert 0.7 < gap < 2.0, gap  # keepalive_s = 1
    assert all(p.first_line.startswith(f"OPTIONS sip:{LINE}@{NAT_IP}:{device}") for p in probes)
    # no third answer: Timer F (64 x 100 ms) and the binding is gone
    deadline = time.monotonic() + 12
    while LINE in proxy.status()["bindings"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert LINE not in proxy.status()["bindings"]
    assert "no answer to keep-alive OPTIONS" in proxy.log_text()
    assert proxy.status()["registrations"]["keepalive"]["dropped"] == 1


# --------------------------------------------------------------------------- 3. registrations


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_inbound_call_forks_to_every_registered_device(field: Field, transport: str) -> None:
    """Two devices of one line, each with its own expiry; the PBX's call rings both, the
    first 200 wins, the other gets CANCEL (and answers 487)."""
    pbx_media = field.peer()
    proxy = field.proxy(free_port(), transport)
    desk, dect = free_port(), free_port()
    first = register(proxy.inside, desk, LINE, expires=600, transport=transport)
    second = register(proxy.inside, dect, LINE, expires=300, transport=transport)
    desk_uri = f"sip:{LINE}@{HOST}:{desk}" + (";transport=tcp" if transport == "tcp" else "")
    dect_uri = f"sip:{LINE}@{HOST}:{dect}" + (";transport=tcp" if transport == "tcp" else "")
    assert first.contacts == {desk_uri: 600}
    assert second.contacts[dect_uri] == 300 and 598 <= second.contacts[desk_uri] <= 600
    ringing = field.sipp.uas("uas_cancel.xml", desk, transport)
    answering = field.sipp.uas("field_uas_answer.xml", dect, transport,
                               extra=keys(pbx_port=field.peer().port))  # fmt: skip
    pbx = field.sipp.uac("field_uac_inbound.xml", proxy.outside, transport, extra=[
        "-s", LINE, *keys(caller="pbx", pbx_port=pbx_media.port)])  # fmt: skip
    field.sipp.check(pbx, ringing, answering)
    cancel = find(trace(ringing.files["messages"]), "received", "CANCEL")
    ok = find(trace(answering.files["messages"]), "sent", "SIP/2.0 200")
    assert cancel.at >= ok.at  # cancelled because the other one answered
    invites = [find(trace(run.files["messages"]), "received", "INVITE")
               for run in (ringing, answering)]  # fmt: skip
    assert len({m.header("Call-ID") for m in invites}) == 2  # one dialog per branch
    proxy.wait_idle()


def test_registered_user_without_a_line_is_reachable_in_the_clear(field: Field) -> None:
    proxy = field.proxy(free_port())
    device = free_port()
    assert register(proxy.inside, device, "alice").status == 200
    callee = field.sipp.uas("field_uas_answer.xml", device, "udp",
                            extra=keys(pbx_port=field.peer().port))  # fmt: skip
    pbx = field.sipp.uac("field_uac_inbound.xml", proxy.outside, "udp", extra=[
        "-s", "alice", *keys(caller="pbx", pbx_port=field.peer().port)])  # fmt: skip
    wait_trace(callee.files["messages"], "received", "ACK")
    (call,) = proxy.calls()
    assert call["line"] is None and call["secure"] is None
    field.sipp.check(pbx, callee)


# --------------------------------------------------------------------------- 4. fax


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_t38_reinvite_carries_udptl_both_ways(field: Field, transport: str) -> None:
    """m=audio 0 + m=image udptl t38: both m-lines relayed, the image stream anchored on
    the proxy, UDPTL byte for byte both ways (never SRTP-processed or renumbered)."""
    phone_fax, pbx_fax = field.peer(), field.peer()
    uas_port = free_port()
    proxy = field.proxy(uas_port, transport)
    pbx = field.sipp.uas("field_uas_fax.xml", uas_port, transport,
                         extra=keys(pbx_port=field.peer().port, pbx_fax=pbx_fax.port))  # fmt: skip
    ata = field.sipp.uac("field_uac_fax.xml", proxy.inside, transport, extra=[
        "-s", "18005550199",
        *keys(caller="fax", phone_port=field.peer().port, phone_fax=phone_fax.port)])  # fmt: skip
    reoffer = wait_trace(pbx.files["messages"], "received", "INVITE", 1)
    answer = wait_trace(ata.files["messages"], "received", "SIP/2.0 200", 1)
    for message in (reoffer.text, answer.text):
        assert re.search(r"^m=audio 0 RTP/AVP 0$", message, re.M), message
        assert re.search(r"^m=image \d+ udptl t38$", message, re.M), message
    outside = sdp_ports(reoffer.text)["image"]
    inside = sdp_ports(answer.text)["image"]
    for port in (outside[1], inside[1]):
        assert proxy.media[0] <= port <= proxy.media[1]
    sent = [udptl(i) for i in range(20)]
    assert [d for d, _ in exchange(phone_fax, inside, pbx_fax, sent)] == sent
    back = [udptl(1000 + i) for i in range(20)]
    got = exchange(pbx_fax, outside, phone_fax, back)
    assert [d for d, _ in got] == back and {src for _, src in got} == {inside}
    field.sipp.check(ata, pbx)
    proxy.wait_idle()


# --------------------------------------------------------------------------- 5. timers


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timer_c_cancels_a_call_that_never_answers(field: Field, transport: str) -> None:
    uas_port = free_port()
    proxy = field.proxy(uas_port, transport, sip={"timer_c_s": 2})
    callee = field.sipp.uas("uas_cancel.xml", uas_port, transport)
    caller = field.sipp.uac(
        "field_uac_timer_c.xml",
        proxy.inside,
        transport,
        extra=["-s", "18005550199", *keys(caller="alice", phone_port=field.peer().port)],
    )
    field.sipp.check(caller, callee)
    messages = trace(caller.files["messages"])
    waited = (
        find(messages, "received", "SIP/2.0 408").at - find(messages, "received", "SIP/2.0 180").at
    )
    assert 1.8 < waited < 3.0, waited
    uas = trace(callee.files["messages"])
    assert 1.8 < find(uas, "received", "CANCEL").at - find(uas, "sent", "SIP/2.0 180").at < 3.0
    assert proxy.status()["stats"]["timer_c_fired"] == 1
    proxy.wait_idle()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_session_timer_expiry_byes_both_legs(field: Field, transport: str) -> None:
    uas_port = free_port()
    proxy = field.proxy(uas_port, transport, media={"rtp_timeout_s": 0})
    callee = field.sipp.uas("field_uas_session.xml", uas_port, transport,
                            extra=keys(pbx_port=field.peer().port, se=2))  # fmt: skip
    caller = field.sipp.uac(
        "field_uac_session.xml",
        proxy.inside,
        transport,
        extra=["-s", "18005550199", *keys(caller="alice", phone_port=field.peer().port, se=2)],
    )
    wait_trace(callee.files["messages"], "received", "ACK")
    (call,) = proxy.calls()
    assert call["session_timer"]["interval_s"] == 2.0
    field.sipp.check(caller, callee)
    for run, ack in ((caller, "sent"), (callee, "received")):
        messages = trace(run.files["messages"])
        lasted = find(messages, "received", "BYE").at - find(messages, ack, "ACK").at
        assert 1.7 < lasted < 3.0, (run.name, lasted)
    assert proxy.status()["stats"]["sessions_expired"] == 1
    proxy.wait_idle()


def test_a_held_call_gets_the_on_hold_rtp_timeout(field: Field) -> None:
    uas_port = free_port()
    proxy = field.proxy(uas_port, media={"rtp_timeout_s": 1, "rtp_timeout_onhold_s": 3})
    callee = field.sipp.uas("field_uas_hold_silent.xml", uas_port, "udp",
                            extra=keys(pbx_port=field.peer().port))  # fmt: skip
    caller = field.sipp.uac(
        "field_uac_hold_silent.xml",
        proxy.inside,
        "udp",
        extra=["-s", "18005550199", *keys(caller="alice", phone_port=field.peer().port)],
    )
    field.sipp.check(caller, callee)
    messages = trace(caller.files["messages"])
    held = find(messages, "sent", "ACK", 1).at
    silence = find(messages, "received", "BYE").at - held
    assert 2.5 < silence < 4.5, silence  # the on-hold 3 s, not the 1 s of a live call
    proxy.wait_idle()


# --------------------------------------------------------------------------- 6. forking, CANCEL


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_second_2xx_with_another_to_tag_is_acked_and_byed(field: Field, transport: str) -> None:
    uas_port = free_port()
    proxy = field.proxy(uas_port, transport)
    callee = field.sipp.uas("field_uas_two_2xx.xml", uas_port, transport,
                            extra=keys(pbx_port=field.peer().port))  # fmt: skip
    caller = field.sipp.uac(
        "field_uac_media.xml",
        proxy.inside,
        transport,
        extra=[
            "-s",
            "18005550199",
            *keys(caller="alice", phone_ip=HOST, phone_port=field.peer().port),
        ],
    )
    field.sipp.check(caller, callee)
    oks = [m for m in trace(caller.files["messages"]) if m.first_line.startswith("SIP/2.0 200")]
    assert [m.header("CSeq") for m in oks] == ["1 INVITE", "2 BYE"]  # one dialog only
    assert proxy.status()["stats"]["dialogs_ended"] == 1
    proxy.wait_idle()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_of_a_pending_reinvite_is_relayed(field: Field, transport: str) -> None:
    uas_port = free_port()
    proxy = field.proxy(uas_port, transport)
    callee = field.sipp.uas("field_uas_cancel_reinvite.xml", uas_port, transport,
                            extra=keys(pbx_port=field.peer().port))  # fmt: skip
    caller = field.sipp.uac(
        "field_uac_cancel_reinvite.xml",
        proxy.inside,
        transport,
        extra=["-s", "18005550199", *keys(caller="alice", phone_port=field.peer().port)],
    )
    field.sipp.check(caller, callee)
    far = trace(callee.files["messages"])
    reinvite = find(far, "received", "INVITE", 1)
    cancel = find(far, "received", "CANCEL")
    assert cancel.header("Call-ID") == reinvite.header("Call-ID")
    assert cancel.header("CSeq") == reinvite.header("CSeq").replace("INVITE", "CANCEL")  # type: ignore[union-attr]
    branch = re.compile(r"branch=([^;,\s]+)")
    assert branch.search(cancel.header("Via") or "").group(1) == (  # type: ignore[union-attr]
        branch.search(reinvite.header("Via") or "").group(1)  # type: ignore[union-attr]
    )
    proxy.wait_idle()


# --------------------------------------------------------------------------- line identity


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_another_port_cannot_borrow_a_lines_identity(field: Field, transport: str) -> None:
    """The hostile-network finding, against a running proxy: with unknown users
    rejected, a device on another port of the phone's own address (127.0.0.1) claims
    the line in From. It gets 403 every time, nothing goes on to the far end (no call,
    so no x-sipura), and the refusal is logged once; the line's phone still gets
    through."""
    phone_port, uas_port = free_port(), free_port()
    proxy = field.proxy(
        uas_port,
        transport,
        inside={"unknown_users": "reject"},
        lines=[{"user_id": LINE, "allowed_sources": [f"{HOST}:{phone_port}"]}],
    )
    callee = field.sipp.uas("field_uas_answer.xml", uas_port, transport,
                            extra=keys(pbx_port=field.peer().port))  # fmt: skip
    attacker = field.sipp.uac("field_uac_refused.xml", proxy.inside, transport, calls=3, extra=[
        "-s", "18005550199", *keys(caller=LINE, phone_port=field.peer().port)])  # fmt: skip
    field.sipp.check(attacker)
    phone = field.sipp._start(
        "phone",
        "field_uac_media.xml",
        phone_port,
        transport,
        f"{HOST}:{proxy.inside}",
        1,
        ["-s", "18005550199", *keys(caller=LINE, phone_ip=HOST, phone_port=field.peer().port)],
    )
    field.sipp.check(phone, callee)
    invites = [m for m in trace(callee.files["messages"]) if m.first_line.startswith("INVITE")]
    assert len(invites) == 1 and f"sip:{LINE}@" in (invites[0].header("From") or "")
    refusals = [line for line in proxy.log_text().splitlines() if "not the line's phone" in line]
    assert len(refusals) == 1, refusals  # rate-limited: three attempts, one line
    assert proxy.status()["registrations"]["identity_refusals"] == 3
    proxy.wait_idle()
