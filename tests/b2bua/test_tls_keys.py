"""TLS key material at start-up: certificate, key, their match, modes, the trust store;
and ``run --check`` reporting each problem as one line with exit code 2."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from x509ca import TestCa

from proxy.b2bua.config import ConfigError, load_config
from proxy.b2bua.tls_keys import load_tls
from proxy.cli import main

CONFIG = """\
[inside]
listen = "127.0.0.1:5070"
media_ip = "127.0.0.1"
[outside]
listen = "127.0.0.1:5080"
media_ip = "127.0.0.1"
tls_listen = "127.0.0.1:5081"
[sip]
transports = ["udp", "tls"]
[tls]
certificate = "{cert}"
private_key = "@{key}"
ca = "ca.pem"
"""


def write(tmp_path: Path, cert: str = "proxy.crt", key: str = "proxy.key") -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG.format(cert=cert, key=key))
    return path


@pytest.fixture
def ca(tmp_path: Path) -> TestCa:
    authority = TestCa(tmp_path)
    authority.issue("proxy", ("proxy.test",), ("127.0.0.1",))
    return authority


def test_a_good_pair_gives_server_and_client_contexts(tmp_path: Path, ca: TestCa) -> None:
    tls = load_tls(load_config(write(tmp_path)))
    assert tls.server is not None and tls.client is not None
    assert tls.server.minimum_version is ssl.TLSVersion.TLSv1_2
    assert tls.client.minimum_version is ssl.TLSVersion.TLSv1_2
    assert tls.client.check_hostname and tls.client.verify_mode is ssl.CERT_REQUIRED
    assert tls.subject == "CN=proxy.test"
    assert tls.warnings == ()


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["run", "--config", str(config), "--check"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_reports_tls(tmp_path: Path, ca: TestCa, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(write(tmp_path), capsys)
    assert code == 0, err
    assert "TLS as CN=proxy.test" in out


@pytest.mark.parametrize(
    ("case", "key", "fragment"),
    [
        ("mismatch", "tls.private_key", "does not belong to the certificate"),
        ("open_key", "tls.private_key", "must not be accessible by group or others"),
        ("expired", "tls.certificate", "expired on"),
        ("not_pem", "tls.certificate", "not a PEM certificate"),
        ("bad_key", "tls.private_key", "not an unencrypted PEM private key"),
        ("missing", "tls.certificate", "cannot read"),
        ("bad_ca", "tls.ca", "cannot load"),
    ],
)
def test_bad_material_is_one_line_and_exit_2(
    tmp_path: Path, ca: TestCa, capsys: pytest.CaptureFixture[str], case: str, key: str,
    fragment: str,
) -> None:  # fmt: skip
    other = ca.issue("other", ("other.test",))
    cert, key_file = "proxy.crt", "proxy.key"
    if case == "mismatch":
        key_file = other.key.name
    elif case == "open_key":
        (tmp_path / "proxy.key").chmod(0o640)
    elif case == "expired":
        old = ca.issue("old", ("proxy.test",), valid_days=-1, not_before_days=-10)
        cert, key_file = old.certificate.name, old.key.name
    elif case == "not_pem":
        (tmp_path / "proxy.crt").write_text("hello\n")
    elif case == "bad_key":
        (tmp_path / "proxy.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n")
    elif case == "missing":
        cert = "nowhere.crt"
    elif case == "bad_ca":
        (tmp_path / "ca.pem").write_text("junk\n")
    config = write(tmp_path, cert, key_file)
    with pytest.raises(ConfigError) as info:
        load_tls(load_config(config))
    assert info.value.key == key
    assert fragment in str(info.value)
    code, out, err = check(config, capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and fragment in err
    assert "BEGIN" not in err  # never key material


def test_expiring_soon_is_a_warning(
    tmp_path: Path, ca: TestCa, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = ca.issue("soon", ("proxy.test",), valid_days=3)
    code, _, err = check(write(tmp_path, soon.certificate.name, soon.key.name), capsys)
    assert code == 0
    assert "warning: tls.certificate:" in err and "expires on" in err


def test_no_tls_transport_no_contexts(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(CONFIG.split("tls_listen")[0].replace("[sip]", "") + "\n")
    tls = load_tls(load_config(path))
    assert (tls.server, tls.client) == (None, None)
