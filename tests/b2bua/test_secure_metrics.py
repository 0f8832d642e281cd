"""The secure-call counters the core feeds (``sipura_secure_calls_total{role}``,
``sipura_handshake_seconds``, ``sipura_clear_calls_total{reason}``) and a line whose
own Mini Certificate expired (``local_mc_expired``: the line's calls go clear, counted,
and nothing is presented to a peer). Built on the x-sipura core tests' flows."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from sipfake import LINE1, LINE2, World, only, pick
from test_secure_core import (
    FAR_ID,
    IN,
    NOW_UTC,
    OUT,
    Pki,
    call_in,
    call_out,
    far_caller,
    issue,
    load_security,
    make_world,
    secure_config,
    secure_outbound,
    secure_state,
    send_info,
)

from proxy.b2bua.call_summary import secure_summary
from proxy.xsipura.keyfiles import generate_ca_key


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = generate_ca_key()
    far = issue(ca, "Far End", FAR_ID)
    return Pki(
        ca=ca, line1=issue(ca, "Joe Smith", LINE1), line2=issue(ca, "Jane Doe", LINE2),
        far=far, far_untrusted=far, far_expired=far, far_wrong_number=far,
    )  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def fake_dns() -> Iterator[None]:
    with mock.patch.dict(sipfake.NAMES, {"itsp.example.net": "203.0.113.5"}):
        yield


def test_secured_calls_counted_by_role_with_the_handshake_time(pki: Pki) -> None:
    w = make_world(pki)
    started = w.now
    secure_outbound(w, pki)
    metrics = w.core.stats.metrics
    assert metrics.secure_by_role == {"caller": 1, "callee": 0}
    assert w.core.stats.secured == 1
    hist = metrics.handshake_seconds
    assert hist.count == 1
    # from the Caller Hello (after the 0.2 s start delay) to the Callee Final: no fake
    # time passed in between, so the histogram's first bucket has it
    assert 0 <= hist.total < w.now - started and hist.buckets()[0] == ("0.05", 1)
    (call,) = w.core.calls.values()
    assert secure_summary(call) == {
        "method": "x-sipura", "state": "secure", "reason": None, "role": "caller",
    }  # fmt: skip


def test_callee_role_counted_too(pki: Pki) -> None:
    w = make_world(pki)
    call = call_in(w)
    caller = far_caller(pki)
    (hello,) = caller.start(w.now)
    w.advance(0.3)  # the handshake starts when the peer's Hello arrives
    ok = only(pick(send_info(w, call, hello.body), OUT, status=200)).response  # type: ignore[attr-defined]
    w.advance(0.25)
    events = caller.receive_response(200, ok.body, w.now, NOW_UTC)
    final = events[1]
    only(pick(send_info(w, call, final.body), OUT, status=200))  # type: ignore[attr-defined]
    metrics = w.core.stats.metrics
    assert metrics.secure_by_role == {"caller": 0, "callee": 1}
    assert metrics.handshake_seconds.total == pytest.approx(0.25)  # Hello in -> Final in


def test_a_line_whose_mc_expired_since_start_goes_clear_counted(pki: Pki) -> None:
    config = secure_config(pki)
    security = load_security(config, NOW_UTC)  # valid when loaded (expires 2031-01-01)
    w = World(config, security=security, utc_now=lambda: datetime(2031, 2, 1, tzinfo=UTC))
    call_out(w)
    out = w.advance(1.0)
    assert pick(out, OUT, method="INFO") == []  # an expired MC is never presented
    state = secure_state(w)
    assert state["state"] == "clear" and state["reason"] == "local_mc_expired"
    assert w.core.stats.clear_reasons == {"local_mc_expired": 1}
    assert w.core.stats.metrics.secure_by_role == {"caller": 0, "callee": 0}


def test_a_line_expired_at_start_answers_a_peers_hello_488(pki: Pki) -> None:
    config = secure_config(pki)
    late = datetime(2031, 2, 1, tzinfo=UTC)
    security = load_security(config, late)
    assert sorted(security.expired) and not security.lines  # both lines' MCs expired
    w = World(config, security=security, utc_now=lambda: late)
    call = call_in(w)  # confirmed: the line goes clear at once
    assert secure_state(w)["reason"] == "local_mc_expired"
    (hello,) = far_caller(pki).start(w.now)
    out = send_info(w, call, hello.body)  # type: ignore[attr-defined]
    refused = only(pick(out, OUT, status=488), "488 to the peer's Hello").response
    assert refused.body == b"" and pick(out, IN) == []
    assert w.core.stats.clear_reasons == {"local_mc_expired": 1}
    w2 = World(config, security=security, utc_now=lambda: late)
    call_out(w2)
    hello_free = w2.advance(1.0)
    assert pick(hello_free, OUT, method="INFO") == []
    assert w2.core.stats.clear_reasons == {"local_mc_expired": 1}
