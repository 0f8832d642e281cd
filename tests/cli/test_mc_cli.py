"""`sipura-proxy mc` through the installed console script, as operators' scripts use it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]


def _find_exe() -> str | None:
    """The console script installed beside this interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "sipura-proxy"
    return str(beside) if beside.exists() else shutil.which("sipura-proxy")


EXE = _find_exe()


@pytest.fixture(scope="session")
def run() -> Run:
    if EXE is None:
        pytest.fail("the sipura-proxy console script is not installed (pip install -e .)")

    def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
        )

    return _run


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module", params=["linksys", "pem"])
def ca(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, run: Run) -> Path:
    path = tmp_path_factory.mktemp("ca") / f"ca.{request.param}"
    result = run("mc", "ca-new", "--out", str(path), "--format", request.param)
    assert result.returncode == 0, result.stderr
    return path


def issue_json(run: Run, ca: Path, *extra: str) -> dict[str, str]:
    result = run(
        "mc", "issue", "--ca", str(ca), "--name", "Joe Smith", "--user-id", "14085551234",
        *extra, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data: dict[str, str] = json.loads(result.stdout)
    return data


def test_ca_new_writes_0600_key_in_requested_format(ca: Path, run: Run) -> None:
    mode = stat.S_IMODE(ca.stat().st_mode)
    assert mode == 0o600
    text = ca.read_text()
    if ca.suffix == ".pem":
        assert text.startswith("-----BEGIN RSA PRIVATE KEY-----")
    else:
        lines = text.split()
        assert len(lines) == 2
        assert all(len(base64.b64decode(line)) == 128 for line in lines)


def test_ca_new_refuses_to_overwrite_without_force(ca: Path, run: Run, tmp_path: Path) -> None:
    target = tmp_path / "ca.key"
    target.write_text("precious")
    line = one_line_error(run("mc", "ca-new", "--out", str(target)))
    assert "--force" in line
    assert target.read_text() == "precious"
    target.chmod(0o644)
    assert run("mc", "ca-new", "--out", str(target), "--force").returncode == 0
    assert target.read_text() != "precious"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_issue_prints_gen_mc_blocks(ca: Path, run: Run) -> None:
    result = run(
        "mc", "issue", "--ca", str(ca), "--name", "Joe", "--user-id", "1001", "--days", "30"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    # gen_mc: "\n<Mini Certificate>\n%s\n" then "\n<SRTP Private Key>\n%s\n\n"
    assert lines[0] == ""
    assert lines[1] == "<Mini Certificate>"
    assert len(base64.b64decode(lines[2], validate=True)) == 380
    assert lines[3] == ""
    assert lines[4] == "<SRTP Private Key>"
    assert 1 <= len(base64.b64decode(lines[5], validate=True)) <= 64
    assert lines[6:] == ["", ""]


def test_issue_show_verify_round_trip(ca: Path, run: Run, tmp_path: Path) -> None:
    issued = issue_json(run, ca, "--expires", "2031-02-03T04:05:06")
    assert set(issued) >= {"mini_certificate", "srtp_private_key", "name", "user_id", "expires"}
    assert issued["name"] == "Joe Smith"
    assert issued["user_id"] == "14085551234"
    assert issued["expires"] == "2031-02-03T04:05:06Z"
    assert len(base64.b64decode(issued["mini_certificate"])) == 380

    shown = run("mc", "show", issued["mini_certificate"], "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["name"] == "Joe Smith"
    assert info["user_id"] == "14085551234"
    assert info["expires"] == "2031-02-03T04:05:06Z"
    assert info["sample_ca"] is False
    param = base64.b64decode(issued["mini_certificate"])

    assert info["key_sha256"] == hashlib.sha256(param[60:124]).hexdigest()
    assert info["ca_sha256"] == hashlib.sha256(param[252:]).hexdigest()

    # The same MC as a file holding gen_mc output, and as raw 252-byte hex.
    as_file = tmp_path / "joe.txt"
    as_file.write_text(f"\n<Mini Certificate>\n{issued['mini_certificate']}\n")
    raw_hex = param[:252].hex()
    for form in (issued["mini_certificate"], str(as_file), raw_hex):
        ok = run("mc", "verify", "--ca", str(ca), form)
        assert ok.returncode == 0, (form[:20], ok.stderr)
        assert ok.stderr == ""
    raw_shown = json.loads(run("mc", "show", raw_hex, "--json").stdout)
    assert raw_shown["ca_sha256"] is None

    expired = run("mc", "verify", "--ca", str(ca), str(as_file), "--at", "2031-02-03T04:05:07Z")
    assert expired.returncode == 1
    assert "expired" in expired.stderr
    at_expiry = run("mc", "verify", "--ca", str(ca), str(as_file), "--at", "2031-02-03T04:05:06Z")
    assert at_expiry.returncode == 0, at_expiry.stderr


def test_verify_trusts_only_configured_cas(ca: Path, run: Run, tmp_path: Path) -> None:
    issued = issue_json(run, ca, "--days", "10")
    other = tmp_path / "other.key"
    assert run("mc", "ca-new", "--out", str(other)).returncode == 0
    # The CA appended to the MC is never trusted by itself.
    untrusted = run("mc", "verify", "--ca", str(other), issued["mini_certificate"])
    assert untrusted.returncode == 1
    assert "not signed by a trusted CA" in untrusted.stderr
    # Any one trusted CA among several is enough.
    both = run("mc", "verify", "--ca", str(other), "--ca", str(ca), issued["mini_certificate"])
    assert both.returncode == 0, both.stderr
    # A file holding a Mini Certificate param: its appended CA is trusted, as on an SPA.
    line_param = tmp_path / "line.param"
    line_param.write_text(issue_json(run, ca, "--days", "5")["mini_certificate"] + "\n")
    assert run("mc", "verify", "--ca", str(line_param), issued["mini_certificate"]).returncode == 0
    # The public half exported with ca-pub works as a trust anchor, both formats.
    for fmt in ("linksys", "pem"):
        pub = run("mc", "ca-pub", "--ca", str(ca), "--format", fmt)
        assert pub.returncode == 0, pub.stderr
        pub_file = tmp_path / f"ca.pub.{fmt}"
        pub_file.write_text(pub.stdout)
        assert (
            run("mc", "verify", "--ca", str(pub_file), issued["mini_certificate"]).returncode == 0
        )
        # ...but cannot issue.
        line = one_line_error(
            run(
                "mc", "issue", "--ca", str(pub_file), "--name", "x", "--user-id", "1", "--days", "1"
            )
        )
        assert "CA" in line


def test_malformed_mc_is_invalid_not_unreadable(ca: Path, run: Run, vectors: dict) -> None:  # type: ignore[type-arg]
    truncated = vectors["mc_negative"]["truncated_hex"]
    result = run("mc", "verify", "--ca", str(ca), truncated)
    assert result.returncode == 1
    assert "malformed" in result.stderr


def test_sample_ca_warns_but_verifies(run: Run, tmp_path: Path, vectors: dict) -> None:  # type: ignore[type-arg]
    sample = tmp_path / "sample.key"
    sample.write_text(vectors["ca"]["ca_key_file"])
    joe = vectors["users"]["joe"]["mini_certificate_param_b64"]
    result = run("mc", "verify", "--ca", str(sample), joe, "--at", "2030-01-01")
    assert result.returncode == 0
    assert "sample CA" in result.stderr
    shown = run("mc", "show", joe, "--json")
    assert json.loads(shown.stdout)["sample_ca"] is True
    assert "sample CA" in shown.stderr
    # Negative vectors through the CLI.
    for key, reason in (
        ("tampered_name_hex", "not signed by a trusted CA"),
        ("signed_by_other_ca_hex", "not signed by a trusted CA"),
        ("expired_2005_hex", "expired"),
    ):
        bad = run("mc", "verify", "--ca", str(sample), vectors["mc_negative"][key])
        assert bad.returncode == 1, key
        assert reason in bad.stderr, (key, bad.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["mc", "issue", "--ca", "{ca}", "--name", "", "--user-id", "1", "--days", "1"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x" * 33, "--user-id", "1", "--days", "1"],
        ["mc", "issue", "--ca", "{ca}", "--name", "Jos\u00e9", "--user-id", "1", "--days", "1"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1" * 17, "--days", "1"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1", "--days", "0"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1", "--expires", "2001-01-01"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1", "--expires", "2100-01-01"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1", "--expires", "soon"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1"],
        ["mc", "issue", "--ca", "{ca}", "--name", "x", "--user-id", "1", "--days", "1",
         "--expires", "2030-01-01"],
        ["mc", "issue", "--ca", "{missing}", "--name", "x", "--user-id", "1", "--days", "1"],
        ["mc", "issue", "--ca", "{garbage}", "--name", "x", "--user-id", "1", "--days", "1"],
        ["mc", "verify", "--ca", "{missing}", "{mc}"],
        ["mc", "verify", "--ca", "{garbage}", "{mc}"],
        ["mc", "verify", "--ca", "{ca}", "not an MC!"],
        ["mc", "verify", "--ca", "{ca}", "{mc}", "--at", "yesterday"],
        ["mc", "verify", "{mc}"],
        ["mc", "show", "%%%"],
        ["mc", "show", "{garbage}"],
        ["mc", "show", "{missing}"],
        ["mc", "ca-new", "--out", "{tmp}/no/such/dir/ca.key"],
        ["mc", "ca-new", "--out", "{tmp}/x", "--format", "der"],
        ["mc", "frobnicate"],
        ["nonsense"],
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(
    args: list[str],
    ca: Path,
    run: Run,
    tmp_path: Path,
    vectors: dict,  # type: ignore[type-arg]
) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(300))
    values = {
        "ca": str(ca),
        "missing": str(tmp_path / "missing"),
        "garbage": str(garbage),
        "mc": vectors["users"]["joe"]["mini_certificate_param_b64"],
        "tmp": str(tmp_path),
    }
    line = one_line_error(run(*[a.format(**values) for a in args]))
    assert line.strip()


def test_python_dash_m_is_the_same_cli(run: Run) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "mc", "show", "%%%"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1


def test_days_expiry_is_relative_to_now(ca: Path, run: Run) -> None:
    issued = issue_json(run, ca, "--days", "2")
    expires = datetime.fromisoformat(issued["expires"].replace("Z", "+00:00"))
    delta = expires - datetime.now(UTC)
    assert timedelta(days=2) - timedelta(minutes=5) < delta <= timedelta(days=2)
