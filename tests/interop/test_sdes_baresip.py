"""SDES-SRTP over SIP/TLS against a real far end: baresip with its ``srtp`` module.

The legacy phone is a plain baresip on the inside (UDP, RTP); the far end is a second
baresip on the outside, reached over SIP/TLS (certificates from a test CA, checked both
ways by host name 127.0.0.1) with ``mediaenc=srtp-mand`` (RTP/SAVP + a=crypto: SRTP or
no call). Each test places one call of a few seconds with a distinct tone each way and
checks:

* the proxy: the call's method is ``sdes``, packets encrypted and decrypted on the
  outside leg with no SRTP drops, the secure-call tone played to the phone;
* the wire (tshark on ``lo``): the outside leg carries SRTP: its packets are the length
  of the inside leg's plus an auth tag, and not one of them carries, as an RTP payload,
  a payload that the inside leg carried in the clear (so the outside is not plain RTP
  of the same audio); the inside leg is plain RTP;
* the ears: each baresip recorded the other's tone (``sox stat``): baresip decrypted
  the proxy's SRTP with the key the proxy sent it, and the proxy decrypted baresip's.

Directions: the phone calls out (the proxy offers best-effort ``RTP/AVP`` + a=crypto
over TLS; baresip's srtp module answers with its key) and baresip calls the phone's line
at the proxy's TLS port with ``RTP/SAVP`` (the proxy answers with its own key).
A TLS client that sends plaintext to the proxy's TLS port first costs one log line and
does not disturb the call that follows.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit.ports import PortBlock
from testkit.processes import Processes, wait_for
from testkit.proxy import LocalProxy
from tests.interop.baresip import Baresip, Capture, in_range, missing_tools, write_tone
from tests.x509ca import TestCa

pytestmark = pytest.mark.skipif(
    bool(missing_tools()), reason=f"interop tools not installed: {', '.join(missing_tools())}"
)

HOST = "127.0.0.1"
CALL_SECONDS = 6
MIN_RTP = 100
"""Packets each direction of each leg must show (50/s, a call of ~5 s with media)."""
MIN_RELAYED = 40
PHONE_HZ, FAR_HZ = 1000.0, 440.0
LINE = "1001"
SRTP_TAGS = (10, 4)
"""HMAC-SHA1-80 or -32 auth tag lengths: an SRTP packet is the RTP one plus one of these."""


@dataclass
class Rig:
    tmp: Path
    procs: Processes
    proxy: LocalProxy
    tls_port: int
    capture: Capture
    ports: PortBlock
    media: tuple[int, int]
    ca: TestCa
    ues: list[Baresip] = field(default_factory=list)

    def phone(self, name: str, account: str, hz: float, *, tls: bool = False) -> Baresip:
        """A baresip UA; ``tls``: the far end (srtp module, a certificate for 127.0.0.1
        signed by the test CA, the CA as its trust store; TLS on its SIP port + 1)."""
        sip = self.ports.take(2)
        rtp = self.ports.take(10)
        wav = write_tone(self.tmp / f"{name}-{hz:.0f}hz.wav", hz)
        extra: list[tuple[str, str]] = []
        if tls:
            issued = self.ca.issue(name, ips=(HOST,))
            bundle = self.tmp / f"{name}-bundle.pem"  # libre wants certificate and key in one
            bundle.write_bytes(issued.certificate.read_bytes() + issued.key.read_bytes())
            extra = [("module", "srtp.so"), ("sip_certificate", str(bundle)),
                     ("sip_cafile", str(self.ca.pem))]  # fmt: skip
        ue = Baresip.configure(self.tmp, name, sip_port=sip, rtp_ports=(rtp, rtp + 9), wav=wav,
                               account=account, extra=extra)  # fmt: skip
        self.ues.append(ue)
        return ue

    def diagnostics(self) -> str:
        parts = [f"--- proxy log (tail)\n{self.proxy.log_text()[-8000:]}"]
        for ue in self.ues:
            parts.append(f"--- {ue.name} log (tail)\n{ue.log_text()[-4000:]}")
        return "\n".join(parts)

    def configure_proxy(self, *, upstream: str | None = None, lines: list[dict[str, Any]],
                        sdes: str | None = None) -> None:  # fmt: skip
        """TLS on the outside (``sdes`` then defaults to "offer"), the test CA trusted."""
        issued = self.ca.issue("proxy", ips=(HOST,))
        self.proxy.write_config(
            upstream=upstream, lines=lines,
            sip={"transports": ["udp", "tcp", "tls"]},
            tls={"certificate": str(issued.certificate), "private_key": f"@{issued.key}",
                 "ca": str(self.ca.pem)},
            outside={"tls_listen": f"{HOST}:{self.tls_port}", "sdes": sdes},
        )  # fmt: skip


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    ports = PortBlock.take_block(64)
    inside, outside, admin, tls_port = (ports.take(1) for _ in range(4))
    media_min = ports.take(8)
    media = (media_min, media_min + 7)
    proxy = LocalProxy("proxy", tmp_path, inside=inside, outside=outside, admin=admin, media=media)
    bpf = f"udp and portrange {media[0]}-{media[1]}"
    procs = Processes()
    try:
        yield Rig(tmp_path, procs, proxy, tls_port, Capture(tmp_path / "media.pcapng", bpf),
                  ports, media, TestCa(tmp_path))  # fmt: skip
    finally:
        procs.stop_all()


def plaintext_to_tls_port(rig: Rig) -> None:
    """A phone misconfigured for TCP on the TLS port: refused at the handshake."""
    with socket.create_connection((HOST, rig.tls_port), timeout=5) as sock:
        sock.sendall(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nContent-Length: 0\r\n\r\n")
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    wait_for(lambda: "TLS handshake from" in rig.proxy.log_text(), 5, "the handshake line")


def run_call(rig: Rig, caller: Baresip, uri: str) -> dict[str, Any]:
    """The callee runs; start the caller, wait for media both ways on both legs and for
    the end of the call, stop everything that records; the call as ``/calls`` showed it
    last (less than 0.2 s before it ended)."""
    rig.capture.start(rig.procs)
    proc = caller.start(rig.procs, "-e", f"/dial {uri}", "-t", str(CALL_SECONDS))

    def flowing() -> dict[str, Any] | None:
        for call in rig.proxy.calls():
            media = call.get("media") or {}
            sides = [media.get(side, [{}])[0] for side in ("inside", "outside")]
            if all(s.get("packets_in", 0) >= MIN_RELAYED and s.get("packets_out", 0) >= MIN_RELAYED
                   for s in sides):  # fmt: skip
                return call
        return None

    latest: list[dict[str, Any]] = []

    def ended() -> bool:
        calls = rig.proxy.calls()
        latest[:] = calls or latest
        return not calls

    try:
        wait_for(flowing, CALL_SECONDS + 5, "media both ways through the proxy", 0.1)
        wait_for(ended, CALL_SECONDS + 15, "the call to end on the proxy", 0.2)
        assert proc.wait(10) == 0
    except (AssertionError, OSError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"{exc}\n{rig.diagnostics()}") from exc
    for ue in rig.ues:
        if ue.proc is not None and ue.proc.poll() is None:
            Processes.stop(ue.proc)  # its recordings are complete on disk once it exits
    rig.capture.stop()
    (result,) = latest  # the last snapshot, a fraction of a second before the end
    return result


def rtp_payloads(rig: Rig) -> list[tuple[int, int, bytes]]:
    """(source port, destination port, RTP payload) of every packet to or from the
    proxy's media ports, decoded as RTP (an SRTP packet decodes too: header in the
    clear, its payload the ciphertext and the auth tag)."""
    decode = [f"udp.port=={port},rtp" for port in range(rig.media[0], rig.media[1] + 1, 2)]
    rows = rig.capture.fields("rtp", "udp.srcport", "udp.dstport", "rtp.payload",
                              decode=decode, check=False)  # fmt: skip
    return [(int(s), int(d), bytes.fromhex(p.replace(":", ""))) for s, d, p in rows if p]


def check_outside_is_srtp(rig: Rig, phone: Baresip, far: Baresip) -> dict[str, int]:
    """The inside leg carries the phone's audio in the clear, the outside leg only SRTP."""
    packets = rtp_payloads(rig)

    def leg(src: tuple[int, int], dst: tuple[int, int]) -> list[bytes]:
        return [p for s, d, p in packets if in_range(s, src) and in_range(d, dst)]

    phone_out, phone_in = leg(phone.rtp_ports, rig.media), leg(rig.media, phone.rtp_ports)
    far_in, far_out = leg(rig.media, far.rtp_ports), leg(far.rtp_ports, rig.media)
    counts = {"phone->proxy": len(phone_out), "proxy->phone": len(phone_in),
              "proxy->far": len(far_in), "far->proxy": len(far_out)}  # fmt: skip
    assert all(n >= MIN_RTP for n in counts.values()), counts
    plain = set(phone_out) | set(phone_in)  # every G.711 payload the inside leg carried
    assert all(len(p) == 160 for p in plain), "inside: not plain 20 ms G.711"
    for name, payloads in (("proxy->far", far_in), ("far->proxy", far_out)):
        tags = {len(p) - 160 for p in payloads}
        assert tags <= set(SRTP_TAGS) and len(tags) == 1, (name, tags)
        tag = tags.pop()
        clear = [p for p in payloads if p in plain or p[:-tag] in plain]
        assert not clear, f"{name}: {len(clear)} packets carry inside audio in the clear"
    return counts


def check_call(rig: Rig, call: dict[str, Any], phone: Baresip, far: Baresip) -> None:
    assert call["method"] == "sdes", call
    outside, inside = call["media"]["outside"][0], call["media"]["inside"][0]
    assert outside["packets_encrypted"] >= MIN_RELAYED, outside
    assert outside["packets_decrypted"] >= MIN_RELAYED, outside
    # baresip sends some RTCP in the clear on its SRTP stream (an APP "PING" as the stream
    # starts, beside the same packet as SRTCP; a BYE as it ends): dropped, and counted as
    # plain. Every other packet authenticated.
    drops = outside["drops"]
    assert drops["srtp_replay"] == drops["srtp_protect"] == 0, outside
    assert drops["srtp_auth"] == outside["plain_after_grace"] <= 2, outside
    assert inside["packets_encrypted"] == inside["packets_decrypted"] == 0, inside
    wire = check_outside_is_srtp(rig, phone, far)
    heard = {ue.name: ue.heard() for ue in (phone, far)}
    for ue, hz in ((phone, FAR_HZ), (far, PHONE_HZ)):
        assert abs(heard[ue.name].get("Rough frequency", 0) - hz) < 0.1 * hz, (ue.name, heard)
        assert heard[ue.name].get("RMS amplitude", 0) > 0.1, (ue.name, heard)
    print({"wire": wire, "heard_hz": {k: v.get("Rough frequency") for k, v in heard.items()},
           "outside": {k: outside[k] for k in ("packets_encrypted", "packets_decrypted")},
           "tone_packets": inside["tone_packets"]})  # fmt: skip


@pytest.mark.parametrize(("sdes", "mediaenc"), [("offer", "srtp"), ("require", "srtp-mand")])
def test_phone_calls_baresip_over_tls_secured_with_sdes(rig: Rig, sdes: str, mediaenc: str) -> None:
    """``offer``: RTP/AVP with a=crypto, which baresip's best-effort ``srtp`` takes (its
    ``srtp-mand`` refuses a non-SAVP offer: 488); ``require``: RTP/SAVP."""
    far = rig.phone("far", f"<sip:far@{HOST};transport=tls>;regint=0;answermode=auto;"
                    f"mediaenc={mediaenc};audio_codecs=PCMU,PCMA", FAR_HZ, tls=True)  # fmt: skip
    phone = rig.phone("phone", f"<sip:{LINE}@{HOST}>;regint=0;audio_codecs=PCMU,PCMA",
                      PHONE_HZ)  # fmt: skip
    line = {"user_id": LINE, "allowed_sources": [f"{HOST}:{phone.sip_port}"]}
    rig.configure_proxy(upstream=f"sip:far@{HOST}:{far.sip_port + 1};transport=tls", lines=[line],
                        sdes=sdes)  # fmt: skip
    rig.proxy.run(rig.procs)
    plaintext_to_tls_port(rig)
    far.start(rig.procs)

    call = run_call(rig, phone, f"sip:far@{HOST}:{rig.proxy.inside}")

    assert call["direction"] == "inside->outside", call
    check_call(rig, call, phone, far)
    assert call["media"]["inside"][0]["tone_packets"] > 0  # the secure-call tone, for SDES too
    log = rig.proxy.log_text()
    assert log.count("TLS handshake from") == 1, "one line for the plaintext client"


def test_baresip_calls_a_line_over_tls_with_savp(rig: Rig) -> None:
    phone = rig.phone("phone", f"<sip:{LINE}@{HOST}:{rig.proxy.inside}>;regint=60;"
                      "answermode=auto;audio_codecs=PCMU,PCMA", PHONE_HZ)  # fmt: skip
    far = rig.phone("far", f"<sip:5550100@{HOST};transport=tls>;regint=0;mediaenc=srtp-mand;"
                    "audio_codecs=PCMU,PCMA", FAR_HZ, tls=True)  # fmt: skip
    rig.configure_proxy(lines=[{"user_id": LINE}])
    rig.proxy.run(rig.procs)
    phone.start(rig.procs)
    wait_for(lambda: LINE in rig.proxy.status()["bindings"], 10, f"line {LINE} to register")

    call = run_call(rig, far, f"sip:{LINE}@{HOST}:{rig.tls_port}")  # (the account adds TLS)

    assert call["direction"] == "outside->inside", call
    check_call(rig, call, phone, far)
