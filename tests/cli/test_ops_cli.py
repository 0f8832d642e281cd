"""Key files and certificates as `run --check` and the `mc` commands treat them: private
files written 0600, refused when group/others can read them, line MC expiry."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.cli import _secure_state, main
from proxy.xsipura.mc import encode_private_key_param
from tests.conftest import Pki

CONFIG = """\
[inside]
listen = "127.0.0.1:15070"
media_ip = "127.0.0.1"
[outside]
listen = "127.0.0.1:15080"
media_ip = "127.0.0.1"
{admin}
[[line]]
user_id = "15550001111"
mini_certificate = "@line.mc"
srtp_private_key = "@line.key"
"""


def _site(tmp_path: Path, pki: Pki, expires: datetime, admin: str = "") -> Path:
    party = pki.issue("Alice Caller", "15550001111", expires)
    (tmp_path / "line.mc").write_text(party.param.to_base64() + "\n")
    (tmp_path / "line.key").write_text(encode_private_key_param(party.key) + "\n")
    (tmp_path / "line.key").chmod(0o600)
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG.format(admin=admin))
    return config


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["run", "--config", str(config), "--check"])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_check_refuses_a_key_readable_by_others(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _site(tmp_path, pki, datetime.now(UTC) + timedelta(days=400))
    assert _check(config, capsys)[0] == 0
    for mode in (0o640, 0o604, 0o620):
        (tmp_path / "line.key").chmod(mode)
        code, out, err = _check(config, capsys)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert "line[0].srtp_private_key" in err and f"{mode:04o}" in err
        assert "chmod 600" in err
    (tmp_path / "line.key").chmod(0o600)
    assert _check(config, capsys)[0] == 0


def test_run_check_refuses_an_open_ca_private_key_and_token(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["mc", "ca-new", "--out", str(tmp_path / "ca.key")]) == 0
    capsys.readouterr()
    admin = '[admin]\nlisten = "127.0.0.1:15099"\ntoken = "@admin.token"\n'
    admin += '[xsipura]\ntrusted_ca = ["ca.key"]\n'
    config = _site(tmp_path, pki, datetime.now(UTC) + timedelta(days=400), admin)
    (tmp_path / "admin.token").write_text("secret\n")
    assert _check(config, capsys)[0] == 0
    (tmp_path / "ca.key").chmod(0o644)
    code, _, err = _check(config, capsys)
    assert code == 2 and "xsipura.trusted_ca[0]: a CA private key" in err
    (tmp_path / "ca.key").chmod(0o600)
    (tmp_path / "admin.token").chmod(0o644)
    code, _, err = _check(config, capsys)
    assert code == 2 and "admin.token" in err and err.count("\n") == 1


def test_run_check_expired_mc_is_an_error_expiring_soon_a_warning(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _site(tmp_path, pki, datetime.now(UTC) + timedelta(days=10, hours=1))
    code, out, err = _check(config, capsys)
    assert code == 0 and "OK" in out
    assert "warning: line[0].mini_certificate: expires on" in err and "in 10 days" in err
    config = _site(tmp_path, pki, datetime.now(UTC) - timedelta(days=1))
    code, out, err = _check(config, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "expired on" in err and "local_mc_expired" in err


def test_mc_issue_out_and_ca_new_write_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.umask(0o022)  # an operator's usual umask: the files must still come out 0600
    try:
        assert main(["mc", "ca-new", "--out", str(tmp_path / "ca.key")]) == 0
        out = tmp_path / "line.mc"
        argv = ["mc", "issue", "--ca", str(tmp_path / "ca.key"), "--name", "Joe",
                "--user-id", "14085551234", "--days", "30", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        assert main(argv) == 2  # exists: refuses without --force
        out.chmod(0o644)
        assert main([*argv, "--force"]) == 0
    finally:
        os.umask(0o077)
    for name in ("ca.key", "line.mc"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    text = out.read_text()
    assert "<Mini Certificate>" in text and "<SRTP Private Key>" in text
    assert "<SRTP Private Key>" not in capsys.readouterr().out  # never on stdout with --out


@pytest.mark.parametrize(
    ("secure", "shown"),
    [
        (None, "clear (not requested)"),
        ({"state": "secure", "reason": None}, "secure"),
        ({"state": "clear", "reason": "untrusted_ca"}, "clear (untrusted_ca)"),
        ({"state": "handshaking", "reason": None}, "pending"),
        ({"state": "waiting", "reason": None}, "pending"),
    ],
)
def test_calls_secure_column(secure: object, shown: str) -> None:
    assert _secure_state(secure) == shown


def test_admin_endpoint_argument_accepts_ipv6() -> None:
    from proxy.admin.client import parse_endpoint
    from proxy.errors import UsageError

    assert parse_endpoint("[::1]:5099") == ("::1", 5099)
    assert parse_endpoint("127.0.0.1:5099") == ("127.0.0.1", 5099)
    assert parse_endpoint("localhost:80") == ("localhost", 80)
    for bad in ("::1:5099", "[::1]5099", "host:", "host:99999", "[::1]:x"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)
