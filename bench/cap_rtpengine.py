"""The rtpengine reference of the capacity bench: our own userspace-only, loopback-only
rtpengine (``--table=-1``, ``--interface=127.0.0.1``), driven over its ng control
protocol (``testkit.rtpengine.NG``), bridging a plain RTP/AVP caller to an RTP/SAVP callee with
SDES AES_CM_128_HMAC_SHA1_80; and the check, on sampled packets, that the SRTP it sends
authenticates under the key it advertised (independently, with pylibsrtp).

rtpengine stops reading a socket that delivers more than 50 packets in one read five
times, so it is only ever driven closed loop (``rtpgen``) or paced (``capgen``), never
blasted; :meth:`Rtpengine.overrun_lines` counts its log lines about that guard.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pylibsrtp
from cap_common import HOST, SRTP_LEN, BenchError, pin

from testkit.ports import free_port, free_port_range
from testkit.rtpengine import NG, rtpengine_binary

SUITE = "AES_CM_128_HMAC_SHA1_80"
RTPE_SUITES_OFF = [
    "AEAD_AES_256_GCM",
    "AEAD_AES_128_GCM",
    "AES_256_CM_HMAC_SHA1_80",
    "AES_256_CM_HMAC_SHA1_32",
    "AES_192_CM_HMAC_SHA1_80",
    "AES_192_CM_HMAC_SHA1_32",
    "AES_CM_128_HMAC_SHA1_32",
    "F8_128_HMAC_SHA1_80",
    "F8_128_HMAC_SHA1_32",
    "NULL_HMAC_SHA1_80",
    "NULL_HMAC_SHA1_32",
]
"""rtpengine 10.5 ignores ``only-<SUITE>``; switching every other suite off works."""
OVERRUN_MARK = b"UDP receive queue"
"""rtpengine's log lines when its per-socket overrun guard fires."""
SAMPLE_CALLS = 16
"""Calls whose SRTP is checked per step (both directions, two packets each)."""
PAYLOAD = bytes((j * 7 + 3) & 0xFF for j in range(160))


def rtpengine_version() -> str | None:
    exe = rtpengine_binary()
    if exe is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0].split()[-1] if text else "unknown"
    return "unknown"


def sdes_key(inline: str) -> bytes:
    """The 30-byte master key + salt of an ``a=crypto ... inline:`` value."""
    return base64.b64decode(inline + "=" * (-len(inline) % 4))


@dataclass
class RtpeCall:
    """One bridged call: rtpengine's two ports and the two SDES keys."""

    call_id: str
    caller_port: int
    """rtpengine's port toward the (plain RTP) caller, from its answer SDP."""
    callee_port: int
    """rtpengine's port toward the (SRTP) callee, from its offer SDP."""
    rtpe_key: bytes
    """The key rtpengine advertised in its offer: it protects toward the callee with it."""
    callee_key: bytes
    """The key the callee (the bench) answered with: rtpengine unprotects with it."""


class Rtpengine:
    """A userspace-only, loopback-only rtpengine of our own (stopped by PID)."""

    def __init__(
        self,
        workdir: Path,
        cpus: set[int] | None,
        *,
        name: str = "rtpengine",
        ports: tuple[int, int] | None = None,
        threads: int | None = None,
    ) -> None:
        exe = rtpengine_binary()
        assert exe is not None
        self.ng_port = free_port()
        try:
            port_min, port_max = ports or free_port_range(2000)
        except RuntimeError as exc:
            raise BenchError(f"rtpengine's media ports: {exc}") from None
        self.threads = threads
        self.log_path = workdir / f"{name}.log"
        self._log_seen = 0
        cmd = [
            exe,
            "--config-file=none",
            "--table=-1",
            f"--interface={HOST}",
            f"--listen-ng={HOST}:{self.ng_port}",
            f"--port-min={port_min}",
            f"--port-max={port_max}",
            "--foreground",
            "--log-stderr",
            "--log-level=4",
        ]
        if threads:
            cmd.append(f"--num-threads={threads}")
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pin(self.proc.pid, cpus)
        self.ng = NG(HOST, self.ng_port, timeout=0.3)
        for _ in range(60):
            try:
                self.ng.cmd("ping")
                break
            except (TimeoutError, ConnectionRefusedError, OSError):
                if self.proc.poll() is not None:
                    raise BenchError(f"rtpengine exited at start-up, see {self.log_path}") from None
                time.sleep(0.1)
        else:
            self.stop()
            raise BenchError("rtpengine did not answer ng ping in 6 s")
        self.ng.sock.settimeout(3.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    def _sdp(user: str, port: int, proto: str, crypto: tuple[int, str] | None = None) -> str:
        s = (
            f"v=0\r\no={user} 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n"
        )
        if crypto:
            s += f"a=crypto:{crypto[0]} {SUITE} inline:{crypto[1]}\r\n"
        return s

    def call(self, call_id: str, caller_port: int, callee_port: int) -> RtpeCall:
        """caller RTP/AVP -> rtpengine -> callee RTP/SAVP (SDES), as rtpe_bench.py sets
        it up: offer from the caller, answer from the callee with a fresh key."""
        common = {
            "call-id": call_id,
            "from-tag": "caller-tag",
            "ICE": "remove",
            "replace": ["origin", "session-connection"],
        }
        offer = self.ng.cmd(
            "offer",
            sdp=self._sdp("caller", caller_port, "RTP/AVP"),
            **common,
            **{
                "transport-protocol": "RTP/SAVP",
                "DTLS": "off",
                "SDES": ["no-" + s for s in RTPE_SUITES_OFF],
            },
        )["sdp"]
        crypto = re.search(rf"^a=crypto:(\d+) {SUITE} inline:([A-Za-z0-9+/=]+)", offer, re.M)
        to_callee = re.search(r"^m=audio (\d+) RTP/SAVP ", offer, re.M)
        if not crypto or not to_callee:
            raise BenchError(f"rtpengine did not offer RTP/SAVP with {SUITE}")
        callee_key = os.urandom(30)
        inline = base64.b64encode(callee_key).decode().rstrip("=")
        answer = self.ng.cmd(
            "answer",
            sdp=self._sdp("callee", callee_port, "RTP/SAVP", (int(crypto.group(1)), inline)),
            **common,
            **{"to-tag": "callee-tag"},
        )["sdp"]
        to_caller = re.search(r"^m=audio (\d+) RTP/AVP ", answer, re.M)
        if not to_caller or "a=crypto" in answer:
            raise BenchError("rtpengine did not answer the caller with plain RTP/AVP")
        return RtpeCall(
            call_id,
            int(to_caller.group(1)),
            int(to_callee.group(1)),
            sdes_key(crypto.group(2)),
            callee_key,
        )

    def bridge(self, call_id: str, caller_port: int, callee_port: int) -> int:
        """:meth:`call`, for the closed loop: rtpengine's caller-facing port."""
        return self.call(call_id, caller_port, callee_port).caller_port

    def open_calls(self, n: int, caller_port: int, callee_port: int) -> list[RtpeCall]:
        """n fresh calls, all toward the same two bench sockets (rtpengine's per-call
        ports tell them apart, as the proxy's do)."""
        tag = f"paced-{os.getpid()}-{time.time_ns()}"
        calls: list[RtpeCall] = []
        try:
            for i in range(n):
                calls.append(self.call(f"{tag}-{i}", caller_port, callee_port))
        except BaseException:
            self.delete_all(calls)
            raise
        return calls

    def userspace_only(self, call: RtpeCall) -> bool:
        """True when rtpengine's own view of the call says it is not kernel-forwarded."""
        reply = self.ng.cmd("query", **{"call-id": call.call_id})
        flags = [
            flag
            for tag in (reply.get("tags") or {}).values()
            for media in tag.get("medias", [])
            for stream in media.get("streams", [])
            for flag in stream.get("flags", [])
        ]
        # 10.5 sets "kernelized" also when it merely tried; "no kernel support" = userspace
        return "kernelized" not in flags or "no kernel support" in flags

    def delete(self, call_id: str) -> None:
        with contextlib.suppress(Exception):
            self.ng.cmd("delete", **{"call-id": call_id, "delete-delay": 0})

    def delete_all(self, calls: list[RtpeCall]) -> None:
        for call in calls:
            self.delete(call.call_id)

    def overrun_lines(self) -> int:
        """Lines about rtpengine's overrun guard logged since the last call of this."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_seen)
                data = f.read()
        except OSError:
            return 0
        self._log_seen += len(data)
        return data.count(OVERRUN_MARK)

    def stop(self) -> None:
        self.ng.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------- SRTP check


def rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + PAYLOAD


def _session(key: bytes, ssrc_type: int) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(
        key=key, ssrc_type=ssrc_type, srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
    )
    return pylibsrtp.Session(policy=policy)


def unprotects(key: bytes, packets: list[bytes]) -> list[bytes] | None:
    """The packets unprotected under ``key`` (one stream), or None if any fails."""
    session = _session(key, pylibsrtp.Policy.SSRC_ANY_INBOUND)
    try:
        return [session.unprotect(p) for p in packets]
    except pylibsrtp.Error:
        return None


def callee_stream(
    call: RtpeCall, ssrc: int, seq0: int, k: int, probes: int
) -> tuple[list[bytes], bytes]:
    """The callee's SRTP under the key it answered with: ``probes`` packets before seq0
    (for the check), then k packets from seq0 (for the generator)."""
    session = _session(call.callee_key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    before = [session.protect(rtp(seq0 - probes + j, ssrc)) for j in range(probes)]
    return before, b"".join(session.protect(rtp(seq0 + j, ssrc)) for j in range(k))


async def _collect(
    socks: dict[str, socket.socket], want: int, timeout: float
) -> dict[str, dict[int, list[bytes]]]:
    """Packets received on each socket, by source port, until ``want`` in all or timeout."""
    got: dict[str, dict[int, list[bytes]]] = {name: {} for name in socks}
    count = 0
    deadline = time.monotonic() + timeout
    while count < want and time.monotonic() < deadline:
        for name, sock in socks.items():
            sock.setblocking(False)
            while True:
                try:
                    data, addr = sock.recvfrom(4096)
                except (BlockingIOError, OSError):
                    break
                got[name].setdefault(int(addr[1]), []).append(data)
                count += 1
        await asyncio.sleep(0.005)
    return got


def _ssrc(packet: bytes) -> int:
    return int.from_bytes(packet[8:12], "big") if len(packet) >= 12 else -1


def _stream(packets: list[bytes], ssrc: int, received: dict[str, int]) -> list[bytes]:
    """The packets of one RTP/SRTP stream; the others are counted in ``received``."""
    mine = [p for p in packets if _ssrc(p) == ssrc]
    received["other_streams"] += len(packets) - len(mine)
    return mine


async def check_srtp(
    phone: socket.socket,
    peer: socket.socket,
    calls: list[RtpeCall],
    phone_ssrcs: list[int],
    phone_seq0s: list[int],
    peer_probes: list[list[bytes]],
    peer_plain: list[list[bytes]],
) -> dict[str, Any]:
    """Send, on sampled calls, two RTP packets from the phone socket and the callee's two
    probe SRTP packets from the peer socket, before the generator starts; then check that
    what rtpengine sent the callee is SRTP that authenticates and decrypts under the key
    rtpengine advertised (and fails under another: the check can fail), and that what it
    sent the phone is the callee's plaintext. The sequence numbers precede the
    generator's, so the SRTP streams go on from them."""
    step = max(1, len(calls) // SAMPLE_CALLS)
    sample = list(range(0, len(calls), step))[:SAMPLE_CALLS]
    sent_up: dict[int, list[bytes]] = {}
    for i in sample:
        call = calls[i]
        probes = len(peer_probes[i])
        sent_up[i] = [rtp(phone_seq0s[i] - probes + j, phone_ssrcs[i]) for j in range(probes)]
        for pkt in sent_up[i]:
            phone.sendto(pkt, (HOST, call.caller_port))
        for pkt in peer_probes[i]:
            peer.sendto(pkt, (HOST, call.callee_port))
    want = sum(len(sent_up[i]) + len(peer_probes[i]) for i in sample)
    got = await _collect({"phone": phone, "peer": peer}, want, 3.0)
    up_ok = down_ok = control_failed = 0
    received = {"to_callee": 0, "to_phone": 0, "other_streams": 0}
    for i in sample:
        call = calls[i]
        # Only the sampled streams count (their SSRC is in the clear, SRTP too): a stray
        # packet of another stream on the same port is reported, not judged. rtpengine's
        # threads may relay a call's two packets out of order: compare sorted.
        srtp = _stream(got["peer"].get(call.callee_port, []), phone_ssrcs[i], received)
        srtp.sort(key=lambda p: p[2:4])
        to_phone = _stream(got["phone"].get(call.caller_port, []),
                           _ssrc(peer_plain[i][0]), received)  # fmt: skip
        received["to_callee"] += len(srtp)
        received["to_phone"] += len(to_phone)
        plain = unprotects(call.rtpe_key, srtp) if srtp else None
        sized = all(len(p) == SRTP_LEN for p in srtp)
        up_ok += sized and plain is not None and sorted(plain) == sorted(sent_up[i])
        control_failed += bool(srtp) and unprotects(call.callee_key, srtp[:1]) is None
        down_ok += sorted(to_phone) == sorted(peer_plain[i])
    n = len(sample)
    return {
        "sampled_calls": n,
        "to_callee_authentic": up_ok,
        "to_callee_wrong_key_rejected": control_failed,
        "to_phone_plaintext": down_ok,
        "packets_sent_each_way": sum(len(sent_up[i]) for i in sample),
        "packets_received": received,
        "ok": n > 0 and up_ok == n and control_failed == n and down_ok == n,
    }
