"""The secured outside leg: x-sipura on a line's behalf, and what the phone's user sees.

:mod:`proxy.b2bua.secure` decides, per call, what the x-sipura protocol does next; this
module carries it out in the call: which calls get a :class:`CallSecurity` (decision
14's policy: line MC, secure by default, ``*18``/``*19``, ``require_secure``), when
stage 2 may start (dialog confirmed *and* the phone's RTP flowing, profile §2), the
INFOs it sends and answers on the outside leg, the SRTP switch-over it asks of the
media engine, and the user indication toward the phone: the secure-call tone and the
``$`` caller-ID refresh (profile §4) by UPDATE or re-INVITE. Requests the proxy
originates for this (:class:`OwnRequest`) are answered here and never relayed.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

from proxy.b2bua import secure as sec
from proxy.b2bua.calls import CallTable, CallTimer
from proxy.b2bua.legs import Call, CallState, Leg, OwnRequest
from proxy.b2bua.line_keys import LineSecurity, Security
from proxy.b2bua.messages import TARGET_REFRESH
from proxy.b2bua.sides import Outbound, SipSides
from proxy.b2bua.teardown import Teardown
from proxy.logsetup import bind_call
from proxy.media.commands import (
    AcceptSrtp,
    ClearSrtp,
    MediaFlowing,
    PlayTone,
    SetTxSsrc,
    SrtpAuthenticated,
    SwitchSrtp,
    WatchSrtp,
)
from proxy.media.engine import MediaEngine, Side
from proxy.sip.headers import SipHeaderError, SipUri, format_hostport
from proxy.sip.message import Request, Response
from proxy.sip.sdp import SdpError
from proxy.sip.transaction import ClientTransaction, ServerTransaction, response_to
from proxy.xsipura.handshake import ClearReason, PeerIdentity

log = logging.getLogger("sipura.b2bua")

XSIPURA_PURPOSE = "x-sipura"
CALLERID_PURPOSE = "callerid"


class SecureLegs:
    """x-sipura for every call that has it, driven by SIP events and call deadlines."""

    def __init__(
        self, sides: SipSides, calls: CallTable, teardown: Teardown, security: Security | None,
        utc_now: Callable[[], datetime], media: MediaEngine,
    ) -> None:  # fmt: skip
        self.sides = sides
        self.calls = calls
        self.teardown = teardown
        self.security = security
        self.utc_now = utc_now
        self.media = media
        self._execute: dict[type, Callable[[Call, Any, float], list[Outbound]]] = {
            sec.SendInfo: self._send_info,
            AcceptSrtp: self._new_keys,
            SwitchSrtp: self._new_keys,
            ClearSrtp: self._clear_srtp,
            sec.Secured: self._secured,
            sec.Cleared: self._cleared,
            sec.HangUp: self._hang_up,
        }

    # --- policy -----------------------------------------------------------------------

    def for_new_call(
        self, call: Call, request: Request, forced: bool | None
    ) -> sec.CallSecurity | None:
        """Who secures this call: the proxy plays the line's SPA on the outside leg."""
        if self.security is None or call.line is None:
            return None
        line, expired = self._line_security(call.line.user_key)
        if line is None:
            if forced:
                log.warning("call %d: *18 dialled, but line %s has no Mini Certificate",
                            call.id, call.line.user_id)  # fmt: skip
            return None
        if call.a.side is Side.INSIDE:  # the phone calls out: the proxy is the x-sipura caller
            wanted = line.secure_by_default if forced is None else forced
            wanted = wanted or line.require_secure  # *19 cannot defeat a policy
            if not wanted:
                log.info("call %d: secure call not requested (%s)", call.id,
                         "*19" if forced is False else "line not secure by default")  # fmt: skip
                return None
            try:
                dialled = SipUri.parse(request.uri).user or ""
            except SipHeaderError:
                dialled = ""
            role = sec.Role.CALLER
        else:  # inbound: the peer decides; the proxy answers as the line's callee
            dialled, role = "", sec.Role.CALLEE
        call.secure_ssrc = secrets.randbits(32) or 1
        return sec.CallSecurity(role=role, line=line, settings=self.security.xsipura,
                                label=call.label, dialled_user_id=dialled,
                                local_mc_expired=expired)  # fmt: skip

    def _line_security(self, user_key: str) -> tuple[LineSecurity | None, bool]:
        """The line's loaded MC and key, and whether that MC has expired (at start-up,
        or since: a proxy runs for months)."""
        assert self.security is not None
        line = self.security.lines.get(user_key)
        if line is not None:
            return line, line.param.certificate.expires <= self.utc_now()
        expired = self.security.expired.get(user_key)
        return expired, expired is not None

    # --- driven by the call -----------------------------------------------------------

    def on_confirmed(self, call: Call, now: float) -> list[Outbound]:
        """The dialog is confirmed (ACK): stage 2 may start (caller role) or the peer is
        expected to start it (callee role with ``require_secure``). A call SDES already
        secured needs no x-sipura: it gets the secure-call tone, but no ``$`` caller ID
        (SDES proves no identity)."""
        if call.sdes is not None and call.sdes.active:
            return self._sdes_secured(call)
        security = call.security
        if security is None:
            if call.line is not None and call.line.require_secure:
                reason = "require_secure: the call could not be secured"
                log.warning("call %d: %s", call.id, reason)
                out = self.teardown.send_bye(call, call.a, now, reason)
                return out + self.teardown.send_bye(call, call.b, now, reason)
            return []
        if security.local_mc_expired:  # the line goes clear, counted (decision 28)
            expires = security.line.param.certificate.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
            detail = f"line {security.line.user_key}'s Mini Certificate expired on {expires}"
            return self._run(call, security.give_up(ClearReason.LOCAL_MC_EXPIRED, detail), now)
        if security.role is sec.Role.CALLEE:
            security.arm(now)
            return self._rearm(call)
        if call.media is None:
            reason = "no anchored media to secure"
            return self._run(call, security.give_up(ClearReason.PEER_UNSUPPORTED, reason), now)
        if not call.b.supports_xsipura and not security.settings.probe_unadvertised:
            reason = "peer did not advertise Supported: x-sipura"
            return self._run(call, security.give_up(ClearReason.PEER_UNSUPPORTED, reason), now)
        security.arm(now)
        return self._rearm(call)

    def _sdes_secured(self, call: Call) -> list[Outbound]:
        self.sides.stats.secured += 1
        tone = self.sides.config.xsipura.tone
        if call.media is not None and tone is not None:
            self.media.apply(PlayTone(call.media.session.id, Side.INSIDE, 0, tone))
        return []

    def on_timer(self, call: Call, now: float) -> list[Outbound]:
        """The call's x-sipura deadline is due."""
        security = call.security
        if security is None or call.state is not CallState.CONFIRMED:
            return []  # stage 2 runs in a confirmed dialog only (profile §2)
        out: list[Outbound] = []
        if security.ready_to_start(now):
            if not _phone_media_flows(call):  # profile §2: after the dialog *and* media
                if self.media.reports_flowing:
                    security.wait_for_media()  # a MediaFlowing event starts it
                else:
                    security.postpone(now)  # look again in 100 ms
            elif call.media is not None:
                sid = call.media.session.id
                self.media.apply(SetTxSsrc(sid, Side.OUTSIDE, call.secure_ssrc))
                out += self._run(call, security.start(now, call.secure_ssrc), now)
        deadline = security.next_deadline()
        if deadline is not None and deadline <= now:
            out += self._run(call, security.poll(now), now)
        return out + self._rearm(call)

    def on_media_flowing(self, event: MediaFlowing, now: float) -> list[Outbound]:
        """The first packet of a session's side arrived: a caller that waits for the
        phone's RTP starts stage 2 now."""
        if event.side is not Side.INSIDE:
            return []
        call = self.calls.by_media(event.session)
        if call is None or call.security is None or not call.security.media_flowing(now):
            return []
        with bind_call(call.fields()):
            return self.on_timer(call, now)

    def on_srtp_authenticated(self, event: SrtpAuthenticated, now: float) -> list[Outbound]:
        """Media reports SRTP that authenticated under the key last handed to it (a
        ``WatchSrtp`` fired): the handshake may switch over (decision 13)."""
        call = self.calls.by_media(event.session)
        if call is None or call.security is None:
            return []
        with bind_call(call.fields()):
            return self._run(call, call.security.srtp_authenticated(now), now)

    def on_info(
        self, call: Call, tx: ServerTransaction, request: Request, now: float
    ) -> list[Outbound]:
        """Callee role: an x-sipura INFO on the outside leg, consumed here, never relayed."""
        security = call.security
        assert security is not None
        if security.role is not sec.Role.CALLEE:
            # Only the dialog's caller starts stage 2 (profile §2).
            warning = [("Warning", '399 - "x-sipura: only the caller starts stage 2"')]
            return self.sides.respond(Side.OUTSIDE, tx, 400, "Bad Request", now, extra=warning)
        if call.media is not None:
            self.media.apply(SetTxSsrc(call.media.session.id, Side.OUTSIDE, call.secure_ssrc))
        actions = security.on_info(request.body, now, self.utc_now(), call.secure_ssrc)
        out: list[Outbound] = []
        for action in actions:
            if isinstance(action, sec.RespondInfo):
                out += self._respond_info(tx, action, now)
        rest = [a for a in actions if not isinstance(a, sec.RespondInfo)]
        return out + self._run(call, rest, now)

    def _respond_info(
        self, tx: ServerTransaction, action: sec.RespondInfo, now: float
    ) -> list[Outbound]:
        response = response_to(tx.request, action.status, action.reason)
        if action.body:
            response.add("Content-Type", action.content_type)
            response.body = action.body.encode("ascii")
        self.sides.advertise(Side.OUTSIDE, response)
        return self.sides.send_response(Side.OUTSIDE, tx, response, now)

    # --- executing the policy's actions -----------------------------------------------

    def _run(self, call: Call, actions: Iterable[sec.Action], now: float) -> list[Outbound]:
        out: list[Outbound] = []
        for action in actions:
            out += self._execute[type(action)](call, action, now)
        return out + self._rearm(call)

    def _rearm(self, call: Call) -> list[Outbound]:
        security = call.security
        when = security.next_deadline() if security is not None else None
        self.calls.arm(call, CallTimer.SECURITY, when)
        return []

    def _send_info(self, call: Call, action: sec.SendInfo, now: float) -> list[Outbound]:
        leg = call.leg_on(Side.OUTSIDE)
        return self.send_own_request(call, leg, "INFO", now, XSIPURA_PURPOSE,
            body=action.body.encode("ascii"), content_type=action.content_type)  # fmt: skip

    def _new_keys(self, call: Call, action: AcceptSrtp | SwitchSrtp, now: float) -> list[Outbound]:
        """Accept or switch to new keys, and hear when the first packet authenticates."""
        if call.media is not None:
            sid = call.media.session.id
            self.media.apply(replace(action, session=sid))
            self.media.apply(WatchSrtp(sid, action.side))
        return []

    def _clear_srtp(self, call: Call, action: ClearSrtp, now: float) -> list[Outbound]:
        if call.media is not None:
            sid = call.media.session.id
            self.media.apply(replace(action, session=sid))
            self.media.apply(SetTxSsrc(sid, action.side, None))
        return []

    def _secured(self, call: Call, action: sec.Secured, now: float) -> list[Outbound]:
        if action.rekey:
            return []
        security = call.security
        if security is not None:
            started = security.handshake_started
            took = None if started is None else now - started
            self.sides.stats.call_secured(security.role.value, took)
        return self._user_indication(call, action.peer, now)

    def _cleared(self, call: Call, action: sec.Cleared, now: float) -> list[Outbound]:
        self.sides.stats.call_cleared(action.reason.value)
        return []

    def _hang_up(self, call: Call, action: sec.HangUp, now: float) -> list[Outbound]:
        log.warning("call %d: require_secure: hanging up (%s)", call.id, action.reason)
        out = self.teardown.send_bye(call, call.a, now, action.reason)
        return out + self.teardown.send_bye(call, call.b, now, action.reason)

    # --- what the phone's user perceives ----------------------------------------------

    def _user_indication(self, call: Call, peer: PeerIdentity, now: float) -> list[Outbound]:
        """What an SPA user perceives: the secure-call tone and ``$`` + the peer's name."""
        settings = call.security.settings if call.security else None
        if settings is None:
            return []
        audio = call.media.audio_index() if call.media is not None else None
        if call.media is not None and audio is not None and settings.tone is not None:
            self.media.apply(PlayTone(call.media.session.id, Side.INSIDE, audio, settings.tone))
        mode = settings.callerid_refresh
        if mode == "off":
            return []
        leg = call.leg_on(Side.INSIDE)
        host, _ = self.sides.advertised(Side.INSIDE)
        name = ("$" + peer.name).replace("\\", "").replace('"', "")
        identity = f'"{name}" <sip:{peer.user_id}@{format_hostport(host, None)}>'
        party = "called" if call.a.side is Side.INSIDE else "calling"
        headers = [
            ("P-Asserted-Identity", identity),
            ("Remote-Party-ID", f"{identity};party={party};screen=yes;privacy=off"),
        ]
        if mode == "reinvite" and call.media is not None and Side.INSIDE in call.media.last_sent:
            return self.send_own_request(call, leg, "INVITE", now, CALLERID_PURPOSE,
                body=call.media.last_sent[Side.INSIDE], content_type="application/sdp",
                headers=headers)  # fmt: skip
        return self.send_own_request(call, leg, "UPDATE", now, CALLERID_PURPOSE, headers=headers)

    # --- requests the proxy originates in a call's dialog -----------------------------

    def send_own_request(
        self, call: Call, leg: Leg, method: str, now: float, purpose: str, *,
        body: bytes = b"", content_type: str = "", headers: Iterable[tuple[str, str]] = (),
    ) -> list[Outbound]:  # fmt: skip
        if leg.dest is None or leg.remote_target is None:
            return []
        cseq = leg.next_cseq()
        if method == "INVITE":
            leg.invite_cseq = cseq
        request = self.sides.dialog_request(leg, method, cseq, self.sides.config.sip.max_forwards)
        if method in TARGET_REFRESH:
            request.add("Contact", self.sides.contact(leg.side, leg.dest.transport))
        for name, value in headers:
            request.add(name, value)
        if body:
            request.add("Content-Type", content_type)
            request.body = body
        self.sides.advertise(leg.side, request)
        context = OwnRequest(call, leg, purpose)
        _, out = self.sides.send_request(leg.side, request, leg.dest, now, context)
        return out

    def on_own_response(
        self, context: OwnRequest, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        call = context.call
        if response.status < 200 or call.state is CallState.TERMINATED:
            return []
        if context.purpose == XSIPURA_PURPOSE and call.security is not None:
            actions = call.security.on_info_response(
                response.status, response.body, now, self.utc_now()
            )
            return self._run(call, actions, now)
        if tx.request.method == "INVITE" and 200 <= response.status < 300:
            if response.body and call.media is not None:
                with contextlib.suppress(SdpError):  # learn where the phone now sends from
                    leg = context.leg
                    host = leg.flow.host if leg.flow else None
                    call.media.relay_sdp(leg.side, response.body, signal_host=host)
            return self.sides.ack(context.leg, tx.request.cseq.number)
        if response.status >= 300:
            log.info("call %d: the phone answered the caller-ID refresh %s with %d", call.id,
                     tx.request.method, response.status)  # fmt: skip
        return []

    def on_own_timeout(
        self, context: OwnRequest, tx: ClientTransaction, now: float
    ) -> list[Outbound]:
        call = context.call
        if context.purpose == XSIPURA_PURPOSE and call.security is not None:
            return self._run(call, call.security.on_info_timeout(now), now)
        return []


def _phone_media_flows(call: Call) -> bool:
    if call.media is None:
        return False
    streams = call.media.session.stats().get(Side.INSIDE) or []
    return bool(streams) and int(streams[0]["packets_in"]) > 0
