"""Two real baresip phones calling each other through ``sipura-proxy run``.

Each test starts its own proxy (random free ports, its own config), a tshark capture on
``lo`` and two headless baresip UAs, places one call of ~5 s with a distinct tone each
way, and checks the call from every angle: the proxy's ``/status`` (answered, ended),
its ``/calls`` media counters while the call is up (packets both ways on both sides,
no drops but the answerer's pre-answer RTCP, see :func:`early_packets`), the wire
(tshark sees RTP streams on both legs, each direction) and the ears (``sox stat`` of
what each phone recorded is the other's tone).

* inside -> outside: phone on line 1001 dials through the inside address; the callee
  is the proxy's ``outside.upstream``.
* outside -> inside: the phone of line 1001 REGISTERs with the proxy (no registrar
  upstream: the proxy keeps the binding) and a caller on the outside dials 1001 at the
  proxy's outside address.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit.ports import PortBlock
from testkit.processes import Processes, wait_for
from testkit.proxy import LocalProxy
from tests.interop.baresip import (
    Baresip,
    Capture,
    count_between,
    in_range,
    missing_tools,
    write_tone,
)

pytestmark = pytest.mark.skipif(
    bool(missing_tools()), reason=f"interop tools not installed: {', '.join(missing_tools())}"
)

CALL_SECONDS = 5
"""The caller hangs up (BYE) and quits this long after it starts (baresip ``-t``)."""
MIN_RTP = 100
"""RTP packets each direction of each leg must show on the wire: 50 pkt/s at 20 ms
ptime, so a ~4.5 s call sends ~225; half of that leaves room for a slow start."""
MIN_RELAYED = 40
"""Packets each counter must reach in the snapshot taken while the call is up."""
CALLER_HZ, CALLEE_HZ = 1000.0, 440.0
LINE = "1001"
UDP_ONLY = {"transports": ["udp"]}


@dataclass
class Rig:
    """One proxy, one capture, the processes of one test and its free ports."""

    tmp: Path
    procs: Processes
    proxy: LocalProxy
    capture: Capture
    ports: PortBlock
    media: tuple[int, int]
    ues: list[Baresip] = field(default_factory=list)

    def phone(self, name: str, account: str, hz: float) -> Baresip:
        sip = self.ports.take(1)
        rtp = self.ports.take(10)
        wav = write_tone(self.tmp / f"{name}-{hz:.0f}hz.wav", hz)
        ue = Baresip.configure(self.tmp, name, sip_port=sip, rtp_ports=(rtp, rtp + 9),
                               wav=wav, account=account)  # fmt: skip
        self.ues.append(ue)
        return ue

    def diagnostics(self) -> str:
        parts = [f"--- proxy log (tail)\n{self.proxy.log_text()[-6000:]}"]
        for ue in self.ues:
            parts.append(f"--- {ue.name} log (tail)\n{ue.log_text()[-3000:]}")
        if self.capture.file.exists():
            sip_ports = [self.proxy.inside, self.proxy.outside]
            sip_ports += [ue.sip_port for ue in self.ues]
            sip = self.capture.sip_messages(sip_ports)
            parts.append("--- SIP on the wire\n" + "\n".join(" ".join(r) for r in sip))
        return "\n".join(parts)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    ports = PortBlock.take_block(64)
    inside, outside, admin = ports.take(1), ports.take(1), ports.take(1)
    media_min = ports.take(8)
    media = (media_min, media_min + 7)
    proxy = LocalProxy("proxy", tmp_path, inside=inside, outside=outside, admin=admin, media=media)
    bpf = f"udp and (portrange {media[0]}-{media[1]} or port {inside} or port {outside})"
    procs = Processes()
    try:
        yield Rig(tmp_path, procs, proxy, Capture(tmp_path / "call.pcapng", bpf), ports, media)
    finally:
        procs.stop_all()


@dataclass
class CallResult:
    during: list[dict[str, Any]]
    """``/calls`` while media was flowing both ways."""
    status: dict[str, Any]
    """``/status`` after the caller hung up and the call ended."""
    caller_rc: int


def place_call(rig: Rig, caller: Baresip, callee: Baresip, uri: str) -> CallResult:
    """Callee already running; start the capture and the caller, watch the call end."""
    rig.capture.start(rig.procs)
    proc = caller.start(rig.procs, "-e", f"/dial {uri}", "-t", str(CALL_SECONDS))

    def flowing() -> list[dict[str, Any]] | None:
        calls: list[dict[str, Any]] = rig.proxy.get("/calls")
        for call in calls:
            media = call.get("media") or {}
            sides = [media.get(side, [{}])[0] for side in ("inside", "outside")]
            if all(
                s.get("packets_in", 0) >= MIN_RELAYED and s.get("packets_out", 0) >= MIN_RELAYED
                for s in sides
            ):
                return calls
        return None

    try:
        during = wait_for(flowing, CALL_SECONDS, "media both ways through the proxy", 0.1)
        caller_rc = proc.wait(CALL_SECONDS + 15)
        wait_for(lambda: not rig.proxy.get("/calls"), 10, "the call to end on the proxy")
    except (AssertionError, OSError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"{exc}\n{rig.diagnostics()}") from exc
    status = rig.proxy.get("/status")
    if callee.proc is not None:  # stopped, so its recording is complete on disk
        Processes.stop(callee.proc)
    rig.capture.stop()
    return CallResult(during, status, caller_rc)


def early_packets(rig: Rig, offerer: Baresip, answerer: Baresip) -> int:
    """Media packets the answerer sent to the proxy before the proxy relayed its answer.

    baresip starts its RTCP ("APP PING", to open NAT pinholes) as soon as it accepts the
    offer, i.e. with its 180, before the 200 that carries its SDP answer. Until the
    proxy has read that answer it cannot know the answerer's media address, and the
    relay drops such packets as ``wrong_source`` (by design, see
    ``tests/media/test_relay.py::test_packets_before_the_remote_is_known``).
    """
    sip_ports = [rig.proxy.inside, rig.proxy.outside, offerer.sip_port]
    relayed = [
        float(row[0]) for row in rig.capture.sip_messages(sip_ports)
        if int(row[2]) == offerer.sip_port and row[4] == "200" and row[5] == "INVITE"
    ]  # fmt: skip
    assert relayed, "no 200 for the INVITE reached the caller"
    return sum(
        1
        for t, src, dst in rig.capture.udp_packets()
        if t <= relayed[0] and in_range(src, answerer.rtp_ports) and in_range(dst, rig.media)
    )


def check_call(
    rig: Rig, result: CallResult, caller: Baresip, callee: Baresip, caller_side: str
) -> dict[str, Any]:
    """Everything a bridged call with media both ways must show; returns the figures."""
    diag = rig.diagnostics
    assert result.caller_rc == 0, diag()
    stats = result.status["stats"]
    assert stats["calls_answered"] >= 1, (stats, diag())
    assert result.status["calls"] == [], (result.status, diag())

    # The relay's counters, read while the call was up: packets both ways on both sides.
    # wrong_source: none from the caller (its address came with the offer); from the
    # callee at most what it sent before the proxy had its answer (see early_packets).
    (call,) = result.during
    media = call["media"]
    callee_side = "outside" if caller_side == "inside" else "inside"
    early = early_packets(rig, caller, callee)
    for side in ("inside", "outside"):
        (stream,) = media[side]
        assert stream["packets_in"] >= MIN_RELAYED, (side, media)
        assert stream["packets_out"] >= MIN_RELAYED, (side, media)
        dropped = {k: v for k, v in stream["drops"].items() if v}
        if side == callee_side:
            assert stream["drops"]["wrong_source"] <= early, (side, dropped, early)
            dropped.pop("wrong_source", None)
        assert not dropped, (side, media)

    # The wire: RTP on both legs, each direction, and never directly between the phones.
    decode = [f"udp.port=={port},rtp" for port in range(rig.media[0], rig.media[1] + 1, 2)]
    counts = rig.capture.rtp_counts(decode)
    wire = {
        f"{caller.name}->proxy": count_between(counts, caller.rtp_ports, rig.media),
        f"proxy->{caller.name}": count_between(counts, rig.media, caller.rtp_ports),
        f"{callee.name}->proxy": count_between(counts, callee.rtp_ports, rig.media),
        f"proxy->{callee.name}": count_between(counts, rig.media, callee.rtp_ports),
    }
    direct = count_between(counts, caller.rtp_ports, callee.rtp_ports) + count_between(
        counts, callee.rtp_ports, caller.rtp_ports
    )
    streams = rig.capture.rtp_streams(decode)
    assert all(n >= MIN_RTP for n in wire.values()), (wire, counts, diag())
    assert direct == 0, f"media bypassed the proxy: {counts}"
    full = [s for s in streams if s["packets"] >= MIN_RTP]
    assert len(full) == 4, streams
    assert all(s["payload"] in ("g711U", "g711A") and s["lost"] == 0 for s in full), streams

    # The ears: each phone heard the other's tone (sox "Rough frequency"; G.711 and the
    # resampling shift it a little: 1 kHz measures ~974 Hz).
    heard_by_callee, heard_by_caller = callee.heard(), caller.heard()
    for heard, hz in ((heard_by_callee, CALLER_HZ), (heard_by_caller, CALLEE_HZ)):
        assert abs(heard.get("Rough frequency", 0) - hz) < 0.1 * hz, heard
        assert heard.get("RMS amplitude", 0) > 0.1, heard

    figures = {
        "relay": {
            side: {k: media[side][0][k] for k in ("packets_in", "packets_out")}
            | {"wrong_source": media[side][0]["drops"]["wrong_source"]}
            for side in ("inside", "outside")
        },
        "callee_early_packets": early,
        "wire_rtp": wire,
        "streams": [(s["src"][1], s["dst"][1], s["payload"], s["packets"]) for s in streams],
        f"{callee.name}_heard_hz": heard_by_callee.get("Rough frequency"),
        f"{caller.name}_heard_hz": heard_by_caller.get("Rough frequency"),
    }
    print(f"\n{figures}")
    return figures


def test_inside_phone_calls_outside_through_proxy(rig: Rig) -> None:
    callee = rig.phone("callee", "<sip:callee@127.0.0.1>;regint=0;answermode=auto;"
                       "audio_codecs=PCMU,PCMA", CALLEE_HZ)  # fmt: skip
    caller = rig.phone("caller", f"<sip:{LINE}@127.0.0.1>;regint=0;audio_codecs=PCMU,PCMA",
                       CALLER_HZ)  # fmt: skip
    line = {"user_id": LINE, "allowed_sources": [f"127.0.0.1:{caller.sip_port}"]}
    rig.proxy.write_config(upstream=callee.sip_port, lines=[line], sip=UDP_ONLY)
    rig.proxy.run(rig.procs)
    callee.start(rig.procs)

    result = place_call(rig, caller, callee, f"sip:callee@127.0.0.1:{rig.proxy.inside}")

    check_call(rig, result, caller, callee, "inside")
    (call,) = result.during
    assert call["direction"] == "inside->outside", call
    assert call["line"] == LINE, call


def test_outside_calls_registered_inside_phone(rig: Rig) -> None:
    phone = rig.phone("phone", f"<sip:{LINE}@127.0.0.1:{rig.proxy.inside}>;regint=60;"
                      "answermode=auto;audio_codecs=PCMU,PCMA", CALLEE_HZ)  # fmt: skip
    caller = rig.phone("far", "<sip:5550100@127.0.0.1>;regint=0;audio_codecs=PCMU,PCMA",
                       CALLER_HZ)  # fmt: skip
    rig.proxy.write_config(lines=[{"user_id": LINE}], sip=UDP_ONLY)
    rig.proxy.run(rig.procs)
    phone.start(rig.procs)
    wait_for(lambda: LINE in rig.proxy.get("/status")["bindings"], 10,
             f"line {LINE} to register")  # fmt: skip

    result = place_call(rig, caller, phone, f"sip:{LINE}@127.0.0.1:{rig.proxy.outside}")

    check_call(rig, result, caller, phone, "outside")
    (call,) = result.during
    assert call["direction"] == "outside->inside", call
    assert call["line"] == LINE, call
    assert result.status["stats"]["registrations"] >= 1
