"""One call's x-sipura security on the outside leg, sans-IO.

The handshake machines (:mod:`proxy.xsipura.handshake`) know the protocol; this module
knows the *call*: which role the proxy plays on the outside leg (caller when the call
came from a line's phone, callee when it goes to one), with which line's MC and key,
under which policy (secure by default, ``*18``/``*19``, ``require_secure``), and what a
result means for the media and for the phone's user (SRTP switch-over with a grace
window, the secure-call tone, the ``$`` caller-ID refresh, or a hang-up).

The B2BUA core executes the :data:`Action` values it returns; nothing here touches a
socket or a clock (``now`` is monotonic seconds, ``now_utc`` the wall-clock instant used
for MC expiry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, ClassVar

from proxy.b2bua.config import XsipuraConfig
from proxy.b2bua.line_keys import LineSecurity
from proxy.media.commands import AcceptSrtp, ClearSrtp, SrtpKeys, SwitchSrtp
from proxy.media.engine import Side
from proxy.xsipura import handshake as hs

log = logging.getLogger("sipura.secure")

MEDIA_CHECK_INTERVAL = 0.1
"""How often a waiting caller looks whether the phone's RTP flows yet (seconds)."""

KNOWN_OTHER_INFO = frozenset(
    {"application/dtmf-relay", "application/dtmf", "application/media_control+xml"}
)
"""INFO packages that are not x-sipura (profile §2a): relayed as usual."""


def is_xsipura_info(content_type: str, body: bytes) -> bool | None:
    """§2a: True for an x-sipura INFO, False for another package, None for an empty body."""
    if not body.strip():
        return None
    return content_type.split(";", 1)[0].strip().lower() not in KNOWN_OTHER_INFO


class Role(Enum):
    CALLER = "caller"
    CALLEE = "callee"


class SecureState(Enum):
    WAITING = "waiting"
    """Caller: dialog confirmed, waiting for media to flow before the Caller Hello."""
    HANDSHAKING = "handshaking"
    SECURE = "secure"
    CLEAR = "clear"


# --- actions for the core ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendInfo:
    body: str
    content_type: str


@dataclass(frozen=True, slots=True)
class RespondInfo:
    status: int
    reason: str
    body: str | None
    content_type: str


UNBOUND = 0
"""The session id in the media commands this module returns: the policy does not know
the call's media session; :mod:`proxy.b2bua.secure_leg` binds the command to it."""


@dataclass(frozen=True, slots=True)
class Secured:
    """The call just became secure: play the tone, refresh the caller ID."""

    peer: hs.PeerIdentity
    rekey: bool


@dataclass(frozen=True, slots=True)
class Cleared:
    """Stage 2 ended in the clear (counted and shown per call)."""

    reason: hs.ClearReason
    detail: str


@dataclass(frozen=True, slots=True)
class HangUp:
    reason: str


Action = SendInfo | RespondInfo | AcceptSrtp | SwitchSrtp | ClearSrtp | Secured | Cleared | HangUp


class CallSecurity:
    """x-sipura for one call's outside leg."""

    def __init__(
        self,
        *,
        role: Role,
        line: LineSecurity,
        settings: XsipuraConfig,
        label: str,
        dialled_user_id: str = "",
        require_secure: bool | None = None,
        local_mc_expired: bool = False,
    ) -> None:
        self.role = role
        self.line = line
        self.settings = settings
        self.label = label
        self.dialled = dialled_user_id
        self.require_secure = line.require_secure if require_secure is None else require_secure
        self.local_mc_expired = local_mc_expired
        """The line's own MC has expired: nothing is attempted, the call goes clear
        (``local_mc_expired``) once confirmed, and a peer's x-sipura INFO gets 488."""
        self.state = SecureState.WAITING
        self.reason: hs.ClearReason | None = None
        self.detail = ""
        self.peer: hs.PeerIdentity | None = None
        self.generation = -1
        self._caller: hs.CallerHandshake | None = None
        self._callee: hs.CalleeHandshake | None = None
        self._start_at: float | None = None
        self.awaiting_media = False
        """Caller: the start delay passed without the phone's RTP, and the media engine
        reports when it flows (see :meth:`wait_for_media`)."""
        self.handshake_started: float | None = None
        """When the first x-sipura message of the call went out (caller: the Caller
        Hello) or came in (callee): ``sipura_handshake_seconds`` runs from here to
        the switch to SRTP."""
        self._expect_by: float | None = None

    # --- caller role --------------------------------------------------------------------

    def arm(self, now: float) -> None:
        """The outside dialog is confirmed. Caller: start once media flows (and not
        before ``start_delay_s``). Callee with ``require_secure``: the peer must start
        stage 2 within the handshake timeout, or the call is hung up."""
        if self.state is not SecureState.WAITING:
            return
        if self.role is Role.CALLER:
            self._start_at = now + self.settings.start_delay_s
        elif self.require_secure:
            self._expect_by = now + self.settings.handshake_timeout_s

    def ready_to_start(self, now: float) -> bool:
        return (
            self.role is Role.CALLER
            and self.state is SecureState.WAITING
            and self._start_at is not None
            and now >= self._start_at
        )

    def postpone(self, now: float) -> None:
        """Caller: media does not flow yet; look again shortly."""
        if self._start_at is not None:
            self._start_at = now + MEDIA_CHECK_INTERVAL

    def wait_for_media(self) -> None:
        """Caller: media does not flow yet, and the media engine will say when it does
        (:meth:`media_flowing`): no deadline meanwhile, so nothing polls."""
        if self._start_at is not None:
            self._start_at = None
            self.awaiting_media = True

    def media_flowing(self, now: float) -> bool:
        """The phone's first RTP packet arrived: True if this call was waiting for it
        (stage 2 may start now)."""
        if not self.awaiting_media:
            return False
        self.awaiting_media = False
        self._start_at = now
        return True

    def start(self, now: float, local_ssrc: int) -> list[Action]:
        """Caller: send the Caller Hello, with the SSRC the proxy relays toward the peer."""
        self._caller = hs.CallerHandshake(
            certificate=self.line.param.certificate,
            trust=self.line.trust,
            dialled_user_id=self.dialled,
            local_ssrc=local_ssrc,
            timeout=self.settings.handshake_timeout_s,
            grace=self.settings.grace_s,
        )
        self.state = SecureState.HANDSHAKING
        self._start_at = None
        self.handshake_started = now
        log.info("call %s: x-sipura step 1: Caller Hello (%s, ssrc %08x)", self.label,
                 self.line.param.certificate.name, local_ssrc)  # fmt: skip
        return self._translate(self._caller.start(now))

    def rekey(self, now: float) -> list[Action]:
        if self._caller is None or self.state is not SecureState.SECURE:
            return []
        log.info("call %s: x-sipura re-key", self.label)
        return self._translate(self._caller.rekey(now))

    def on_info_response(
        self, status: int, body: bytes | None, now: float, now_utc: datetime
    ) -> list[Action]:
        if self._caller is None:
            return []
        return self._translate(self._caller.receive_response(status, body, now, now_utc))

    def on_info_timeout(self, now: float) -> list[Action]:
        if self._caller is None:
            return []
        return self._translate(self._caller.transaction_timeout(now))

    # --- callee role --------------------------------------------------------------------

    def on_info(self, body: bytes, now: float, now_utc: datetime, local_ssrc: int) -> list[Action]:
        """Callee: an x-sipura INFO arrived on the outside leg; always yields one response."""
        if self.local_mc_expired:  # an expired MC is never presented: refused, as understood
            return [RespondInfo(488, "Not Acceptable Here", None, "")]
        if self._callee is None:
            self._callee = hs.CalleeHandshake(
                certificate=self.line.param.certificate,
                private_key=self.line.private_key,
                trust=self.line.trust,
                local_ssrc=local_ssrc,
                grace=self.settings.grace_s,
            )
        if self.state is SecureState.WAITING:
            self.state = SecureState.HANDSHAKING
        if self.handshake_started is None:
            self.handshake_started = now
        self._expect_by = None
        return self._translate(self._callee.receive_request(body, now, now_utc))

    # --- both ---------------------------------------------------------------------------

    def srtp_authenticated(self, now: float) -> list[Action]:
        machine = self._caller or self._callee
        return [] if machine is None else self._translate(machine.srtp_authenticated(now))

    def next_deadline(self) -> float | None:
        machine = self._caller or self._callee
        candidates = (self._start_at, self._expect_by, machine.next_deadline() if machine else None)
        deadlines = [d for d in candidates if d is not None]
        return min(deadlines) if deadlines else None

    def poll(self, now: float) -> list[Action]:
        if self._expect_by is not None and now >= self._expect_by:
            self._expect_by = None
            if self.state is SecureState.WAITING:
                return self._clear(
                    hs.ClearReason.PEER_UNSUPPORTED, "the peer did not start x-sipura"
                )
        machine = self._caller or self._callee
        return [] if machine is None else self._translate(machine.handle_timer(now))

    def give_up(self, reason: hs.ClearReason, detail: str) -> list[Action]:
        """Policy decided not to try (peer does not advertise x-sipura, *19...)."""
        return self._clear(reason, detail)

    def _translate(self, events: list[hs.Event]) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            actions += self._on_event[type(event)](self, event)
        return actions

    def _send_info(self, event: hs.SendInfo) -> list[Action]:
        return [SendInfo(event.body, event.content_type)]

    def _send_response(self, event: hs.SendResponse) -> list[Action]:
        log.info("call %s: x-sipura callee answers %d %s", self.label, event.status,
                 event.reason)  # fmt: skip
        return [RespondInfo(event.status, event.reason, event.body, event.content_type)]

    def _expect_srtp(self, event: hs.ExpectSrtp) -> list[Action]:
        peer = event.session.peer
        log.info("call %s: x-sipura step 2: Callee Hello from %s <%s> verified; "
                 "step 3: Caller Final sent", self.label, peer.name, peer.user_id)  # fmt: skip
        keys = _media_keys(event.session.keys)
        return [AcceptSrtp(UNBOUND, Side.OUTSIDE, keys, self.settings.srtcp)]

    def _on_secured(self, event: hs.Secured) -> list[Action]:
        return self._secured(event.session)

    def _stay_clear(self, event: hs.StayClear) -> list[Action]:
        return self._clear(event.reason, event.detail)

    def _rekey_failed(self, event: hs.RekeyFailed) -> list[Action]:
        log.warning("call %s: x-sipura re-key failed (%s): %s; keeping the current key",
                    self.label, event.reason.value, event.detail)  # fmt: skip
        return []

    _on_event: ClassVar[dict[type, Callable[[CallSecurity, Any], list[Action]]]] = {
        hs.SendInfo: _send_info,
        hs.SendResponse: _send_response,
        hs.ExpectSrtp: _expect_srtp,
        hs.Secured: _on_secured,
        hs.StayClear: _stay_clear,
        hs.RekeyFailed: _rekey_failed,
    }
    """What each handshake event means for the call (dispatch by type)."""

    def _secured(self, session: hs.SecureSession) -> list[Action]:
        rekey = self.state is SecureState.SECURE
        self.state = SecureState.SECURE
        self.peer = session.peer
        self.generation = session.generation
        self.reason = None
        warn = " (peer MC under the PUBLIC SAMPLE CA: not secure)" if session.peer.sample_ca else ""
        log.info("call %s: x-sipura step 4: %s, peer %s <%s>, ssrc local %08x peer %08x%s",
                 self.label, "re-keyed" if rekey else "SECURE", session.peer.name,
                 session.peer.user_id, session.local_ssrc, session.peer_ssrc, warn)  # fmt: skip
        keys = _media_keys(session.keys)
        settings = self.settings
        switch = SwitchSrtp(UNBOUND, Side.OUTSIDE, keys, settings.grace_s, settings.srtcp)
        return [switch, Secured(session.peer, rekey)]

    def _clear(self, reason: hs.ClearReason, detail: str) -> list[Action]:
        was_secure = self.state is SecureState.SECURE
        self.state = SecureState.CLEAR
        self.reason = reason
        self.detail = detail
        log.warning("call %s: x-sipura: call stays in the clear: %s (%s)", self.label,
                    reason.value, detail)  # fmt: skip
        actions: list[Action] = [Cleared(reason, detail)]
        if was_secure or self._caller:
            actions.append(ClearSrtp(UNBOUND, Side.OUTSIDE))
        if self.require_secure:
            actions.append(HangUp(f"x-sipura: {reason.value}"))
        return actions

    def describe(self) -> dict[str, object]:
        return {
            "role": self.role.value,
            "state": self.state.value,
            "reason": self.reason.value if self.reason else None,
            "peer_name": self.peer.name if self.peer else None,
            "peer_user_id": self.peer.user_id if self.peer else None,
            "peer_sample_ca": self.peer.sample_ca if self.peer else None,
            "generation": self.generation,
        }


def _media_keys(keys: hs.MasterKeys) -> SrtpKeys:
    """The agreed x-sipura keys as media key material (AES_CM_128_HMAC_SHA1_80, §3)."""
    return SrtpKeys(keys.master_key, keys.master_salt)
