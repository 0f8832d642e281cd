"""Stage-2 key agreement as two sans-IO state machines (profile §2, §2a, §3).

The machines never touch a socket or a clock. The SIP layer feeds them what happened
(a response to our INFO, an INFO body received, an INFO transaction timeout, SRTP that
authenticated, the current time) and executes what they return: INFO bodies to send,
a response to give, and the media decisions (accept SRTP, switch over, stay clear).
That keeps every rule of the profile testable in microseconds with a fake clock, and
lets the B2BUA drive the same code for both legs and for re-keys.

Time is a float in seconds on any monotonic scale chosen by the caller.

Outcomes are machine-readable: :class:`Secured` carries the SRTP master key and salt,
both SSRCs and the peer's MC identity; :class:`StayClear` carries a :class:`ClearReason`.
A failed re-key inside a secured dialog is :class:`RekeyFailed`: the call keeps the
keys it has.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum

from proxy.xsipura import messages as msg
from proxy.xsipura.mc import MalformedCertificate, MiniCertificate
from proxy.xsipura.rsa import PrivateKey, RsaError, decrypt_type2, encrypt_type2
from proxy.xsipura.trust import McStatus, TrustStore

MASTER_KEY_LENGTH = 16
MASTER_SALT_LENGTH = 16
LIBSRTP_SALT_LENGTH = 14
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_CALLEE_TIMEOUT = 32.0
DEFAULT_GRACE = 2.0


class ClearReason(StrEnum):
    """Why a call stays (or falls back) in the clear. Values are a logging contract."""

    BAD_MESSAGE = "bad_message"
    """A stage-2 body did not decode (base64, length, msg_id, version, E(x) padding)."""
    BAD_CERTIFICATE = "bad_certificate"
    """The peer's MC decoded as a message but its fields are not a valid MC."""
    UNTRUSTED_CA = "untrusted_ca"
    EXPIRED = "expired"
    USER_ID_MISMATCH = "user_id_mismatch"
    SSRC_CLASH = "ssrc_clash"
    PEER_UNSUPPORTED = "peer_unsupported"
    """The peer answered the Caller Hello with 4xx/5xx/6xx (not 488) or an empty 200."""
    PEER_REJECTED = "peer_rejected"
    """The peer understood and refused: 488 to our Hello, or an error to our Final."""
    OUT_OF_ORDER = "out_of_order"
    TIMEOUT = "timeout"
    NO_AUTHENTICATED_SRTP = "no_authenticated_srtp"
    """Callee switched, but no SRTP authenticated within the grace window: fall back."""
    LOCAL_MC_EXPIRED = "local_mc_expired"
    """The line's own Mini Certificate has expired: the proxy does not present it, the
    line's calls stay clear (set by the call policy, never by a handshake machine)."""


_VERDICT_REASONS = {
    McStatus.UNTRUSTED_CA: ClearReason.UNTRUSTED_CA,
    McStatus.EXPIRED: ClearReason.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class MasterKeys:
    master_key: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.master_key) != MASTER_KEY_LENGTH or len(self.master_salt) != (
            MASTER_SALT_LENGTH
        ):
            raise ValueError("master key and master salt must be 16 bytes each")

    @property
    def libsrtp_key(self) -> bytes:
        """Key ‖ first 14 salt bytes: the 30-byte input libsrtp's AES_CM_128 expects (§3)."""
        return self.master_key + self.master_salt[:LIBSRTP_SALT_LENGTH]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the peer's MC says about it; shown to users as ``$`` + name."""

    name: str
    user_id: str
    expires: datetime
    key_sha256: str
    ca_sha256: str
    sample_ca: bool

    @classmethod
    def from_certificate(
        cls, certificate: MiniCertificate, ca_sha256: str, sample_ca: bool
    ) -> PeerIdentity:
        return cls(
            name=certificate.name,
            user_id=certificate.user_id,
            expires=certificate.expires,
            key_sha256=certificate.key_sha256,
            ca_sha256=ca_sha256,
            sample_ca=sample_ca,
        )


@dataclass(frozen=True, slots=True)
class SecureSession:
    """Everything the media layer needs to run SRTP on a leg."""

    keys: MasterKeys
    local_ssrc: int
    peer_ssrc: int
    peer: PeerIdentity
    generation: int = 0
    """0 for the first key of the dialog, +1 for every re-key."""


# --- events the machines return ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendInfo:
    """Caller: send an INFO in the dialog with this body (``Content-Type: CONTENT_TYPE``)."""

    body: str
    content_type: str = msg.CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class SendResponse:
    """Callee: answer the INFO just received with this status and optional body."""

    status: int
    reason: str
    body: str | None = None
    content_type: str = msg.CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class ExpectSrtp:
    """Caller: start accepting SRTP under these keys (its Final may be overtaken)."""

    session: SecureSession


@dataclass(frozen=True, slots=True)
class Secured:
    """Switch-over: encrypt outbound and expect SRTP inbound under ``session``."""

    session: SecureSession


@dataclass(frozen=True, slots=True)
class StayClear:
    """Stage 2 is abandoned; the call carries on in the clear."""

    reason: ClearReason
    detail: str


@dataclass(frozen=True, slots=True)
class RekeyFailed:
    """A re-key inside a secured dialog failed; the current keys stay in use."""

    reason: ClearReason
    detail: str


Event = SendInfo | SendResponse | ExpectSrtp | Secured | StayClear | RekeyFailed


def normalize_user_id(user: str) -> str:
    """The caller-ID comparison form (§2a): drop ``*18``/``*19``, then one leading ``+``."""
    if user.startswith(("*18", "*19")):
        user = user[3:]
    return user.removeprefix("+")


class _Refused(Exception):
    """Internal: a check failed; carries the outcome's reason and detail."""

    def __init__(self, reason: ClearReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _verify_peer(
    hello: msg.CallerHello | msg.CalleeHello, trust: TrustStore, now_utc: datetime
) -> tuple[MiniCertificate, PeerIdentity]:
    """The profile's check 2: a valid MC under a trusted CA, not expired."""
    try:
        certificate, verdict = trust.check(hello.mc, now_utc)  # decoded and verified once
    except MalformedCertificate as exc:
        raise _Refused(ClearReason.BAD_CERTIFICATE, str(exc)) from exc
    if not verdict.ok or verdict.ca is None:
        raise _Refused(
            _VERDICT_REASONS[verdict.status],
            f"peer MC {certificate.user_id!r}: {verdict.message}",
        )
    identity = PeerIdentity.from_certificate(
        certificate, trust.fingerprint(verdict.ca), verdict.sample_ca
    )
    return certificate, identity


class CallerState(Enum):
    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    FINAL_SENT = "final_sent"
    FINAL_LOST = "final_lost"
    """The Final's transaction timed out: switch only if SRTP authenticates in time."""
    SECURED = "secured"
    CLEAR = "clear"


class CallerHandshake:
    """The side that sent the dialog's INVITE; only it starts stage 2 (profile §2).

    ``dialled_user_id`` is the user part of the request URI that was dialled; the callee's
    MC must carry the same user id (after :func:`normalize_user_id`).
    """

    def __init__(
        self,
        *,
        certificate: MiniCertificate,
        trust: TrustStore,
        dialled_user_id: str,
        local_ssrc: int,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        grace: float = DEFAULT_GRACE,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._certificate = certificate
        self._trust = trust
        self._dialled = normalize_user_id(dialled_user_id)
        self._local_ssrc = local_ssrc
        self._timeout = timeout
        self._grace = grace
        self._random_bytes = random_bytes
        self.state = CallerState.IDLE
        self.session: SecureSession | None = None
        """The session in force (set at switch-over; kept through a failed re-key)."""
        self._pending: SecureSession | None = None
        self._deadline: float | None = None

    @property
    def secured(self) -> bool:
        return self.session is not None and self.state is not CallerState.CLEAR

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next needs calling (None: nothing pending)."""
        return self._deadline

    def start(self, now: float) -> list[Event]:
        """Send the Caller Hello (first key, or a re-key when already secured)."""
        if self.state not in (CallerState.IDLE, CallerState.SECURED):
            raise RuntimeError(f"cannot start stage 2 in state {self.state.value}")
        self.state = CallerState.HELLO_SENT
        self._deadline = now + self._timeout
        hello = msg.CallerHello(ssrc=self._local_ssrc, mc=self._certificate.encode())
        return [SendInfo(msg.encode_body(hello))]

    rekey = start

    def receive_response(
        self, status: int, body: bytes | str | None, now: float, now_utc: datetime
    ) -> list[Event]:
        """A final (or provisional) response to the INFO we sent last."""
        if status < 200:
            return []
        if self.state is CallerState.HELLO_SENT:
            return self._on_hello_response(status, body, now, now_utc)
        if self.state in (CallerState.FINAL_SENT, CallerState.FINAL_LOST):
            return self._on_final_response(status, body)
        return []  # a late response after we gave up: nothing to do

    def _on_hello_response(
        self, status: int, body: bytes | str | None, now: float, now_utc: datetime
    ) -> list[Event]:
        if status >= 300:
            reason = ClearReason.PEER_REJECTED if status == 488 else ClearReason.PEER_UNSUPPORTED
            return self._fail(reason, f"peer answered the Caller Hello with {status}")
        if body is None or not body.strip():
            return self._fail(ClearReason.PEER_UNSUPPORTED, "200 without a body")
        try:
            reply = msg.decode_body(body)
        except msg.MessageError as exc:
            return self._fail(ClearReason.BAD_MESSAGE, f"Callee Hello: {exc}")
        if not isinstance(reply, msg.CalleeHello):
            return self._fail(ClearReason.BAD_MESSAGE, f"expected Callee Hello, got {reply.msg_id}")
        try:
            certificate, identity = _verify_peer(reply, self._trust, now_utc)
        except _Refused as refused:
            return self._fail(refused.reason, refused.detail)
        if normalize_user_id(certificate.user_id) != self._dialled:
            return self._fail(
                ClearReason.USER_ID_MISMATCH,
                f"callee MC user id {certificate.user_id!r} is not the number dialled"
                f" {self._dialled!r}",
            )
        if reply.ssrc == self._local_ssrc:
            return self._fail(ClearReason.SSRC_CLASH, f"callee uses our SSRC {reply.ssrc:#010x}")
        if self.session is not None and reply.ssrc != self.session.peer_ssrc:
            return self._fail(ClearReason.SSRC_CLASH, "callee changed its SSRC on re-key")
        keys = MasterKeys(
            self._random_bytes(MASTER_KEY_LENGTH), self._random_bytes(MASTER_SALT_LENGTH)
        )
        final = msg.CallerFinal(
            encrypt_type2(certificate.subscriber_key, keys.master_key, self._random_bytes),
            encrypt_type2(certificate.subscriber_key, keys.master_salt, self._random_bytes),
        )
        generation = 0 if self.session is None else self.session.generation + 1
        self._pending = SecureSession(keys, self._local_ssrc, reply.ssrc, identity, generation)
        self.state = CallerState.FINAL_SENT
        self._deadline = now + self._timeout  # the Final's INFO gets a full timeout (§2a)
        return [ExpectSrtp(self._pending), SendInfo(msg.encode_body(final))]

    def _on_final_response(self, status: int, body: bytes | str | None) -> list[Event]:
        if status >= 300:
            return self._fail(
                ClearReason.PEER_REJECTED, f"peer answered the Caller Final with {status}"
            )
        try:
            reply = msg.decode_body(body or "")
        except msg.MessageError as exc:
            return self._fail(ClearReason.BAD_MESSAGE, f"Callee Final: {exc}")
        if not isinstance(reply, msg.CalleeFinal):
            return self._fail(ClearReason.BAD_MESSAGE, f"expected Callee Final, got {reply.msg_id}")
        return self._switch()

    def transaction_timeout(self, now: float) -> list[Event]:
        """The INFO transaction we started timed out (Timer F) without a final response."""
        if self.state is CallerState.HELLO_SENT:
            return self._fail(ClearReason.TIMEOUT, "no response to the Caller Hello")
        if self.state is CallerState.FINAL_SENT:
            return self._final_lost(now)
        return []

    def _final_lost(self, now: float) -> list[Event]:
        # §2a "Lost Callee Final": the callee may have switched; SRTP that authenticates
        # under the key we sent proves it did.
        self.state = CallerState.FINAL_LOST
        self._deadline = now + self._grace
        return []

    def srtp_authenticated(self, now: float) -> list[Event]:
        """The media layer saw the peer's SRTP authenticate under the pending key.

        The callee encrypts only once it has sent the Callee Final, so authenticated SRTP
        proves it switched: the caller switches at once rather than wait for a Final
        that may be lost (§2a). Waiting would leave the callee's grace window (2 s)
        to run out long before the INFO transaction times out (32 s), and the callee
        would fall back to clear while the caller still holds the key.
        """
        if self.state in (CallerState.FINAL_SENT, CallerState.FINAL_LOST):
            return self._switch()
        return []

    def handle_timer(self, now: float) -> list[Event]:
        if self._deadline is None or now < self._deadline:
            return []
        if self.state is CallerState.HELLO_SENT:
            return self._fail(ClearReason.TIMEOUT, "handshake timed out waiting for Callee Hello")
        if self.state is CallerState.FINAL_SENT:
            return self._final_lost(now)
        if self.state is CallerState.FINAL_LOST:
            return self._fail(
                ClearReason.TIMEOUT, "no Callee Final and no authenticated SRTP from the callee"
            )
        self._deadline = None
        return []

    def abandon(self) -> None:
        """The dialog ended: stop without an outcome."""
        self._deadline = None
        self._pending = None
        self.state = CallerState.CLEAR if self.session is None else CallerState.SECURED

    def _switch(self) -> list[Event]:
        assert self._pending is not None
        self.session, self._pending = self._pending, None
        self.state = CallerState.SECURED
        self._deadline = None
        return [Secured(self.session)]

    def _fail(self, reason: ClearReason, detail: str) -> list[Event]:
        self._deadline = None
        self._pending = None
        if self.session is not None:
            self.state = CallerState.SECURED
            return [RekeyFailed(reason, detail)]
        self.state = CallerState.CLEAR
        return [StayClear(reason, detail)]


class CalleeState(Enum):
    IDLE = "idle"
    HELLO_ACCEPTED = "hello_accepted"
    SECURED = "secured"
    CLEAR = "clear"


_BAD_REQUEST = "Bad Request"
_NOT_ACCEPTABLE = "Not Acceptable Here"


class CalleeHandshake:
    """The side that received the dialog's INVITE: answers Hello and Final INFOs.

    Every call of :meth:`receive_request` returns exactly one :class:`SendResponse`
    (first in the list), then any outcome.
    """

    def __init__(
        self,
        *,
        certificate: MiniCertificate,
        private_key: PrivateKey,
        trust: TrustStore,
        local_ssrc: int,
        half_done_timeout: float = DEFAULT_CALLEE_TIMEOUT,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        if private_key.n != certificate.subscriber_key.n:
            raise ValueError("private key does not belong to the certificate")
        self._certificate = certificate
        self._key = private_key
        self._trust = trust
        self._local_ssrc = local_ssrc
        self._half_done_timeout = half_done_timeout
        self._grace = grace
        self.state = CalleeState.IDLE
        self.session: SecureSession | None = None
        self._peer: tuple[int, PeerIdentity] | None = None
        self._accepted_final: bytes | None = None
        self._grace_deadline: float | None = None
        """The lost-Final fallback (§2a): when the session in force falls back to clear
        unless SRTP under it authenticates first. Only authenticated SRTP or the fallback
        itself end it: a re-key, good or bad, runs beside it and never cancels it."""
        self._final_deadline: float | None = None
        """A Hello was accepted: when the handshake is given up if no Caller Final came."""

    @property
    def secured(self) -> bool:
        return self.state is CalleeState.SECURED or (
            self.state is CalleeState.HELLO_ACCEPTED and self.session is not None
        )

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._grace_deadline, self._final_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    def receive_request(self, body: bytes | str, now: float, now_utc: datetime) -> list[Event]:
        """An x-sipura INFO body arrived on the dialog."""
        if not body.strip():
            return [SendResponse(200, "OK")]  # §2a: an empty INFO is answered and ignored
        try:
            request = msg.decode_body(body)
        except msg.MessageError as exc:
            return self._reject(400, _BAD_REQUEST, ClearReason.BAD_MESSAGE, str(exc))
        if isinstance(request, msg.CallerHello):
            return self._on_hello(request, now, now_utc)
        if isinstance(request, msg.CallerFinal):
            return self._on_final(request, body, now)
        return self._reject(
            400,
            _BAD_REQUEST,
            ClearReason.OUT_OF_ORDER,
            f"msg_id {request.msg_id} is not valid in a request",
        )

    def _on_hello(self, hello: msg.CallerHello, now: float, now_utc: datetime) -> list[Event]:
        try:
            _, identity = _verify_peer(hello, self._trust, now_utc)
        except _Refused as refused:
            return self._reject(488, _NOT_ACCEPTABLE, refused.reason, refused.detail)
        if hello.ssrc == self._local_ssrc:
            return self._reject(
                488,
                _NOT_ACCEPTABLE,
                ClearReason.SSRC_CLASH,
                f"caller uses our SSRC {hello.ssrc:#010x}",
            )
        if self.session is not None and hello.ssrc != self.session.peer_ssrc:
            return self._reject(
                488, _NOT_ACCEPTABLE, ClearReason.SSRC_CLASH, "caller changed its SSRC on re-key"
            )
        self._peer = (hello.ssrc, identity)
        self._accepted_final = None
        self.state = CalleeState.HELLO_ACCEPTED
        self._final_deadline = now + self._half_done_timeout
        reply = msg.CalleeHello(ssrc=self._local_ssrc, mc=self._certificate.encode())
        return [SendResponse(200, "OK", msg.encode_body(reply))]

    def _on_final(self, final: msg.CallerFinal, body: bytes | str, now: float) -> list[Event]:
        raw = body.encode("ascii", "replace") if isinstance(body, str) else bytes(body)
        raw = b"".join(raw.split())
        if (
            self.state is CalleeState.SECURED
            and self._accepted_final is not None
            and hmac.compare_digest(raw, self._accepted_final)
        ):
            # The caller retransmitted a Final we already took (our 200 was lost).
            return [SendResponse(200, "OK", msg.encode_body(msg.CalleeFinal()))]
        if self.state is not CalleeState.HELLO_ACCEPTED or self._peer is None:
            return self._reject(
                400,
                _BAD_REQUEST,
                ClearReason.OUT_OF_ORDER,
                "Caller Final without an accepted Hello",
            )
        try:
            keys = MasterKeys(
                decrypt_type2(self._key, final.encrypted_key, MASTER_KEY_LENGTH),
                decrypt_type2(self._key, final.encrypted_salt, MASTER_SALT_LENGTH),
            )
        except RsaError as exc:
            return self._reject(400, _BAD_REQUEST, ClearReason.BAD_MESSAGE, f"Caller Final: {exc}")
        peer_ssrc, identity = self._peer
        generation = 0 if self.session is None else self.session.generation + 1
        self.session = SecureSession(keys, self._local_ssrc, peer_ssrc, identity, generation)
        self._accepted_final = raw
        self._peer = None
        self.state = CalleeState.SECURED
        self._final_deadline = None
        if generation == 0:
            # Fall back if no SRTP authenticates within the grace window (§2a, lost Final).
            self._grace_deadline = now + self._grace
        return [
            SendResponse(200, "OK", msg.encode_body(msg.CalleeFinal())),
            Secured(self.session),
        ]

    def srtp_authenticated(self, now: float) -> list[Event]:
        """The media layer saw the caller's SRTP authenticate under the current key."""
        self._grace_deadline = None
        return []

    def handle_timer(self, now: float) -> list[Event]:
        if self._grace_deadline is not None and now >= self._grace_deadline:
            # No SRTP authenticated: the caller never switched (its Final was lost), so
            # the call falls back to clear, and any re-key under way goes with it.
            self._grace_deadline = None
            self._final_deadline = None
            self._peer = None
            self.session = None
            self.state = CalleeState.CLEAR
            return [
                StayClear(
                    ClearReason.NO_AUTHENTICATED_SRTP,
                    "no SRTP from the caller authenticated within the grace window",
                )
            ]
        if self._final_deadline is not None and now >= self._final_deadline:
            self._final_deadline = None
            if self.state is CalleeState.HELLO_ACCEPTED:
                return self._abandon(ClearReason.TIMEOUT, "no Caller Final after the Callee Hello")
        return []

    def _reject(
        self, status: int, reason_phrase: str, reason: ClearReason, detail: str
    ) -> list[Event]:
        return [SendResponse(status, reason_phrase), *self._abandon(reason, detail)]

    def _abandon(self, reason: ClearReason, detail: str) -> list[Event]:
        """Give up the handshake under way. A session in force keeps its keys *and* its
        lost-Final fallback: a bad re-key Hello must neither break a working call nor
        leave one whose caller never switched silent for ever."""
        self._peer = None
        self._final_deadline = None
        if self.session is not None:
            self.state = CalleeState.SECURED
            return [RekeyFailed(reason, detail)]
        self._grace_deadline = None
        self.state = CalleeState.CLEAR
        return [StayClear(reason, detail)]
