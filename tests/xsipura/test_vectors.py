"""Every x-sipura test vector (tests/data/xsipura_vectors.json) reproduces."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from proxy.media.srtp import SrtpContext, libsrtp_key
from proxy.xsipura import handshake as hs
from proxy.xsipura import keyfiles, messages, rsa, trust
from proxy.xsipura.mc import (
    MalformedCertificate,
    MiniCertificate,
    MiniCertificateParam,
    decode_private_key_param,
    encode_private_key_param,
    format_expiry,
    parse_expiry,
)

if TYPE_CHECKING:
    from testkit.pki import Party, Pki

NOW_UTC = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
"""Every vector MC is valid at this instant."""

USERS = ("joe", "jane")


def expiry_from_digits(digits: str) -> datetime:
    """HHMMSSMMDDYY -> datetime, written independently of mc.parse_expiry."""
    hh, mi, ss, mo, dd, yy = (int(digits[i : i + 2]) for i in range(0, 12, 2))
    return datetime(2000 + yy, mo, dd, hh, mi, ss, tzinfo=UTC)


def hello_body(hex_bytes: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_bytes)).decode("ascii")


# --- CA --------------------------------------------------------------------------------


def test_sample_ca_key_file_loads_to_vector_numbers(
    vectors: dict[str, Any], sample_ca: rsa.PrivateKey
) -> None:
    ca = vectors["ca"]
    assert ca["e"] == rsa.PUBLIC_EXPONENT
    assert sample_ca.n == int(ca["n_hex"], 16)
    assert sample_ca.d == int(ca["d_hex"], 16)
    assert sample_ca.n.bit_length() == 1024
    # The Linksys dump of the loaded key is the vector file, byte for byte.
    dumped = keyfiles.dump_ca_key(sample_ca, keyfiles.CaKeyFormat.LINKSYS).decode("ascii")
    assert dumped.split() == ca["ca_key_file"].split()


def test_sample_ca_is_detected(
    vectors: dict[str, Any], sample_ca: rsa.PrivateKey, pki: Pki
) -> None:
    assert trust.is_sample_ca(sample_ca.public)
    assert trust.is_sample_ca(rsa.PublicKey(int(vectors["ca"]["n_hex"], 16)))
    assert not trust.is_sample_ca(pki.ca.public)

    store = trust.TrustStore([sample_ca.public])
    assert store.includes_sample_ca
    assert not trust.TrustStore([pki.ca.public]).includes_sample_ca
    joe = MiniCertificate.decode(bytes.fromhex(vectors["users"]["joe"]["mc_hex"]))
    verdict = store.verify(joe, NOW_UTC)
    assert verdict.ok
    assert verdict.sample_ca
    assert verdict.ca == sample_ca.public

    # An MC from a non-sample CA is not flagged.
    other = trust.TrustStore([pki.ca.public]).verify(pki.alice.certificate, NOW_UTC)
    assert other.ok
    assert not other.sample_ca


# --- users: MC, Mini Certificate param, SRTP Private Key param ------------------------


@pytest.mark.parametrize("user", USERS)
def test_mc_decodes_and_reencodes(vectors: dict[str, Any], user: str) -> None:
    u = vectors["users"][user]
    raw = bytes.fromhex(u["mc_hex"])
    assert len(raw) == 252
    certificate = MiniCertificate.decode(raw)
    assert certificate.name == u["name"]
    assert certificate.user_id == u["user_id"]
    assert certificate.expires == expiry_from_digits(u["expiry"])
    assert certificate.subscriber_key.n == int(u["n_hex"], 16)
    assert certificate.encode() == raw
    assert format_expiry(certificate.expires) == u["expiry"].encode("ascii")
    assert parse_expiry(u["expiry"].encode("ascii")) == certificate.expires


@pytest.mark.parametrize("user", USERS)
def test_issue_with_sample_ca_reproduces_mc(
    vectors: dict[str, Any], sample_ca: rsa.PrivateKey, user: str
) -> None:
    u = vectors["users"][user]
    issued = MiniCertificate.issue(
        sample_ca,
        u["name"],
        u["user_id"],
        expiry_from_digits(u["expiry"]),
        rsa.PublicKey(int(u["n_hex"], 16)),
    )
    assert issued.encode().hex() == u["mc_hex"]
    # A naive datetime is taken as UTC and gives the same bytes.
    naive = expiry_from_digits(u["expiry"]).replace(tzinfo=None)
    again = MiniCertificate.issue(
        sample_ca, u["name"], u["user_id"], naive, rsa.PublicKey(int(u["n_hex"], 16))
    )
    assert again.encode() == issued.encode()


@pytest.mark.parametrize("user", USERS)
def test_mini_certificate_param_round_trips(
    vectors: dict[str, Any], sample_ca: rsa.PrivateKey, user: str
) -> None:
    u = vectors["users"][user]
    param = MiniCertificateParam.from_base64(u["mini_certificate_param_b64"])
    assert param.certificate.encode().hex() == u["mc_hex"]
    assert param.ca_key == sample_ca.public
    assert param.ca_sha256 == trust.ca_fingerprint(sample_ca.public)
    assert param.to_base64() == u["mini_certificate_param_b64"]
    assert len(param.encode()) == 380
    rebuilt = MiniCertificateParam(
        MiniCertificate.decode(bytes.fromhex(u["mc_hex"])), sample_ca.public
    )
    assert rebuilt.to_base64() == u["mini_certificate_param_b64"]
    # Surrounding whitespace and CRLF are tolerated.
    padded = "  " + u["mini_certificate_param_b64"] + "\r\n"
    assert MiniCertificateParam.from_base64(padded).encode() == param.encode()


@pytest.mark.parametrize("user", USERS)
def test_srtp_private_key_param_round_trips(vectors: dict[str, Any], user: str) -> None:
    u = vectors["users"][user]
    certificate = MiniCertificate.decode(bytes.fromhex(u["mc_hex"]))
    key = decode_private_key_param(u["srtp_private_key_param_b64"], certificate)
    assert key.n == int(u["n_hex"], 16)
    assert key.d == int(u["d_hex"], 16)
    assert encode_private_key_param(key) == u["srtp_private_key_param_b64"]
    # The key really is the MC's key.
    secret = bytes(range(16))
    assert rsa.decrypt_type2(key, rsa.encrypt_type2(certificate.subscriber_key, secret), 16) == (
        secret
    )


def test_private_key_param_of_the_other_user_is_refused(vectors: dict[str, Any]) -> None:
    joe = MiniCertificate.decode(bytes.fromhex(vectors["users"]["joe"]["mc_hex"]))
    with pytest.raises(MalformedCertificate):
        decode_private_key_param(vectors["users"]["jane"]["srtp_private_key_param_b64"], joe)


# --- messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("caller_hello", messages.CallerHello),
        ("callee_hello", messages.CalleeHello),
        ("caller_final", messages.CallerFinal),
        ("callee_final", messages.CalleeFinal),
    ],
)
def test_message_decodes_and_encodes_byte_exact(
    vectors: dict[str, Any], name: str, cls: type
) -> None:
    m = vectors["messages"][name]
    raw = bytes.fromhex(m["bytes_hex"])
    decoded = messages.decode(raw)
    assert type(decoded) is cls
    assert decoded.msg_id == m["msg_id"]
    assert decoded.encode() == raw
    assert messages.encode_body(decoded) == m["body_b64"]
    assert messages.decode_body(m["body_b64"]) == decoded
    assert messages.decode_body(m["body_b64"].encode("ascii") + b"\r\n") == decoded


@pytest.mark.parametrize("name", ["caller_hello", "callee_hello"])
def test_hello_fields_and_construction(vectors: dict[str, Any], name: str) -> None:
    m = vectors["messages"][name]
    user = vectors["users"][m["from"]]
    cls = messages.CallerHello if name == "caller_hello" else messages.CalleeHello
    built = cls(ssrc=int(m["ssrc"], 16), mc=bytes.fromhex(user["mc_hex"]))
    assert built.encode().hex() == m["bytes_hex"]
    assert messages.encode_body(built) == m["body_b64"]
    assert m["version_flags"] == "00010000"
    assert built.certificate().user_id == user["user_id"]


def test_callee_final_is_four_bytes(vectors: dict[str, Any]) -> None:
    assert messages.CalleeFinal().encode() == bytes.fromhex(
        vectors["messages"]["callee_final"]["bytes_hex"]
    )
    assert messages.encode_body(messages.CalleeFinal()) == "AAAABA=="


def test_caller_final_decrypts_with_janes_key(
    vectors: dict[str, Any], vector_users: dict[str, Party]
) -> None:
    m = vectors["messages"]["caller_final"]
    assert m["to"] == "jane"
    final = messages.decode_body(m["body_b64"])
    assert isinstance(final, messages.CallerFinal)
    jane = vector_users["jane"].key
    assert rsa.decrypt_type2(jane, final.encrypted_key, 16).hex() == m["master_key_hex"]
    assert rsa.decrypt_type2(jane, final.encrypted_salt, 16).hex() == m["master_salt_hex"]
    # Joe's key cannot read it.
    with pytest.raises(rsa.RsaError):
        rsa.decrypt_type2(vector_users["joe"].key, final.encrypted_key, 16)


def jane_callee(
    vector_users: dict[str, Party], sample_ca: rsa.PrivateKey, vectors: dict[str, Any]
) -> hs.CalleeHandshake:
    return hs.CalleeHandshake(
        certificate=vector_users["jane"].certificate,
        private_key=vector_users["jane"].key,
        trust=trust.TrustStore([sample_ca.public]),
        local_ssrc=int(vectors["messages"]["callee_hello"]["ssrc"], 16),
    )


@pytest.fixture
def jane_after_hello(
    vectors: dict[str, Any], vector_users: dict[str, Party], sample_ca: rsa.PrivateKey
) -> Iterator[hs.CalleeHandshake]:
    callee = jane_callee(vector_users, sample_ca, vectors)
    events = callee.receive_request(vectors["messages"]["caller_hello"]["body_b64"], 0.0, NOW_UTC)
    assert events == [hs.SendResponse(200, "OK", vectors["messages"]["callee_hello"]["body_b64"])]
    assert callee.state is hs.CalleeState.HELLO_ACCEPTED
    yield callee


def test_callee_answers_vector_hello_with_vector_callee_hello(
    jane_after_hello: hs.CalleeHandshake,
) -> None:
    # The fixture asserts the exact Callee Hello body; here: nothing is secured yet.
    assert jane_after_hello.session is None
    assert not jane_after_hello.secured


def test_callee_decrypts_vector_caller_final(
    vectors: dict[str, Any], jane_after_hello: hs.CalleeHandshake
) -> None:
    m = vectors["messages"]["caller_final"]
    events = jane_after_hello.receive_request(m["body_b64"], 1.0, NOW_UTC)
    assert events[0] == hs.SendResponse(200, "OK", vectors["messages"]["callee_final"]["body_b64"])
    assert len(events) == 2
    secured = events[1]
    assert isinstance(secured, hs.Secured)
    keys = secured.session.keys
    assert keys.master_key.hex() == m["master_key_hex"]
    assert keys.master_salt.hex() == m["master_salt_hex"]
    assert keys.libsrtp_key.hex() == vectors["srtp"]["libsrtp_key_hex"]
    assert secured.session.local_ssrc == int(vectors["messages"]["callee_hello"]["ssrc"], 16)
    assert secured.session.peer_ssrc == int(vectors["messages"]["caller_hello"]["ssrc"], 16)
    assert secured.session.peer.name == "Joe Smith"
    assert secured.session.peer.user_id == "14085551234"
    assert secured.session.peer.sample_ca


def test_caller_final_bad_padding_gets_400(
    vectors: dict[str, Any], jane_after_hello: hs.CalleeHandshake, vector_users: dict[str, Party]
) -> None:
    m = vectors["messages"]["caller_final_bad_padding"]
    assert m["expect"].startswith("400")
    final = messages.decode_body(m["body_b64"])  # decodes as a message: the padding is bad
    assert isinstance(final, messages.CallerFinal)
    with pytest.raises(rsa.RsaError):
        rsa.decrypt_type2(vector_users["jane"].key, final.encrypted_key, 16)
    events = jane_after_hello.receive_request(m["body_b64"], 1.0, NOW_UTC)
    assert events[0].status == 400
    assert events[0].body is None
    assert events[1:] == [hs.StayClear(hs.ClearReason.BAD_MESSAGE, events[1].detail)]
    assert jane_after_hello.session is None
    assert jane_after_hello.state is hs.CalleeState.CLEAR


def test_caller_hello_version_2_is_refused(
    vectors: dict[str, Any], vector_users: dict[str, Party], sample_ca: rsa.PrivateKey
) -> None:
    raw = bytes.fromhex(vectors["messages"]["caller_hello_version_2"]["bytes_hex"])
    with pytest.raises(messages.MessageError, match="version"):
        messages.decode(raw)
    with pytest.raises(messages.MessageError):
        messages.decode_body(hello_body(raw.hex()))
    callee = jane_callee(vector_users, sample_ca, vectors)
    events = callee.receive_request(hello_body(raw.hex()), 0.0, NOW_UTC)
    assert events[0].status == 400
    assert isinstance(events[1], hs.StayClear)
    assert events[1].reason is hs.ClearReason.BAD_MESSAGE


def test_caller_hello_unknown_flags_is_accepted(
    vectors: dict[str, Any], vector_users: dict[str, Party], sample_ca: rsa.PrivateKey
) -> None:
    raw = bytes.fromhex(vectors["messages"]["caller_hello_unknown_flags"]["bytes_hex"])
    decoded = messages.decode(raw)
    assert isinstance(decoded, messages.CallerHello)
    assert decoded.flags == 0xABCD
    assert decoded.ssrc == 0x11223344
    assert decoded.encode() == raw
    callee = jane_callee(vector_users, sample_ca, vectors)
    events = callee.receive_request(hello_body(raw.hex()), 0.0, NOW_UTC)
    assert events == [hs.SendResponse(200, "OK", vectors["messages"]["callee_hello"]["body_b64"])]


def test_vector_users_full_handshake_reproduces_vector_bodies(
    vectors: dict[str, Any], vector_users: dict[str, Party], sample_ca: rsa.PrivateKey
) -> None:
    m = vectors["messages"]
    key = bytes.fromhex(m["caller_final"]["master_key_hex"])
    salt = bytes.fromhex(m["caller_final"]["master_salt_hex"])
    chunks = [key, salt]

    def random_bytes(n: int) -> bytes:
        if chunks:
            chunk = chunks.pop(0)
            assert len(chunk) == n
            return chunk
        return b"\x5a" * n

    store = trust.TrustStore([sample_ca.public])
    caller = hs.CallerHandshake(
        certificate=vector_users["joe"].certificate,
        trust=store,
        dialled_user_id="+" + vectors["users"]["jane"]["user_id"],
        local_ssrc=int(m["caller_hello"]["ssrc"], 16),
        random_bytes=random_bytes,
    )
    callee = jane_callee(vector_users, sample_ca, vectors)
    [hello] = caller.start(0.0)
    assert hello == hs.SendInfo(m["caller_hello"]["body_b64"], "application/x-sipura")
    [response] = callee.receive_request(hello.body, 0.1, NOW_UTC)
    assert response.body == m["callee_hello"]["body_b64"]
    accept, final = caller.receive_response(response.status, response.body, 0.2, NOW_UTC)
    assert isinstance(accept, hs.ExpectSrtp)
    assert isinstance(final, hs.SendInfo)
    callee_response, callee_secured = callee.receive_request(final.body, 0.3, NOW_UTC)
    assert callee_response.body == m["callee_final"]["body_b64"]
    [caller_secured] = caller.receive_response(200, callee_response.body, 0.4, NOW_UTC)
    assert isinstance(caller_secured, hs.Secured)
    assert isinstance(callee_secured, hs.Secured)
    assert caller_secured.session.keys == callee_secured.session.keys
    assert caller_secured.session.keys.libsrtp_key.hex() == vectors["srtp"]["libsrtp_key_hex"]
    assert caller_secured.session.peer.name == "Jane Doe"
    assert caller_secured.session.peer.sample_ca


# --- SRTP ----------------------------------------------------------------------------------


def vector_context(vectors: dict[str, Any]) -> SrtpContext:
    final = vectors["messages"]["caller_final"]
    return SrtpContext(
        bytes.fromhex(final["master_key_hex"]), bytes.fromhex(final["master_salt_hex"])
    )


def test_srtp_key_input_matches_vector(vectors: dict[str, Any]) -> None:
    final = vectors["messages"]["caller_final"]
    key = libsrtp_key(
        bytes.fromhex(final["master_key_hex"]), bytes.fromhex(final["master_salt_hex"])
    )
    assert key.hex() == vectors["srtp"]["libsrtp_key_hex"]
    assert vectors["srtp"]["profile"] == "AES_CM_128_HMAC_SHA1_80"


def test_srtp_packets_protect_and_unprotect_byte_for_byte(vectors: dict[str, Any]) -> None:
    sender = vector_context(vectors)
    receiver = vector_context(vectors)
    packets = vectors["srtp"]["packets"]
    assert len(packets) == 4
    for packet in packets:
        rtp = bytes.fromhex(packet["rtp_hex"])
        assert int.from_bytes(rtp[8:12], "big") == int(packet["ssrc"], 16)
        assert int.from_bytes(rtp[2:4], "big") == packet["seq"]
        assert sender.protect(rtp).hex() == packet["srtp_hex"]
        assert receiver.unprotect(bytes.fromhex(packet["srtp_hex"])) == rtp


# --- negative MCs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("tampered_name_hex", trust.McStatus.UNTRUSTED_CA),
        ("expired_2005_hex", trust.McStatus.EXPIRED),
        ("signed_by_other_ca_hex", trust.McStatus.UNTRUSTED_CA),
    ],
)
def test_mc_negative_verdicts(
    vectors: dict[str, Any], sample_ca: rsa.PrivateKey, name: str, status: trust.McStatus
) -> None:
    certificate = MiniCertificate.decode(bytes.fromhex(vectors["mc_negative"][name]))
    verdict = trust.TrustStore([sample_ca.public]).verify(certificate, NOW_UTC)
    assert verdict.status is status
    assert not verdict.ok
    if status is trust.McStatus.EXPIRED:
        assert certificate.expires.year == 2005
        assert verdict.ca == sample_ca.public  # the signature itself verified
        # Before its expiry it was valid.
        earlier = trust.TrustStore([sample_ca.public]).verify(
            certificate, certificate.expires - timedelta(seconds=1)
        )
        assert earlier.ok
    else:
        assert verdict.ca is None


def test_mc_negative_truncated_is_malformed(vectors: dict[str, Any]) -> None:
    raw = bytes.fromhex(vectors["mc_negative"]["truncated_hex"])
    assert len(raw) == 251
    with pytest.raises(MalformedCertificate):
        MiniCertificate.decode(raw)
