"""CallerHandshake and CalleeHandshake driven against each other in memory, fake clocks."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from proxy.media.srtp import SrtpContext
from proxy.xsipura import handshake as hs
from proxy.xsipura import messages, rsa
from proxy.xsipura.trust import TrustStore, ca_fingerprint

if TYPE_CHECKING:
    from testkit.pki import Party, Pki

NOW_UTC = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
CALLER_SSRC = 0x0A0A0A0A
CALLEE_SSRC = 0x0B0B0B0B
STEP = 0.1
"""Fake seconds between two hops of the driver."""

R = hs.ClearReason


# --- driver --------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One INFO transaction: the body sent, the callee's events, the caller's reaction."""

    request: str
    callee_events: list[hs.Event]
    caller_events: list[hs.Event]

    @property
    def response(self) -> hs.SendResponse:
        first = self.callee_events[0]
        assert isinstance(first, hs.SendResponse)
        return first


@dataclass
class Trace:
    start_events: list[hs.Event]
    exchanges: list[Exchange] = field(default_factory=list)
    time: float = 0.0
    """Fake time of the last hop."""
    dropped: hs.SendResponse | None = None
    """The response that was lost on the way back, if any."""

    @property
    def caller_events(self) -> list[hs.Event]:
        events = list(self.start_events)
        for exchange in self.exchanges:
            events.extend(exchange.caller_events)
        return events

    @property
    def callee_events(self) -> list[hs.Event]:
        return [e for exchange in self.exchanges for e in exchange.callee_events]

    def caller_outcomes(self) -> list[hs.Event]:
        return [e for e in self.caller_events if not isinstance(e, hs.SendInfo)]

    def callee_outcomes(self) -> list[hs.Event]:
        return [e for e in self.callee_events if not isinstance(e, hs.SendResponse)]

    @property
    def statuses(self) -> list[int]:
        return [exchange.response.status for exchange in self.exchanges]


RequestHook = Callable[[int, str], str]
ResponseHook = Callable[[int, int, str | None], tuple[int, str | None] | None]


def run(
    caller: hs.CallerHandshake,
    callee: hs.CalleeHandshake,
    *,
    now: float = 0.0,
    now_utc: datetime = NOW_UTC,
    rekey: bool = False,
    on_request: RequestHook | None = None,
    on_response: ResponseHook | None = None,
) -> Trace:
    """Shuttle the caller's INFO bodies to the callee and its responses back.

    ``on_request(i, body)`` may rewrite the i-th INFO body; ``on_response(i, status, body)``
    may rewrite the i-th response or return None to lose it (the caller then sees nothing).
    """
    t = now
    events = caller.rekey(t) if rekey else caller.start(t)
    trace = Trace(list(events), time=t)
    for i in range(10):
        infos = [e for e in events if isinstance(e, hs.SendInfo)]
        if not infos:
            break
        assert len(infos) == 1
        assert infos[0].content_type == "application/x-sipura"
        body = infos[0].body
        if on_request is not None:
            body = on_request(i, body)
        t += STEP
        callee_events = callee.receive_request(body, t, now_utc)
        assert isinstance(callee_events[0], hs.SendResponse)
        assert not any(isinstance(e, hs.SendResponse) for e in callee_events[1:])
        status, response_body = callee_events[0].status, callee_events[0].body
        if on_response is not None:
            replaced = on_response(i, status, response_body)
            if replaced is None:
                trace.exchanges.append(Exchange(body, callee_events, []))
                trace.dropped = callee_events[0]
                trace.time = t
                return trace
            status, response_body = replaced
        t += STEP
        events = caller.receive_response(status, response_body, t, now_utc)
        trace.exchanges.append(Exchange(body, callee_events, events))
        trace.time = t
    else:  # pragma: no cover - the handshake has two round trips at most
        pytest.fail("handshake did not terminate")
    return trace


# --- helpers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    caller_party: Party
    callee_party: Party
    trust: TrustStore
    dialled: str
    ca_sha256: str
    sample_ca: bool

    def caller(self, **kwargs: Any) -> hs.CallerHandshake:
        options: dict[str, Any] = {
            "certificate": self.caller_party.certificate,
            "trust": self.trust,
            "dialled_user_id": self.dialled,
            "local_ssrc": CALLER_SSRC,
        }
        options.update(kwargs)
        return hs.CallerHandshake(**options)

    def callee(self, **kwargs: Any) -> hs.CalleeHandshake:
        options: dict[str, Any] = {
            "certificate": self.callee_party.certificate,
            "private_key": self.callee_party.key,
            "trust": self.trust,
            "local_ssrc": CALLEE_SSRC,
        }
        options.update(kwargs)
        return hs.CalleeHandshake(**options)


@pytest.fixture
def setup(pki: Pki) -> Setup:
    return Setup(
        pki.alice,
        pki.bob,
        pki.trust,
        pki.bob.certificate.user_id,
        ca_fingerprint(pki.ca.public),
        sample_ca=False,
    )


@pytest.fixture(params=["generated", "vectors"])
def any_setup(
    request: pytest.FixtureRequest,
    pki: Pki,
    vector_users: dict[str, Party],
    sample_ca: rsa.PrivateKey,
) -> Setup:
    if request.param == "generated":
        return Setup(
            pki.alice,
            pki.bob,
            pki.trust,
            pki.bob.certificate.user_id,
            ca_fingerprint(pki.ca.public),
            sample_ca=False,
        )
    return Setup(
        vector_users["joe"],
        vector_users["jane"],
        TrustStore([sample_ca.public]),
        vector_users["jane"].certificate.user_id,
        ca_fingerprint(sample_ca.public),
        sample_ca=True,
    )


def secured(
    setup: Setup, *, now: float = 0.0
) -> tuple[hs.CallerHandshake, hs.CalleeHandshake, Trace]:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee, now=now)
    assert caller.state is hs.CallerState.SECURED
    assert callee.state is hs.CalleeState.SECURED
    return caller, callee, trace


def only(events: list[hs.Event], kind: type) -> Any:
    matching = [e for e in events if isinstance(e, kind)]
    assert len(matching) == 1, events
    return matching[0]


def rewrite_hello(
    body: str, *, ssrc: int | None = None, mc: Callable[[bytes], bytes] | None = None
) -> str:
    hello = messages.decode_body(body)
    assert isinstance(hello, messages.CallerHello | messages.CalleeHello)
    new_mc = mc(hello.mc) if mc is not None else hello.mc
    new_ssrc = hello.ssrc if ssrc is None else ssrc
    return messages.encode_body(type(hello)(ssrc=new_ssrc, mc=new_mc, flags=hello.flags))


def patch(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    def apply(mc: bytes) -> bytes:
        return mc[:offset] + value + mc[offset + len(value) :]

    return apply


def on_step(step: int, rewrite: Callable[[str], str]) -> RequestHook:
    return lambda i, body: rewrite(body) if i == step else body


def response_on_step(
    step: int, rewrite: Callable[[int, str | None], tuple[int, str | None] | None]
) -> ResponseHook:
    return lambda i, status, body: rewrite(status, body) if i == step else (status, body)


def final_for(key: rsa.PublicKey, key_len: int = 16, salt_len: int = 16) -> str:
    final = messages.CallerFinal(
        rsa.encrypt_type2(key, b"k" * key_len), rsa.encrypt_type2(key, b"s" * salt_len)
    )
    return messages.encode_body(final)


def rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack(">BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"\xd5" * 160


# --- success ---------------------------------------------------------------------------------


def test_success(any_setup: Setup) -> None:
    caller, callee = any_setup.caller(), any_setup.callee()
    assert caller.state is hs.CallerState.IDLE
    assert callee.state is hs.CalleeState.IDLE
    trace = run(caller, callee, now=50.0)

    assert trace.statuses == [200, 200]
    hello_response, final_response = (x.response for x in trace.exchanges)
    assert isinstance(messages.decode_body(hello_response.body or ""), messages.CalleeHello)
    assert final_response.body == messages.encode_body(messages.CalleeFinal())
    assert messages.decode_body(trace.exchanges[0].request).msg_id == 1
    assert messages.decode_body(trace.exchanges[1].request).msg_id == 3

    # Caller: ExpectSrtp (with the Final) strictly before Secured (on the Callee Final).
    outcomes = trace.caller_outcomes()
    assert [type(e) for e in outcomes] == [hs.ExpectSrtp, hs.Secured]
    assert isinstance(trace.exchanges[0].caller_events[0], hs.ExpectSrtp)
    assert outcomes[0].session == outcomes[1].session
    assert trace.callee_outcomes() == [hs.Secured(callee.session)]  # type: ignore[arg-type]

    a, b = caller.session, callee.session
    assert a is not None
    assert b is not None
    assert a.keys == b.keys
    assert a.keys.master_key != a.keys.master_salt
    assert (a.local_ssrc, a.peer_ssrc) == (CALLER_SSRC, CALLEE_SSRC)
    assert (b.local_ssrc, b.peer_ssrc) == (CALLEE_SSRC, CALLER_SSRC)
    assert a.generation == b.generation == 0

    callee_mc = any_setup.callee_party.certificate
    caller_mc = any_setup.caller_party.certificate
    for session, mc in ((a, callee_mc), (b, caller_mc)):
        assert session.peer.name == mc.name
        assert session.peer.user_id == mc.user_id
        assert session.peer.expires == mc.expires
        assert session.peer.key_sha256 == mc.key_sha256
        assert session.peer.ca_sha256 == any_setup.ca_sha256
        assert session.peer.sample_ca is any_setup.sample_ca

    assert caller.secured
    assert callee.secured
    assert caller.next_deadline() is None
    # The callee awaits authenticated SRTP for the grace window.
    assert callee.next_deadline() == pytest.approx(trace.time - STEP + hs.DEFAULT_GRACE)

    # The agreed keys really carry media both ways.
    caller_ctx = SrtpContext(a.keys.master_key, a.keys.master_salt)
    callee_ctx = SrtpContext(b.keys.master_key, b.keys.master_salt)
    assert callee_ctx.unprotect(caller_ctx.protect(rtp(1, CALLER_SSRC))) == rtp(1, CALLER_SSRC)
    assert caller_ctx.unprotect(callee_ctx.protect(rtp(7, CALLEE_SSRC))) == rtp(7, CALLEE_SSRC)


def test_each_handshake_uses_fresh_keys(setup: Setup) -> None:
    first, _, _ = secured(setup)
    second, _, _ = secured(setup)
    assert first.session is not None
    assert second.session is not None
    assert first.session.keys.master_key != second.session.keys.master_key
    assert first.session.keys.master_salt != second.session.keys.master_salt


def test_session_repr_hides_keys(setup: Setup) -> None:
    caller, _, _ = secured(setup)
    assert caller.session is not None
    keys = caller.session.keys
    for text in (repr(caller.session), repr(keys), repr(hs.Secured(caller.session))):
        assert repr(keys.master_key) not in text
        assert keys.master_key.hex() not in text
        assert keys.master_salt.hex() not in text
    assert keys.libsrtp_key == keys.master_key + keys.master_salt[:14]
    with pytest.raises(ValueError):
        hs.MasterKeys(b"k" * 15, b"s" * 16)
    with pytest.raises(ValueError):
        hs.MasterKeys(b"k" * 16, b"s" * 14)


def test_callee_refuses_a_private_key_not_matching_its_certificate(pki: Pki) -> None:
    with pytest.raises(ValueError):
        hs.CalleeHandshake(
            certificate=pki.bob.certificate,
            private_key=pki.alice.key,
            trust=pki.trust,
            local_ssrc=CALLEE_SSRC,
        )


def test_caller_cannot_start_twice(setup: Setup) -> None:
    caller = setup.caller()
    caller.start(0.0)
    with pytest.raises(RuntimeError):
        caller.start(0.1)


# --- bad_message ----------------------------------------------------------------------------


def patch_body(offset: int, value: bytes) -> Callable[[str], str]:
    """Rewrite bytes of the binary message inside a body (no re-validation)."""

    def apply(body: str) -> str:
        raw = base64.b64decode(body)
        return base64.b64encode(raw[:offset] + value + raw[offset + len(value) :]).decode()

    return apply


CORRUPT_BODIES: dict[str, Callable[[str], str]] = {
    "not base64": lambda body: "!!" + body[2:],
    "truncated": lambda body: body[:-8],
    "doubled": lambda body: body + body,
    "version 2": patch_body(4, b"\x00\x02"),
    "version 0": patch_body(4, b"\x00\x00"),
    "unknown msg_id": patch_body(0, b"\x00\x00\x00\x09"),
    "msg_id 3 with Hello length": patch_body(3, b"\x03"),
    "missing padding": lambda body: body.rstrip("=") + "A",
    "inner garbage": lambda body: body[:100] + "*" + body[100:],
}


@pytest.mark.parametrize("corruption", sorted(CORRUPT_BODIES))
def test_bad_message_in_caller_hello(setup: Setup, corruption: str) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee, on_request=on_step(0, CORRUPT_BODIES[corruption]))
    with pytest.raises(messages.MessageError):
        messages.decode_body(trace.exchanges[0].request)
    assert trace.statuses == [400]
    assert trace.exchanges[0].response.body is None
    assert [type(e) for e in trace.callee_outcomes()] == [hs.StayClear]
    assert trace.callee_outcomes()[0].reason is R.BAD_MESSAGE  # type: ignore[union-attr]
    # The caller sees a 4xx it does not understand: the peer does not support x-sipura.
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_UNSUPPORTED
    assert caller.state is hs.CallerState.CLEAR
    assert callee.state is hs.CalleeState.CLEAR


def test_version_2_hello_body_is_really_version_2(setup: Setup) -> None:
    body = setup.caller().start(0.0)[0].body  # type: ignore[union-attr]
    corrupted = CORRUPT_BODIES["version 2"](body)
    with pytest.raises(messages.MessageError, match="version 2"):
        messages.decode_body(corrupted)


@pytest.mark.parametrize(
    "reply",
    [
        "%%%%",
        "AAAABA==",  # a Callee Final where a Callee Hello belongs
        "AAAAAQ==",
        messages.encode_body(messages.CallerFinal(b"\x01" * 64, b"\x02" * 64)),
    ],
)
def test_bad_message_in_callee_hello(setup: Setup, reply: str) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee, on_response=response_on_step(0, lambda s, b: (200, reply)))
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.BAD_MESSAGE
    assert not any(isinstance(e, hs.ExpectSrtp) for e in trace.caller_events)
    assert caller.state is hs.CallerState.CLEAR
    assert caller.session is None


@pytest.mark.parametrize(("key_len", "salt_len"), [(15, 16), (16, 17), (0, 16), (16, 1), (32, 16)])
def test_bad_padding_in_caller_final(setup: Setup, key_len: int, salt_len: int) -> None:
    caller, callee = setup.caller(), setup.callee()
    bad = final_for(setup.callee_party.certificate.subscriber_key, key_len, salt_len)
    trace = run(caller, callee, on_request=on_step(1, lambda body: bad))
    assert trace.statuses == [200, 400]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.BAD_MESSAGE
    assert callee.session is None
    assert callee.state is hs.CalleeState.CLEAR
    # An error to our Final: the peer understood and refused.
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_REJECTED
    assert caller.session is None


def test_caller_final_under_the_wrong_key_is_400(setup: Setup, pki: Pki) -> None:
    caller, callee = setup.caller(), setup.callee()
    wrong = final_for(pki.alice.certificate.subscriber_key)  # not the callee's key
    trace = run(caller, callee, on_request=on_step(1, lambda body: wrong))
    assert trace.statuses == [200, 400]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.BAD_MESSAGE


@pytest.mark.parametrize("reply", ["", "AAAAAQ==", "AAAABA==AAAABA==", "AAAABAAAAAQ="])
def test_bad_message_in_callee_final(setup: Setup, reply: str) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee, on_response=response_on_step(1, lambda s, b: (200, reply)))
    assert isinstance(trace.caller_outcomes()[0], hs.ExpectSrtp)
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.BAD_MESSAGE
    assert caller.session is None
    assert caller.state is hs.CallerState.CLEAR


# --- bad_certificate ---------------------------------------------------------------------------


MC_CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "expiry not digits": patch(48, b"12ab56010130"),
    "expiry month 13": patch(48, b"000000130130"),
    "expiry hour 24": patch(48, b"240000010130"),
    "byte after name padding": patch(31, b"X"),
    "empty name": patch(0, b"\x00" * 32),
    "control char in user id": patch(32, b"\x07"),
    "non-ascii name": patch(0, b"\xe9"),
    "even modulus": lambda mc: mc[:123] + bytes([mc[123] & 0xFE]) + mc[124:],
    "short modulus": patch(60, b"\x00\x00"),
}


@pytest.mark.parametrize("corruption", sorted(MC_CORRUPTIONS))
def test_bad_certificate_in_caller_hello(setup: Setup, corruption: str) -> None:
    caller, callee = setup.caller(), setup.callee()
    mutate = MC_CORRUPTIONS[corruption]
    trace = run(caller, callee, on_request=on_step(0, lambda b: rewrite_hello(b, mc=mutate)))
    assert trace.statuses == [488]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.BAD_CERTIFICATE
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_REJECTED


@pytest.mark.parametrize("corruption", sorted(MC_CORRUPTIONS))
def test_bad_certificate_in_callee_hello(setup: Setup, corruption: str) -> None:
    caller, callee = setup.caller(), setup.callee()
    mutate = MC_CORRUPTIONS[corruption]
    trace = run(
        caller,
        callee,
        on_response=response_on_step(0, lambda s, b: (s, rewrite_hello(b or "", mc=mutate))),
    )
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.BAD_CERTIFICATE
    assert len(trace.exchanges) == 1  # no Caller Final was sent


# --- untrusted_ca ----------------------------------------------------------------------------


def test_callee_trusts_a_different_ca(setup: Setup, pki: Pki) -> None:
    caller = setup.caller()
    callee = setup.callee(trust=TrustStore([pki.other_ca.public]))
    trace = run(caller, callee)
    assert trace.statuses == [488]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.UNTRUSTED_CA
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_REJECTED


def test_caller_trusts_a_different_ca(setup: Setup, pki: Pki) -> None:
    caller = setup.caller(trust=TrustStore([pki.other_ca.public]))
    callee = setup.callee()
    trace = run(caller, callee)
    assert trace.statuses == [200]
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.UNTRUSTED_CA
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED


def test_empty_trust_store_trusts_nobody(setup: Setup) -> None:
    trace = run(setup.caller(), setup.callee(trust=TrustStore()))
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.UNTRUSTED_CA


def test_mc_from_another_ca_is_untrusted_even_with_a_good_key(setup: Setup, pki: Pki) -> None:
    forged = pki.issue(
        pki.alice.certificate.name,
        pki.alice.certificate.user_id,
        pki.alice.certificate.expires,
        key=pki.alice.key,
        ca=pki.other_ca,
    )
    trace = run(setup.caller(certificate=forged.certificate), setup.callee())
    assert trace.statuses == [488]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.UNTRUSTED_CA


def test_multiple_anchors(setup: Setup, pki: Pki) -> None:
    both = TrustStore([pki.other_ca.public, pki.ca.public])
    caller, callee = setup.caller(trust=both), setup.callee(trust=both)
    run(caller, callee)
    assert caller.state is hs.CallerState.SECURED


# --- expired -------------------------------------------------------------------------------


def test_expired_caller_mc(setup: Setup) -> None:
    expiry = setup.caller_party.certificate.expires
    assert expiry < setup.callee_party.certificate.expires
    trace = run(setup.caller(), setup.callee(), now_utc=expiry + timedelta(seconds=1))
    assert trace.statuses == [488]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.EXPIRED
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_REJECTED


def test_expiry_instant_itself_is_still_valid(setup: Setup) -> None:
    expiry = setup.caller_party.certificate.expires
    caller, callee = setup.caller(), setup.callee()
    run(caller, callee, now_utc=expiry)
    assert caller.state is hs.CallerState.SECURED
    assert callee.state is hs.CalleeState.SECURED
    # Naive datetimes are UTC.
    caller, callee = setup.caller(), setup.callee()
    run(caller, callee, now_utc=expiry.replace(tzinfo=None))
    assert callee.state is hs.CalleeState.SECURED


def test_expired_callee_mc(setup: Setup, pki: Pki) -> None:
    expiry = datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
    short = pki.issue("Bob Callee", pki.bob.certificate.user_id, expiry, key=pki.bob.key)
    assert short.certificate.expires < setup.caller_party.certificate.expires

    caller, callee = setup.caller(), setup.callee(certificate=short.certificate)
    run(caller, callee, now_utc=expiry)
    assert caller.state is hs.CallerState.SECURED

    caller, callee = setup.caller(), setup.callee(certificate=short.certificate)
    trace = run(caller, callee, now_utc=expiry + timedelta(seconds=1))
    assert trace.statuses == [200]
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.EXPIRED


def test_vector_mc_expiry_boundaries(
    vector_users: dict[str, Party], sample_ca: rsa.PrivateKey
) -> None:
    joe = vector_users["joe"].certificate
    store = TrustStore([sample_ca.public])
    assert store.verify(joe, joe.expires).ok
    assert not store.verify(joe, joe.expires + timedelta(microseconds=1)).ok
    assert store.verify(joe, joe.expires + timedelta(microseconds=1)).status.value == "expired"


# --- user_id_mismatch ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dialled", ["15550002222", "+15550002222", "*1815550002222", "*1915550002222"]
)
def test_dialled_number_is_normalised(setup: Setup, dialled: str) -> None:
    assert setup.callee_party.certificate.user_id == "15550002222"
    caller, callee = setup.caller(dialled_user_id=dialled), setup.callee()
    run(caller, callee)
    assert caller.state is hs.CallerState.SECURED


@pytest.mark.parametrize(
    "dialled",
    [
        "15550009999",
        "1555000222",
        "155500022222",
        "++15550002222",
        "*1715550002222",
        "015550002222",
    ],
)
def test_user_id_mismatch(setup: Setup, dialled: str) -> None:
    caller, callee = setup.caller(dialled_user_id=dialled), setup.callee()
    trace = run(caller, callee)
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.USER_ID_MISMATCH
    assert len(trace.exchanges) == 1  # no key was sent to the wrong party
    assert caller.state is hs.CallerState.CLEAR


def test_normalize_user_id() -> None:
    assert hs.normalize_user_id("+14085551234") == "14085551234"
    assert hs.normalize_user_id("*1814085551234") == "14085551234"
    assert hs.normalize_user_id("*19+14085551234") == "14085551234"
    assert hs.normalize_user_id("14085551234") == "14085551234"
    assert hs.normalize_user_id("++1") == "+1"
    assert hs.normalize_user_id("*17123") == "*17123"


# --- ssrc_clash ----------------------------------------------------------------------------


def test_ssrc_clash_seen_by_callee(setup: Setup) -> None:
    caller, callee = setup.caller(local_ssrc=CALLEE_SSRC), setup.callee()
    trace = run(caller, callee)
    assert trace.statuses == [488]
    assert only(trace.callee_outcomes(), hs.StayClear).reason is R.SSRC_CLASH
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_REJECTED


def test_ssrc_clash_seen_by_caller(setup: Setup) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(
        caller,
        callee,
        on_response=response_on_step(0, lambda s, b: (s, rewrite_hello(b or "", ssrc=CALLER_SSRC))),
    )
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.SSRC_CLASH
    assert len(trace.exchanges) == 1


# --- peer_unsupported / peer_rejected --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (501, None, R.PEER_UNSUPPORTED),
        (415, None, R.PEER_UNSUPPORTED),
        (481, None, R.PEER_UNSUPPORTED),
        (500, "x", R.PEER_UNSUPPORTED),
        (603, None, R.PEER_UNSUPPORTED),
        (200, None, R.PEER_UNSUPPORTED),
        (200, "", R.PEER_UNSUPPORTED),
        (200, b"\r\n", R.PEER_UNSUPPORTED),
        (202, None, R.PEER_UNSUPPORTED),
        (488, None, R.PEER_REJECTED),
    ],
)
def test_responses_to_caller_hello(
    setup: Setup, status: int, body: str | bytes | None, reason: hs.ClearReason
) -> None:
    caller = setup.caller()
    caller.start(0.0)
    assert caller.receive_response(100, None, 0.05, NOW_UTC) == []
    assert caller.receive_response(183, None, 0.06, NOW_UTC) == []
    assert caller.state is hs.CallerState.HELLO_SENT
    events = caller.receive_response(status, body, 0.1, NOW_UTC)
    assert [type(e) for e in events] == [hs.StayClear]
    assert events[0].reason is reason  # type: ignore[union-attr]
    assert caller.state is hs.CallerState.CLEAR
    assert not caller.secured
    assert caller.next_deadline() is None
    # Nothing afterwards revives it.
    assert caller.receive_response(200, "AAAABA==", 0.2, NOW_UTC) == []
    assert caller.handle_timer(100.0) == []
    assert caller.transaction_timeout(100.0) == []
    with pytest.raises(RuntimeError):
        caller.start(1.0)


@pytest.mark.parametrize("status", [400, 488, 500, 603])
def test_error_to_caller_final_is_peer_rejected(setup: Setup, status: int) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee, on_response=response_on_step(1, lambda s, b: (status, None)))
    assert only(trace.caller_outcomes(), hs.StayClear).reason is R.PEER_REJECTED
    assert caller.session is None


def test_bytes_bodies_are_accepted(setup: Setup) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(
        caller,
        callee,
        on_request=lambda i, body: body,
        on_response=lambda i, s, b: (s, None if b is None else "\r\n" + b + "\r\n"),
    )
    assert caller.state is hs.CallerState.SECURED
    assert trace.statuses == [200, 200]


# --- timeouts --------------------------------------------------------------------------------


def test_caller_transaction_timeout_on_hello(setup: Setup) -> None:
    caller = setup.caller()
    caller.start(0.0)
    events = caller.transaction_timeout(32.0)
    assert [type(e) for e in events] == [hs.StayClear]
    assert events[0].reason is R.TIMEOUT  # type: ignore[union-attr]
    assert caller.state is hs.CallerState.CLEAR
    assert caller.next_deadline() is None


def test_caller_handle_timer_deadline(setup: Setup) -> None:
    caller = setup.caller(timeout=3.0)
    assert caller.next_deadline() is None
    assert caller.handle_timer(1000.0) == []
    caller.start(10.0)
    assert caller.next_deadline() == 13.0
    assert caller.handle_timer(12.999) == []
    assert caller.state is hs.CallerState.HELLO_SENT
    events = caller.handle_timer(13.0)
    assert [type(e) for e in events] == [hs.StayClear]
    assert events[0].reason is R.TIMEOUT  # type: ignore[union-attr]
    assert caller.next_deadline() is None
    # A late Callee Hello changes nothing.
    callee = setup.callee()
    [response] = callee.receive_request(caller_hello_body(setup), 13.5, NOW_UTC)
    assert caller.receive_response(response.status, response.body, 14.0, NOW_UTC) == []  # type: ignore[union-attr]
    assert caller.state is hs.CallerState.CLEAR


def caller_hello_body(setup: Setup) -> str:
    hello = messages.CallerHello(ssrc=CALLER_SSRC, mc=setup.caller_party.certificate.encode())
    return messages.encode_body(hello)


def test_default_timeouts() -> None:
    assert hs.DEFAULT_CALLEE_TIMEOUT == 32.0
    assert hs.DEFAULT_GRACE == 2.0


def test_callee_half_done_timeout_after_32s(setup: Setup) -> None:
    callee = setup.callee()
    caller = setup.caller()
    trace = run(caller, callee, now=100.0, on_response=response_on_step(0, lambda s, b: None))
    assert trace.dropped is not None  # the Callee Hello was lost
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    accepted_at = 100.0 + STEP
    assert callee.next_deadline() == pytest.approx(accepted_at + 32.0)
    assert callee.handle_timer(accepted_at + 31.9) == []
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    events = callee.handle_timer(accepted_at + 32.0)
    assert [type(e) for e in events] == [hs.StayClear]
    assert events[0].reason is R.TIMEOUT  # type: ignore[union-attr]
    assert callee.state is hs.CalleeState.CLEAR
    assert callee.next_deadline() is None
    # A Caller Final arriving now is out of order.
    late = callee.receive_request(
        final_for(setup.callee_party.certificate.subscriber_key), 140.0, NOW_UTC
    )
    assert late[0].status == 400  # type: ignore[union-attr]
    assert only(late, hs.StayClear).reason is R.OUT_OF_ORDER


def test_callee_custom_half_done_timeout(setup: Setup) -> None:
    callee = setup.callee(half_done_timeout=5.0)
    callee.receive_request(caller_hello_body(setup), 1.0, NOW_UTC)
    assert callee.next_deadline() == 6.0
    assert [type(e) for e in callee.handle_timer(6.0)] == [hs.StayClear]


def test_caller_final_gets_its_own_transaction_timeout(setup: Setup) -> None:
    caller, callee = setup.caller(timeout=5.0), setup.callee()
    [hello] = caller.start(0.0)
    [response] = callee.receive_request(hello.body, 4.0, NOW_UTC)  # type: ignore[union-attr]
    caller.receive_response(response.status, response.body, 4.5, NOW_UTC)  # type: ignore[union-attr]
    assert caller.state is hs.CallerState.FINAL_SENT
    # The Final left at 4.5 s; its response may take up to the INFO timeout (until 9.5 s).
    assert caller.handle_timer(5.0) == []
    assert caller.state is hs.CallerState.FINAL_SENT


# --- lost Callee Final -----------------------------------------------------------------------


def lose_callee_final(setup: Setup) -> tuple[hs.CallerHandshake, hs.CalleeHandshake, Trace]:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee, on_response=response_on_step(1, lambda s, b: None))
    assert trace.dropped is not None
    assert trace.dropped.status == 200
    assert callee.state is hs.CalleeState.SECURED
    assert caller.state is hs.CallerState.FINAL_SENT
    assert [type(e) for e in trace.caller_outcomes()] == [hs.ExpectSrtp]
    return caller, callee, trace


def test_lost_callee_final_then_authenticated_srtp(setup: Setup) -> None:
    caller, callee, trace = lose_callee_final(setup)
    t = trace.time
    assert caller.transaction_timeout(t + 1.0) == []
    assert caller.state is hs.CallerState.FINAL_LOST
    assert caller.next_deadline() == pytest.approx(t + 1.0 + hs.DEFAULT_GRACE)
    assert not caller.secured
    events = caller.srtp_authenticated(t + 1.5)
    assert [type(e) for e in events] == [hs.Secured]
    assert caller.session is not None
    assert callee.session is not None
    assert caller.session.keys == callee.session.keys
    assert events[0].session == trace.caller_outcomes()[0].session  # type: ignore[union-attr]
    assert caller.state is hs.CallerState.SECURED
    assert caller.next_deadline() is None
    assert caller.srtp_authenticated(t + 2.0) == []


def test_srtp_authenticated_before_the_timeout(setup: Setup) -> None:
    """Authenticated SRTP proves the callee switched: the caller switches at once, well
    inside the callee's grace window, instead of waiting for the INFO timeout."""
    caller, callee, trace = lose_callee_final(setup)
    events = caller.srtp_authenticated(trace.time + 0.2)
    assert [type(e) for e in events] == [hs.Secured]
    assert caller.state is hs.CallerState.SECURED
    assert caller.session is not None
    assert callee.session is not None
    assert caller.session.keys == callee.session.keys
    assert caller.transaction_timeout(trace.time + 1.0) == []
    # The late Callee Final (had it arrived) changes nothing.
    assert caller.receive_response(200, "AAAABA==", trace.time + 1.1, NOW_UTC) == []


def test_lost_callee_final_without_srtp_stays_clear(setup: Setup) -> None:
    caller, callee, trace = lose_callee_final(setup)
    t = trace.time
    assert caller.transaction_timeout(t + 1.0) == []
    assert caller.handle_timer(t + 1.0 + hs.DEFAULT_GRACE - 0.01) == []
    events = caller.handle_timer(t + 1.0 + hs.DEFAULT_GRACE)
    assert [type(e) for e in events] == [hs.StayClear]
    assert events[0].reason is R.TIMEOUT  # type: ignore[union-attr]
    assert caller.state is hs.CallerState.CLEAR
    assert caller.session is None
    # The callee switched at trace.time and falls back after its grace window.
    assert callee.next_deadline() == pytest.approx(t + hs.DEFAULT_GRACE)
    assert callee.handle_timer(t + hs.DEFAULT_GRACE - 0.01) == []
    fallback = callee.handle_timer(t + hs.DEFAULT_GRACE)
    assert [type(e) for e in fallback] == [hs.StayClear]
    assert fallback[0].reason is R.NO_AUTHENTICATED_SRTP  # type: ignore[union-attr]
    assert callee.session is None
    assert callee.state is hs.CalleeState.CLEAR
    assert not callee.secured


def test_late_callee_final_after_the_timeout_still_switches(setup: Setup) -> None:
    caller, callee, trace = lose_callee_final(setup)
    caller.transaction_timeout(trace.time + 1.0)
    assert caller.state is hs.CallerState.FINAL_LOST
    events = caller.receive_response(200, trace.dropped.body, trace.time + 1.2, NOW_UTC)  # type: ignore[union-attr]
    assert [type(e) for e in events] == [hs.Secured]
    assert caller.session is not None
    assert callee.session is not None
    assert caller.session.keys == callee.session.keys


def test_caller_timer_in_final_sent_enters_final_lost(setup: Setup) -> None:
    caller, _, _ = lose_callee_final(setup)
    deadline = caller.next_deadline()
    assert deadline is not None
    assert caller.handle_timer(deadline) == []
    assert caller.state is hs.CallerState.FINAL_LOST
    assert caller.next_deadline() == pytest.approx(deadline + hs.DEFAULT_GRACE)
    assert [type(e) for e in caller.srtp_authenticated(deadline + 0.5)] == [hs.Secured]


def test_callee_does_not_fall_back_once_srtp_authenticates(setup: Setup) -> None:
    _, callee, trace = secured(setup)
    assert callee.next_deadline() is not None
    assert callee.srtp_authenticated(trace.time) == []
    assert callee.next_deadline() is None
    assert callee.handle_timer(trace.time + 1000.0) == []
    assert callee.state is hs.CalleeState.SECURED
    assert callee.session is not None


def test_callee_falls_back_without_srtp(setup: Setup) -> None:
    _, callee, _ = secured(setup)
    deadline = callee.next_deadline()
    assert deadline is not None
    events = callee.handle_timer(deadline + 0.5)
    assert [type(e) for e in events] == [hs.StayClear]
    assert events[0].reason is R.NO_AUTHENTICATED_SRTP  # type: ignore[union-attr]
    assert callee.session is None
    assert not callee.secured


def test_abandon_stops_without_outcome(setup: Setup) -> None:
    caller = setup.caller()
    caller.start(0.0)
    caller.abandon()
    assert caller.state is hs.CallerState.CLEAR
    assert caller.next_deadline() is None
    assert caller.handle_timer(100.0) == []
    callee = setup.callee()
    [response] = callee.receive_request(caller_hello_body(setup), 0.1, NOW_UTC)
    assert caller.receive_response(200, response.body, 0.2, NOW_UTC) == []  # type: ignore[union-attr]


# --- out of order, empty body ----------------------------------------------------------------


def test_final_before_hello_is_400(setup: Setup) -> None:
    callee = setup.callee()
    events = callee.receive_request(
        final_for(setup.callee_party.certificate.subscriber_key), 0.0, NOW_UTC
    )
    assert events[0] == hs.SendResponse(400, events[0].reason)  # type: ignore[union-attr]
    assert only(events, hs.StayClear).reason is R.OUT_OF_ORDER
    assert callee.session is None
    assert callee.state is hs.CalleeState.CLEAR


@pytest.mark.parametrize("accepted_hello", [False, True])
@pytest.mark.parametrize(
    "body",
    [
        messages.encode_body(messages.CalleeFinal()),
        "placeholder: Callee Hello",
    ],
)
def test_response_messages_in_a_request_are_400(
    setup: Setup, body: str, accepted_hello: bool
) -> None:
    if body.startswith("placeholder"):
        callee_hello = messages.CalleeHello(CALLER_SSRC, setup.callee_party.certificate.encode())
        body = messages.encode_body(callee_hello)
    callee = setup.callee()
    if accepted_hello:
        callee.receive_request(caller_hello_body(setup), 0.0, NOW_UTC)
        assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    events = callee.receive_request(body, 1.0, NOW_UTC)
    assert events[0].status == 400  # type: ignore[union-attr]
    assert events[0].body is None  # type: ignore[union-attr]
    assert only(events, hs.StayClear).reason is R.OUT_OF_ORDER
    assert callee.session is None


@pytest.mark.parametrize("body", ["", "\r\n", b"", b" \t\r\n", "   "])
def test_empty_info_body_gets_200_and_is_ignored(setup: Setup, body: str | bytes) -> None:
    callee = setup.callee()
    assert callee.receive_request(body, 0.0, NOW_UTC) == [hs.SendResponse(200, "OK")]
    assert callee.state is hs.CalleeState.IDLE
    # Also in the middle of a handshake: nothing changes, the deadline stays.
    callee.receive_request(caller_hello_body(setup), 1.0, NOW_UTC)
    deadline = callee.next_deadline()
    assert callee.receive_request(body, 2.0, NOW_UTC) == [hs.SendResponse(200, "OK")]
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    assert callee.next_deadline() == deadline


def test_empty_info_body_in_a_secured_dialog(setup: Setup) -> None:
    _, callee, _ = secured(setup)
    session = callee.session
    assert callee.receive_request("", 5.0, NOW_UTC) == [hs.SendResponse(200, "OK")]
    assert callee.session is session
    assert callee.state is hs.CalleeState.SECURED


def test_retransmitted_hello_is_answered_again(setup: Setup) -> None:
    callee = setup.callee()
    body = caller_hello_body(setup)
    first = callee.receive_request(body, 0.0, NOW_UTC)
    second = callee.receive_request(body, 0.5, NOW_UTC)
    assert first == second
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED


# --- re-key ---------------------------------------------------------------------------------------


def test_rekey_inside_a_secured_dialog(any_setup: Setup) -> None:
    caller, callee, _ = secured(any_setup)
    old = caller.session
    assert old is not None
    callee.srtp_authenticated(1.0)

    trace = run(caller, callee, now=100.0, rekey=True)
    assert trace.statuses == [200, 200]
    assert [type(e) for e in trace.caller_outcomes()] == [hs.ExpectSrtp, hs.Secured]
    assert [type(e) for e in trace.callee_outcomes()] == [hs.Secured]
    new_a, new_b = caller.session, callee.session
    assert new_a is not None
    assert new_b is not None
    assert new_a.keys == new_b.keys
    assert new_a.keys != old.keys
    assert new_a.keys.master_key != old.keys.master_key
    assert new_a.generation == new_b.generation == 1
    assert (new_a.local_ssrc, new_a.peer_ssrc) == (old.local_ssrc, old.peer_ssrc)
    assert (new_b.local_ssrc, new_b.peer_ssrc) == (old.peer_ssrc, old.local_ssrc)
    assert new_a.peer == old.peer
    # No fallback timer on a re-key: the call was already secure.
    assert callee.next_deadline() is None

    run(caller, callee, now=200.0, rekey=True)
    assert caller.session is not None
    assert callee.session is not None
    assert caller.session.generation == callee.session.generation == 2


def test_sessions_stay_in_force_during_a_rekey(setup: Setup) -> None:
    caller, callee, _ = secured(setup)
    old_a, old_b = caller.session, callee.session
    [hello] = caller.rekey(10.0)
    assert caller.secured
    assert caller.session is old_a
    [response] = callee.receive_request(hello.body, 10.1, NOW_UTC)  # type: ignore[union-attr]
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    assert callee.secured
    assert callee.session is old_b
    caller.receive_response(200, response.body, 10.2, NOW_UTC)  # type: ignore[union-attr]
    assert caller.session is old_a
    assert caller.secured


def check_rekey_failed(
    caller: hs.CallerHandshake,
    callee: hs.CalleeHandshake,
    trace: Trace,
    old: tuple[hs.SecureSession | None, hs.SecureSession | None],
) -> tuple[hs.ClearReason | None, hs.ClearReason | None]:
    assert not any(isinstance(e, hs.StayClear | hs.Secured) for e in trace.caller_events)
    assert not any(isinstance(e, hs.StayClear | hs.Secured) for e in trace.callee_events)
    assert (caller.session, callee.session) == old
    assert caller.state is hs.CallerState.SECURED
    assert caller.secured
    assert callee.secured
    caller_failed = [e for e in trace.caller_events if isinstance(e, hs.RekeyFailed)]
    callee_failed = [e for e in trace.callee_events if isinstance(e, hs.RekeyFailed)]
    # A callee that saw nothing wrong is half-done (its 32 s timer will end the re-key).
    expected = hs.CalleeState.SECURED if callee_failed else hs.CalleeState.HELLO_ACCEPTED
    assert callee.state is expected
    assert len(caller_failed) <= 1
    assert len(callee_failed) <= 1
    return (
        caller_failed[0].reason if caller_failed else None,
        callee_failed[0].reason if callee_failed else None,
    )


def test_failed_rekey_bad_message_keeps_the_old_session(setup: Setup) -> None:
    caller, callee, _ = secured(setup)
    old = (caller.session, callee.session)
    trace = run(caller, callee, now=50.0, rekey=True, on_request=on_step(0, lambda b: b[:-4]))
    assert trace.statuses == [400]
    assert check_rekey_failed(caller, callee, trace, old) == (R.PEER_UNSUPPORTED, R.BAD_MESSAGE)
    # A later re-key works and is generation 1.
    run(caller, callee, now=60.0, rekey=True)
    assert caller.session is not None
    assert caller.session.generation == 1
    assert caller.session.keys == callee.session.keys  # type: ignore[union-attr]


def test_failed_rekey_expired_mc(setup: Setup) -> None:
    caller, callee, _ = secured(setup)
    old = (caller.session, callee.session)
    later = setup.caller_party.certificate.expires + timedelta(days=1)
    trace = run(caller, callee, now=50.0, now_utc=later, rekey=True)
    assert trace.statuses == [488]
    assert check_rekey_failed(caller, callee, trace, old) == (R.PEER_REJECTED, R.EXPIRED)


def test_failed_rekey_callee_changes_ssrc(setup: Setup) -> None:
    caller, callee, _ = secured(setup)
    old = (caller.session, callee.session)
    trace = run(
        caller,
        callee,
        now=50.0,
        rekey=True,
        on_response=response_on_step(0, lambda s, b: (s, rewrite_hello(b or "", ssrc=0x1234))),
    )
    assert check_rekey_failed(caller, callee, trace, old)[0] is R.SSRC_CLASH


def test_failed_rekey_caller_changes_ssrc(setup: Setup) -> None:
    caller, callee, _ = secured(setup)
    old = (caller.session, callee.session)
    trace = run(
        caller,
        callee,
        now=50.0,
        rekey=True,
        on_request=on_step(0, lambda b: rewrite_hello(b, ssrc=0x4321)),
    )
    assert trace.statuses == [488]
    assert check_rekey_failed(caller, callee, trace, old) == (R.PEER_REJECTED, R.SSRC_CLASH)


def test_failed_rekey_bad_final(setup: Setup) -> None:
    caller, callee, _ = secured(setup)
    old = (caller.session, callee.session)
    bad = final_for(setup.callee_party.certificate.subscriber_key, 15, 16)
    trace = run(caller, callee, now=50.0, rekey=True, on_request=on_step(1, lambda b: bad))
    assert trace.statuses == [200, 400]
    assert check_rekey_failed(caller, callee, trace, old) == (R.PEER_REJECTED, R.BAD_MESSAGE)


def test_failed_rekey_timeouts(setup: Setup) -> None:
    caller, callee, trace = secured(setup)
    callee.srtp_authenticated(trace.time + 0.1)  # media flows under the first key
    old = (caller.session, callee.session)
    caller.rekey(50.0)
    [failed] = caller.transaction_timeout(82.0)
    assert failed == hs.RekeyFailed(R.TIMEOUT, failed.detail)  # type: ignore[union-attr]
    assert caller.session is old[0]
    assert caller.state is hs.CallerState.SECURED
    # Callee: a re-key Hello that is never followed by a Final.
    callee.receive_request(caller_hello_body(setup), 60.0, NOW_UTC)
    [failed] = callee.handle_timer(60.0 + 32.0)
    assert isinstance(failed, hs.RekeyFailed)
    assert failed.reason is R.TIMEOUT
    assert callee.session is old[1]
    assert callee.state is hs.CalleeState.SECURED


# --- retransmitted Caller Final ----------------------------------------------------------------


def test_retransmitted_final_after_switch_over(setup: Setup) -> None:
    caller, callee, trace = secured(setup)
    final_body = trace.exchanges[1].request
    session = callee.session
    for again in (final_body, final_body + "\r\n", "  " + final_body, final_body.encode("ascii")):
        events = callee.receive_request(again, trace.time + 0.5, NOW_UTC)
        assert events == [hs.SendResponse(200, "OK", messages.encode_body(messages.CalleeFinal()))]
        assert callee.session is session
        assert callee.state is hs.CalleeState.SECURED
    # The caller ignores the duplicate 200.
    assert caller.receive_response(200, "AAAABA==", trace.time + 0.6, NOW_UTC) == []
    assert caller.state is hs.CallerState.SECURED


def test_a_different_final_after_switch_over_is_refused(setup: Setup) -> None:
    _, callee, trace = secured(setup)
    session = callee.session
    other = final_for(setup.callee_party.certificate.subscriber_key)
    events = callee.receive_request(other, trace.time + 0.5, NOW_UTC)
    assert events[0].status == 400  # type: ignore[union-attr]
    assert only(events, hs.RekeyFailed).reason is R.OUT_OF_ORDER
    assert callee.session is session
    assert callee.state is hs.CalleeState.SECURED


# --- a failed re-key keeps the lost-Final fallback ---------------------------------------------


def switched_but_caller_did_not(setup: Setup) -> tuple[hs.CalleeHandshake, float]:
    """The callee took a Final and switched; its 200 was lost, so the caller never did.
    Returns the callee and the time it switched (its grace window runs from there)."""
    _, callee, trace = lose_callee_final(setup)
    assert callee.next_deadline() == pytest.approx(trace.time + hs.DEFAULT_GRACE)
    return callee, trace.time


def bad_hellos(setup: Setup, pki: Pki) -> dict[str, str]:
    stranger = pki.issue("Mallory", "15550009999", datetime(2031, 1, 1, tzinfo=UTC),
                         ca=pki.other_ca)  # fmt: skip
    return {
        "garbage": "not base64 at all!",
        "untrusted_ca": messages.encode_body(
            messages.CallerHello(ssrc=CALLER_SSRC, mc=stranger.certificate.encode())
        ),
        "ssrc_changed": messages.encode_body(
            messages.CallerHello(ssrc=0x0C0C0C0C, mc=setup.caller_party.certificate.encode())
        ),
        "final_without_hello": final_for(setup.callee_party.certificate.subscriber_key),
    }


@pytest.mark.parametrize("kind", ["garbage", "untrusted_ca", "ssrc_changed", "final_without_hello"])
def test_bad_rekey_during_grace_keeps_the_lost_final_fallback(
    setup: Setup, pki: Pki, kind: str
) -> None:
    """Regression: ``_abandon`` cleared the only deadline, so a bad INFO during the grace
    window left the callee encrypting for a caller that never switched: silence."""
    callee, switched_at = switched_but_caller_did_not(setup)
    events = callee.receive_request(bad_hellos(setup, pki)[kind], switched_at + 0.5, NOW_UTC)
    assert events[0].status in (400, 488)  # type: ignore[union-attr]
    assert only(events, hs.RekeyFailed)
    assert callee.state is hs.CalleeState.SECURED  # the keys in force still work
    assert callee.next_deadline() == pytest.approx(switched_at + hs.DEFAULT_GRACE)
    assert callee.handle_timer(switched_at + hs.DEFAULT_GRACE - 0.01) == []
    fallback = callee.handle_timer(switched_at + hs.DEFAULT_GRACE)
    assert [type(e) for e in fallback] == [hs.StayClear]
    assert fallback[0].reason is R.NO_AUTHENTICATED_SRTP  # type: ignore[union-attr]
    assert callee.session is None
    assert callee.state is hs.CalleeState.CLEAR
    assert callee.next_deadline() is None


def test_good_rekey_hello_during_grace_keeps_the_fallback(setup: Setup) -> None:
    """A Hello that passes every check but is never followed by a Final does not stop
    the fallback either; the fallback also ends the half-done re-key."""
    callee, switched_at = switched_but_caller_did_not(setup)
    events = callee.receive_request(caller_hello_body(setup), switched_at + 0.5, NOW_UTC)
    assert events[0].status == 200  # type: ignore[union-attr]
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    assert callee.next_deadline() == pytest.approx(switched_at + hs.DEFAULT_GRACE)
    fallback = callee.handle_timer(switched_at + hs.DEFAULT_GRACE)
    assert [e.reason for e in fallback] == [R.NO_AUTHENTICATED_SRTP]  # type: ignore[union-attr]
    assert callee.state is hs.CalleeState.CLEAR
    assert callee.next_deadline() is None
    late_final = callee.receive_request(
        final_for(setup.callee_party.certificate.subscriber_key), switched_at + 3.0, NOW_UTC
    )
    assert late_final[0].status == 400  # type: ignore[union-attr]
    assert callee.session is None


def test_bad_rekey_after_srtp_flows_leaves_the_keys_for_good(setup: Setup, pki: Pki) -> None:
    caller, callee, trace = secured(setup)
    callee.srtp_authenticated(trace.time + 0.1)
    session = callee.session
    for index, body in enumerate(bad_hellos(setup, pki).values()):
        events = callee.receive_request(body, trace.time + 1 + index, NOW_UTC)
        assert only(events, hs.RekeyFailed)
        assert callee.session is session
        assert callee.state is hs.CalleeState.SECURED
        assert callee.next_deadline() is None
    assert callee.handle_timer(trace.time + 1000.0) == []
    assert callee.session is session
    assert caller.session is not None and caller.session.keys == session.keys  # type: ignore[union-attr]


def test_half_done_rekey_times_out_beside_a_running_grace(setup: Setup) -> None:
    """Grace longer than the half-done timeout: the re-key gives up first (RekeyFailed,
    keys kept), the fallback still fires at its own time."""
    caller, callee = setup.caller(), setup.callee(grace=10.0, half_done_timeout=3.0)
    trace = run(caller, callee, on_response=response_on_step(1, lambda s, b: None))
    switched_at = trace.time
    callee.receive_request(caller_hello_body(setup), switched_at + 1.0, NOW_UTC)
    assert callee.next_deadline() == pytest.approx(switched_at + 4.0)
    [failed] = callee.handle_timer(switched_at + 4.0)
    assert failed == hs.RekeyFailed(R.TIMEOUT, failed.detail)  # type: ignore[union-attr]
    assert callee.state is hs.CalleeState.SECURED
    assert callee.next_deadline() == pytest.approx(switched_at + 10.0)
    assert [type(e) for e in callee.handle_timer(switched_at + 10.0)] == [hs.StayClear]


def test_completed_rekey_during_grace_still_needs_authenticated_srtp(setup: Setup) -> None:
    caller, callee = setup.caller(), setup.callee()
    trace = run(caller, callee)
    switched_at = trace.time - STEP  # the callee switched one hop before the caller
    rekeyed = run(caller, callee, now=switched_at + 0.2, rekey=True)
    assert rekeyed.statuses == [200, 200]
    assert callee.session is not None and callee.session.generation == 1
    assert callee.next_deadline() == pytest.approx(switched_at + hs.DEFAULT_GRACE)
    assert callee.srtp_authenticated(switched_at + 1.0) == []
    assert callee.next_deadline() is None
    assert callee.handle_timer(switched_at + 100.0) == []
    assert callee.state is hs.CalleeState.SECURED
