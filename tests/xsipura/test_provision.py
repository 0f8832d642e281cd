"""Issuing a line's credentials (proxy.xsipura.provision), as mc issue, the demo, the
tests and the bench all do."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.xsipura import keyfiles
from proxy.xsipura.mc import (
    MalformedCertificate,
    MiniCertificateParam,
    decode_private_key_param,
)
from proxy.xsipura.provision import LineCredentials, issue_line
from proxy.xsipura.rsa import PrivateKey
from proxy.xsipura.trust import McStatus, TrustStore

EXPIRES = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
BEFORE = datetime(2030, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> PrivateKey:
    return keyfiles.generate_ca_key()


@pytest.fixture(scope="module")
def line(ca: PrivateKey) -> LineCredentials:
    return issue_line(ca, "Joe Smith", "14085551234", EXPIRES)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_issued_mc_names_the_line_and_verifies_under_its_ca(
    ca: PrivateKey, line: LineCredentials
) -> None:
    certificate = line.certificate
    assert (certificate.name, certificate.user_id, certificate.expires) == (
        "Joe Smith", "14085551234", EXPIRES)  # fmt: skip
    assert certificate.subscriber_key.n == line.key.n  # the MC carries this line's key
    assert line.key.n.bit_length() == 512
    assert line.param.ca_key == ca.public  # the CA appended is the line's trust anchor
    assert TrustStore([ca.public]).verify(certificate, BEFORE).status is McStatus.VALID
    other = keyfiles.generate_ca_key()
    assert TrustStore([other.public]).verify(certificate, BEFORE).status is not McStatus.VALID


def test_params_are_the_provisioning_forms_and_read_back(line: LineCredentials) -> None:
    param = MiniCertificateParam.from_base64(line.mini_certificate)
    assert param.encode() == line.param.encode()
    assert decode_private_key_param(line.srtp_private_key, param.certificate).d == line.key.d
    again = LineCredentials.from_params(line.mini_certificate, line.srtp_private_key)
    assert again.param.encode() == line.param.encode() and again.key.d == line.key.d


def test_from_params_refuses_a_key_of_another_line(ca: PrivateKey, line: LineCredentials) -> None:
    other = issue_line(ca, "Jane Doe", "14085559876", EXPIRES)
    with pytest.raises(MalformedCertificate):
        LineCredentials.from_params(line.mini_certificate, other.srtp_private_key)


def test_a_given_key_is_used_as_is(ca: PrivateKey, line: LineCredentials) -> None:
    reissued = issue_line(ca, "Joe Smith", "14085551234", datetime(2032, 1, 1, tzinfo=UTC),
                          key=line.key)  # fmt: skip
    assert reissued.key is line.key
    assert reissued.certificate.subscriber_key.n == line.key.n
    assert reissued.certificate.expires != line.certificate.expires


def test_a_name_the_mc_cannot_hold_is_refused(ca: PrivateKey) -> None:
    with pytest.raises(MalformedCertificate):
        issue_line(ca, "x" * 33, "14085551234", EXPIRES)


def test_gen_mc_text_is_the_vendor_layout(line: LineCredentials) -> None:
    assert line.gen_mc_text() == (
        f"\n<Mini Certificate>\n{line.mini_certificate}\n"
        f"\n<SRTP Private Key>\n{line.srtp_private_key}\n\n"
    )


def test_repr_never_shows_the_private_exponent(line: LineCredentials) -> None:
    text = repr(line)
    assert str(line.key.d) not in text and f"{line.key.d:x}" not in text
    assert line.srtp_private_key not in text


def test_write_files_key_is_0600_and_both_read_back(line: LineCredentials, tmp_path: Path
                                                    ) -> None:  # fmt: skip
    files = line.write_files(tmp_path)
    assert files.mini_certificate == tmp_path / "14085551234.mc"
    assert files.srtp_private_key == tmp_path / "14085551234.key"
    assert mode(files.srtp_private_key) == 0o600
    assert files.mini_certificate.read_text() == line.mini_certificate + "\n"
    assert files.srtp_private_key.read_text() == line.srtp_private_key + "\n"
    named = line.write_files(tmp_path, stem="joe")
    assert named.srtp_private_key.name == "joe.key" and mode(named.srtp_private_key) == 0o600


def test_rewriting_a_lax_key_file_narrows_it_to_0600(line: LineCredentials, tmp_path: Path
                                                     ) -> None:  # fmt: skip
    path = tmp_path / "14085551234.key"
    path.write_text("old and longer than the new content\n" * 4)
    path.chmod(0o644)
    files = line.write_files(tmp_path)
    assert files.srtp_private_key == path
    assert mode(path) == 0o600 and path.read_text() == line.srtp_private_key + "\n"
