"""RFC 3261 §17 transactions (+ RFC 6026 Accepted) driven with a fake clock.

Time is a plain float handed to the layer; :func:`drive` polls at every deadline the
layer announces, so each test reads as a timeline of what went on the wire and what the
transaction user was told.
"""

from __future__ import annotations

import pytest

from proxy.sip.headers import CSeq
from proxy.sip.message import Request, Response, parse_message
from proxy.sip.retention import TX_OVERHEAD, RetainedBytes
from proxy.sip.transaction import (
    AckReceived,
    Address,
    ClientTransaction,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    State,
    StrayResponse,
    Timers,
    TransactionEvent,
    TransactionLayer,
    TransactionTimeout,
    Transmit,
    response_to,
    stamp_via,
)

CALL_ID = "a84b4c76e66710@pc33.example.com"
FROM_TAG = "1928301774"

UAS = Address("198.51.100.20", 5060)
UAS_TCP = Address("198.51.100.20", 5060, "tcp", conn=3)
UAC = Address("192.0.2.10", 5060)
UAC_TCP = Address("192.0.2.10", 40123, "tcp", conn=7)

Log = list[tuple[float, list[TransactionEvent], list[Transmit]]]


# --- message builders ---------------------------------------------------------------------


def request_bytes(
    method: str,
    *,
    branch: str,
    cseq: int = 1,
    cseq_method: str | None = None,
    call_id: str = CALL_ID,
    from_tag: str = FROM_TAG,
    to_tag: str | None = None,
    via_host: str = "192.0.2.10",
    via_port: int = 5060,
    transport: str = "UDP",
    rport: bool = False,
    extra_vias: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    uri: str = "sip:bob@example.com",
) -> bytes:
    via = f"SIP/2.0/{transport} {via_host}:{via_port};branch={branch}" + (";rport" if rport else "")
    to = "Bob <sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via}",
        *(f"Via: {v}" for v in extra_vias),
        "Max-Forwards: 70",
        f"From: Alice <sip:alice@example.com>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        *extra,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def request(method: str, **kwargs: object) -> Request:
    message = parse_message(request_bytes(method, **kwargs))  # type: ignore[arg-type]
    assert isinstance(message, Request)
    return message


def invite(branch: str = "z9hG4bKinv1", **kwargs: object) -> Request:
    return request("INVITE", branch=branch, **kwargs)


def bye(branch: str = "z9hG4bKbye1", **kwargs: object) -> Request:
    kwargs.setdefault("cseq", 2)
    kwargs.setdefault("to_tag", "uas-tag")
    return request("BYE", branch=branch, **kwargs)


def options(branch: str = "z9hG4bKopt1", **kwargs: object) -> Request:
    return request("OPTIONS", branch=branch, **kwargs)


def ack(branch: str, **kwargs: object) -> Request:
    kwargs.setdefault("to_tag", "uas-tag")
    return request("ACK", branch=branch, **kwargs)


def cancel(branch: str = "z9hG4bKinv1", **kwargs: object) -> Request:
    return request("CANCEL", branch=branch, **kwargs)


REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 486: "Busy Here", 487: "Request Terminated"}


def response_bytes(req: Request, status: int, *, to_tag: str | None = "uas-tag") -> bytes:
    """What the far side would answer: Vias, From, To (+tag), Call-ID, CSeq copied."""
    to = req.get("to") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines = [f"SIP/2.0 {status} {REASONS.get(status, 'Whatever')}"]
    lines += [f"Via: {v}" for v in req.get_all("via")]
    lines += [
        f"From: {req.get('from')}",
        f"To: {to}",
        f"Call-ID: {req.call_id}",
        f"CSeq: {req.get('cseq')}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(req: Request, status: int, *, to_tag: str | None = "uas-tag") -> Response:
    message = parse_message(response_bytes(req, status, to_tag=to_tag))
    assert isinstance(message, Response)
    return message


def parse_response(data: bytes) -> Response:
    message = parse_message(data)
    assert isinstance(message, Response)
    return message


def parse_request(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


# --- fake clock ---------------------------------------------------------------------------


def drive(layer: TransactionLayer, until: float) -> Log:
    """Poll at every announced deadline up to ``until``; what each poll produced."""
    log: Log = []
    for _ in range(10_000):
        deadline = layer.next_deadline()
        if deadline is None or deadline > until:
            return log
        events, out = layer.poll(deadline)
        log.append((deadline, events, out))
    raise AssertionError("the layer never goes idle")


def sent_at(log: Log) -> list[float]:
    return [when for when, _, out in log for _ in out]


def events_of(log: Log) -> list[tuple[float, TransactionEvent]]:
    return [(when, event) for when, events, _ in log for event in events]


def server_tx(
    layer: TransactionLayer, req: Request, source: Address, now: float
) -> ServerTransaction:
    events, _ = layer.receive(req, source, now)
    assert len(events) == 1
    assert isinstance(events[0], RequestReceived)
    return events[0].tx


def state_of(tx: ClientTransaction | ServerTransaction) -> State:
    """Read through a call so mypy does not narrow ``tx.state`` across layer calls."""
    return tx.state


# --- client INVITE ------------------------------------------------------------------------


def test_client_invite_timer_a_doubles_and_timer_b_times_out() -> None:
    layer = TransactionLayer()
    inv = invite()
    tx, out = layer.send_request(inv, UAS, 0.0, context="leg-a")
    assert out == [Transmit(inv.serialize(), UAS)]
    assert state_of(tx) is State.CALLING and tx.invite and tx.context == "leg-a"
    assert layer.next_deadline() == 0.5
    assert layer.poll(0.49) == ([], [])

    log = drive(layer, 100.0)
    assert sent_at(log) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # T1, 2T1, 4T1, ... (no T2 cap)
    assert all(t.data == inv.serialize() and t.dest == UAS for _, _, o in log for t in o)
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]  # timer B = 64*T1
    assert state_of(tx) is State.TERMINATED
    assert len(layer) == 0 and layer.next_deadline() is None

    late = response(inv, 200)
    assert layer.receive(late, UAS, 40.0) == ([StrayResponse(late, UAS)], [])


def test_client_invite_provisional_stops_timer_a_and_timer_b() -> None:
    layer = TransactionLayer()
    inv = invite()
    tx, _ = layer.send_request(inv, UAS, 0.0)
    _, out = layer.poll(0.5)
    assert len(out) == 1

    ringing = response(inv, 180)
    assert layer.receive(ringing, UAS, 0.7) == ([ResponseReceived(tx, ringing)], [])
    assert state_of(tx) is State.PROCEEDING
    assert layer.next_deadline() is None  # A stopped; B only runs in "Calling"
    assert drive(layer, 1000.0) == []  # a long ring does not time the INVITE out

    again = response(inv, 180)
    assert layer.receive(again, UAS, 500.0) == ([ResponseReceived(tx, again)], [])
    ok = response(inv, 200)
    assert layer.receive(ok, UAS, 600.0) == ([ResponseReceived(tx, ok)], [])
    assert state_of(tx) is State.ACCEPTED


def test_client_invite_error_is_acked_in_transaction() -> None:
    layer = TransactionLayer()
    inv = invite(extra=("Route: <sip:proxy.example.com;lr>", "Subject: lunch"))
    tx, _ = layer.send_request(inv, UAS, 0.0)
    layer.receive(response(inv, 100, to_tag=None), UAS, 0.1)

    busy = response(inv, 486, to_tag="busy-tag")
    events, out = layer.receive(busy, UAS, 2.0)
    assert events == [ResponseReceived(tx, busy)]
    assert state_of(tx) is State.COMPLETED
    assert len(out) == 1 and out[0].dest == UAS
    ack_msg = parse_request(out[0].data)
    assert ack_msg.method == "ACK"
    assert ack_msg.uri == inv.uri
    assert len(ack_msg.vias) == 1
    assert str(ack_msg.top_via) == str(inv.top_via)
    assert ack_msg.top_via.branch == "z9hG4bKinv1"  # same transaction
    assert ack_msg.to.tag == "busy-tag"
    assert ack_msg.to.uri == inv.to.uri
    assert ack_msg.from_.tag == FROM_TAG
    assert ack_msg.call_id == CALL_ID
    assert ack_msg.cseq == CSeq(1, "ACK")
    assert ack_msg.get_all("route") == ["<sip:proxy.example.com;lr>"]
    assert ack_msg.get("max-forwards") == "70"
    assert ack_msg.get("subject") is None

    # A retransmitted error is re-ACKed, not reported again.
    assert layer.receive(response(inv, 486, to_tag="busy-tag"), UAS, 5.0) == ([], [out[0]])
    # Timer D (32 s over UDP).
    assert layer.next_deadline() == 34.0
    assert drive(layer, 33.9) == []
    assert layer.poll(34.0) == ([], [])
    assert state_of(tx) is State.TERMINATED and len(layer) == 0
    stray = response(inv, 486, to_tag="busy-tag")
    assert layer.receive(stray, UAS, 35.0) == ([StrayResponse(stray, UAS)], [])


def test_client_invite_2xx_accepted_passes_every_2xx_then_strays() -> None:
    layer = TransactionLayer()
    inv = invite()
    tx, _ = layer.send_request(inv, UAS, 0.0)
    ok = response(inv, 200)
    assert layer.receive(ok, UAS, 1.0) == ([ResponseReceived(tx, ok)], [])  # no ACK here
    assert state_of(tx) is State.ACCEPTED
    assert layer.next_deadline() == 33.0  # timer M = 64*T1, no retransmissions

    retransmitted = response(inv, 200)
    assert layer.receive(retransmitted, UAS, 2.0) == ([ResponseReceived(tx, retransmitted)], [])
    forked = response(inv, 200, to_tag="other-fork")
    assert layer.receive(forked, UAS, 3.0) == ([ResponseReceived(tx, forked)], [])
    assert layer.receive(response(inv, 486), UAS, 4.0) == ([], [])  # error after 2xx: ignored

    log = drive(layer, 100.0)
    assert log == [(33.0, [], [])]  # timer M ends it quietly: no TransactionTimeout
    assert len(layer) == 0
    late = response(inv, 200)
    assert layer.receive(late, UAS, 40.0) == ([StrayResponse(late, UAS)], [])


def test_client_invite_tcp_never_retransmits() -> None:
    layer = TransactionLayer()
    inv = invite(transport="TCP")
    tx, out = layer.send_request(inv, UAS_TCP, 0.0)
    assert out == [Transmit(inv.serialize(), UAS_TCP)]
    assert layer.next_deadline() == 32.0  # only timer B
    log = drive(layer, 100.0)
    assert sent_at(log) == []
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]
    assert len(layer) == 0


def test_client_invite_tcp_error_ack_and_timer_d_zero() -> None:
    layer = TransactionLayer()
    inv = invite(transport="TCP")
    tx, _ = layer.send_request(inv, UAS_TCP, 0.0)
    busy = response(inv, 486)
    events, out = layer.receive(busy, UAS_TCP, 1.0)
    assert events == [ResponseReceived(tx, busy)]
    assert len(out) == 1 and out[0].dest == UAS_TCP
    assert parse_request(out[0].data).method == "ACK"
    assert layer.next_deadline() == 1.0  # timer D = 0 over a reliable transport
    assert layer.poll(1.0) == ([], [])
    assert len(layer) == 0


def test_client_invite_tcp_2xx_has_timer_m() -> None:
    layer = TransactionLayer()
    inv = invite(transport="TCP")
    tx, _ = layer.send_request(inv, UAS_TCP, 0.0)
    ok = response(inv, 200)
    assert layer.receive(ok, UAS_TCP, 1.0) == ([ResponseReceived(tx, ok)], [])
    assert drive(layer, 100.0) == [(33.0, [], [])]
    assert len(layer) == 0


def test_cancel_rearms_timer_b_on_a_proceeding_invite() -> None:
    """§9.1: no final response 64*T1 after the CANCEL: the INVITE transaction gives up."""
    layer = TransactionLayer()
    inv = invite()
    inv_tx, _ = layer.send_request(inv, UAS, 0.0)
    layer.receive(response(inv, 180), UAS, 0.2)
    assert layer.next_deadline() is None

    can = cancel()
    can_tx, out = layer.send_request(can, UAS, 10.0)
    assert out == [Transmit(can.serialize(), UAS)]
    assert can_tx is not inv_tx and not can_tx.invite
    cancel_ok = response(can, 200)
    # The 200 to the CANCEL (same branch, CSeq method CANCEL) belongs to the CANCEL only.
    assert layer.receive(cancel_ok, UAS, 10.1) == ([ResponseReceived(can_tx, cancel_ok)], [])
    assert state_of(inv_tx) is State.PROCEEDING
    ringing = response(inv, 180)
    assert layer.receive(ringing, UAS, 11.0) == ([ResponseReceived(inv_tx, ringing)], [])
    assert layer.next_deadline() == 15.1  # timer K of the CANCEL; the INVITE's B at 42

    log = drive(layer, 100.0)
    assert events_of(log) == [(42.0, TransactionTimeout(inv_tx))]
    assert len(layer) == 0


def test_cancel_answered_by_487_ends_normally() -> None:
    layer = TransactionLayer()
    inv = invite()
    inv_tx, _ = layer.send_request(inv, UAS, 0.0)
    layer.receive(response(inv, 180), UAS, 0.2)
    can = cancel()
    layer.send_request(can, UAS, 10.0)
    layer.receive(response(can, 200), UAS, 10.1)
    terminated = response(inv, 487)
    events, out = layer.receive(terminated, UAS, 10.5)
    assert events == [ResponseReceived(inv_tx, terminated)]
    assert parse_request(out[0].data).cseq == CSeq(1, "ACK")
    log = drive(layer, 100.0)
    assert events_of(log) == []  # no timeout: the INVITE got its final response
    assert len(layer) == 0


# --- client non-INVITE --------------------------------------------------------------------


def test_client_non_invite_timer_e_capped_at_t2_and_timer_f() -> None:
    layer = TransactionLayer()
    opt = options()
    tx, _ = layer.send_request(opt, UAS, 0.0)
    assert state_of(tx) is State.TRYING and not tx.invite
    log = drive(layer, 100.0)
    times = sent_at(log)
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]  # doubling, capped T2
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]
    assert len(layer) == 0


def test_client_non_invite_proceeding_retransmits_at_t2() -> None:
    layer = TransactionLayer()
    req = bye()
    tx, _ = layer.send_request(req, UAS, 0.0)
    assert len(layer.poll(0.5)[1]) == 1  # next at 1.5
    trying = response(req, 100)
    assert layer.receive(trying, UAS, 0.6) == ([ResponseReceived(tx, trying)], [])
    assert state_of(tx) is State.PROCEEDING
    assert len(layer.poll(1.5)[1]) == 1
    assert layer.next_deadline() == 5.5  # T2, not 2*T1, once Proceeding
    assert len(layer.poll(5.5)[1]) == 1
    assert layer.next_deadline() == 9.5

    ok = response(req, 200)
    assert layer.receive(ok, UAS, 6.0) == ([ResponseReceived(tx, ok)], [])
    assert state_of(tx) is State.COMPLETED
    assert layer.next_deadline() == 11.0  # timer K = T4, retransmissions stopped
    assert layer.receive(response(req, 200), UAS, 7.0) == ([], [])  # absorbed
    assert drive(layer, 100.0) == [(11.0, [], [])]
    assert len(layer) == 0
    late = response(req, 200)
    assert layer.receive(late, UAS, 12.0) == ([StrayResponse(late, UAS)], [])


def test_client_non_invite_timer_f_fires_in_proceeding() -> None:
    layer = TransactionLayer()
    req = bye()
    tx, _ = layer.send_request(req, UAS, 0.0)
    layer.receive(response(req, 100), UAS, 0.1)
    log = drive(layer, 100.0)
    assert sent_at(log) == [0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]
    assert len(layer) == 0


def test_client_non_invite_tcp() -> None:
    layer = TransactionLayer()
    req = options(transport="TCP")
    tx, _ = layer.send_request(req, UAS_TCP, 0.0)
    assert layer.next_deadline() == 32.0  # timer F only, no timer E
    ok = response(req, 200)
    assert layer.receive(ok, UAS_TCP, 1.0) == ([ResponseReceived(tx, ok)], [])
    assert layer.next_deadline() == 1.0  # timer K = 0
    assert drive(layer, 100.0) == [(1.0, [], [])]
    assert len(layer) == 0


def test_client_non_invite_tcp_timeout_without_retransmissions() -> None:
    layer = TransactionLayer()
    tx, _ = layer.send_request(options(transport="TCP"), UAS_TCP, 0.0)
    log = drive(layer, 100.0)
    assert sent_at(log) == []
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]


def test_client_misc() -> None:
    layer = TransactionLayer()
    with pytest.raises(ValueError, match="send_stateless"):
        layer.send_request(ack("z9hG4bKack"), UAS, 0.0)
    a = ack("z9hG4bKack")
    assert layer.send_stateless(a, UAS) == [Transmit(a.serialize(), UAS)]
    assert len(layer) == 0
    unknown = response(options(branch="z9hG4bKnobody"), 200)
    assert layer.receive(unknown, UAS, 0.0) == ([StrayResponse(unknown, UAS)], [])


# --- server INVITE ------------------------------------------------------------------------


def test_server_invite_answers_100_trying_at_once() -> None:
    layer = TransactionLayer()
    inv = invite(rport=True, extra_vias=("SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKpx",))
    source = Address("192.0.2.99", 61000)
    events, out = layer.receive(inv, source, 0.0)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    tx = events[0].tx
    assert events[0].request is inv  # the transaction user gets the whole request
    assert tx.request.method == "INVITE" and tx.request.uri == inv.uri
    assert [name for name, _ in tx.request.headers] == ["Via", "Via", "From", "To", "Call-ID",
                                                         "CSeq"]  # fmt: skip
    assert tx.invite and state_of(tx) is State.PROCEEDING
    assert len(out) == 1 and out[0].dest == source
    trying = parse_response(out[0].data)
    assert trying.status == 100
    assert trying.get_all("via") == inv.get_all("via")  # both Vias, top one stamped
    assert trying.top_via.param("received") == "192.0.2.99"
    assert trying.top_via.param("rport") == "61000"
    assert trying.to.tag is None
    assert trying.cseq == CSeq(1, "INVITE") and trying.call_id == CALL_ID
    assert layer.next_deadline() is None  # nothing to time in Proceeding
    assert len(layer) == 1

    # A retransmitted INVITE re-sends the last response and is not passed up again.
    assert layer.receive(invite(rport=True), source, 0.5) == ([], [out[0]])
    ringing = response_to(tx.request, 180, "Ringing", to_tag="uas-tag")
    sent = layer.respond(tx, ringing, 1.0)
    assert sent == [Transmit(ringing.serialize(), source)]
    assert state_of(tx) is State.PROCEEDING
    assert layer.receive(invite(rport=True), source, 1.5) == ([], sent)


def test_server_invite_error_timer_g_then_ack_confirmed_then_timer_i() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, invite(), UAC, 0.0)
    busy = response_to(tx.request, 486, "Busy Here", to_tag="uas-tag")
    sent = layer.respond(tx, busy, 2.0)
    assert sent == [Transmit(busy.serialize(), UAC)]
    assert state_of(tx) is State.COMPLETED

    log = drive(layer, 20.0)
    assert sent_at(log) == [2.5, 3.5, 5.5, 9.5, 13.5, 17.5]  # T1 doubling, capped at T2
    assert all(t == sent[0] for _, _, o in log for t in o)
    assert events_of(log) == []
    assert layer.receive(invite(), UAC, 19.0) == ([], sent)  # retransmitted INVITE

    assert layer.receive(ack("z9hG4bKinv1"), UAC, 20.0) == ([], [])  # absorbed, not passed up
    assert state_of(tx) is State.CONFIRMED
    assert layer.next_deadline() == 25.0  # timer I = T4; G stopped
    assert layer.receive(ack("z9hG4bKinv1"), UAC, 21.0) == ([], [])  # ACK retransmission
    assert drive(layer, 100.0) == [(25.0, [], [])]
    assert state_of(tx) is State.TERMINATED and len(layer) == 0
    assert layer.respond(tx, busy, 30.0) == []


def test_server_invite_error_without_ack_timer_h() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, invite(), UAC, 0.0)
    layer.respond(tx, response_to(tx.request, 486, "Busy Here", to_tag="t"), 0.0)
    log = drive(layer, 100.0)
    assert sent_at(log) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]
    assert len(layer) == 0


def test_server_invite_2xx_retransmitted_until_ack_with_new_branch() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, invite(), UAC, 0.0)
    ok = response_to(tx.request, 200, "OK", to_tag="uas-tag")
    sent = layer.respond(tx, ok, 1.0)
    assert sent == [Transmit(ok.serialize(), UAC)]
    assert state_of(tx) is State.ACCEPTED

    log = drive(layer, 10.0)
    assert sent_at(log) == [1.5, 2.5, 4.5, 8.5]
    assert all(t == sent[0] for _, _, o in log for t in o)
    assert layer.receive(invite(), UAC, 9.0) == ([], sent)  # INVITE retransmission

    # An ACK for another CSeq / another dialog goes up but does not end this transaction.
    other = ack("z9hG4bKack9", cseq=7)
    assert layer.receive(other, UAC, 9.5) == ([AckReceived(other, UAC)], [])
    assert state_of(tx) is State.ACCEPTED

    the_ack = ack("z9hG4bKack1")  # a 2xx ACK carries a new branch
    assert layer.receive(the_ack, UAC, 10.0) == ([AckReceived(the_ack, UAC)], [])
    assert state_of(tx) is State.TERMINATED
    assert layer.receive(invite(), UAC, 10.0) == ([], [])  # absorbed until reaped
    assert drive(layer, 100.0) == [(10.0, [], [])]  # no more 2xx, no timeout
    assert len(layer) == 0
    again = ack("z9hG4bKack1")
    assert layer.receive(again, UAC, 11.0) == ([AckReceived(again, UAC)], [])


def test_server_invite_2xx_without_ack_timer_l() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, invite(), UAC, 0.0)
    layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="uas-tag"), 0.0)
    log = drive(layer, 100.0)
    assert sent_at(log) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert events_of(log) == [(32.0, TransactionTimeout(tx))]
    assert len(layer) == 0
    late = ack("z9hG4bKack1")
    assert layer.receive(late, UAC, 40.0) == ([AckReceived(late, UAC)], [])


def test_server_invite_tcp() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, invite(transport="TCP", via_port=40123), UAC_TCP, 0.0)
    busy = response_to(tx.request, 486, "Busy Here", to_tag="uas-tag")
    assert layer.respond(tx, busy, 1.0) == [Transmit(busy.serialize(), UAC_TCP)]
    assert layer.next_deadline() == 33.0  # timer H only, no timer G
    assert layer.receive(ack("z9hG4bKinv1", transport="TCP", via_port=40123), UAC_TCP, 2.0) == (
        [],
        [],
    )
    assert state_of(tx) is State.CONFIRMED
    assert layer.next_deadline() == 2.0  # timer I = 0
    assert drive(layer, 100.0) == [(2.0, [], [])]
    assert len(layer) == 0

    tx = server_tx(layer, invite("z9hG4bKinv2", transport="TCP", via_port=40123), UAC_TCP, 3.0)
    layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="uas-tag"), 4.0)
    assert layer.next_deadline() == 36.0  # timer L only: no 2xx retransmissions
    log = drive(layer, 100.0)
    assert sent_at(log) == []
    assert events_of(log) == [(36.0, TransactionTimeout(tx))]


def test_server_invite_late_tu_responses_are_dropped() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, invite(), UAC, 0.0)
    layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="a"), 1.0)
    assert layer.respond(tx, response_to(tx.request, 486, "Busy Here", to_tag="a"), 2.0) == []
    assert layer.respond(tx, response_to(tx.request, 180, "Ringing", to_tag="a"), 2.0) == []
    assert tx.last_status == 200


# --- server non-INVITE --------------------------------------------------------------------


def test_server_non_invite_absorbs_retransmissions_and_timer_j() -> None:
    layer = TransactionLayer()
    events, out = layer.receive(bye(), UAC, 0.0)
    assert out == []  # no automatic 100 for non-INVITE
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    tx = events[0].tx
    assert state_of(tx) is State.TRYING and not tx.invite
    assert layer.receive(bye(), UAC, 0.5) == ([], [])  # Trying: absorbed silently

    ok = response_to(tx.request, 200, "OK")
    sent = layer.respond(tx, ok, 1.0)
    assert sent == [Transmit(ok.serialize(), UAC)]
    assert state_of(tx) is State.COMPLETED
    assert layer.receive(bye(), UAC, 2.0) == ([], sent)  # answered with the last response
    assert layer.next_deadline() == 33.0  # timer J = 64*T1; no response retransmissions
    assert drive(layer, 100.0) == [(33.0, [], [])]
    assert len(layer) == 0
    assert layer.respond(tx, ok, 40.0) == []


def test_server_non_invite_provisional_resent_on_retransmission() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, options(), UAC, 0.0)
    trying = response_to(tx.request, 100, "Trying")
    sent = layer.respond(tx, trying, 0.1)
    assert state_of(tx) is State.PROCEEDING
    assert layer.receive(options(), UAC, 0.5) == ([], sent)
    assert layer.next_deadline() == 320.0  # only the backstop: 10 x 64*T1 unanswered


def test_unanswered_non_invite_gets_a_500_from_the_backstop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The transaction user answers every request; should it ever fail to, the request
    still gets an answer and its transaction still ends (no state outlives its timers).
    The backstop leaves room for a relay failing over through several targets."""
    layer = TransactionLayer()
    tx = server_tx(layer, options(), UAC, 0.0)
    with caplog.at_level("WARNING", logger="sipura.transaction"):
        log = drive(layer, 319.9)
        assert log == []
        [(when, events, out)] = drive(layer, 320.0)
    assert when == 320.0 and events == []
    reply = parse_response(out[0].data)
    assert reply.status == 500 and reply.to.tag is not None
    assert state_of(tx) is State.COMPLETED
    assert "unanswered for 320 s: 500" in caplog.text
    drive(layer, 400.0)
    assert len(layer) == 0 and layer.retained == 0
    invite_tx = server_tx(layer, invite(), UAC, 400.0)  # an INVITE may ring for ever
    assert layer.next_deadline() is None and state_of(invite_tx) is State.PROCEEDING


def test_server_non_invite_tcp_timer_j_zero() -> None:
    layer = TransactionLayer()
    tx = server_tx(layer, options(transport="TCP", via_port=40123), UAC_TCP, 0.0)
    layer.respond(tx, response_to(tx.request, 200, "OK"), 1.0)
    assert layer.next_deadline() == 1.0
    assert drive(layer, 100.0) == [(1.0, [], [])]
    assert len(layer) == 0


# --- CANCEL, Via stamping -----------------------------------------------------------------


def test_find_invite_server_for_cancel() -> None:
    layer = TransactionLayer()
    inv_tx = server_tx(layer, invite(), UAC, 0.0)
    can = cancel()
    can_tx = server_tx(layer, can, UAC, 1.0)  # a CANCEL is its own transaction
    assert can_tx is not inv_tx and not can_tx.invite
    assert layer.find_invite_server(can) is inv_tx
    assert layer.find_invite_server(cancel(branch="z9hG4bKother")) is None
    assert layer.find_invite_server(cancel(via_host="192.0.2.11")) is None  # other sent-by
    assert len(layer) == 2

    layer.respond(can_tx, response_to(can_tx.request, 200, "OK"), 1.0)
    layer.respond(inv_tx, response_to(inv_tx.request, 487, "Request Terminated", to_tag="x"), 1.0)
    assert layer.receive(ack("z9hG4bKinv1", to_tag="x"), UAC, 1.2) == ([], [])
    assert state_of(inv_tx) is State.CONFIRMED
    drive(layer, 100.0)
    assert len(layer) == 0 and layer.next_deadline() is None


def stamped(via: str, source: Address, name: str = "Via") -> list[tuple[str, str]]:
    req = invite()
    req.headers = [
        (name if h.lower() == "via" else h, via if h.lower() == "via" else v)
        for h, v in req.headers
    ]
    stamp_via(req, source)
    return [(h, v) for h, v in req.headers if h.lower() in ("via", "v")]


def test_stamp_via_rport_and_received() -> None:
    src = Address("203.0.113.9", 61000)
    via = "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx;rport"
    assert stamped(via, src) == [
        ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx;received=203.0.113.9;rport=61000")
    ]
    # RFC 3581: with rport, received is added even when the host already matches.
    same = "SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bKx;rport"
    assert stamped(same, src) == [
        ("Via", "SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bKx;received=203.0.113.9;rport=61000")
    ]


def test_stamp_via_received_only_when_host_differs() -> None:
    src = Address("203.0.113.9", 61000)
    plain = "SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bKx"
    assert stamped(plain, src) == [("Via", plain)]
    other = "SIP/2.0/UDP pc33.example.com;branch=z9hG4bKx"
    assert stamped(other, src) == [("Via", other + ";received=203.0.113.9")]
    v6 = "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx"
    assert stamped(v6, Address("2001:db8::1", 5060)) == [("Via", v6)]


def test_stamp_via_only_touches_the_top_value() -> None:
    src = Address("203.0.113.9", 61000)
    joined = (
        "SIP/2.0/UDP a.example.com;branch=z9hG4bK1;rport, SIP/2.0/UDP b.example.com;branch=z9hG4bK2"
    )
    assert stamped(joined, src, name="v") == [
        (
            "v",
            "SIP/2.0/UDP a.example.com;branch=z9hG4bK1;received=203.0.113.9;rport=61000"
            ", SIP/2.0/UDP b.example.com;branch=z9hG4bK2",
        )
    ]


def test_receive_stamps_requests_not_responses() -> None:
    layer = TransactionLayer()
    src = Address("203.0.113.9", 61000)
    tx = server_tx(layer, options(rport=True), src, 0.0)
    assert tx.request.top_via.param("rport") == "61000"
    assert tx.request.top_via.param("received") == "203.0.113.9"
    req = options(branch="z9hG4bKmine", rport=True)
    layer.send_request(req, UAS, 0.0)
    resp = response(req, 200)
    layer.receive(resp, src, 0.1)
    assert resp.top_via.param("rport") == ""  # responses are left alone


# --- timers, deadlines, bookkeeping -------------------------------------------------------


def test_timer_defaults() -> None:
    t = Timers()
    assert (t.t1, t.t2, t.t4, t.timeout) == (0.5, 4.0, 5.0, 32.0)


def test_configurable_timers() -> None:
    timers = Timers(t1=0.25, t2=1.0, t4=2.0)
    assert timers.timeout == 16.0
    layer = TransactionLayer(timers)
    assert layer.timers is timers

    inv_tx, _ = layer.send_request(invite(), UAS, 0.0)
    log = drive(layer, 100.0)
    assert sent_at(log) == [0.25, 0.75, 1.75, 3.75, 7.75, 15.75]  # A: no cap
    assert events_of(log) == [(16.0, TransactionTimeout(inv_tx))]

    req = options()
    opt_tx, _ = layer.send_request(req, UAS, 0.0)
    layer.poll(0.25)
    layer.poll(0.75)
    assert layer.next_deadline() == 1.75  # E capped at T2 = 1.0
    layer.receive(response(req, 200), UAS, 1.0)
    assert layer.next_deadline() == 3.0  # K = T4
    drive(layer, 100.0)

    tx = server_tx(layer, invite("z9hG4bKsrv"), UAC, 0.0)
    layer.respond(tx, response_to(tx.request, 486, "Busy Here", to_tag="t"), 0.0)
    log = drive(layer, 5.0)
    assert sent_at(log) == [0.25, 0.75, 1.75, 2.75, 3.75, 4.75]  # G capped at T2
    layer.receive(ack("z9hG4bKsrv", to_tag="t"), UAC, 5.0)
    assert layer.next_deadline() == 7.0  # I = T4
    drive(layer, 100.0)
    assert len(layer) == 0
    assert state_of(opt_tx) is State.TERMINATED


def test_next_deadline_is_the_earliest_timer() -> None:
    layer = TransactionLayer()
    assert layer.next_deadline() is None
    server_tx(layer, invite("z9hG4bKsrv"), UAC, 0.0)
    assert layer.next_deadline() is None  # a server tx in Proceeding has no timer
    layer.send_request(options(), UAS, 0.2)
    assert layer.next_deadline() == 0.7
    layer.send_request(invite(), UAS, 0.1)
    assert layer.next_deadline() == 0.6
    layer.poll(0.6)
    assert layer.next_deadline() == 0.7
    layer.poll(0.7)
    assert layer.next_deadline() == 1.6  # INVITE: 0.6 + 2*T1; OPTIONS: 0.7 + 2*T1 = 1.7
    assert len(layer) == 3


def test_address_reliability() -> None:
    assert not Address("h", 5060).reliable
    assert not Address("h", 5060, "UDP").reliable  # Via spelling must not turn off timer A
    assert Address("h", 5060, "tcp").reliable
    assert Address("h", 5061, "TLS").reliable


def test_transactions_have_distinct_ids() -> None:
    layer = TransactionLayer()
    a, _ = layer.send_request(invite(), UAS, 0.0)
    b, _ = layer.send_request(options(), UAS, 0.0)
    c = server_tx(layer, invite("z9hG4bKsrv"), UAC, 0.0)
    assert isinstance(a, ClientTransaction) and isinstance(c, ServerTransaction)
    assert len({a.id, b.id, c.id}) == 3


def test_no_retransmission_when_the_timeout_fires_at_the_same_instant() -> None:
    """With T2 = T1, timers E and G fire at every multiple of T1, 64*T1 included."""
    layer = TransactionLayer(Timers(t1=0.5, t2=0.5))
    tx, _ = layer.send_request(options(), UAS, 0.0)
    stx = server_tx(layer, invite(), UAC, 0.0)
    layer.respond(stx, response_to(stx.request, 486, "Busy Here", to_tag="t"), 0.0)
    log = drive(layer, 100.0)
    assert sent_at(log)[-2:] == [31.5, 31.5]
    assert len(sent_at(log)) == 2 * 63
    assert events_of(log) == [(32.0, TransactionTimeout(tx)), (32.0, TransactionTimeout(stx))]
    assert len(layer) == 0


@pytest.mark.parametrize(
    "vias",
    [
        ["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK00ff00ff00ff00ff;rport"],  # the proxy's own
        ["SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKa1b2c3d4e5f60718;rport"],
        ["SIP/2.0/UDP 192.0.2.1:5060;rport;branch=z9hG4bKabc"],  # other shapes: parsed
        ["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKABC;rport"],
        ["SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKabc;rport, SIP/2.0/UDP h;branch=z9hG4bKdef"],
        ["SIP/2.0/UDP 192.0.2.1:5060 ;branch=z9hG4bKabc;rport"],
    ],
)
@pytest.mark.parametrize("name", ["Via", "v", "via"])
def test_a_sent_request_is_matched_by_its_top_via_branch(vias: list[str], name: str) -> None:
    """The key of a request the layer sends is its top Via's branch, whatever the Via
    looks like (the proxy's own form is read without a full parse)."""
    layer = TransactionLayer()
    request = Request(method="OPTIONS", uri="sip:uas@198.51.100.20")
    request.add("Via" if name == "v" else name, vias[0])  # a later Via of another spelling
    request.add(name, "SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKlater")
    for header, value in (("From", f"<sip:a@b>;tag={FROM_TAG}"), ("To", "<sip:c@d>"),
                          ("Call-ID", CALL_ID), ("CSeq", "1 OPTIONS")):  # fmt: skip
        request.add(header, value)
    tx, _ = layer.send_request(request, UAS, 0.0)
    assert tx.key == (request.top_via.branch, "OPTIONS")
    response = parse_message(response_to(request, 200, "OK", to_tag="t").serialize())
    events, _ = layer.receive(response, UAS, 0.1)
    assert [type(e) for e in events] == [ResponseReceived]


# --- what a transaction keeps, and the memory budget ---------------------------------------

PAD = "x" * 60_000


def test_server_transaction_keeps_no_body_and_no_foreign_header() -> None:
    """Regression: each 64 KB request was kept whole for the 32 s of timer J."""
    layer = TransactionLayer()
    big = request("OPTIONS", branch="z9hG4bKbig", extra=(f"X-Pad: {PAD}",))
    big.body = PAD.encode()
    tx = server_tx(layer, big, UAC, 0.0)
    assert tx.request.body == b""
    assert all(name.lower() != "x-pad" for name, _ in tx.request.headers)
    layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="t"), 0.0)
    assert layer.retained < 4096
    assert layer.snapshot()["server"] == 1


def test_client_transaction_drops_what_it_will_never_send_again() -> None:
    layer = TransactionLayer()
    big = request("MESSAGE", branch="z9hG4bKmsg", extra=(f"X-Pad: {PAD}",))
    tx, out = layer.send_request(big, UAS, 0.0)
    assert out[0].data == big.serialize()  # sent whole...
    assert tx.data == out[0].data  # ...and kept for timer E over UDP
    assert tx.request is big  # whole: a failover sends it again to another target...
    assert layer.retained > 2 * len(PAD)  # ...and charged for it, and for its bytes
    layer.receive(response(big, 200), UAS, 0.3)
    assert tx.data == b""  # timer K only absorbs retransmitted responses
    assert len(PAD) < layer.retained < len(PAD) + 4096
    drive(layer, 10.0)
    assert layer.retained == 0
    tcp, _ = layer.send_request(request("MESSAGE", branch="z9hG4bKtcp"), UAS_TCP, 0.0)
    assert tcp.data == b""  # nothing is retransmitted over TCP


def test_client_invite_keeps_only_the_ack_after_an_error() -> None:
    layer = TransactionLayer()
    inv = invite(extra=(f"X-Pad: {PAD}",))
    tx, _ = layer.send_request(inv, UAS, 0.0)
    _, out = layer.receive(response(inv, 486), UAS, 0.1)
    assert tx.data == out[0].data and parse_request(tx.data).method == "ACK"
    assert layer.retained < len(PAD) + 4096  # the INVITE itself, not its bytes twice
    assert tx.last_status == 486


def test_budget_is_released_when_transactions_end() -> None:
    layer = TransactionLayer()
    for index in range(50):
        tx = server_tx(layer, options(branch=f"z9hG4bKo{index}"), UAC, 0.0)
        layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="t"), 0.0)
        layer.send_request(options(branch=f"z9hG4bKc{index}"), UAS, 0.0)
    assert layer.retained == layer.budget.used > 50 * 2 * TX_OVERHEAD
    drive(layer, 100.0)
    assert len(layer) == 0
    assert layer.retained == layer.budget.used == 0


def answered_options(layer: TransactionLayer, branch: str, now: float) -> ServerTransaction:
    tx = server_tx(layer, options(branch=branch), UAC, now)
    layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="t"), now)
    return tx


def test_spent_budget_sheds_the_oldest_answered_transactions_first() -> None:
    """A flood of answered requests cannot crowd out new ones: the oldest answered
    non-INVITE transactions end early (they only absorb retransmissions)."""
    budget = RetainedBytes(limit=10 * TX_OVERHEAD)
    layer = TransactionLayer(budget=budget)
    index = 0
    while budget.admits("OPTIONS"):
        answered_options(layer, f"z9hG4bKf{index}", float(index))
        index += 1
    first_count = len(layer)
    newest = answered_options(layer, "z9hG4bKnew", 100.0)
    assert len(layer) == first_count  # one in, the oldest out
    assert layer.shed == 1 and budget.refused == 0
    assert budget.used <= budget.limit + newest.cost
    # The shed one's retransmission is a new request now; a live one is still absorbed.
    assert isinstance(layer.receive(options(branch="z9hG4bKf0"), UAC, 101.0)[0][0],
                      RequestReceived)  # fmt: skip
    assert layer.receive(options(branch=f"z9hG4bKf{index - 1}"), UAC, 101.0)[0] == []


def test_spent_budget_with_nothing_to_shed_answers_503_statelessly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = RetainedBytes(limit=10 * TX_OVERHEAD)
    layer = TransactionLayer(budget=budget)
    index = 0
    while budget.admits("INVITE"):  # calls in progress: nothing may be ended early
        server_tx(layer, invite(branch=f"z9hG4bKi{index}"), UAC, 0.0)
        index += 1
    alive = len(layer)
    with caplog.at_level("WARNING", logger="sipura.transaction"):
        for extra in range(20):
            events, out = layer.receive(options(branch=f"z9hG4bKx{extra}"), UAC, 0.1)
            assert events == []
            reply = parse_response(out[0].data)
            assert reply.status == 503 and reply.get("retry-after") == "5"
            assert reply.to.tag is not None
    assert len(layer) == alive  # no state for a refused request
    assert budget.refused == 20 and layer.shed == 0
    assert len([r for r in caplog.records if "503 to OPTIONS" in r.message]) == 1
    # CANCEL and BYE free state: they still get a transaction (up to 1.25x the budget).
    [received], _ = layer.receive(bye(), UAC, 0.2)
    assert isinstance(received, RequestReceived)
    for tx in list(layer._servers.values()):
        layer.respond(tx, response_to(tx.request, 486, "Busy Here", to_tag="t"), 0.3)
    drive(layer, 100.0)
    assert budget.used == 0
    assert isinstance(layer.receive(options(branch="z9hG4bKnew"), UAC, 101.0)[0][0],
                      RequestReceived)  # fmt: skip


def test_layers_can_share_one_budget() -> None:
    budget = RetainedBytes()
    inside, outside = TransactionLayer(budget=budget), TransactionLayer(budget=budget)
    server_tx(inside, options(), UAC, 0.0)
    outside.send_request(options(branch="z9hG4bKout"), UAS, 0.0)
    assert budget.used == inside.retained + outside.retained
    assert inside.snapshot()["budget_used_bytes"] == budget.used


def test_shed_transactions_free_their_texts_and_the_heap_stays_bounded() -> None:
    """Shed transactions still have timer entries on the heap (lazy deletion): those
    entries must not keep their texts alive, and must not pile up under a flood."""
    budget = RetainedBytes(limit=50 * TX_OVERHEAD)
    layer = TransactionLayer(budget=budget)
    first = answered_options(layer, "z9hG4bKfirst", 0.0)
    for index in range(6_000):
        answered_options(layer, f"z9hG4bKh{index}", 0.001 * index)
    assert layer.shed > 5_000 and len(layer) < 60
    assert first.request.headers == [] and first.last_response is None
    assert len(layer._heap) <= 4 * len(layer) + 4096 + 2
    assert budget.used <= budget.limit + 2 * TX_OVERHEAD


def test_ended_transactions_left_on_the_heap_hold_no_texts() -> None:
    """Regression (found by bench/flood.py): an answered transaction ends at timer J,
    but its backstop entry (320 s) stays on the heap until its time; it kept the 30 KB
    texts of 800 flood requests alive for five minutes."""
    layer = TransactionLayer()
    big = request("OPTIONS", branch="z9hG4bKbig", extra=(f"X-Pad: {PAD}",))
    big.set("From", f'"{PAD}" <sip:alice@example.com>;tag=1')
    tx = server_tx(layer, big, UAC, 0.0)
    layer.respond(tx, response_to(tx.request, 200, "OK", to_tag="t"), 0.0)
    layer.poll(40.0)  # timer J; next_deadline() is not asked, as under a busy flood
    assert len(layer) == 0
    assert any(entry[2] is tx for entry in layer._heap)  # still referenced...
    assert tx.request.headers == [] and tx.last_response is None  # ...but holds nothing
