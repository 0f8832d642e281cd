"""Media events reaching the sans-IO core: sessions lost with a media worker process.

(SRTP-authenticated reports are driven through the secure-call flows of
``test_secure_core.py``.) The engine names sessions by id; the core finds their calls
through its index, without looking at the other calls.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sipfake
from callflows import IN, OUT, outbound_call, start_call
from sipfake import World, build_response, only, pick

from proxy.media.commands import SessionsLost


@pytest.fixture(autouse=True, scope="module")
def fake_dns() -> Iterator[None]:
    with mock.patch.dict(sipfake.NAMES, {"itsp.example.net": "203.0.113.5"}):
        yield


def test_a_lost_session_hangs_up_its_call_only() -> None:
    w = World()
    lost = outbound_call(w)
    kept = outbound_call(w)
    doomed, survivor = w.media.active
    w.media.report(SessionsLost((doomed.id,), "channel closed"))
    out = w.advance(0)
    byes = pick(out, method="BYE")
    assert {bye.side for bye in byes} == {IN, OUT} and len(byes) == 2
    for bye in byes:
        assert 'text="media relay failed"' in (bye.request.get("reason") or "")
    assert {bye.request.call_id for bye in byes} == {lost.a_invite.call_id, lost.b_invite.call_id}
    for bye in byes:
        w.send(bye.side, build_response(bye.request, 200), bye.dest)
    assert doomed.released and not survivor.released
    assert len(w.core.calls) == 1
    w.media.report(SessionsLost((doomed.id, doomed.id + 100), "again"))  # gone / unknown
    assert w.advance(0) == []
    assert kept.phone.call_id in {call.a.call_id for call in w.core.calls.values()}


def test_a_lost_session_cancels_a_ringing_call() -> None:
    w = World()
    _, b = start_call(w)
    w.upstream(build_response(b.request, 180, to_tag="ring"))
    (session,) = w.media.active
    w.media.report(SessionsLost((session.id,), "stuck"))
    out = w.advance(0)
    only(pick(out, IN, status=487), "487 to the phone")
    only(pick(out, OUT, method="CANCEL"), "CANCEL upstream")
    w.settle()
    assert w.core.calls == {} and w.media.all_returned()
