"""RSA primitives (rsa.py) and key/trust-anchor files (keyfiles.py)."""

from __future__ import annotations

import base64
import math
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric import rsa as crsa

from proxy.xsipura import keyfiles, rsa
from proxy.xsipura.keyfiles import CaKeyFormat, KeyFileError
from proxy.xsipura.mc import MiniCertificateParam, encode_private_key_param

if TYPE_CHECKING:
    from testkit.pki import Pki

LINKSYS = CaKeyFormat.LINKSYS
PEM = CaKeyFormat.PEM


@pytest.fixture(scope="module")
def subscriber() -> rsa.PrivateKey:
    return rsa.generate_subscriber_key()


@pytest.fixture(scope="module")
def other_subscriber() -> rsa.PrivateKey:
    return rsa.generate_subscriber_key()


def lam(key: rsa.PrivateKey) -> int:
    return math.lcm(key.p - 1, key.q - 1)


def pem_private(key: crsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


# --- subscriber key generation -----------------------------------------------------------


def test_generated_subscriber_keys_are_512_bit_e65537(subscriber: rsa.PrivateKey) -> None:
    keys = [subscriber, *(rsa.generate_subscriber_key() for _ in range(4))]
    assert len({k.n for k in keys}) == len(keys)
    for key in keys:
        assert key.n.bit_length() == 512
        assert key.size == 64
        assert key.public.size == 64
        assert key.p * key.q == key.n
        assert key.p != key.q
        assert key.p.bit_length() == key.q.bit_length() == 256
        assert (rsa.PUBLIC_EXPONENT * key.d) % lam(key) == 1
        # cryptography's own consistency checks (primality included) accept it.
        numbers = key.to_cryptography().private_numbers()
        assert numbers.public_numbers.e == 65537
        assert numbers.public_numbers.n == key.n
        crsa.RSAPrivateNumbers(
            p=numbers.p,
            q=numbers.q,
            d=numbers.d,
            dmp1=numbers.dmp1,
            dmq1=numbers.dmq1,
            iqmp=numbers.iqmp,
            public_numbers=numbers.public_numbers,
        ).private_key()


def test_generate_key_rejects_bad_sizes() -> None:
    with pytest.raises(rsa.RsaError):
        rsa.generate_key(511)
    with pytest.raises(rsa.RsaError):
        rsa.generate_key(128)
    assert rsa.generate_key(256).n.bit_length() == 256


def test_public_and_private_ops_are_inverse(subscriber: rsa.PrivateKey) -> None:
    for _ in range(5):
        m = secrets.randbelow(subscriber.n)
        block = rsa.int_to_bytes(m, 64)
        assert subscriber.private_op(subscriber.public.public_op(block)) == block
        assert rsa.bytes_to_int(subscriber.public.public_op(block)) == pow(m, 65537, subscriber.n)
    with pytest.raises(rsa.RsaError):
        subscriber.private_op(b"\x00" * 63)
    with pytest.raises(rsa.RsaError):
        subscriber.public.public_op(rsa.int_to_bytes(subscriber.n, 64))


def test_type2_round_trip(subscriber: rsa.PrivateKey) -> None:
    for length in (1, 16, 53):
        message = secrets.token_bytes(length)
        ciphertext = rsa.encrypt_type2(subscriber.public, message)
        assert len(ciphertext) == 64
        assert rsa.decrypt_type2(subscriber, ciphertext, length) == message
    with pytest.raises(rsa.RsaError):
        rsa.encrypt_type2(subscriber.public, b"x" * 54)  # > size - 11


def test_type2_padding_never_contains_zero(subscriber: rsa.PrivateKey) -> None:
    calls = []

    def mostly_zero(n: int) -> bytes:
        calls.append(n)
        return b"\x00" * n if len(calls) < 3 else bytes((i % 255) + 1 for i in range(n))

    message = bytes(range(16))
    ciphertext = rsa.encrypt_type2(subscriber.public, message, mostly_zero)
    block = subscriber.private_op(ciphertext)
    assert block[:2] == b"\x00\x02"
    assert b"\x00" not in block[2 : 64 - 17]
    assert block[64 - 17] == 0
    assert block[-16:] == message
    assert len(calls) >= 3


def test_type2_pads_with_exactly_the_bytes_given(subscriber: rsa.PrivateKey) -> None:
    """A caller-supplied source (reproducible vectors) is used as is, zeros skipped in
    order; the default source (OpenSSL's padding) gives a fresh block every time."""
    drawn = bytes(range(1, 200))
    message = bytes(range(16))
    ciphertext = rsa.encrypt_type2(subscriber.public, message, lambda n: drawn[:n])
    assert subscriber.private_op(ciphertext) == b"\x00\x02" + drawn[:45] + b"\x00" + message
    stream = iter(bytes([0, 7, 0, 0, 9] * 40))
    block = subscriber.private_op(
        rsa.encrypt_type2(
            subscriber.public, message, lambda n: bytes(next(stream) for _ in range(n))
        )
    )
    assert block[2:47] == bytes([7, 9] * 23)[:45]
    first = rsa.encrypt_type2(subscriber.public, message)
    assert first != rsa.encrypt_type2(subscriber.public, message)
    assert rsa.decrypt_type2(subscriber, first, 16) == message


def test_type2_interoperates_with_cryptography(subscriber: rsa.PrivateKey) -> None:
    ck = subscriber.to_cryptography()
    message = secrets.token_bytes(16)
    theirs = ck.public_key().encrypt(message, padding.PKCS1v15())
    assert rsa.decrypt_type2(subscriber, theirs, 16) == message
    ours = rsa.encrypt_type2(subscriber.public, message)
    assert ck.decrypt(ours, padding.PKCS1v15()) == message


def encrypt_block(key: rsa.PrivateKey, block: bytes) -> bytes:
    assert len(block) == key.size
    return key.public.public_op(block)


def test_decrypt_type2_rejects_bad_blocks(subscriber: rsa.PrivateKey) -> None:
    message = bytes(range(1, 17))
    good_ps = b"\x11" * (64 - 3 - 16)

    # Sanity: the hand-built good block decrypts.
    good = b"\x00\x02" + good_ps + b"\x00" + message
    assert rsa.decrypt_type2(subscriber, encrypt_block(subscriber, good), 16) == message

    # Exactly eight padding bytes is the minimum and still fine.
    eight = b"\x00\x02" + b"\x22" * 8 + b"\x00" + b"\x33" * (64 - 11)
    assert rsa.decrypt_type2(subscriber, encrypt_block(subscriber, eight), 64 - 11) == (
        b"\x33" * 53
    )

    # (block, expected length): each expected length matches what follows the first zero
    # after the header, so only the named defect can be the reason for refusing it.
    bad_blocks = {
        "type 1": (b"\x00\x01" + good_ps + b"\x00" + message, 16),
        "leading byte not zero": (b"\x01\x02" + good_ps + b"\x00" + message, 16),
        "seven padding bytes": (b"\x00\x02" + b"\x22" * 7 + b"\x00" + b"\x33" * 54, 54),
        "one padding byte": (b"\x00\x02\x22\x00" + b"\x33" * 60, 60),
        "no padding at all": (b"\x00\x02\x00" + b"\x33" * 61, 61),
        "no separator": (b"\x00\x02" + b"\x44" * 62, 62),
        "message 15 bytes": (b"\x00\x02" + good_ps + b"\x05" + b"\x00" + message[1:], 16),
        "message 17 bytes": (b"\x00\x02" + good_ps[:-1] + b"\x00" + b"\x07" + message, 16),
    }
    for what, (block, expected_length) in bad_blocks.items():
        assert len(block) == 64, what
        with pytest.raises(rsa.RsaError):
            rsa.decrypt_type2(subscriber, encrypt_block(subscriber, block), expected_length)

    ciphertext = rsa.encrypt_type2(subscriber.public, message)
    for wrong_length in (ciphertext[:-1], ciphertext + b"\x00", b"", b"\x00" + ciphertext):
        with pytest.raises(rsa.RsaError):
            rsa.decrypt_type2(subscriber, wrong_length, 16)
    with pytest.raises(rsa.RsaError):  # not below the modulus
        rsa.decrypt_type2(subscriber, b"\xff" * 64, 16)
    with pytest.raises(rsa.RsaError):  # right block, wrong expected length
        rsa.decrypt_type2(subscriber, ciphertext, 15)


def test_sign_and_verify_raw(subscriber: rsa.PrivateKey, pki: Pki) -> None:
    digest = secrets.token_bytes(20)
    for key in (subscriber, pki.ca):
        signature = rsa.sign_raw(key, digest)
        assert len(signature) == key.size
        assert rsa.verify_raw(key.public, digest, signature)
        # It is OpenSSL's RSA_private_encrypt: a type-1 block around the bare digest.
        public = key.to_cryptography().public_key()
        assert public.recover_data_from_signature(signature, padding.PKCS1v15(), None) == digest
        assert key.public.public_op(signature) == rsa.pad_type1(digest, key.size)

        assert not rsa.verify_raw(key.public, digest[:-1] + bytes([digest[-1] ^ 1]), signature)
        flipped = bytearray(signature)
        flipped[10] ^= 0x40
        assert not rsa.verify_raw(key.public, digest, bytes(flipped))
        assert not rsa.verify_raw(key.public, digest, signature[1:])
        assert not rsa.verify_raw(key.public, digest, b"\xff" * key.size)
    assert not rsa.verify_raw(pki.other_ca.public, digest, rsa.sign_raw(pki.ca, digest))


def test_pad_type1_layout() -> None:
    block = rsa.pad_type1(b"\xab" * 20, 64)
    assert block == b"\x00\x01" + b"\xff" * 41 + b"\x00" + b"\xab" * 20
    with pytest.raises(rsa.RsaError):
        rsa.pad_type1(b"x" * 54, 64)


def test_from_n_d_rebuilds_the_key(subscriber: rsa.PrivateKey) -> None:
    rebuilt = rsa.PrivateKey.from_n_d(subscriber.n, subscriber.d)
    assert {rebuilt.p, rebuilt.q} == {subscriber.p, subscriber.q}
    block = rsa.encrypt_type2(subscriber.public, b"k" * 16)
    assert rsa.decrypt_type2(rebuilt, block, 16) == b"k" * 16


def test_from_n_d_rejects_mismatched_d(
    subscriber: rsa.PrivateKey, other_subscriber: rsa.PrivateKey
) -> None:
    n, d = subscriber.n, subscriber.d
    for bad_n, bad_d in [
        (n, other_subscriber.d),
        (n, d + 2),
        (n, d ^ (1 << 100)),
        (n, 1),
        (n, 0),
        (n, n),
        (n, n + d),
        (n + 1, d),  # even modulus
        (other_subscriber.n, d),
        (1, 1),
    ]:
        with pytest.raises(rsa.RsaError):
            rsa.PrivateKey.from_n_d(bad_n, bad_d)


def test_from_n_d_rejects_d_plus_half_lambda() -> None:
    """d + λ(n)/2 lets the factors be recovered but is not a private exponent.

    (e·d' ≡ 1 + λ/2 mod λ.) Such a key decrypts only about half of all messages, so it
    must be refused at load time, not mid-handshake.
    """
    refused = 0
    for _ in range(8):
        key = rsa.generate_subscriber_key()
        wrong = key.d + lam(key) // 2
        if wrong >= key.n:
            continue
        with pytest.raises(rsa.RsaError):
            rsa.PrivateKey.from_n_d(key.n, wrong)
        refused += 1
    assert refused > 0
    # An equivalent exponent (d + λ) is still the same key and is accepted.
    key = rsa.generate_subscriber_key()
    same = rsa.PrivateKey.from_n_d(key.n, key.d + lam(key))
    assert rsa.decrypt_type2(same, rsa.encrypt_type2(key.public, b"s" * 16), 16) == b"s" * 16


def test_private_key_repr_never_contains_d(subscriber: rsa.PrivateKey, pki: Pki) -> None:
    for key in (subscriber, pki.ca):
        for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
            assert f"{key.d:x}" not in text
            assert f"{key.d:X}" not in text
            assert str(key.d) not in text
            assert f"{key.p:x}" not in text
            assert str(key.p) not in text
            assert f"{key.dp:x}" not in text
            assert str(key.n.bit_length()) in text


# --- keyfiles: CA private keys ---------------------------------------------------------


@pytest.mark.parametrize("fmt", [LINKSYS, PEM])
def test_ca_key_dump_load_round_trip(pki: Pki, fmt: CaKeyFormat) -> None:
    dumped = keyfiles.dump_ca_key(pki.ca, fmt)
    loaded = keyfiles.load_ca_private_key(dumped)
    assert (loaded.n, loaded.d) == (pki.ca.n, pki.ca.d)
    assert keyfiles.load_trust_anchor(dumped) == pki.ca.public
    # The loaded key signs exactly like the original.
    assert rsa.sign_raw(loaded, b"z" * 20) == rsa.sign_raw(pki.ca, b"z" * 20)


def test_linksys_ca_key_file_layout(pki: Pki) -> None:
    lines = keyfiles.dump_ca_key(pki.ca, LINKSYS).decode("ascii").splitlines()
    assert len(lines) == 2
    assert int.from_bytes(base64.b64decode(lines[0], validate=True), "big") == pki.ca.n
    assert int.from_bytes(base64.b64decode(lines[1], validate=True), "big") == pki.ca.d
    assert len(base64.b64decode(lines[0])) == 128
    # CRLF line ends and blank lines are tolerated.
    crlf = ("\r\n\r\n" + lines[0] + "\r\n" + lines[1] + "\r\n").encode("ascii")
    assert keyfiles.load_ca_private_key(crlf).d == pki.ca.d


def test_pem_ca_key_formats_all_load(pki: Pki) -> None:
    ck = pki.ca.to_cryptography()
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8):
        assert keyfiles.load_ca_private_key(pem_private(ck, fmt)).d == pki.ca.d
    assert b"BEGIN RSA PRIVATE KEY" in keyfiles.dump_ca_key(pki.ca, PEM)


def test_generate_ca_key_is_1024_bits() -> None:
    key = keyfiles.generate_ca_key()
    assert key.n.bit_length() == 1024
    assert (rsa.PUBLIC_EXPONENT * key.d) % lam(key) == 1


# --- keyfiles: trust anchors -------------------------------------------------------------


def test_trust_anchor_from_public_dumps(pki: Pki) -> None:
    one_line = keyfiles.dump_ca_public(pki.ca.public, LINKSYS)
    assert one_line.count(b"\n") == 1
    assert keyfiles.load_trust_anchor(one_line) == pki.ca.public
    assert keyfiles.load_trust_anchor(one_line.strip()) == pki.ca.public
    pem = keyfiles.dump_ca_public(pki.ca.public, PEM)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert keyfiles.load_trust_anchor(pem) == pki.ca.public
    pkcs1 = (
        pki.ca.to_cryptography()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    )
    assert keyfiles.load_trust_anchor(pkcs1) == pki.ca.public


def test_trust_anchor_from_sample_ca_key_file(
    vectors: dict[str, Any], sample_ca: rsa.PrivateKey
) -> None:
    anchor = keyfiles.load_trust_anchor(vectors["ca"]["ca_key_file"].encode("ascii"))
    assert anchor == sample_ca.public


def gen_mc_output(param: MiniCertificateParam, private_key: str) -> str:
    # gen_mc prints "\n<Mini Certificate>\n%s\n" then "\n<SRTP Private Key>\n%s\n\n".
    return f"\n<Mini Certificate>\n{param.to_base64()}\n\n<SRTP Private Key>\n{private_key}\n\n"


def spa_xml(param: MiniCertificateParam, tag: str = "Mini_Certificate") -> str:
    return (
        '<flat-profile>\n<SRTP_Method ua="na">x-sipura</SRTP_Method>\n'
        f'<{tag} ua="na">{param.to_base64()}</{tag}>\n'
        '<SRTP_Private_Key ua="na">AAAA</SRTP_Private_Key>\n</flat-profile>\n'
    )


def test_trust_anchor_from_mini_certificate_param(pki: Pki, vectors: dict[str, Any]) -> None:
    param = pki.alice.param
    b64 = param.to_base64()
    assert keyfiles.load_trust_anchor(b64.encode("ascii")) == pki.ca.public
    assert keyfiles.load_trust_anchor((b64 + "\r\n").encode("ascii")) == pki.ca.public
    generated = gen_mc_output(param, encode_private_key_param(pki.alice.key))
    assert keyfiles.load_trust_anchor(generated.encode("ascii")) == pki.ca.public
    assert keyfiles.extract_param_text(generated) == b64
    for tag in ("Mini_Certificate", "Mini_Certificate_1_", "Mini_Certificate_2_"):
        xml = spa_xml(param, tag)
        assert keyfiles.extract_param_text(xml) == b64
        assert keyfiles.load_trust_anchor(xml.encode("ascii")) == pki.ca.public
    sample_param = vectors["users"]["jane"]["mini_certificate_param_b64"]
    assert keyfiles.load_trust_anchor(sample_param.encode("ascii")).n == int(
        vectors["ca"]["n_hex"], 16
    )
    assert keyfiles.extract_param_text(b64) is None


def test_load_ca_private_key_refuses_a_param_or_public_key(pki: Pki) -> None:
    for data in (
        pki.alice.param.to_base64().encode("ascii"),
        keyfiles.dump_ca_public(pki.ca.public, LINKSYS),
        keyfiles.dump_ca_public(pki.ca.public, PEM),
    ):
        with pytest.raises(KeyFileError):
            keyfiles.load_ca_private_key(data)


# --- keyfiles: errors ----------------------------------------------------------------------


GARBAGE = [
    b"",
    b"\n\n",
    b"hello world",
    b"\xff\xfe\x00garbage",
    b"!!!not base64!!!\n",
    b"AAAA\nAAAA\nAAAA\n",
    b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    b'<Mini_Certificate ua="na">AAAA</Mini_Certificate>',
    b"<Mini Certificate>\n" + base64.b64encode(b"\x01" * 380) + b"\n",
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_key_file_error(data: bytes) -> None:
    with pytest.raises(KeyFileError):
        keyfiles.load_ca_private_key(data)
    with pytest.raises(KeyFileError):
        keyfiles.load_trust_anchor(data)


def test_wrong_size_keys_are_refused(subscriber: rsa.PrivateKey) -> None:
    # A 512-bit key in every form.
    small_linksys = keyfiles.dump_ca_key(subscriber, LINKSYS)
    small_pem = keyfiles.dump_ca_key(subscriber, PEM)
    small_public = keyfiles.dump_ca_public(subscriber.public, PEM)
    small_line = keyfiles.dump_ca_public(subscriber.public, LINKSYS)
    big = crsa.generate_private_key(public_exponent=65537, key_size=1536)
    big_pem = pem_private(big, serialization.PrivateFormat.PKCS8)
    big_public = big.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    big_numbers = big.private_numbers()
    big_linksys = (
        base64.b64encode(rsa.int_to_bytes(big_numbers.public_numbers.n, 192))
        + b"\n"
        + base64.b64encode(rsa.int_to_bytes(big_numbers.d, 192))
        + b"\n"
    )
    for data in (small_linksys, small_pem, big_pem, big_linksys):
        with pytest.raises(KeyFileError, match="1024"):
            keyfiles.load_ca_private_key(data)
    for data in (small_pem, small_public, big_pem, big_public):
        with pytest.raises(KeyFileError, match="1024"):
            keyfiles.load_trust_anchor(data)
    for data in (small_linksys, small_line, big_linksys):
        with pytest.raises(KeyFileError):
            keyfiles.load_trust_anchor(data)


def test_encrypted_pem_is_refused(pki: Pki) -> None:
    ck = pki.ca.to_cryptography()
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8):
        data = ck.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
        )
        with pytest.raises(KeyFileError, match="encrypted"):
            keyfiles.load_ca_private_key(data)
        with pytest.raises(KeyFileError, match="encrypted"):
            keyfiles.load_trust_anchor(data)


def test_non_rsa_and_wrong_exponent_pem_are_refused() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    e3 = crsa.generate_private_key(public_exponent=3, key_size=1024)
    for data in (
        pem_private(ec_key, serialization.PrivateFormat.PKCS8),
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        pem_private(e3, serialization.PrivateFormat.TraditionalOpenSSL),
        e3.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ):
        with pytest.raises(KeyFileError):
            keyfiles.load_ca_private_key(data)
        with pytest.raises(KeyFileError):
            keyfiles.load_trust_anchor(data)


RSA_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption
UNKNOWN_OID = bytes.fromhex("2a864886f70d010163")  # 1.2.840.113549.1.1.99: no such key type


def pem_armour(der: bytes, label: str) -> bytes:
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode()


def unknown_algorithm_pems(pki: Pki) -> list[bytes]:
    ck = pki.ca.to_cryptography()
    spki = ck.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pkcs8 = ck.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert RSA_OID in spki
    assert RSA_OID in pkcs8
    return [
        pem_armour(spki.replace(RSA_OID, UNKNOWN_OID), "PUBLIC KEY"),
        pem_armour(pkcs8.replace(RSA_OID, UNKNOWN_OID), "PRIVATE KEY"),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["spki", "pkcs8"])
def test_pem_with_unknown_key_algorithm_is_key_file_error(pki: Pki, which: int) -> None:
    data = unknown_algorithm_pems(pki)[which]
    with pytest.raises(KeyFileError):
        keyfiles.load_trust_anchor(data)
    with pytest.raises(KeyFileError):
        keyfiles.load_ca_private_key(data)


def test_inconsistent_linksys_key_is_refused_without_quoting_it(pki: Pki) -> None:
    n_line = base64.b64encode(rsa.int_to_bytes(pki.ca.n, 128))
    d_line = base64.b64encode(rsa.int_to_bytes(pki.other_ca.d, 128))
    data = n_line + b"\n" + d_line + b"\n"
    for loader in (keyfiles.load_ca_private_key, keyfiles.load_trust_anchor):
        with pytest.raises(KeyFileError) as info:
            loader(data)
        message = str(info.value)
        assert n_line.decode() not in message
        assert d_line.decode() not in message
        assert f"{pki.ca.n:x}" not in message
        assert str(pki.other_ca.d) not in message


def test_generated_ca_key_is_usable_with_datetime_issue(pki: Pki) -> None:
    # Smoke: a key loaded back from each format issues MCs that the original CA vouches for.
    from proxy.xsipura.mc import MiniCertificate
    from proxy.xsipura.trust import TrustStore

    for fmt in (LINKSYS, PEM):
        loaded = keyfiles.load_ca_private_key(keyfiles.dump_ca_key(pki.ca, fmt))
        certificate = MiniCertificate.issue(
            loaded, "X", "1", datetime(2040, 1, 1, tzinfo=UTC), pki.alice.key.public
        )
        assert TrustStore([pki.ca.public]).verify(certificate, datetime(2039, 1, 1)).ok
