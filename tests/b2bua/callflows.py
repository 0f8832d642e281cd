"""Call flows the in-memory core tests share: a phone's INVITE, the PBX's answer, a
registration, with the addresses and SDP of :mod:`sipfake`'s network."""

from __future__ import annotations

from dataclasses import dataclass

from sipfake import (
    LINE1,
    PHONE,
    UPSTREAM,
    PeerDialog,
    Wire,
    World,
    build_request,
    build_response,
    only,
    parse,
    pick,
    sdp,
    tag,
    uac_dialog,
    uas_dialog,
    via_for,
)

from proxy.media.engine import Side
from proxy.sip.headers import CSeq
from proxy.sip.message import Request, Response
from proxy.sip.transaction import Address

IN, OUT = Side.INSIDE, Side.OUTSIDE
PHONE_CONTACT = "<sip:14085551234@10.0.0.10:5060>"
PHONE_SDP = sdp("10.0.0.10", 4000)
UP_CONTACT = "<sip:pbx@203.0.113.5:5060>"
UP_SDP = sdp("203.0.113.50", 7000)
CALLEE = "sip:18005550199@itsp.example.net"


def phone_invite(
    *,
    source: Address = PHONE,
    uri: str = CALLEE,
    from_user: str = "+14085551234",
    cseq: int = 101,
    body: bytes = PHONE_SDP,
    headers: tuple[tuple[str, str], ...] = (),
    call_id: str | None = None,
    from_tag: str | None = None,
    max_forwards: int | None = 70,
    br: str | None = None,
    via: str | None = None,
    contact: str = PHONE_CONTACT,
) -> bytes:
    return build_request(
        "INVITE",
        uri,
        via=via or via_for(source, br),
        from_=f'"Joe" <sip:{from_user}@10.0.0.1>;tag={from_tag or tag()}',
        to=f"<{uri}>",
        call_id=call_id or f"{tag()}@10.0.0.10",
        cseq=cseq,
        contact=contact,
        max_forwards=max_forwards,
        headers=headers,
        body=body,
    )


def upstream_invite(
    *,
    uri: str = f"sip:{LINE1}@192.0.2.1",
    cseq: int = 7,
    body: bytes = UP_SDP,
    headers: tuple[tuple[str, str], ...] = (),
    source: Address = UPSTREAM,
    call_id: str | None = None,
) -> bytes:
    return build_request(
        "INVITE",
        uri,
        via=via_for(source),
        from_=f"<sip:+18005550199@itsp.example.net>;tag={tag()}",
        to=f"<{uri}>",
        call_id=call_id or f"{tag()}@itsp",
        cseq=cseq,
        contact=UP_CONTACT,
        headers=headers,
        body=body,
    )


def start_call(w: World, **kwargs: object) -> tuple[Request, Wire]:
    """Phone INVITE in; returns (the phone's INVITE, the B-leg INVITE sent upstream)."""
    source = kwargs.get("source", PHONE)
    assert isinstance(source, Address)
    data = phone_invite(**kwargs)  # type: ignore[arg-type]
    out = w.phone(data, source)
    trying = only(pick(out, IN, status=100), "100 Trying")
    assert trying.dest == source
    invite = only(pick(out, OUT, method="INVITE"), "B-leg INVITE")
    a_invite = parse(data)
    assert isinstance(a_invite, Request)
    return a_invite, invite


@dataclass
class Established:
    a_invite: Request
    b_invite: Request
    phone: PeerDialog
    pbx: PeerDialog
    a_ok: Response


def answer(
    w: World,
    a_invite: Request,
    b: Wire,
    *,
    ring: bool = True,
    body: bytes = UP_SDP,
    record_route: tuple[str, ...] = (),
    source: Address = UPSTREAM,
    phone_source: Address = PHONE,
) -> Established:
    up_tag = tag()
    if ring:
        out = w.upstream(build_response(b.request, 180, to_tag=up_tag, contact=UP_CONTACT), source)
        ringing = only(pick(out, IN, status=180), "180 to the phone")
        assert ringing.dest == phone_source
    out = w.upstream(
        build_response(
            b.request,
            200,
            to_tag=up_tag,
            contact=UP_CONTACT,
            body=body,
            record_route=list(record_route),
        ),
        source,
    )
    ok = only(pick(out, IN, status=200), "200 to the phone")
    assert ok.dest == phone_source
    phone = uac_dialog(phone_source, a_invite, ok.response, PHONE_CONTACT)
    out = w.phone(phone.request("ACK"), phone_source)
    ack = only(pick(out, OUT, method="ACK"), "ACK upstream")
    assert ack.request.cseq == CSeq(b.request.cseq.number, "ACK")
    pbx = uas_dialog(source, b.request, up_tag, UP_CONTACT)
    return Established(a_invite, b.request, phone, pbx, ok.response)


def outbound_call(w: World, **kwargs: object) -> Established:
    a_invite, b = start_call(w, **kwargs)
    return answer(w, a_invite, b)


def register_locally(
    w: World,
    *,
    user: str = "+14085551234",
    source: Address = PHONE,
    contact: str | None = None,
    expires: int = 3600,
) -> Wire:
    contact = contact or f"<sip:{user}@{source.host}:{source.port}>"
    data = build_request(
        "REGISTER",
        "sip:10.0.0.1",
        via=via_for(source),
        from_=f"<sip:{user}@10.0.0.1>;tag={tag()}",
        to=f"<sip:{user}@10.0.0.1>",
        call_id=f"{tag()}@phone",
        cseq=1,
        contact=contact,
        headers=[("Expires", str(expires))],
    )
    return only(w.phone(data, source), "REGISTER response")
