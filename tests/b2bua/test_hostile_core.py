"""The sans-IO core under hostile input: bad numbers, registration state, streams per
call, 503s that say why. In memory, fake clock (sipfake)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callflows import (
    IN,
    OUT,
    PHONE_CONTACT,
    UP_CONTACT,
    UP_SDP,
    answer,
    phone_invite,
    start_call,
)
from sipfake import (
    LINE1,
    PHONE,
    PHONE_TCP,
    UPSTREAM,
    FakeMedia,
    World,
    build_request,
    build_response,
    make_config,
    only,
    parse,
    pick,
    tag,
    via_for,
)

from proxy.b2bua.core import Outbound
from proxy.sip.headers import NameAddr
from proxy.sip.message import Request, Response
from proxy.sip.stateless import stateless_response
from proxy.sip.transaction import Address

REGISTRAR = Address("203.0.113.8", 5060)


def register(
    *, expires: str | None = "3600", contact_params: str = "", call_id: str | None = None,
    source: Address = PHONE, user: str = "+14085551234", cseq: int = 1,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:  # fmt: skip
    headers = [("Expires", expires)] if expires is not None else []
    return build_request(
        "REGISTER", "sip:10.0.0.1", via=via_for(source),
        from_=f"<sip:{user}@10.0.0.1>;tag={tag()}", to=f"<sip:{user}@10.0.0.1>",
        call_id=call_id or f"{tag()}@phone", cseq=cseq,
        contact=f"<sip:{user}@{source.host}:{source.port}>{contact_params}",
        headers=[*headers, *extra],
    )  # fmt: skip


def final_to(w: World, data: bytes, side: object, source: Address) -> list[Response]:
    """The final responses the proxy sent back for the request in ``data``."""
    request = parse(data)
    assert isinstance(request, Request)
    return [
        wire.response
        for wire in w.sent
        if wire.side is side and wire.dest == source and isinstance(wire.msg, Response)
        and wire.msg.status >= 200 and wire.msg.call_id == request.call_id
        and wire.msg.cseq.number == request.cseq.number
    ]  # fmt: skip


# --- numbers: ASCII only, and a bad one is answered, never raised --------------------------


@pytest.mark.parametrize(
    ("expires", "params"),
    [("²", ""), ("٣٦٠٠", ""), ("3600", ";expires=²"), ("-1", ";expires=1²"), (None, ";expires=")],
)
def test_non_ascii_expires_is_answered_with_the_default(expires: str | None, params: str) -> None:
    """Regression: ``Expires: ²`` passed ``isdigit`` and ``int()`` raised in the core;
    the phone got no answer and the transaction leaked."""
    w = World()
    ok = only(w.phone(register(expires=expires, contact_params=params))).response
    assert ok.status == 200
    assert NameAddr.parse(ok.get_all("contact")[0]).param("expires") == "3600"
    [binding] = w.core.bindings.of(LINE1)
    assert binding.expires_at == w.now + 3600
    w.settle()
    assert len(w.core.layers[IN]) == 0


def test_non_ascii_expires_from_the_registrar_falls_back() -> None:
    w = World(make_config(registrar="sip:203.0.113.8:5060"))
    relayed = only(w.phone(register())).request
    reply = build_response(relayed, 200, to_tag="r", headers=[("Expires", "²")],
                           contact=f"{relayed.get_all('contact')[0]};expires=٣")  # fmt: skip
    ok = only(w.upstream(reply, REGISTRAR)).response
    [binding] = w.core.bindings.of(LINE1)
    assert ok.status == 200 and binding.expires_at == w.now + 3600


def test_bad_rack_and_max_forwards_digits_are_not_numbers() -> None:
    w = World()
    data = phone_invite().replace(b"Max-Forwards: 70", "Max-Forwards: ²".encode())
    assert only(w.phone(data)).response.status == 400
    assert w.core.calls == {}


READ_HEADERS = [
    "Expires", "Max-Forwards", "CSeq", "Content-Length", "Content-Type", "Contact",
    "Record-Route", "Route", "Require", "Supported", "RAck", "RSeq", "Session-Expires",
    "Min-SE", "Retry-After", "From", "To", "Call-ID", "Via", "Server", "User-Agent",
]  # fmt: skip
"""Every header the core reads (and the numeric ones the issue lists)."""

VALUES = st.one_of(
    st.sampled_from(["", " ", "²", "٣", "1²", "-1", "+5", "0", "00", "4294967296", "9" * 40,
                     "3600;x", "1 2 3", "1 ² INVITE", '"', "<", ">;", "sip:", "*", "a,b"]),
    st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=30),
)  # fmt: skip


def with_header(data: bytes, name: str, value: str) -> bytes:
    """``data`` with every ``name`` header's value replaced (or the header added)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    encoded = value.encode("utf-8")
    hit = [
        i for i, line in enumerate(lines) if line.lower().startswith(name.lower().encode() + b":")
    ]
    for index in hit:
        lines[index] = name.encode() + b": " + encoded
    if not hit:
        lines.insert(1, name.encode() + b": " + encoded)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


SCENARIOS = ["register", "invite", "options", "in_dialog", "answer", "registrar_answer"]
FINAL = re.compile(rb"SIP/2\.0 [2-6][0-9][0-9] ")
_CALL_ID_LINE = re.compile(rb"^(?:call-id|i)[ \t]*:(.*)$", re.I | re.M)
_CSEQ_LINE = re.compile(rb"^cseq[ \t]*:[ \t]*([0-9]*)", re.I | re.M)


def dialog_key(data: bytes) -> tuple[bytes, bytes]:
    """Call-ID and CSeq number as raw bytes: a salvage 400 copies them byte for byte."""
    call_id = _CALL_ID_LINE.search(data)
    cseq = _CSEQ_LINE.search(data)
    return (call_id.group(1).strip() if call_id else b"", cseq.group(1) if cseq else b"")


def record_raw(w: World) -> list[tuple[object, Address, bytes]]:
    """Everything the core sends, unparsed (the harness drops salvage replies it cannot
    parse from ``w.sent``; they are answers all the same)."""
    raw: list[tuple[object, Address, bytes]] = []
    receive, poll = w.core.receive, w.core.poll

    def recording_receive(*args: Any) -> list[Outbound]:
        out = receive(*args)
        raw.extend((o.side, o.dest, o.data) for o in out)
        return out

    def recording_poll(now: float) -> list[Outbound]:
        out = poll(now)
        raw.extend((o.side, o.dest, o.data) for o in out)
        return out

    w.core.receive = recording_receive  # type: ignore[method-assign]
    w.core.poll = recording_poll  # type: ignore[method-assign]
    return raw


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=st.sampled_from(SCENARIOS), name=st.sampled_from(READ_HEADERS), value=VALUES)
def test_arbitrary_values_in_every_header_the_core_reads(
    scenario: str, name: str, value: str
) -> None:
    """No exception escapes, every answerable request is answered, and once the timers
    ran nothing is left: no transaction, no call, no media port."""
    config = make_config(registrar="sip:203.0.113.8:5060") if scenario == "registrar_answer" \
        else make_config()  # fmt: skip
    w = World(config)
    raw = record_raw(w)
    request_data, side, source = b"", IN, PHONE
    hang_up: bytes | None = None
    if scenario == "register":
        request_data = with_header(register(), name, value)
        w.phone(request_data)
    elif scenario == "invite":
        request_data = with_header(phone_invite(), name, value)
        w.phone(request_data)
    elif scenario == "options":
        request_data = with_header(
            build_request("OPTIONS", "sip:10.0.0.1", via=via_for(PHONE),
                          from_=f"<sip:a@10.0.0.10>;tag={tag()}", to="<sip:10.0.0.1>",
                          call_id=f"{tag()}@o", cseq=1), name, value)  # fmt: skip
        w.phone(request_data)
    elif scenario == "in_dialog":
        a_invite, b = start_call(w)
        call = answer(w, a_invite, b)
        request_data = with_header(call.pbx.request("INFO"), name, value)
        side, source = OUT, UPSTREAM
        w.upstream(request_data)
        hang_up = call.pbx.request("BYE")  # an answered call lives until a BYE
    elif scenario == "answer":
        _, b = start_call(w)
        ok = build_response(b.request, 200, to_tag="up", contact=UP_CONTACT, body=UP_SDP)
        w.upstream(with_header(ok, name, value))
    else:
        relayed = only(w.phone(register())).request
        w.upstream(with_header(build_response(relayed, 200, to_tag="r",
                                              contact=relayed.get_all("contact")[0]),
                               name, value), REGISTRAR)  # fmt: skip
    w.advance(40.0)
    if request_data and stateless_response(request_data, 400) is not None:
        key = dialog_key(request_data)
        finals = [data for out_side, dest, data in raw if out_side is side and dest == source
                  and FINAL.match(data) and dialog_key(data) == key]  # fmt: skip
        assert finals, f"{scenario}: {name}: {value!r} was not answered"
    if hang_up is not None:
        w.upstream(hang_up)
    w.advance(400.0)
    assert all(len(layer) == 0 for layer in w.core.layers.values())
    assert w.core.calls == {} and w.media.all_returned()


# --- registration state lives as long as the binding (decision 45), its flow held -------


def test_bindings_expire_and_are_forgotten() -> None:
    w = World()
    assert only(w.phone(register(expires="60"))).response.status == 200
    assert LINE1 in w.core.bindings
    assert w.core.next_deadline() is not None
    w.advance(59.0)
    assert LINE1 in w.core.bindings
    w.advance(2.0)
    assert LINE1 not in w.core.bindings


def test_a_registered_tcp_flow_is_held_while_the_binding_lives() -> None:
    w = World()
    held: list[tuple[Address, bool]] = []
    w.core.registrar.on_flow = lambda flow, on: held.append((flow, on))
    assert only(w.phone(register(expires="60", source=PHONE_TCP), PHONE_TCP)).response
    assert held == [(PHONE_TCP, True)]
    only(w.phone(register(expires="60", source=PHONE_TCP), PHONE_TCP))  # a refresh
    assert held == [(PHONE_TCP, True)]
    w.phone(register(expires="0", source=PHONE_TCP), PHONE_TCP)
    assert held == [(PHONE_TCP, True), (PHONE_TCP, False)]
    w.phone(register(expires="30", source=PHONE_TCP), PHONE_TCP)
    w.advance(31.0)  # expiry lets go of it too
    assert held[-2:] == [(PHONE_TCP, True), (PHONE_TCP, False)]
    w.phone(register(expires="30"))  # UDP: nothing to hold
    assert len(held) == 4


# --- streams per call ----------------------------------------------------------------------


def many_streams(ip: str, port: int, count: int) -> bytes:
    lines = ["v=0", f"o=- 1 1 IN IP4 {ip}", "s=-", f"c=IN IP4 {ip}", "t=0 0"]
    for index in range(count):
        lines += [f"m=audio {port + 2 * index} RTP/AVP 0", f"a=rtcp:{port + 2 * index + 1}"]
    return ("\r\n".join(lines) + "\r\n").encode()


def m_ports(body: bytes) -> list[int]:
    return [int(line.split()[1]) for line in body.decode().split("\r\n") if line.startswith("m=")]


def test_extra_m_lines_are_declined_with_port_0() -> None:
    """Regression: four INVITEs with 62 m= lines each bound 992 of 1,000 ports."""
    media = FakeMedia(pairs=40)
    w = World(media=media)
    for _ in range(4):
        a_invite, b = start_call(w, body=many_streams("10.0.0.10", 4000, 62))
        assert media.sessions[-1].streams == 4
        offered = m_ports(b.request.body)
        assert len(offered) == 62 and all(offered[:4]) and offered[4:] == [0] * 58
        answer_sdp = many_streams("203.0.113.50", 7000, 62)
        call = answer(w, a_invite, b, body=answer_sdp)
        answered = m_ports(call.a_ok.body)
        assert all(answered[:4]) and answered[4:] == [0] * 58
        assert "a=rtcp:0" in call.a_ok.body.decode()
    assert len(media.free) == media.capacity - 4 * 4 * 2  # 4 calls x 4 streams x 2 legs
    w.settle()


def test_max_streams_per_call_is_configurable() -> None:
    config = make_config()
    from dataclasses import replace

    config = replace(config, limits=replace(config.limits, max_streams_per_call=1))
    w = World(config)
    _, b = start_call(w, body=many_streams("10.0.0.10", 4000, 3))
    assert m_ports(b.request.body)[1:] == [0, 0]
    w.settle()


# --- 503s say why ----------------------------------------------------------------------------


def test_503s_are_logged_with_their_cause_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    w = World(make_config(max_calls=1))
    start_call(w)
    with caplog.at_level(logging.INFO, logger="sipura.b2bua"):
        for _ in range(20):
            out = w.phone(phone_invite())
            assert only(pick(out, IN, status=503)).response.get("retry-after") == "5"
        w.advance(11.0)
        w.phone(phone_invite())
    lines = [r.getMessage() for r in caplog.records if "max_calls (1) reached" in r.getMessage()]
    assert len(lines) == 2, lines  # the first, then the first of the next window...
    assert lines[0].startswith("503 (max_calls (1) reached): INVITE ")
    # ...and, when the window closed, how many were held back in it
    assert "19 more max calls (1) reached from 10.0.0.10 suppressed" in caplog.text
    w.settle()


def test_port_exhaustion_503_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    w = World(media=FakeMedia(pairs=1))
    with caplog.at_level(logging.WARNING, logger="sipura.b2bua"):
        out = w.phone(phone_invite())
    assert only(pick(out, IN, status=503))
    assert "503 (media ports exhausted): INVITE" in caplog.text
    w.settle()


def test_late_offer_without_ports_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    w = World(media=FakeMedia(pairs=0))
    a_invite, b = start_call(w, body=b"")
    with caplog.at_level(logging.WARNING, logger="sipura.b2bua"):
        out = w.upstream(build_response(b.request, 200, to_tag="u", contact=UP_CONTACT,
                                        body=UP_SDP))  # fmt: skip
    assert only(pick(out, IN, status=503))
    assert "503 (media ports exhausted): call" in caplog.text
    assert a_invite.call_id  # the phone's call got its 503
    w.settle()


def test_phone_contact_is_untouched_by_hostile_numbers() -> None:
    assert PHONE_CONTACT.startswith("<sip:")


# --- the configuration keys of these limits ------------------------------------------------

LIMITS_CONFIG = """\
[inside]
listen = "127.0.0.1:5070"
media_ip = "127.0.0.1"
[outside]
listen = "127.0.0.1:5080"
media_ip = "127.0.0.1"
[sip]
{sip}
[limits]
{limits}
"""


def test_limit_keys_defaults_and_values() -> None:
    from proxy.b2bua.config import parse_config

    default = parse_config(LIMITS_CONFIG.format(sip="", limits=""), "p.toml")
    assert (default.sip.max_message_bytes, default.sip.tcp_idle_timeout_s,
            default.sip.tcp_message_timeout_s) == (65535, 600.0, 10.0)  # fmt: skip
    assert default.limits.max_tcp_connections is None  # "auto"
    assert default.limits.max_tcp_connections_per_source == 50
    assert default.limits.max_streams_per_call == 4
    given = parse_config(LIMITS_CONFIG.format(
        sip="max_message_bytes = 4000\ntcp_idle_timeout_s = 60\ntcp_message_timeout_s = 3",
        limits='max_tcp_connections = 300\nmax_tcp_connections_per_source = 5\n'
               'max_streams_per_call = 2'), "p.toml")  # fmt: skip
    assert (given.sip.max_message_bytes, given.sip.tcp_idle_timeout_s,
            given.sip.tcp_message_timeout_s) == (4000, 60.0, 3.0)  # fmt: skip
    assert (given.limits.max_tcp_connections, given.limits.max_tcp_connections_per_source,
            given.limits.max_streams_per_call) == (300, 5, 2)  # fmt: skip
    auto = parse_config(LIMITS_CONFIG.format(sip="", limits='max_tcp_connections = "auto"'),
                        "p.toml")  # fmt: skip
    assert auto.limits.max_tcp_connections is None


@pytest.mark.parametrize(
    ("sip", "limits", "error"),
    [
        ("max_message_bytes = 100", "", "sip.max_message_bytes: must be 1500..1048576"),
        ('max_message_bytes = "big"', "", "sip.max_message_bytes: expected an integer"),
        ("tcp_idle_timeout_s = 0", "", "sip.tcp_idle_timeout_s: must be a positive integer"),
        ("tcp_message_timeout_s = -1", "", "sip.tcp_message_timeout_s"),
        ("", 'max_tcp_connections = "lots"', 'expected an integer >= 1 or "auto"'),
        ("", "max_tcp_connections = 0", "limits.max_tcp_connections: must be a positive"),
        ("", "max_tcp_connections_per_source = 0", "max_tcp_connections_per_source"),
        ("", "max_streams_per_call = 65", "limits.max_streams_per_call: must be 1..64"),
    ],
)
def test_limit_keys_refuse_bad_values(sip: str, limits: str, error: str) -> None:
    from proxy.b2bua.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(LIMITS_CONFIG.format(sip=sip, limits=limits), "p.toml")
