"""What an operator relies on from the sans-IO core: draining (503 to new work, calls
in progress untouched, the BYE with a Reason at the end), the counters behind
``/metrics``, the end-of-call summary, call fields on log lines, and rate-limited noise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from callflows import (
    IN,
    OUT,
    PHONE_CONTACT,
    PHONE_SDP,
    outbound_call,
    phone_invite,
    register_locally,
    start_call,
    upstream_invite,
)
from sipfake import (
    LINE1,
    PHONE,
    UPSTREAM,
    World,
    build_request,
    build_response,
    only,
    parse,
    pick,
    tag,
    uac_dialog,
    via_for,
)

from proxy.logsetup import CallContextFilter
from proxy.media.commands import MediaReleased
from proxy.sip.message import Request
from proxy.sip.transaction import Address

SHUTDOWN = 'SIP;cause=503;text="proxy shutting down"'


@pytest.fixture(autouse=True, scope="module")
def fake_dns() -> Iterator[None]:
    with mock.patch.dict(sipfake.NAMES, {"itsp.example.net": "203.0.113.5"}):
        yield


@pytest.fixture
def w() -> World:
    return World()


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captured records with the bound call fields on them, as the proxy's handler does."""
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(CallContextFilter())
    return caplog


def options(source: Address = UPSTREAM, max_forwards: int = 70) -> bytes:
    return build_request(
        "OPTIONS", "sip:192.0.2.1", via=via_for(source), from_=f"<sip:probe@x>;tag={tag()}",
        to="<sip:192.0.2.1>", call_id=f"{tag()}@probe", cseq=1, max_forwards=max_forwards,
    )  # fmt: skip


def register(source: Address = PHONE) -> bytes:
    return build_request(
        "REGISTER", "sip:10.0.0.1", via=via_for(source),
        from_=f"<sip:+14085551234@10.0.0.1>;tag={tag()}", to="<sip:+14085551234@10.0.0.1>",
        call_id=f"{tag()}@phone", cseq=1, contact=PHONE_CONTACT, headers=[("Expires", "600")],
    )  # fmt: skip


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "summary", None) is not None]


# --- draining ----------------------------------------------------------------------------


def test_drain_refuses_new_work_and_calls_in_progress_go_on(w: World) -> None:
    call = outbound_call(w)
    assert w.core.drain.describe(w.now) == {"active": False}
    w.core.start_drain(w.now, 30)
    assert w.core.draining

    out = w.phone(phone_invite())
    refused = only(pick(out, IN, status=503), "503 to a new INVITE").response
    assert refused.get("retry-after") == "30"
    assert not pick(out, OUT), "nothing relayed"
    for probe in (options(), options(max_forwards=0)):
        answer_ = only(pick(w.upstream(probe), OUT), "answer to OPTIONS").response
        assert answer_.status == 503 and answer_.get("retry-after") == "30"
    assert only(pick(w.phone(register()), IN)).response.status == 503
    w.advance(10.2)
    later = only(pick(w.phone(phone_invite()), IN, status=503)).response
    assert later.get("retry-after") == "20"

    # the call in progress: in-dialog requests are relayed, the hang-up works
    out = w.phone(call.phone.request("INFO", body=b"x", content_type="text/plain"))
    info = only(pick(out, OUT, method="INFO"), "INFO relayed").request
    w.upstream(build_response(info, 200))
    out = w.phone(call.phone.request("BYE"))
    bye = only(pick(out, OUT, method="BYE")).request
    w.upstream(build_response(bye, 200))
    assert w.core.calls == {}

    state = w.core.drain.describe(w.now)
    assert state["refused"] == {"INVITE": 2, "OPTIONS": 2, "REGISTER": 1}
    assert state["calls_at_start"] == 1 and state["calls_left"] == 0
    assert state["hung_up"] == 0
    assert w.core.stats.calls_total == 1  # refused INVITEs are no calls
    w.core.start_drain(w.now, 5)  # a second start changes nothing
    assert w.core.drain.describe(w.now)["hang_up_in_s"] == pytest.approx(19.8)


def test_hang_up_all_ends_answered_and_ringing_calls(
    w: World, records: pytest.LogCaptureFixture
) -> None:
    answered = outbound_call(w)
    ringing_invite, ringing_b = start_call(w)
    out = w.upstream(build_response(ringing_b.request, 180, to_tag="up2"))
    quiet_invite, quiet_b = start_call(w)  # no provisional yet: no CANCEL may go out
    w.core.start_drain(w.now, 30)
    w.advance(30)

    out = wires(w, w.core.hang_up_all(w.now))
    byes = pick(out, method="BYE")
    assert sorted(b.side.value for b in byes) == ["inside", "outside"]
    for bye in byes:
        assert bye.request.get("reason") == SHUTDOWN
        assert bye.dest == (PHONE if bye.side is IN else UPSTREAM)
    cancel = only(pick(out, OUT, method="CANCEL")).request
    assert cancel.call_id == ringing_b.request.call_id
    assert cancel.get("reason") == SHUTDOWN
    # the callers of the ringing calls: 503, as a new INVITE gets while draining
    assert not pick(out, IN, status=487)
    unavailable = pick(out, IN, status=503)
    assert sorted(t.response.call_id for t in unavailable) == sorted(
        [ringing_invite.call_id, quiet_invite.call_id]
    )
    for final in unavailable:
        assert final.response.get("retry-after") == "1"
        assert final.response.get("reason") == SHUTDOWN
        assert final.response.to.tag  # the caller's leg keeps its To tag
    assert w.core.drain.hung_up == 3
    assert len(w.core.calls) == 3  # they leave as the far ends answer
    lines = [r.getMessage() for r in records.records if "drain's end" in r.getMessage()]
    assert len(lines) == 3 and sum("ringing" in line for line in lines) == 2
    assert not pick(wires(w, w.core.hang_up_all(w.now)), method="CANCEL")  # only once

    for bye in byes:
        w.send(bye.side, build_response(bye.request, 200), bye.dest)
    w.upstream(build_response(cancel, 200))
    w.upstream(build_response(ringing_b.request, 487, to_tag="up2"))
    w.upstream(build_response(quiet_b.request, 180, to_tag="up3"))  # its CANCEL now
    late = only(pick(w.sent[-3:], OUT, method="CANCEL")).request
    assert late.call_id == quiet_b.request.call_id
    assert late.get("reason") == SHUTDOWN  # held back, with the same Reason
    w.upstream(build_response(late, 200))
    w.upstream(build_response(quiet_b.request, 487, to_tag="up3"))
    assert not pick(w.sent, IN, status=487), "the callers got their 503 only"
    assert w.core.calls == {} and w.media.all_returned()
    assert answered.a_ok.status == 200

    ended = summaries(records)
    assert len(ended) == 3
    for record in ended:
        assert record.summary["ended_by"] == "proxy"  # type: ignore[attr-defined]
        assert record.summary["end_reason"] == "proxy shutting down"  # type: ignore[attr-defined]
    assert sum(r.summary["answered"] for r in ended) == 1  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in records.records if "drain's end" in r.getMessage()]
    assert len(lines) == 3, "one line per call, however many messages followed"


def wires(w: World, out: list[sipfake.Outbound]) -> list[sipfake.Wire]:
    parsed = sipfake.wires(out)
    w.sent.extend(parsed)
    return parsed


# --- counters behind /metrics ------------------------------------------------------------


def test_counters_by_direction_and_media_totals_survive_the_call(w: World) -> None:
    call = outbound_call(w)
    session = w.media.sessions[-1]
    session.packets_in = 250  # what the relay counted from the phone
    out = w.phone(call.phone.request("BYE"))
    w.upstream(build_response(only(pick(out, OUT, method="BYE")).request, 200))
    assert w.core.calls == {}
    metrics = w.core.stats.metrics
    assert metrics.calls_by_direction == {"outbound": 1, "inbound": 0}
    assert metrics.media_released.packets[("inside", "in")] == 250

    register_locally(w)
    out = w.upstream(upstream_invite(uri=f"sip:{LINE1}@192.0.2.1"))
    invite = only(pick(out, IN, method="INVITE")).request
    w.phone(build_response(invite, 486, "Busy Here", to_tag=tag()))
    assert metrics.calls_by_direction == {"outbound": 1, "inbound": 1}
    assert w.core.stats.calls_total == 2


def test_with_workers_totals_and_summary_wait_for_the_final_counters(
    records: pytest.LogCaptureFixture,
) -> None:
    """An engine in other processes reports a released session's final counters later
    (``MediaReleased``): the totals and the summary line hold those, not the last
    periodic report, and the call's end is the time it left the table."""
    media = sipfake.FakeMedia()
    media.reports_final = True
    w = World(media=media)
    call = outbound_call(w)
    session = w.media.sessions[-1]
    session.packets_in = 240  # the last report
    w.advance(5.0)
    out = w.phone(call.phone.request("BYE"))
    w.upstream(build_response(only(pick(out, OUT, method="BYE")).request, 200))
    assert w.core.calls == {} and session.released
    metrics = w.core.stats.metrics
    assert metrics.media_released.packets[("inside", "in")] == 0  # not the stale 240
    assert not summaries(records), "the summary waits for the final counters"
    assert w.core.features()["media_final_awaited"] == 1

    w.advance(0.2)
    session.packets_in = 250  # what the worker counted until its sockets closed
    w.media.report(MediaReleased(session.id, session.stats()))
    assert metrics.media_released.packets[("inside", "in")] == 250
    (record,) = summaries(records)
    summary = record.summary  # type: ignore[attr-defined]
    assert summary["media"]["inside"]["packets_in"] == 250
    assert summary["talk_s"] == pytest.approx(5.0)  # ended at the BYE, not at the report
    assert w.core.features()["media_final_awaited"] == 0
    w.media.report(MediaReleased(session.id, session.stats()))  # a duplicate: ignored
    assert metrics.media_released.packets[("inside", "in")] == 250

    # shutdown before a worker's report: the last reported counters, and the summary
    call = outbound_call(w)
    w.media.sessions[-1].packets_in = 30
    out = w.phone(call.phone.request("BYE"))
    w.upstream(build_response(only(pick(out, OUT, method="BYE")).request, 200))
    assert len(summaries(records)) == 1
    w.core.media_closing(w.now)
    assert len(summaries(records)) == 2
    assert metrics.media_released.packets[("inside", "in")] == 280


def test_malformed_messages_logged_once_per_source_with_the_count(
    w: World, records: pytest.LogCaptureFixture
) -> None:
    noisy, other = Address("198.51.100.66", 5060), Address("198.51.100.67", 5060)
    for _ in range(100):
        w.upstream(b"NOT SIP AT ALL\r\n\r\n", noisy)
    w.upstream(b"garbage", other)
    dropped = [r for r in records.records if "malformed" in r.getMessage()]
    assert [r.getMessage().split(" from ")[1].split(":")[0] for r in dropped] == [
        "198.51.100.66", "198.51.100.67",
    ]  # fmt: skip
    assert w.core.stats.bad_messages == 101
    records.clear()
    w.advance(10.0)  # the core's own deadline flushes the count
    flushed = [r.getMessage() for r in records.records]
    assert flushed == ["99 more malformed message from 198.51.100.66 suppressed in the last 10 s"]
    w.upstream(b"NOT SIP", noisy)  # a new window: logged again
    assert any("malformed" in r.getMessage() for r in records.records[1:])


# --- the end-of-call summary and call fields ---------------------------------------------


def test_summary_of_a_call_the_phone_hangs_up(w: World, records: pytest.LogCaptureFixture) -> None:
    call = outbound_call(w)
    (number,) = w.core.calls
    w.media.sessions[-1].packets_in = 40
    w.advance(12.0)
    out = w.phone(call.phone.request("BYE", headers=[("Reason", "Q.850;cause=16")]))
    bye = only(pick(out, OUT, method="BYE")).request
    w.upstream(build_response(bye, 200))
    (record,) = summaries(records)
    summary = record.summary  # type: ignore[attr-defined]
    assert summary["direction"] == "outbound" and summary["answered"] is True
    assert summary["ended_by"] == "phone"
    assert summary["end_reason"] == "BYE, Reason: Q.850;cause=16"
    assert summary["talk_s"] == pytest.approx(12.0) and summary["duration_s"] >= 12.0
    assert summary["secure"] == {"method": "clear", "state": "clear", "reason": "not requested"}
    assert summary["media"]["inside"] == {"packets_in": 40, "packets_out": 0, "drops": {}}
    assert record.call == number  # type: ignore[attr-defined]
    assert record.call_id == {  # type: ignore[attr-defined]
        "inside": call.a_invite.call_id, "outside": call.b_invite.call_id,
    }  # fmt: skip
    assert record.line == "+" + LINE1  # type: ignore[attr-defined]  # as configured
    text = record.getMessage()
    assert "ended by phone (BYE, Reason: Q.850;cause=16)" in text and "talk 12.0 s" in text

    # every line logged while handling that call's messages carried the same fields
    bye_line = only_record(records, "BYE from the inside side")
    assert bye_line.call == record.call and bye_line.line == record.line  # type: ignore[attr-defined]
    invite_line = only_record(records, ": INVITE ")
    assert invite_line.call_id == record.call_id  # type: ignore[attr-defined]


def only_record(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    found = [r for r in caplog.records if text in r.getMessage()]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    return found[0]


def test_summary_of_failed_cancelled_and_timed_out_calls(
    w: World, records: pytest.LogCaptureFixture
) -> None:
    a_invite, b = start_call(w)
    w.upstream(build_response(b.request, 486, "Busy Here", to_tag=tag()))
    a_invite, b = start_call(w)
    w.upstream(build_response(b.request, 180, to_tag="up"))
    cancel = build_request(
        "CANCEL", a_invite.uri, via=str(a_invite.top_via), from_=a_invite.get("from") or "",
        to=a_invite.get("to") or "", call_id=a_invite.call_id, cseq=a_invite.cseq.number,
    )  # fmt: skip
    out = w.phone(cancel)
    sent_cancel = only(pick(out, OUT, method="CANCEL")).request
    w.upstream(build_response(sent_cancel, 200))
    w.upstream(build_response(b.request, 487, "Request Terminated", to_tag="up"))
    start_call(w)
    w.settle()  # nobody answers: Timer B
    ended = [(r.summary["ended_by"], r.summary["end_reason"]) for r in summaries(records)]  # type: ignore[attr-defined]
    assert ended == [
        ("far end", "486 Busy Here"),
        ("phone", "CANCEL"),
        ("proxy", "no answer (timeout)"),
    ]


def test_inbound_summary_names_the_far_end(w: World, records: pytest.LogCaptureFixture) -> None:
    register_locally(w)
    a_data = upstream_invite(uri=f"sip:{LINE1}@192.0.2.1")
    out = w.upstream(a_data)
    invite = only(pick(out, IN, method="INVITE")).request
    out = w.phone(build_response(invite, 200, to_tag="ph", contact=PHONE_CONTACT, body=PHONE_SDP))
    ok = only(pick(out, OUT, status=200)).response
    a_invite = parse(a_data)
    assert isinstance(a_invite, Request)
    pbx = uac_dialog(UPSTREAM, a_invite, ok, "<sip:pbx@203.0.113.5:5060>")
    w.upstream(pbx.request("ACK"))
    out = w.upstream(pbx.request("BYE"))
    w.phone(build_response(only(pick(out, IN, method="BYE")).request, 200))
    (record,) = summaries(records)
    assert record.summary["direction"] == "inbound"  # type: ignore[attr-defined]
    assert record.summary["ended_by"] == "far end"  # type: ignore[attr-defined]
