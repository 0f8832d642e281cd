"""A scripted SIP phone for the attended-transfer test: what baresip 1.0 cannot do.

baresip 1.0 places a REFER's call to the Refer-To URI with its ``?Replaces=`` mangled
into the Request-URI and no Replaces header, so it cannot be the transferee (and it has
no attended transfer command to be the transferor). This UA can: it registers (digest
MD5, qop=auth), calls, answers, sends a REFER whose Refer-To embeds Replaces (RFC 3891
§6.1), acts on one (202, NOTIFY, then the INVITE with the Replaces header), and replaces
one of its calls when an INVITE names it. Media: PCMU at 20 ms carrying a tone, and a
count of the packets each call received, by source.

It is synchronous and single-threaded on purpose: :func:`pump` polls every UA's sockets
and clocks, so a test reads as the call flow it drives. UDP only, no retransmissions
(loopback does not lose datagrams), and deliberately independent of ``proxy``.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

HOST = "127.0.0.1"


def _ulaw(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    sample = min(abs(sample), 32635) + 132
    exponent = max(0, sample.bit_length() - 8)
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def tone_frame(hz: float, index: int) -> bytes:
    """20 ms of a sine at ``hz`` (PCMU), frame ``index`` of a continuous tone."""
    start = index * 160
    return bytes(
        _ulaw(int(8000 * math.sin(2 * math.pi * hz * (start + i) / 8000))) for i in range(160)
    )


# --- messages ----------------------------------------------------------------------------


@dataclass
class Msg:
    first: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> Msg:
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        return cls(lines[0], headers, body)

    def get(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        found: list[str] = []
        for n, v in self.headers:
            if n.lower() == name.lower():
                found += [part.strip() for part in re.split(r",(?![^<]*>)", v)]
        return found

    @property
    def is_request(self) -> bool:
        return not self.first.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        return self.first.split(" ", 1)[0] if self.is_request else self.cseq[1]

    @property
    def status(self) -> int:
        return int(self.first.split(" ", 2)[1])

    @property
    def cseq(self) -> tuple[int, str]:
        number, method = (self.get("CSeq") or "0 X").split()
        return int(number), method

    def tag(self, header: str) -> str | None:
        match = re.search(r";\s*tag=([^;>\s]+)", self.get(header) or "")
        return match.group(1) if match else None

    def encode(self) -> bytes:
        lines = [self.first] + [f"{n}: {v}" for n, v in self.headers if n != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def uri_of(value: str) -> str:
    match = re.search(r"<([^>]*)>", value)
    return match.group(1) if match else value.split(";", 1)[0].strip()


def sdp(port: int) -> bytes:
    return (
        f"v=0\r\no=ua 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
    ).encode()


def sdp_media(body: bytes) -> tuple[str, int] | None:
    text = body.decode(errors="replace")
    conn = re.search(r"^c=IN IP4 (\S+)", text, re.M)
    media = re.search(r"^m=audio (\d+)", text, re.M)
    return (conn.group(1), int(media.group(1))) if conn and media else None


# --- dialogs -----------------------------------------------------------------------------


@dataclass
class Dialog:
    ua: UA
    call_id: str
    local_tag: str
    local_uri: str
    remote_uri: str
    remote_tag: str | None = None
    remote_target: str = ""
    route: list[str] = field(default_factory=list)
    cseq: int = 1
    rtp: socket.socket | None = None
    peer: tuple[str, int] | None = None
    received: dict[tuple[str, int], int] = field(default_factory=dict)
    """RTP packets received, by source."""
    sent: int = 0
    state: str = "calling"
    """calling, early, confirmed, ended."""
    replaces: str | None = None
    invite_body: bytes = b""

    def replaces_value(self) -> str:
        """This dialog as the far UA must name it: its tag is the to-tag."""
        return f"{self.call_id};to-tag={self.remote_tag};from-tag={self.local_tag}"

    def request(self, method: str, *, headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
                body: bytes = b"", content_type: str = "application/sdp") -> Msg:  # fmt: skip
        if method not in ("ACK", "CANCEL"):
            self.cseq += 1
        msg = Msg(f"{method} {self.remote_target} SIP/2.0", [])
        msg.headers.append(("Via", self.ua.via()))
        msg.headers += [("Route", r) for r in self.route]
        msg.headers += [
            ("Max-Forwards", "70"),
            ("From", f"<{self.local_uri}>;tag={self.local_tag}"),
            ("To", f"<{self.remote_uri}>" + (f";tag={self.remote_tag}" if self.remote_tag else "")),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} {method}"),
            ("Contact", self.ua.contact),
            *headers,
        ]
        if body:
            msg.headers.append(("Content-Type", content_type))
        msg.body = body
        return msg

    @property
    def packets_in(self) -> int:
        return sum(self.received.values())


# --- the phone ---------------------------------------------------------------------------


class UA:
    """One phone: a SIP socket, an outbound proxy, its dialogs."""

    def __init__(self, user: str, domain: str, outbound: tuple[str, int], *, password: str,
                 tone_hz: float) -> None:  # fmt: skip
        self.user = user
        self.domain = domain
        self.outbound = outbound
        self.password = password
        self.tone_hz = tone_hz
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((HOST, 0))
        self.sip.setblocking(False)
        self.port = int(self.sip.getsockname()[1])
        self.contact = f"<sip:{user}@{HOST}:{self.port}>"
        self.aor = f"sip:{user}@{domain}"
        self.dialogs: list[Dialog] = []
        self.registered = False
        self.log: list[str] = []
        self._pending: dict[str, Callable[[Msg], None]] = {}
        """Our client transactions by branch: what to do with their responses."""
        self.notifies: list[str] = []
        """sipfrag status lines of NOTIFYs received (REFER progress)."""

    # --- sending ----------------------------------------------------------------------

    def via(self) -> str:
        return f"SIP/2.0/UDP {HOST}:{self.port};rport;branch=z9hG4bK{secrets.token_hex(8)}"

    def send(self, msg: Msg, on_response: Callable[[Msg], None] | None = None) -> None:
        if msg.is_request and msg.method != "ACK" and on_response is not None:
            branch = re.search(r"branch=([^;\s]+)", msg.get("Via") or "")
            assert branch is not None
            self._pending[branch.group(1)] = on_response
        self.log.append(f"> {msg.first}")
        self.sip.sendto(msg.encode(), self.outbound)

    def respond(self, request: Msg, status: int, reason: str, *, to_tag: str | None = None,
                headers: list[tuple[str, str]] = (), body: bytes = b"") -> None:  # type: ignore[assignment]  # fmt: skip
        msg = Msg(f"SIP/2.0 {status} {reason}", [])
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            for value in [v for n, v in request.headers if n.lower() == name.lower()]:
                if name == "To" and to_tag and ";tag=" not in value:
                    value += f";tag={to_tag}"
                msg.headers.append((name, value))
        msg.headers += [(n, v) for n, v in request.headers if n.lower() == "record-route"]
        msg.headers += [("Contact", self.contact), *headers]
        if body:
            msg.headers.append(("Content-Type", "application/sdp"))
        msg.body = body
        self.log.append(f"> {msg.first} ({request.method})")
        via = request.get("Via") or ""
        received = re.search(r"received=([\d.]+)", via)
        rport = re.search(r"rport=(\d+)", via)
        sent_by = re.match(r"SIP/2\.0/UDP ([\d.]+):(\d+)", via)
        assert sent_by is not None, via
        dest = (received.group(1) if received else sent_by.group(1),
                int(rport.group(1)) if rport else int(sent_by.group(2)))  # fmt: skip
        self.sip.sendto(msg.encode(), dest)

    # --- REGISTER ---------------------------------------------------------------------

    def register(self, expires: int = 600) -> None:
        call_id = secrets.token_hex(8)
        tag = secrets.token_hex(4)
        cseq = [0]

        def build(auth: str | None) -> Msg:
            cseq[0] += 1
            msg = Msg(f"REGISTER sip:{self.domain} SIP/2.0", [
                ("Via", self.via()), ("Max-Forwards", "70"),
                ("From", f"<{self.aor}>;tag={tag}"), ("To", f"<{self.aor}>"),
                ("Call-ID", call_id), ("CSeq", f"{cseq[0]} REGISTER"),
                ("Contact", self.contact), ("Expires", str(expires)),
            ])  # fmt: skip
            if auth:
                msg.headers.append(("Authorization", auth))
            return msg

        def answered(response: Msg) -> None:
            if response.status in (401, 407) and cseq[0] == 1:
                challenge = response.get("WWW-Authenticate") or response.get("Proxy-Authenticate")
                assert challenge is not None
                auth = self.digest(challenge, "REGISTER", f"sip:{self.domain}")
                self.send(build(auth), answered)
            elif response.status >= 200:
                self.registered = response.status == 200

        self.send(build(None), answered)

    def digest(self, challenge: str, method: str, uri: str) -> str:
        params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
        realm, nonce = params["realm"], params["nonce"]
        ha1 = hashlib.md5(f"{self.user}:{realm}:{self.password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
        answer = f'Digest username="{self.user}", realm="{realm}", nonce="{nonce}", uri="{uri}"'
        if "auth" in params.get("qop", ""):
            cnonce, nc = secrets.token_hex(4), "00000001"
            text = f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"
            response = hashlib.md5(text.encode()).hexdigest()
            answer += f', qop=auth, nc={nc}, cnonce="{cnonce}", response="{response}"'
        else:
            response = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
            answer += f', response="{response}"'
        if "opaque" in params:
            answer += f', opaque="{params["opaque"]}"'
        return answer + ", algorithm=MD5"

    # --- calls ------------------------------------------------------------------------

    def _media(self, dialog: Dialog) -> bytes:
        dialog.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dialog.rtp.bind((HOST, 0))
        dialog.rtp.setblocking(False)
        return sdp(int(dialog.rtp.getsockname()[1]))

    def call(self, target: str, *, replaces: str | None = None,
             on_final: Callable[[Msg], None] | None = None) -> Dialog:  # fmt: skip
        dialog = Dialog(self, secrets.token_hex(8), secrets.token_hex(4), self.aor, target,
                        remote_target=target, replaces=replaces)  # fmt: skip
        self.dialogs.append(dialog)
        body = self._media(dialog)
        dialog.invite_body = body
        headers = [("Replaces", replaces)] if replaces else []
        invite = dialog.request("INVITE", body=body, headers=headers)
        dialog.cseq = 1
        invite.headers = [(n, "1 INVITE" if n == "CSeq" else v) for n, v in invite.headers]

        def answered(response: Msg) -> None:
            if response.status < 200:
                if response.tag("To") and dialog.state == "calling":
                    dialog.state = "early"
                return
            if on_final is not None and dialog.state in ("calling", "early"):
                on_final(response)
            if response.status >= 300:
                dialog.state = "ended"
                self.send(self._ack_error(invite, response))
                return
            dialog.remote_tag = response.tag("To")
            contact = response.get("Contact")
            dialog.remote_target = uri_of(contact) if contact else dialog.remote_target
            dialog.route = list(reversed(response.all("Record-Route")))
            dialog.peer = sdp_media(response.body)
            if dialog.state != "confirmed":
                dialog.state = "confirmed"
                self.send(dialog.request("ACK"))

        self.send(invite, answered)
        return dialog

    def _ack_error(self, invite: Msg, response: Msg) -> Msg:
        ack = Msg(invite.first.replace("INVITE", "ACK", 1), [])
        ack.headers = [
            (n, v)
            for n, v in invite.headers
            if n in ("Via", "Route", "From", "Call-ID", "Max-Forwards")
        ]
        ack.headers += [("To", response.get("To") or ""), ("CSeq", f"{invite.cseq[0]} ACK")]
        return ack

    def refer(self, dialog: Dialog, target: str, replaces: Dialog) -> None:
        """Attended transfer: ``dialog``'s peer is asked to call ``target``, replacing
        ``replaces`` (named as the target knows it, RFC 3891 §6.1)."""
        value = quote(replaces.replaces_value(), safe="")
        refer_to = f"<{target}?Replaces={value}>"
        self.send(dialog.request("REFER", headers=[("Refer-To", refer_to),
                                                    ("Referred-By", f"<{self.aor}>")]),
                  lambda r: None)  # fmt: skip

    def bye(self, dialog: Dialog) -> None:
        dialog.state = "ended"
        self.send(dialog.request("BYE"), lambda r: None)

    # --- incoming ---------------------------------------------------------------------

    def on_message(self, msg: Msg) -> None:
        self.log.append(f"< {msg.first}")
        if not msg.is_request:
            branch = re.search(r"branch=([^;\s]+)", msg.get("Via") or "")
            handler = self._pending.get(branch.group(1)) if branch else None
            if handler is not None:
                handler(msg)
            return
        handler_for = {"INVITE": self._on_invite, "BYE": self._on_bye, "REFER": self._on_refer,
                       "NOTIFY": self._on_notify, "ACK": lambda m: None,
                       "OPTIONS": lambda m: self.respond(m, 200, "OK")}  # fmt: skip
        handler_for.get(msg.method, lambda m: self.respond(m, 405, "Method Not Allowed"))(msg)

    def dialog_of(self, msg: Msg) -> Dialog | None:
        mine = msg.tag("To") if msg.is_request else msg.tag("From")
        return next((d for d in self.dialogs
                     if d.call_id == msg.get("Call-ID") and d.local_tag == mine), None)  # fmt: skip

    def _on_invite(self, msg: Msg) -> None:
        existing = self.dialog_of(msg)
        if existing is not None:  # a re-INVITE: keep the media as it is
            existing.peer = sdp_media(msg.body) or existing.peer
            self.respond(msg, 200, "OK", body=existing.invite_body)
            return
        dialog = Dialog(self, msg.get("Call-ID") or "", secrets.token_hex(4), self.aor,
                        uri_of(msg.get("From") or ""), remote_tag=msg.tag("From"),
                        remote_target=uri_of(msg.get("Contact") or ""),
                        route=msg.all("Record-Route"), state="confirmed")  # fmt: skip
        dialog.cseq = 100
        dialog.peer = sdp_media(msg.body)
        replaced = self._replaced(msg.get("Replaces"))
        self.dialogs.append(dialog)
        body = self._media(dialog)
        dialog.invite_body = body
        self.respond(msg, 200, "OK", to_tag=dialog.local_tag, body=body)
        if replaced is not None:  # RFC 3891 §3: the replaced dialog ends
            self.bye(replaced)

    def _replaced(self, value: str | None) -> Dialog | None:
        if not value:
            return None
        call_id, _, rest = value.partition(";")
        tags = dict(re.findall(r"(to-tag|from-tag)=([^;]+)", rest))
        return next((d for d in self.dialogs if d.call_id == call_id.strip()
                     and d.local_tag == tags.get("to-tag")
                     and d.remote_tag == tags.get("from-tag")), None)  # fmt: skip

    def _on_bye(self, msg: Msg) -> None:
        dialog = self.dialog_of(msg)
        if dialog is not None:
            dialog.state = "ended"
        self.respond(msg, 200 if dialog is not None else 481, "OK")

    def _on_notify(self, msg: Msg) -> None:
        self.notifies.append(msg.body.decode(errors="replace").split("\r\n", 1)[0])
        self.respond(msg, 200, "OK")

    def _on_refer(self, msg: Msg) -> None:
        dialog = self.dialog_of(msg)
        if dialog is None:
            self.respond(msg, 481, "Call/Transaction Does Not Exist")
            return
        self.respond(msg, 202, "Accepted")
        refer_to = uri_of(msg.get("Refer-To") or "")
        target, _, query = refer_to.partition("?")
        headers = dict(item.split("=", 1) for item in query.split("&") if "=" in item)
        replaces = next((unquote(v) for k, v in headers.items() if k.lower() == "replaces"),
                        None)  # fmt: skip
        self._notify(dialog, "SIP/2.0 100 Trying")

        def progress(response: Msg) -> None:  # RFC 3515 §2.4.5: the outcome, as sipfrag
            self._notify(dialog, f"SIP/2.0 {response.status} {response.first.split(' ', 2)[2]}")

        self.call(target, replaces=replaces, on_final=progress)

    def _notify(self, dialog: Dialog, frag: str) -> None:
        state = "terminated;reason=noresource" if not frag.startswith("SIP/2.0 1") else "active"
        self.send(dialog.request("NOTIFY", headers=[("Event", "refer"),
                                                     ("Subscription-State", state)],
                                 body=(frag + "\r\n").encode(),
                                 content_type="message/sipfrag;version=2.0"),
                  lambda r: None)  # fmt: skip

    # --- media ------------------------------------------------------------------------

    def media_tick(self) -> None:
        """20 ms of audio on every confirmed call; receive whatever arrived."""
        for dialog in self.dialogs:
            if dialog.rtp is None:
                continue
            while True:
                try:
                    data, addr = dialog.rtp.recvfrom(2048)
                except BlockingIOError:
                    break
                if dialog.state != "ended" and len(data) >= 12 and data[0] >> 6 == 2:
                    key = (str(addr[0]), int(addr[1]))
                    dialog.received[key] = dialog.received.get(key, 0) + 1
            if dialog.state == "confirmed" and dialog.peer is not None:
                seq = dialog.sent & 0xFFFF
                header = struct.pack(
                    "!BBHII", 0x80, 0, seq, dialog.sent * 160, 0x5A5A0000 + self.port
                )
                dialog.rtp.sendto(header + tone_frame(self.tone_hz, dialog.sent), dialog.peer)
                dialog.sent += 1

    def close(self) -> None:
        self.sip.close()
        for dialog in self.dialogs:
            if dialog.rtp is not None:
                dialog.rtp.close()


def pump(uas: list[UA], until: Callable[[], bool], timeout: float, what: str) -> None:
    """Run every UA (SIP and 20 ms media ticks) until ``until()`` or ``timeout``."""
    selector = selectors.DefaultSelector()
    for ua in uas:
        selector.register(ua.sip, selectors.EVENT_READ, ua)
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic()
    try:
        while not until():
            now = time.monotonic()
            if now > deadline:
                logs = "\n".join(f"--- {ua.user}:\n" + "\n".join(ua.log[-30:]) for ua in uas)
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            for key, _ in selector.select(max(0.0, min(next_tick - now, 0.02))):
                ua = key.data
                try:
                    data = ua.sip.recv(65535)
                except BlockingIOError:
                    continue
                if data.strip(b"\r\n"):
                    ua.on_message(Msg.parse(data))
            if time.monotonic() >= next_tick:
                for ua in uas:
                    ua.media_tick()
                next_tick += 0.02
    finally:
        selector.close()
