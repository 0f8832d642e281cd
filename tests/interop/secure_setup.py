"""Helpers for ``test_secure.py``: real proxies, plain phones and the independent x-sipura UA.

Everything runs on 127.0.0.1. Ports are picked below the Linux ephemeral range, verified
free and never handed out twice in a session; the phones' and the UA's ports stay bound
(reserved) from the moment they go into a proxy config, so that a test session running
in parallel cannot take them before the phone does. Every process started here
(``sipura-proxy run``, ``mc issue``, ``tshark``) is bounded: started in its own session,
stopped by its PID with SIGTERM, then SIGKILL to its process group.

What plays which part:

* the inside phones are :class:`TestPhone`, the demo's simulated plain phone
  (:mod:`proxy.demo.phone`) extended with a dial-any-URI call, a re-INVITE (hold/resume),
  and a record of every request and RTP packet it received;
* the far x-sipura peer is :class:`xsipura_ua.XsipuraUA`, written from the wire profile
  only, with its own PKI helper (:class:`xsipura_ua.CaKey`, :class:`xsipura_ua.Subscriber`);
* the proxies' line MCs are issued by the proxy's own code (``mc issue`` or
  :mod:`proxy.xsipura`) from the *same* Linksys ``ca-key`` file the UA's helper wrote, so
  each side verifies MCs that the other implementation produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from xsipura_ua import CaKey, check_pattern, pattern_source

from proxy.demo.phone import Phone, _Rtp, _Sip, payload_for
from proxy.sip.message import Request, Response
from proxy.xsipura.keyfiles import load_ca_private_key
from proxy.xsipura.mc import MiniCertificate, MiniCertificateParam, encode_private_key_param
from proxy.xsipura.rsa import generate_subscriber_key

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
TONE_BOUND = 4000
"""Largest sample difference (16-bit linear) a -19 dBm0 tone plus G.711 re-quantisation
can make."""
PROC_TIMEOUT = 5.0
"""How long a stopping process gets before SIGKILL."""

# --------------------------------------------------------------------------- ports

_taken: set[int] = set()


def _free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def free_ports(count: int) -> int:
    """``count`` consecutive ports from an even base, free for UDP and TCP; the first."""
    for _ in range(500):
        base = random.randrange(21000, 32000 - count) & ~1
        span = range(base, base + count)
        if _taken.isdisjoint(span) and all(_free(p) for p in span):
            _taken.update(span)
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {HOST}")


def free_port() -> int:
    return free_ports(1)


def media_range(pairs: int) -> tuple[int, int]:
    base = free_ports(2 * pairs)
    return base, base + 2 * pairs - 1


# --------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """Every subprocess of a test or module: output to a file, stopped by PID."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: Sequence[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}, **kwargs,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = PROC_TIMEOUT) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: it and children
                proc.wait(PROC_TIMEOUT)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class LineMc:
    """A proxy line's provisioning params (base64 text, as in the config)."""

    mini_certificate: str
    srtp_private_key: str


class Pki:
    """One CA made by the test UA's helper; the proxy's code issues the lines' MCs with it."""

    def __init__(self, directory: Path) -> None:
        self.ca = CaKey.generate()
        self.other_ca = CaKey.generate()
        """A CA nobody trusts (the proxies never list it)."""
        self.ca_key_file = directory / "ca.key"
        self.ca_key_file.write_text(self.ca.key_file())
        self.ca_key_file.chmod(0o600)
        self._proxy_ca = load_ca_private_key(self.ca_key_file.read_bytes())
        assert self._proxy_ca.public.n == self.ca.n

    def line_mc(self, name: str, user_id: str, days: int = 30) -> LineMc:
        """Issued by :mod:`proxy.xsipura` (the code behind ``mc issue``)."""
        key = generate_subscriber_key()
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
        certificate = MiniCertificate.issue(self._proxy_ca, name, user_id, expires, key.public)
        param = MiniCertificateParam(certificate, self._proxy_ca.public)
        return LineMc(param.to_base64(), encode_private_key_param(key))

    def issue_with_cli(self, procs: Processes, directory: Path, lines: Iterable[tuple[str, str]]
                       ) -> dict[str, LineMc]:  # fmt: skip
        """``sipura-proxy mc issue --json`` for each (name, user_id), in parallel."""
        started = []
        for name, user_id in lines:
            out = directory / f"mc-{user_id}.json"
            argv = [sys.executable, "-m", "proxy", "mc", "issue", "--ca", str(self.ca_key_file),
                    "--name", name, "--user-id", user_id, "--days", "30", "--json"]  # fmt: skip
            started.append((user_id, out, procs.start(argv, out)))
        issued = {}
        for user_id, out, proc in started:
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                Processes.stop(proc)
                raise AssertionError("mc issue did not finish in 30 s") from None
            text = out.read_text(errors="replace")
            assert code == 0, f"mc issue failed ({code}): {text}"
            data = json.loads(text[text.index("{") :])
            assert data["user_id"] == user_id
            issued[user_id] = LineMc(data["mini_certificate"], data["srtp_private_key"])
        return issued


# --------------------------------------------------------------------------- the proxy


@dataclass
class Line:
    user_id: str
    mc: LineMc | None = None
    contact: str | None = None
    secure_by_default: bool = True
    require_secure: bool = False


@dataclass
class ProxyProc:
    """One ``python -m proxy run`` with its ports, config and log."""

    name: str
    dir: Path
    inside: int = field(default_factory=free_port)
    outside: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    media: tuple[int, int] = field(default_factory=lambda: media_range(32))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / f"{self.name}.toml"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def write_config(
        self, lines: Sequence[Line], *, upstream: int | None = None, xsipura: dict[str, Any]
    ) -> None:
        text = [
            "[inside]", f'listen = "{HOST}:{self.inside}"', f'media_ip = "{HOST}"',
            "[outside]", f'listen = "{HOST}:{self.outside}"', f'media_ip = "{HOST}"',
        ]  # fmt: skip
        if upstream is not None:
            text.append(f'upstream = "sip:{HOST}:{upstream}"')
        text += [
            "[media]", f"port_min = {self.media[0]}", f"port_max = {self.media[1]}",
            "[sip]", 'transports = ["udp"]',
            "[admin]", f'listen = "{HOST}:{self.admin}"',
            "[log]", 'level = "debug"',
            "[xsipura]",
        ]  # fmt: skip
        text += [f"{key} = {json.dumps(value)}" for key, value in xsipura.items()]
        for line in lines:
            text += ["[[line]]", f'user_id = "{line.user_id}"']
            if line.contact:
                text.append(f'contact = "{line.contact}"')
            if line.mc is not None:
                text += [
                    f'mini_certificate = "{line.mc.mini_certificate}"',
                    f'srtp_private_key = "{line.mc.srtp_private_key}"',
                    f"secure_by_default = {str(line.secure_by_default).lower()}",
                    f"require_secure = {str(line.require_secure).lower()}",
                ]
        self.config.write_text("\n".join(text) + "\n")

    def start(self, procs: Processes) -> None:
        argv = [sys.executable, "-m", "proxy", "run", "--config", str(self.config)]
        self.proc = procs.start(argv, self.log)

    def wait_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy {self.name} exited at start-up:\n{self.log_text()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.get("/status")
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy {self.name} not up in {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def get(self, path: str) -> Any:
        with socket.create_connection((HOST, self.admin), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/status")
        return result

    def calls(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/calls")
        return result

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_proxies(procs: Processes, *proxies: ProxyProc) -> None:
    """Start them all at once, then wait for each admin endpoint."""
    for proxy in proxies:
        proxy.start(procs)
    for proxy in proxies:
        proxy.wait_up()


def find_call(calls: list[dict[str, Any]], line: str) -> dict[str, Any] | None:
    for call in calls:
        if call.get("line") == line:
            return call
    return None


def leg_stats(call: dict[str, Any], side: str) -> dict[str, Any]:
    """Stream 0 counters of one side of a ``/calls`` entry."""
    media = call.get("media") or {}
    streams = media.get(side) or [{}]
    result: dict[str, Any] = streams[0]
    return result


@contextlib.contextmanager
def dump_on_failure(*proxies: ProxyProc, extra: Callable[[], str] | None = None) -> Iterator[None]:
    """Print the proxies' logs (pytest shows them with the failure) if the block raises;
    when it does not, the logs must hold no ERROR line and no traceback."""
    try:
        yield
        for proxy in proxies:
            bad = [line for line in proxy.log_text().splitlines()
                   if " ERROR " in line or "Traceback" in line]  # fmt: skip
            assert not bad, f"proxy {proxy.name} logged errors: {bad[:5]}"
    except BaseException:
        for proxy in proxies:
            print(f"===== proxy {proxy.name} log ({proxy.log}) =====\n{proxy.log_text()[-40000:]}")
        if extra is not None:
            with contextlib.suppress(Exception):
                print(extra())
        raise


# --------------------------------------------------------------------------- async helpers


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until truthy; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(0.02)


class Watcher:
    """Polls one proxy's ``/status`` in a thread every ``interval`` s: the latest view of
    its calls, shared by every scenario running concurrently against it."""

    def __init__(self, proxy: ProxyProc, interval: float = 0.1) -> None:
        self.proxy = proxy
        self.interval = interval
        self.status: dict[str, Any] = {"calls": [], "stats": {}}
        self.updated = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> dict[str, Any]:
        self.status = await asyncio.to_thread(self.proxy.status)
        self.updated = time.monotonic()
        return self.status

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(OSError, ValueError, IndexError):
                await self.refresh()

    def call(self, line: str) -> dict[str, Any] | None:
        return find_call(self.status["calls"], line)

    async def fresh_call(self, line: str) -> dict[str, Any] | None:
        """The call of ``line`` as of a snapshot taken after this moment."""
        asked = time.monotonic()
        await until(lambda: self.updated > asked, 5, f"a fresh /status of {self.proxy.name}")
        return self.call(line)

    async def wait_secure_state(self, line: str, timeout: float = 6.0) -> dict[str, Any]:
        """The call once its ``secure.state`` is final (secure or clear)."""

        def final() -> dict[str, Any] | None:
            call = self.call(line)
            secure = (call or {}).get("secure") or {}
            return call if secure.get("state") in ("secure", "clear") else None

        found: dict[str, Any] = await until(final, timeout, f"line {line}: secure/clear")
        return found


# --------------------------------------------------------------------------- the phone


@dataclass
class Rx:
    at: float
    seq: int
    payload: bytes


def reserve_udp(count: int = 1) -> socket.socket:
    """A UDP socket bound to a port of ours (the first of ``count`` free ones), held so
    that no other process (another test session) can take the port meanwhile."""
    for _ in range(20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((HOST, free_ports(count)))
        except OSError:
            sock.close()
            continue
        return sock
    raise RuntimeError("cannot reserve a UDP port")


def _drained_dup(sock: socket.socket) -> socket.socket:
    """A new descriptor for the reserved socket, after discarding what waited in it."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        while True:
            sock.recv(65536)
    dup = sock.dup()
    dup.setblocking(False)
    return dup


@dataclass
class PhoneSpec:
    """A phone's identity and fixed ports (known before the proxy config is written; a
    fresh :class:`TestPhone` is made from it inside each test's event loop). The ports
    stay bound by this spec until :meth:`close`; each phone uses duplicates of them."""

    name: str
    user: str
    marker: int
    sip_socket: socket.socket = field(default_factory=reserve_udp, repr=False)
    rtp_socket: socket.socket = field(default_factory=lambda: reserve_udp(2), repr=False)

    @property
    def sip_port(self) -> int:
        return int(self.sip_socket.getsockname()[1])

    @property
    def rtp_port(self) -> int:
        return int(self.rtp_socket.getsockname()[1])

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{HOST}:{self.sip_port}"

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return _drained_dup(self.sip_socket), _drained_dup(self.rtp_socket)

    def close(self) -> None:
        self.sip_socket.close()
        self.rtp_socket.close()

    def make(self, *, peer_marker: int = 0, peer_tag: int | None = None) -> TestPhone:
        return TestPhone(self, peer_marker=peer_marker, peer_tag=peer_tag)


class TestPhone(Phone):
    """The demo's plain phone, plus what the tests need.

    * :meth:`dial`: INVITE any Request-URI (``sip:*18123@host:port`` ...) via the proxy;
    * :meth:`reinvite`: a re-INVITE with another direction attribute (hold / resume);
    * ``requests`` / ``responses``: every SIP message it received;
    * ``rtp``: every RTP packet it received (time, seq, payload), to check the audio:
      from another phone (``payload_for(seq, peer_marker)``) or from the test UA
      (``xsipura_ua.pattern_source(peer_tag)``).
    """

    __test__ = False  # not a pytest class

    def __init__(self, spec: PhoneSpec, *, peer_marker: int = 0, peer_tag: int | None = None
                 ) -> None:  # fmt: skip
        super().__init__(spec.name, spec.user, spec.sip_port, spec.rtp_port, spec.marker,
                         peer_marker)  # fmt: skip
        self.spec = spec
        self.peer_tag = peer_tag
        self.rtp: list[Rx] = []
        self.requests: list[Request] = []
        self.responses: list[Response] = []
        self.direction = "sendrecv"
        self.version = 1
        self._offset: int | None = None
        self._first_seq: int | None = None
        self.last_sent_seq = 0

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{HOST}:{self.sip_port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sip, rtp = self.spec.sockets()
        self._sip, _ = await loop.create_datagram_endpoint(lambda: _Sip(self), sock=sip)
        self._rtp, _ = await loop.create_datagram_endpoint(lambda: _Rtp(self), sock=rtp)

    def _sdp(self) -> bytes:
        return (
            f"v=0\r\no=- 1 {self.version} IN IP4 {HOST}\r\ns=test phone\r\nc=IN IP4 {HOST}\r\n"
            f"t=0 0\r\nm=audio {self.rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=ptime:20\r\na={self.direction}\r\n"
        ).encode()

    def _request(self, method: str, uri: str, cseq: int) -> Request:
        request = Request(method=method, uri=uri)
        request.add("Via", f"SIP/2.0/UDP {HOST}:{self.sip_port};"
                           f"branch=z9hG4bK{secrets.token_hex(6)};rport")  # fmt: skip
        request.add("Max-Forwards", "70")
        request.add("From", self._dialog["from"])
        request.add("To", self._dialog["to"])
        request.add("Call-ID", self._dialog["call_id"])
        request.add("CSeq", f"{cseq} {method}")
        return request

    def dial(self, uri: str, proxy: tuple[str, int]) -> None:
        """INVITE ``uri`` through ``proxy`` (the proxy's inside address)."""
        self._proxy = proxy
        self._dialog = {
            "call_id": f"{secrets.token_hex(8)}@test-phone",
            "from": f'"{self.name}" <sip:{self.user}@{HOST}>;tag={secrets.token_hex(4)}',
            "to": f"<{uri}>",
        }
        invite = self._request("INVITE", uri, 1)
        invite.add("Contact", f"<{self.contact}>")
        invite.add("Content-Type", "application/sdp")
        invite.body = self._sdp()
        self._send(invite, proxy)

    async def reinvite(self, direction: str, timeout: float = 5.0) -> Response:
        """Re-INVITE in the confirmed dialog (the phone called); the final response."""
        assert self._proxy is not None and "remote_target" in self._dialog
        self._cseq += 1
        cseq = self._cseq
        self.direction = direction
        self.version += 1
        invite = self._request("INVITE", self._dialog["remote_target"], cseq)
        invite.add("Contact", f"<{self.contact}>")
        invite.add("Content-Type", "application/sdp")
        invite.body = self._sdp()
        self._send(invite, self._proxy)

        def final() -> Response | None:
            for response in self.responses:
                if response.cseq.number == cseq and response.status >= 200:
                    return response
            return None

        found: Response = await until(final, timeout, f"{self.name}: re-INVITE {direction}")
        return found

    def pause_media(self) -> None:
        """Stop sending RTP (a phone that put the call on hold)."""
        self._stop_media()

    def restart_media(self, *, ssrc: int, seq: int) -> None:
        """Start a new RTP stream (what many phones do on resume): new SSRC, and a new
        sequence number (RFC 3550: random; here chosen by the test)."""
        self._stop_media()
        self.ssrc = ssrc
        self._first_seq = seq
        self._start_media()

    async def _send_media(self) -> None:
        """The demo phone's paced sender, with a test-chosen first sequence number."""
        loop = asyncio.get_running_loop()
        seq = secrets.randbelow(1000) if self._first_seq is None else self._first_seq
        timestamp = secrets.randbits(31)
        next_at = loop.time()
        while True:
            if self._rtp is not None and self._remote_media is not None:
                header = struct.pack(">BBHII", 0x80, 0, seq & 0xFFFF, timestamp, self.ssrc)
                self._rtp.sendto(header + payload_for(seq, self.marker), self._remote_media)
                self.sent += 1
                self.last_sent_seq = seq & 0xFFFF
            seq += 1
            timestamp = (timestamp + 160) & 0xFFFFFFFF
            next_at += 0.02
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def _on_response(self, response: Response, source: tuple[str, int]) -> None:
        self.responses.append(response)
        super()._on_response(response, source)

    def _on_request(self, request: Request, source: tuple[str, int]) -> None:
        self.requests.append(request)
        super()._on_request(request, source)

    def on_rtp(self, data: bytes) -> None:
        super().on_rtp(data)
        if len(data) >= 12 and data[0] >> 6 == 2:
            seq = struct.unpack_from(">H", data, 2)[0]
            self.rtp.append(Rx(time.monotonic(), seq, data[12 + 4 * (data[0] & 0x0F) :]))

    def expected(self, seq: int) -> bytes | None:
        """The payload the far end sent with ``seq``, when it is known."""
        if self.peer_tag is None:
            return payload_for(seq, self.peer_marker)
        if self._offset is None:  # the UA's seq = its first seq + the pattern's index
            for packet in self.rtp:
                index = check_pattern(packet.payload, self.peer_tag)
                if index is not None:
                    self._offset = (packet.seq - index) & 0xFFFF
                    break
            else:
                return None
        return pattern_source(self.peer_tag)((seq - self._offset) & 0xFFFF)

    def intact(self, packet: Rx) -> bool:
        """Is this exactly what the far end sent (a phone's or the test UA's pattern)?"""
        if self.peer_tag is not None:
            return check_pattern(packet.payload, self.peer_tag) is not None
        return packet.payload == payload_for(packet.seq, self.peer_marker)

    def tone_only(self, packet: Rx) -> bool:
        """Does this altered packet differ from what was sent by a quiet tone only?

        The SPA's tone is at -19 dBm0 (peak ~2550 in 16-bit linear) and is mixed in
        u-law; anything else (a garbled or still encrypted payload) differs by far more."""
        sent = self.expected(packet.seq)
        if sent is None or len(sent) != len(packet.payload):
            return False
        diff = max(abs(ulaw(a) - ulaw(b)) for a, b in zip(sent, packet.payload, strict=True))
        return 0 < diff <= TONE_BOUND

    def requests_named(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]


def ulaw(code: int) -> int:
    """G.711 u-law code -> 16-bit linear."""
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)) - 0x84
    return -magnitude if code & 0x80 else magnitude


def audio_report(phone: TestPhone, since: float = 0.0) -> dict[str, Any]:
    """What ``phone`` heard since ``since``: packets, intact, altered (and how many of
    those differ by a tone only), and whether the sequence numbers are a gap-free run
    without duplicates."""
    got = [p for p in phone.rtp if p.at >= since]
    seqs = [p.seq for p in got]
    unwrapped: list[int] = []
    for seq in seqs:
        if unwrapped:
            delta = (seq - unwrapped[-1]) & 0xFFFF
            seq = unwrapped[-1] + (delta if delta < 0x8000 else delta - 0x10000)
        unwrapped.append(seq)
    contiguous = bool(unwrapped) and sorted(unwrapped) == list(
        range(min(unwrapped), min(unwrapped) + len(unwrapped))
    )
    altered = [p for p in got if not phone.intact(p)]
    return {
        "packets": len(got),
        "intact": len(got) - len(altered),
        "altered": len(altered),
        "tone_only": sum(1 for p in altered if phone.tone_only(p)),
        "contiguous": contiguous,
        "gaps": _gaps(unwrapped),
    }


def _gaps(seqs: list[int]) -> list[tuple[int, int]]:
    ordered = sorted(set(seqs))
    return [(a, b) for a, b in itertools.pairwise(ordered) if b != a + 1][:10]


# --------------------------------------------------------------------------- tshark


@dataclass
class Packet:
    at: float
    src: int
    dst: int
    data: bytes


class Capture:
    """``tshark -i lo`` into a pcapng file with a BPF filter; decoded with
    ``tshark -r ... -T fields -e udp.payload``."""

    def __init__(self, file: Path, bpf: str) -> None:
        self.file = file
        self.bpf = bpf
        self.log = file.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, procs: Processes) -> None:
        self.proc = procs.start(["tshark", "-i", "lo", "-f", self.bpf, "-w", str(self.file)],
                                self.log)  # fmt: skip

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while "Capturing on" not in self.log.read_text(errors="replace"):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tshark did not start: {self.log.read_text()}")
            time.sleep(0.05)
        time.sleep(0.3)  # printed just before the capture really runs

    def stop(self) -> None:
        if self.proc is not None:
            time.sleep(0.3)  # let the last packets reach the file
            Processes.stop(self.proc, timeout=10)

    def packets(self) -> list[Packet]:
        argv = ["tshark", "-r", str(self.file), "-n", "-T", "fields", "-E", "separator=/t",
                "-e", "frame.time_epoch", "-e", "udp.srcport", "-e", "udp.dstport",
                "-e", "udp.payload"]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        found = []
        for line in result.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[3]:
                data = bytes.fromhex(parts[3].replace(":", ""))
                found.append(Packet(float(parts[0]), int(parts[1]), int(parts[2]), data))
        return found


def within(port: int, span: tuple[int, int]) -> bool:
    return span[0] <= port <= span[1]


def classify_outside_flows(
    packets: list[Packet], a: tuple[int, int], b: tuple[int, int], markers: Iterable[int],
    phone_ports: Iterable[int],
) -> dict[tuple[int, int], list[str]]:  # fmt: skip
    """The RTP flows between two proxies' media ranges (their outside legs), each as the
    time-ordered list of its packets' kinds:

    * ``plain``: as long as a phone's packet and its payload is exactly a phone's
      (``payload_for(seq, marker)``) - relayed before the switch-over;
    * ``srtp``: RTP v2 header, 10 bytes (the HMAC-SHA1-80 tag) longer than the phones'
      packets, and a payload that is no phone's payload for that sequence number;
    * anything else is described in full (a failure).

    The phones' own packets (from ``phone_ports``, on the inside legs) fix their length.
    """
    markers = list(markers)
    phone_ports = set(phone_ports)
    phone_sizes = {len(p.data) for p in packets if p.src in phone_ports}
    assert len(phone_sizes) == 1, f"phones sent packets of sizes {phone_sizes}"
    (size,) = phone_sizes
    for p in packets:  # the premise: what the phones sent is their known pattern
        if p.src in phone_ports:
            seq = struct.unpack_from(">H", p.data, 2)[0]
            assert any(p.data[12:] == payload_for(seq, m) for m in markers), p.data.hex()
    flows: dict[tuple[int, int], list[str]] = {}
    for p in sorted(packets, key=lambda p: p.at):
        crossing = (within(p.src, a) and within(p.dst, b)) or (
            within(p.src, b) and within(p.dst, a)
        )
        if not crossing or p.src % 2 or p.dst % 2:  # RTCP (odd ports) is relayed clear
            continue
        data = p.data
        kind = f"other: {len(data)} bytes {data[:16].hex()}"
        if len(data) >= 12 and data[0] >> 6 == 2:
            seq = struct.unpack_from(">H", data, 2)[0]
            mine = [payload_for(seq, m) for m in markers]
            if len(data) == size and data[12:] in mine:
                kind = "plain"
            elif len(data) == size + 10 and data[12:size] not in mine:
                kind = "srtp"
        flows.setdefault((p.src, p.dst), []).append(kind)
    return flows
