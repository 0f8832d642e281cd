"""SIPp interop: SIPp uac -> proxy inside -> proxy outside -> SIPp uas, over UDP and TCP.

Each test starts its own proxy (``conftest.start_proxy``) whose ``outside.upstream`` is
the SIPp uas, runs one scenario pair from ``scenarios/`` and requires both SIPp ends to
pass every call. The scenarios check what arrives with regexp actions (``check_it``);
the tests read SIPp's message traces for what needs both ends at once (headers byte for
byte, Call-IDs) and finish with the proxy idle: no call in ``/status`` and every media
port free again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Proxy, ProxyFactory, Sipp, SippRun

HOST = "127.0.0.1"
TRANSPORTS = ["udp", "tcp"]
CALLER_CALL_ID = ["-cid_str", "caller-cid-%u-%p@%s"]
"""The uac's Call-IDs start with this; the uas checks it never sees one of them."""


@dataclass
class Rig:
    start_proxy: ProxyFactory
    sipp: Sipp
    new_port: Callable[[], int]
    transport: str

    def call(
        self, uac: str, uas: str, *, calls: int = 1, uas_calls: int | None = None,
        media_pairs: int = 8,
    ) -> tuple[Proxy, SippRun, SippRun]:  # fmt: skip
        """Run one scenario pair through a new proxy; both ends must pass every call."""
        uas_port = self.new_port()
        target = f"sip:{HOST}:{uas_port}" + (";transport=tcp" if self.transport == "tcp" else "")
        proxy = self.start_proxy(target, media_pairs=media_pairs)
        callee = self.sipp.uas(uas, uas_port, self.transport, calls=uas_calls or calls)
        extra = [*CALLER_CALL_ID, "-l", "1"]
        caller = self.sipp.uac(uac, proxy.inside, self.transport, calls=calls, extra=extra)
        self.sipp.check(caller, callee)
        proxy.wait_idle()
        return proxy, caller, callee


@pytest.fixture(params=TRANSPORTS)
def rig(
    request: pytest.FixtureRequest, start_proxy: ProxyFactory, sipp: Sipp,
    new_port: Callable[[], int],
) -> Rig:  # fmt: skip
    return Rig(start_proxy, sipp, new_port, request.param)


# --------------------------------------------------------------------------- trace helpers


def first_line(message: str) -> str:
    return message.split("\n", 1)[0].strip()


def find(run: SippRun, direction: str, start: str, nth: int = 0) -> str:
    """The ``nth`` message ``run`` sent/received whose first line starts with ``start``."""
    found = [m for d, m in run.messages() if d == direction and first_line(m).startswith(start)]
    assert len(found) > nth, f"no {direction} {start!r} #{nth} in {run.files['messages']}"
    return found[nth]


def header_lines(message: str, name: str) -> list[str]:
    """Every ``name:`` header line exactly as on the wire (no unfolding, no trimming)."""
    head = message.split("\n\n", 1)[0]
    return [line for line in head.split("\n")[1:] if line.lower().startswith(name.lower() + ":")]


def header(message: str, name: str) -> str:
    (line,) = header_lines(message, name)
    return line.split(":", 1)[1].strip()


def sdp_audio(message: str) -> tuple[str, int]:
    """(connection address, audio port) of the SDP body."""
    body = message.split("\n\n", 1)[1]
    address = re.search(r"^c=IN IP4 (\S+)", body, re.M)
    port = re.search(r"^m=audio (\d+) ", body, re.M)
    assert address and port, body
    return address.group(1), int(port.group(1))


def assert_anchored(proxy: Proxy, message: str) -> None:
    """The SDP offers the proxy's media address, not the peer's."""
    address, port = sdp_audio(message)
    assert address == HOST
    assert proxy.media[0] <= port <= proxy.media[1], (port, proxy.media)


# --------------------------------------------------------------------------- scenarios


def test_basic_call_caller_bye(rig: Rig) -> None:
    proxy, uac, uas = rig.call("uac_call.xml", "uas_call.xml")
    sent, got = find(uac, "sent", "INVITE"), find(uas, "received", "INVITE")
    # Transparency: what the B2BUA does not own arrives byte for byte ...
    for name in ("X-Custom", "P-Asserted-Identity", "Subject"):
        assert header_lines(got, name) == header_lines(sent, name), name
    # ... what it owns is its own on the outside leg ...
    assert header(got, "Call-ID") != header(sent, "Call-ID")
    assert "caller-cid-" not in got
    assert header(got, "From").split(";tag=")[1] != header(sent, "From").split(";tag=")[1]
    assert "x-sipura" in [v.strip() for line in header_lines(got, "Supported")
                          for v in line.split(":", 1)[1].split(",")]  # fmt: skip
    assert f"SIP/2.0/{rig.transport.upper()} {HOST}:{proxy.outside};" in header(got, "Via")
    # ... and media is anchored on the proxy both ways.
    assert_anchored(proxy, got)
    assert_anchored(proxy, find(uac, "received", "SIP/2.0 200"))
    # The answer's extra header came back unchanged as well.
    assert header_lines(find(uac, "received", "SIP/2.0 200"), "X-Custom-Answer") == (
        header_lines(find(uas, "sent", "SIP/2.0 200"), "X-Custom-Answer")
    )
    stats = proxy.status()["stats"]
    assert (stats["calls_total"], stats["calls_answered"]) == (1, 1), stats


def test_basic_call_callee_bye(rig: Rig) -> None:
    _, uac, uas = rig.call("uac_callee_bye.xml", "uas_callee_bye.xml")
    bye = find(uac, "received", "BYE")
    assert header(bye, "Call-ID") == header(find(uac, "sent", "INVITE"), "Call-ID")
    assert header(find(uas, "received", "SIP/2.0 200", 0), "CSeq") == "1 BYE"


def test_cancel_before_answer(rig: Rig) -> None:
    proxy, uac, uas = rig.call("uac_cancel.xml", "uas_cancel.xml")
    assert header(find(uac, "received", "SIP/2.0 200"), "CSeq") == "1 CANCEL"
    assert header(find(uac, "received", "SIP/2.0 487"), "CSeq") == "1 INVITE"
    cancel = find(uas, "received", "CANCEL")
    invite = find(uas, "received", "INVITE")
    # RFC 3261 §9.1: the CANCEL matches the INVITE it cancels (branch, Call-ID, CSeq number).
    assert header(cancel, "Via") == header(invite, "Via")
    assert header(cancel, "Call-ID") == header(invite, "Call-ID")
    assert header(cancel, "CSeq").split()[0] == header(invite, "CSeq").split()[0]
    assert header(find(uas, "received", "ACK"), "CSeq").endswith(" ACK")
    stats = proxy.status()["stats"]
    assert stats["calls_answered"] == 0, stats


def test_busy_relayed(rig: Rig) -> None:
    proxy, uac, _ = rig.call("uac_busy.xml", "uas_busy.xml")
    busy = find(uac, "received", "SIP/2.0 486")
    assert first_line(busy) == "SIP/2.0 486 Busy Here"
    stats = proxy.status()["stats"]
    assert (stats["calls_total"], stats["calls_failed"]) == (1, 1), stats


def test_auth_challenge_round_trip(rig: Rig) -> None:
    _, uac, uas = rig.call("uac_auth.xml", "uas_auth.xml", uas_calls=2)
    challenge_sent = find(uas, "sent", "SIP/2.0 401")
    challenge_got = find(uac, "received", "SIP/2.0 401")
    assert header_lines(challenge_got, "WWW-Authenticate") == (
        header_lines(challenge_sent, "WWW-Authenticate")
    )
    authorization = header_lines(find(uac, "sent", "INVITE", 1), "Authorization")
    assert authorization, "SIPp sent no Authorization"
    assert header_lines(find(uas, "received", "INVITE", 1), "Authorization") == authorization


def test_reinvite_hold_resume(rig: Rig) -> None:
    _, _, uas = rig.call("uac_hold.xml", "uas_hold.xml")
    for nth, direction in ((1, "sendonly"), (2, "sendrecv")):
        got = find(uas, "received", "INVITE", nth)
        assert f"a={direction}" in got
        assert header(got, "CSeq").endswith(" INVITE")
    invites = [m for d, m in uas.messages() if d == "received" and m.startswith("INVITE")]
    assert len({header(m, "Call-ID") for m in invites}) == 1, "re-INVITEs left the dialog"


@pytest.mark.parametrize("side", ["inside", "outside"])
def test_options_to_the_proxy(
    start_proxy: ProxyFactory, sipp: Sipp, new_port: Callable[[], int], side: str
) -> None:
    proxy = start_proxy(f"sip:{HOST}:{new_port()}")
    port = proxy.inside if side == "inside" else proxy.outside
    runs = [sipp.uac("uac_options.xml", port, transport) for transport in TRANSPORTS]
    sipp.check(*runs)
    for run in runs:
        ok = find(run, "received", "SIP/2.0 200")
        supported = [line.lower() for line in header_lines(ok, "Supported")]
        # The outside advertises x-sipura (what an SPA says); the phones never see it.
        assert any("x-sipura" in line for line in supported) == (side == "outside"), supported
    proxy.wait_idle()


def test_sequential_calls_release_everything(rig: Rig) -> None:
    """Five calls one after another through a proxy with media ports for exactly one call:
    each call must give its ports back (else the next gets 503) and leave no call behind."""
    proxy, uac, _ = rig.call("uac_call.xml", "uas_call.xml", calls=5, media_pairs=2)
    stats = proxy.status()["stats"]
    assert (stats["calls_total"], stats["calls_answered"], stats["calls_failed"]) == (5, 5, 0)
    call_ids = {header(m, "Call-ID") for d, m in uac.messages() if m.startswith("INVITE")}
    assert len(call_ids) == 5
