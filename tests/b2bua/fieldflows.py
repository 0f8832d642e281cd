"""Call flows for the field-telephony core tests: registrations from several devices,
inbound calls that fork, phones that answer, dialogs as each end sees them."""

from __future__ import annotations

from dataclasses import dataclass

from callflows import IN, OUT, UP_CONTACT, upstream_invite
from sipfake import (
    CONFIG,
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

from proxy.b2bua.config import Config, parse_config
from proxy.sip.message import Request
from proxy.sip.transaction import Address

LINE = "14085550000"
"""The line the devices below register as (no static contact, no allowed sources)."""
DESK = Address("10.0.0.30", 5060)
"""LINE's desk phone."""
DECT = Address("10.0.0.31", 5064)
"""A second device of LINE (a DECT handset)."""
NAT = Address("10.0.0.32", 41000)
"""A device behind NAT: its Contact says 10.0.0.77:5060, its packets come from here."""


def field_config(
    *, registrar: str | None = None, unknown_users: str = "relay", **tables: str
) -> Config:
    """The core tests' configuration with extra keys per table (``inside="keepalive_s =
    0"``, ``limits=...``, ``media=...``, ``sip=...``; ``xsipura=...`` adds the table)."""
    outside = ['upstream = "sip:203.0.113.5:5060"']
    if registrar:
        outside.append(f'registrar = "{registrar}"')
    text = CONFIG.format(unknown_users=unknown_users, outside_extra="\n".join(outside),
                         max_calls=0, sip_extra="")  # fmt: skip
    xsipura = tables.pop("xsipura", None)
    for table, extra in tables.items():
        header = f"[{table}]\n"
        assert header in text, table
        text = text.replace(header, header + extra + "\n", 1)
    if xsipura is not None:
        text = text.replace("[[line]]", f"[xsipura]\n{xsipura}\n[[line]]", 1)
    return parse_config(text, "field.toml")


def register(
    w: World,
    source: Address,
    *,
    user: str = LINE,
    contact: str | None = None,
    expires: int | None = 3600,
    call_id: str | None = None,
    cseq: int = 1,
    contacts: list[str] | None = None,
) -> Wire:
    """A REGISTER from ``source``; returns the proxy's answer to it."""
    if contacts is None:
        contacts = [contact or f"<sip:{user}@{source.host}:{source.port}>"]
    headers = [("Contact", c) for c in contacts]
    if expires is not None:
        headers.append(("Expires", str(expires)))
    data = build_request(
        "REGISTER",
        "sip:10.0.0.1",
        via=via_for(source),
        from_=f"<sip:{user}@10.0.0.1>;tag={tag()}",
        to=f"<sip:{user}@10.0.0.1>",
        call_id=call_id or f"{tag()}@{source.host}",
        cseq=cseq,
        headers=headers,
    )
    return only(w.phone(data, source), "REGISTER answer")


def contacts_of(answer: Wire) -> dict[str, int]:
    """The Contacts of a REGISTER's 200: URI -> expires."""
    from proxy.sip.headers import NameAddr

    found: dict[str, int] = {}
    for value in answer.response.get_all("contact"):
        contact = NameAddr.parse(value)
        found[contact.uri] = int(contact.param("expires") or -1)
    return found


@dataclass
class Inbound:
    """An inbound call from the PBX, forked to the phones."""

    invite: Request
    """The PBX's INVITE."""
    forks: dict[Address, Wire]
    """The proxy's INVITE toward each device, by where it went."""


def call_in(w: World, *, uri: str = f"sip:{LINE}@192.0.2.1", body: bytes | None = None,
            headers: tuple[tuple[str, str], ...] = ()) -> Inbound:  # fmt: skip
    data = upstream_invite(uri=uri, headers=headers, **({"body": body} if body else {}))
    out = w.upstream(data)
    invite = parse(data)
    assert isinstance(invite, Request)
    forks = {wire.dest: wire for wire in pick(out, IN, method="INVITE")}
    return Inbound(invite, forks)


def device_answers(
    w: World, call: Inbound, device: Address, status: int = 200, *, ring: bool = False
) -> tuple[list[Wire], PeerDialog]:
    """``device`` answers its fork; returns what the proxy sent and its dialog."""
    request = call.forks[device].request
    my_tag = tag()
    out: list[Wire] = []
    contact = f"<sip:{LINE}@{device.host}:{device.port}>"
    if ring:
        out += w.phone(build_response(request, 180, to_tag=my_tag, contact=contact), device)
    body = sdp(device.host, 4000) if status == 200 else b""
    out += w.phone(
        build_response(request, status, to_tag=my_tag, contact=contact, body=body), device
    )
    return out, uas_dialog(device, request, my_tag, contact)


def pbx_acks(w: World, call: Inbound, ok: Wire) -> PeerDialog:
    """The PBX ACKs the 200 the proxy relayed; returns its dialog."""
    pbx = uac_dialog(Address("203.0.113.5", 5060), call.invite, ok.response, UP_CONTACT)
    out = w.upstream(pbx.request("ACK"))
    assert pick(out, IN, method="ACK"), "ACK to the device"
    return pbx


def answered_inbound(w: World, device: Address) -> tuple[Inbound, PeerDialog, PeerDialog]:
    """An inbound call answered by ``device`` and ACKed: (call, pbx dialog, device's)."""
    call = call_in(w)
    out, phone = device_answers(w, call, device)
    ok = only(pick(out, OUT, status=200), "200 to the PBX")
    return call, pbx_acks(w, call, ok), phone
