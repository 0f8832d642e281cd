"""Trust anchors and each line's MC and key: :func:`load_security` on real key material.

Every CA, MC and subscriber key here is generated once per module (RSA-512 keygen is
~10 ms). Errors are part of the contract: one line, naming the key that is wrong, and
never quoting a private key.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.b2bua.config import ConfigError, load_config, parse_config
from proxy.b2bua.line_keys import Security, load_security
from proxy.cli import main as cli_main
from proxy.media.tones import SECURE_CALL_TONE, Tone
from proxy.xsipura import rsa
from proxy.xsipura.keyfiles import CaKeyFormat, dump_ca_key, dump_ca_public, generate_ca_key
from proxy.xsipura.mc import (
    MiniCertificateParam,
    encode_private_key_param,
)
from proxy.xsipura.provision import issue_line
from proxy.xsipura.trust import SAMPLE_CA_MODULUS, McStatus

LINE_ID = "14085551234"
VALID_AT = datetime(2030, 6, 1, tzinfo=UTC)

HEAD = """\
[inside]
listen = "10.0.0.1:5060"
media_ip = "10.0.0.1"
[outside]
listen = "192.0.2.1:5060"
media_ip = "192.0.2.1"
"""


@dataclass(frozen=True)
class Subscriber:
    key: rsa.PrivateKey
    param: MiniCertificateParam

    @property
    def mc_b64(self) -> str:
        return self.param.to_base64()

    @property
    def key_b64(self) -> str:
        return encode_private_key_param(self.key)


@dataclass(frozen=True)
class Material:
    ca: rsa.PrivateKey
    other_ca: rsa.PrivateKey
    line: Subscriber
    """An MC for LINE_ID under ``ca``."""
    stranger: Subscriber
    """Another subscriber under ``ca`` (its key does not match ``line``'s MC)."""
    foreign: Subscriber
    """An MC for LINE_ID under ``other_ca``."""


def issue(
    ca: rsa.PrivateKey,
    name: str,
    user_id: str,
    expires: datetime = datetime(2031, 1, 1, tzinfo=UTC),
) -> Subscriber:
    line = issue_line(ca, name, user_id, expires)
    return Subscriber(line.key, line.param)


@pytest.fixture(scope="module")
def mat() -> Material:
    ca = generate_ca_key()
    other = generate_ca_key()
    return Material(
        ca,
        other,
        issue(ca, "Joe Smith", LINE_ID),
        issue(ca, "Someone Else", "14085550000"),
        issue(other, "Joe Abroad", LINE_ID),
    )


def toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


def config_text(xsipura: str = "", lines: str | None = None) -> str:
    text = HEAD
    if xsipura:
        text += "[xsipura]\n" + xsipura + "\n"
    return text + (lines if lines is not None else f'[[line]]\nuser_id = "{LINE_ID}"\n')


def line(
    mc: str | None = None, key: str | None = None, *, user_id: str = LINE_ID, **extra: Any
) -> str:
    out = [f"[[line]]\nuser_id = {toml_str(user_id)}"]
    if mc is not None:
        out.append(f"mini_certificate = {toml_str(mc)}")
    if key is not None:
        out.append(f"srtp_private_key = {toml_str(key)}")
    for name, value in extra.items():
        out.append(f"{name} = {value if not isinstance(value, str) else toml_str(value)}")
    return "\n".join(out) + "\n"


def load(text: str, path: Path | str = "proxy.toml") -> Security:
    return load_security(parse_config(text, str(path)))


def error_of(text: str, path: Path | str = "proxy.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, path)
    err = info.value
    assert "\n" not in str(err) and "\r" not in str(err)
    assert str(err).startswith(f"{path}: {err.key}: ")
    return err


def secrets_of(key: rsa.PrivateKey) -> list[str]:
    """Every spelling of a private exponent that must never reach a message or a repr."""
    d = key.d
    spellings = [encode_private_key_param(key), str(d), f"{d:x}", f"{d:X}", str(key.p), str(key.q)]
    raw = d.to_bytes((d.bit_length() + 7) // 8, "big")
    spellings.append(raw.hex())
    spellings.append(base64.b64encode(raw).decode()[:40])
    return spellings


@pytest.fixture
def in_dir(tmp_path: Path) -> Iterator[Path]:
    """A working directory of its own (to show paths never resolve against it), restored."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        yield cwd
    finally:
        os.chdir(old)


# --- trusted_ca: every accepted form ------------------------------------------------------


@pytest.mark.parametrize(
    "form", ["linksys_key", "linksys_pub", "pem_key", "pem_pub", "mc_param", "mc_gen_mc"]
)
def test_trusted_ca_forms(mat: Material, tmp_path: Path, form: str) -> None:
    data = {
        "linksys_key": dump_ca_key(mat.ca, CaKeyFormat.LINKSYS),
        "linksys_pub": dump_ca_public(mat.ca.public, CaKeyFormat.LINKSYS),
        "pem_key": dump_ca_key(mat.ca, CaKeyFormat.PEM),
        "pem_pub": dump_ca_public(mat.ca.public, CaKeyFormat.PEM),
        "mc_param": (mat.stranger.mc_b64 + "\n").encode(),
        "mc_gen_mc": f"\n<Mini Certificate>\n{mat.stranger.mc_b64}\n".encode(),
    }[form]
    if form == "linksys_key":
        assert len(data.splitlines()) == 2
    if form == "linksys_pub":
        assert len(data.splitlines()) == 1
    anchor = tmp_path / "ca.file"
    anchor.write_bytes(data)
    security = load(config_text(f"trusted_ca = [{toml_str(str(anchor))}]"))
    assert [k.n for k in security.trust_anchors] == [mat.ca.n]
    assert security.lines == {}  # no line has an MC
    assert security.warnings == ()


def test_trusted_ca_may_be_a_single_string_and_defaults(mat: Material, tmp_path: Path) -> None:
    anchor = tmp_path / "ca.pub"
    anchor.write_bytes(dump_ca_public(mat.ca.public, CaKeyFormat.LINKSYS))
    security = load(config_text(f"trusted_ca = {toml_str(str(anchor))}"))
    assert [k.n for k in security.trust_anchors] == [mat.ca.n]
    defaults = load(config_text()).xsipura
    assert defaults.trusted_ca == ()
    assert load(config_text()).trust_anchors == ()
    assert (defaults.grace_s, defaults.handshake_timeout_s, defaults.start_delay_s) == (
        2.0,
        5.0,
        0.2,
    )
    assert defaults.callerid_refresh == "update" and defaults.tone == SECURE_CALL_TONE
    assert defaults.probe_unadvertised is False and defaults.srtcp is False


def test_trusted_ca_relative_to_the_config_dir_never_cwd(
    mat: Material, tmp_path: Path, in_dir: Path
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ca.pub").write_bytes(dump_ca_public(mat.other_ca.public, CaKeyFormat.LINKSYS))
    (conf / "only-here.pub").write_bytes(dump_ca_public(mat.other_ca.public, CaKeyFormat.PEM))
    (in_dir / "ca.pub").write_bytes(dump_ca_public(mat.ca.public, CaKeyFormat.LINKSYS))
    (in_dir / "only-cwd.pub").write_bytes(dump_ca_public(mat.ca.public, CaKeyFormat.LINKSYS))
    source = conf / "proxy.toml"
    security = load(config_text('trusted_ca = ["ca.pub", "only-here.pub"]'), source)
    # "ca.pub" exists in the cwd too: the one next to the config is used
    assert [k.n for k in security.trust_anchors] == [mat.other_ca.n, mat.other_ca.n]
    # a file only in the cwd is not found, and the error names where it was looked for
    err = error_of(config_text('trusted_ca = ["only-cwd.pub"]'), source)
    assert err.key == "xsipura.trusted_ca[0]" and str(conf / "only-cwd.pub") in err.reason
    # the repository-root style path, run from the directory above conf/: now an error
    os.chdir(tmp_path)
    err = error_of(config_text('trusted_ca = ["conf/ca.pub"]'), source)
    assert err.key == "xsipura.trusted_ca[0]" and str(conf / "conf" / "ca.pub") in err.reason


def test_trusted_ca_errors_name_the_entry(mat: Material, tmp_path: Path) -> None:
    good = tmp_path / "ca.pub"
    good.write_bytes(dump_ca_public(mat.ca.public, CaKeyFormat.LINKSYS))
    missing = tmp_path / "nope.pub"
    err = error_of(config_text(f"trusted_ca = [{toml_str(str(good))}, {toml_str(str(missing))}]"))
    assert err.key == "xsipura.trusted_ca[1]" and "nope.pub" in err.reason
    junk = tmp_path / "junk.pub"
    junk.write_text("this is not a key\n")
    err = error_of(config_text(f"trusted_ca = [{toml_str(str(junk))}]"))
    assert err.key == "xsipura.trusted_ca[0]" and "junk.pub" in err.reason
    small = tmp_path / "small.pub"
    small.write_bytes(dump_ca_public(mat.line.key.public, CaKeyFormat.PEM))  # RSA-512
    err = error_of(config_text(f"trusted_ca = [{toml_str(str(small))}]"))
    assert err.key == "xsipura.trusted_ca[0]" and "1024" in err.reason
    assert error_of(config_text("trusted_ca = [5]")).key == "xsipura.trusted_ca[0]"
    assert error_of(config_text("trusted_ca = 5")).key == "xsipura.trusted_ca"
    directory = tmp_path / "adir"
    directory.mkdir()
    assert error_of(config_text(f"trusted_ca = [{toml_str(str(directory))}]")).key == (
        "xsipura.trusted_ca[0]"
    )


# --- the line's MC and key: inline, @path, gen_mc output -----------------------------------


def test_inline_mc_and_key(mat: Material) -> None:
    security = load(config_text(lines=line(mat.line.mc_b64, mat.line.key_b64)))
    entry = security.lines[LINE_ID]
    assert entry.user_key == LINE_ID
    assert entry.param.certificate.raw == mat.line.param.certificate.raw
    assert entry.param.ca_key.n == mat.ca.n
    assert entry.private_key.n == mat.line.key.n and entry.private_key.d == mat.line.key.d
    assert entry.secure_by_default is True and entry.require_secure is False
    assert security.warnings == ()


def test_line_policy_flags(mat: Material) -> None:
    text = config_text(
        lines=line(mat.line.mc_b64, mat.line.key_b64, secure_by_default=False, require_secure=True)
        .replace("= False", "= false")
        .replace("= True", "= true")
    )
    entry = load(text).lines[LINE_ID]
    assert entry.secure_by_default is False and entry.require_secure is True
    for flag in ("secure_by_default", "require_secure"):
        err = error_of(config_text(lines=line(mat.line.mc_b64, mat.line.key_b64, **{flag: "yes"})))
        assert err.key == f"line[0].{flag}"


def test_line_keys_by_user_key_and_lines_without_mc_absent(mat: Material) -> None:
    lines = line(user_id="14085550001") + line(
        mat.line.mc_b64, mat.line.key_b64, user_id="+14085551234"
    )
    security = load(config_text(lines=lines))
    assert set(security.lines) == {LINE_ID}
    assert security.warnings == ()  # "+" on the line's user_id is not a mismatch


def test_at_path_mc_and_key_files(mat: Material, tmp_path: Path) -> None:
    mc_file = tmp_path / "line.mc"
    mc_file.write_text(mat.line.mc_b64 + "\n")
    key_file = tmp_path / "line.key"
    key_file.write_text("\n" + mat.line.key_b64 + "\r\n")
    security = load(config_text(lines=line(f"@{mc_file}", f"@{key_file}")))
    assert security.lines[LINE_ID].private_key.d == mat.line.key.d


def run_mc_issue(ca_file: Path, name: str, user_id: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(
            ["mc", "issue", "--ca", str(ca_file), "--name", name, "--user-id", user_id,
             "--days", "30"]
        )  # fmt: skip
    assert code == 0
    return out.getvalue()


def test_full_mc_issue_output_serves_both_keys(mat: Material, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.key"
    ca_file.write_bytes(dump_ca_key(mat.ca, CaKeyFormat.LINKSYS))
    printed = run_mc_issue(ca_file, "Joe Smith", LINE_ID)
    assert "<Mini Certificate>" in printed and "<SRTP Private Key>" in printed
    issued = tmp_path / f"{LINE_ID}.mc"
    issued.write_text(printed)
    security = load(config_text(lines=line(f"@{issued}", f"@{issued}")))
    entry = security.lines[LINE_ID]
    assert entry.param.certificate.name == "Joe Smith"
    assert entry.private_key.n == entry.param.certificate.subscriber_key.n
    # the same blocks inline (the gen_mc text pasted into the TOML) work too
    security = load(config_text(lines=line(printed, printed)))
    assert security.lines[LINE_ID].private_key.n == entry.private_key.n


def test_spa_xml_lines_accepted(mat: Material, tmp_path: Path) -> None:
    xml = tmp_path / "spa.xml"
    xml.write_text(
        "<flat-profile>\n"
        f'<Mini_Certificate_1_ ua="na">{mat.line.mc_b64}</Mini_Certificate_1_>\n'
        f'<SRTP_Private_Key_1_ ua="na">{mat.line.key_b64}</SRTP_Private_Key_1_>\n'
        "</flat-profile>\n"
    )
    security = load(config_text(lines=line(f"@{xml}", f"@{xml}")))
    assert security.lines[LINE_ID].private_key.d == mat.line.key.d


def test_at_paths_relative_to_the_config_dir_never_cwd(
    mat: Material, tmp_path: Path, in_dir: Path
) -> None:
    conf = tmp_path / "conf"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "line.mc").write_text(mat.foreign.mc_b64 + "\n")
    (conf / "keys" / "line.key").write_text(mat.foreign.key_b64 + "\n")
    source = conf / "proxy.toml"
    security = load(config_text(lines=line("@keys/line.mc", "@keys/line.key")), source)
    assert security.lines[LINE_ID].param.ca_key.n == mat.other_ca.n  # from conf/keys/
    (in_dir / "keys").mkdir()
    (in_dir / "keys" / "line.mc").write_text(mat.line.mc_b64 + "\n")
    (in_dir / "keys" / "line.key").write_text(mat.line.key_b64 + "\n")
    security = load(config_text(lines=line("@keys/line.mc", "@keys/line.key")), source)
    assert security.lines[LINE_ID].param.ca_key.n == mat.other_ca.n  # the cwd never wins
    (conf / "keys" / "line.key").unlink()
    err = error_of(config_text(lines=line("@keys/line.mc", "@keys/line.key")), source)
    assert err.key == "line[0].srtp_private_key"
    assert str(conf / "keys" / "line.key") in err.reason


def test_load_config_file_with_relative_key_paths(
    mat: Material, tmp_path: Path, in_dir: Path
) -> None:
    """The whole path a deployment takes: load_config on a file, keys beside it."""
    conf = tmp_path / "etc" / "sipura-proxy"
    conf.mkdir(parents=True)
    (conf / "ca.pub").write_bytes(dump_ca_public(mat.other_ca.public, CaKeyFormat.LINKSYS))
    (conf / "line.mc").write_text(mat.line.mc_b64 + "\n")
    (conf / "line.key").write_text(mat.line.key_b64 + "\n")
    path = conf / "proxy.toml"
    path.write_text(config_text('trusted_ca = ["ca.pub"]', line("@line.mc", "@line.key")))
    security = load_security(load_config(path))
    assert [k.n for k in security.trust_anchors] == [mat.other_ca.n]
    assert security.lines[LINE_ID].private_key.d == mat.line.key.d


# --- errors -------------------------------------------------------------------------------


def test_missing_files_name_the_key(mat: Material, tmp_path: Path) -> None:
    missing = tmp_path / "missing.mc"
    err = error_of(config_text(lines=line(f"@{missing}", mat.line.key_b64)))
    assert err.key == "line[0].mini_certificate"
    assert "missing.mc" in err.reason
    err = error_of(config_text(lines=line(mat.line.mc_b64, f"@{missing}")))
    assert err.key == "line[0].srtp_private_key" and "missing.mc" in err.reason
    err = error_of(config_text(lines=line(user_id="1") + line(f"@{missing}", "@x")))
    assert err.key == "line[1].mini_certificate"


@pytest.mark.parametrize(
    "bad",
    [
        "not base64 at all!",
        base64.b64encode(b"\x01" * 64).decode(),  # base64, wrong length
        "",
        "   ",
    ],
)
def test_not_an_mc(mat: Material, bad: str) -> None:
    err = error_of(config_text(lines=line(bad, mat.line.key_b64)))
    assert err.key == "line[0].mini_certificate"


def test_mc_value_of_the_wrong_type(mat: Material) -> None:
    text = config_text(lines=f'[[line]]\nuser_id = "{LINE_ID}"\nmini_certificate = 42\n')
    assert error_of(text).key == "line[0].mini_certificate"


def test_mc_file_that_is_not_an_mc(tmp_path: Path, mat: Material) -> None:
    junk = tmp_path / "junk.mc"
    junk.write_text("hello\n")
    err = error_of(config_text(lines=line(f"@{junk}", mat.line.key_b64)))
    assert err.key == "line[0].mini_certificate"
    binary = tmp_path / "binary.mc"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    err = error_of(config_text(lines=line(f"@{binary}", mat.line.key_b64)))
    assert err.key == "line[0].mini_certificate"


def test_key_not_matching_the_mc(mat: Material) -> None:
    err = error_of(config_text(lines=line(mat.line.mc_b64, mat.stranger.key_b64)))
    assert err.key == "line[0].srtp_private_key"
    assert "does not match" in err.reason
    for secret in secrets_of(mat.stranger.key) + secrets_of(mat.line.key):
        assert secret not in str(err)
        assert secret not in repr(err)


@pytest.mark.parametrize(
    "bad",
    ["@", "not base64!", base64.b64encode(b"\x01" * 65).decode(), "  "],
)
def test_bad_private_key_values(mat: Material, bad: str) -> None:
    err = error_of(config_text(lines=line(mat.line.mc_b64, bad)))
    assert err.key == "line[0].srtp_private_key"


def test_private_key_required_with_mc_and_mc_required_with_key(mat: Material) -> None:
    err = error_of(config_text(lines=line(mat.line.mc_b64)))
    assert err.key == "line[0].srtp_private_key"
    err = error_of(config_text(lines=line(key=mat.line.key_b64)))
    assert err.key == "line[0].srtp_private_key" and "mini_certificate" in err.reason
    for secret in secrets_of(mat.line.key):
        assert secret not in str(err)
    err = error_of(config_text(lines=line(require_secure=True).replace("True", "true")))
    assert err.key == "line[0].require_secure"


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("grace_ms = -1", "xsipura.grace_ms"),
        ('grace_ms = "2000"', "xsipura.grace_ms"),
        ("grace_ms = 2.5", "xsipura.grace_ms"),
        ("grace_ms = true", "xsipura.grace_ms"),
        ("handshake_timeout_ms = 0", "xsipura.handshake_timeout_ms"),
        ("handshake_timeout_ms = -5", "xsipura.handshake_timeout_ms"),
        ('handshake_timeout_ms = "5s"', "xsipura.handshake_timeout_ms"),
        ("start_delay_ms = -1", "xsipura.start_delay_ms"),
        ('callerid_refresh = "sometimes"', "xsipura.callerid_refresh"),
        ("callerid_refresh = 1", "xsipura.callerid_refresh"),
        ("callerid_refresh = false", "xsipura.callerid_refresh"),
        ('tone = "not a tonescript"', "xsipura.tone"),
        ('tone = "350@-19;5("', "xsipura.tone"),
        ("tone = 5", "xsipura.tone"),
        ('probe_unadvertised = "yes"', "xsipura.probe_unadvertised"),
        ("srtcp = 1", "xsipura.srtcp"),
        ("grace = 2000", "xsipura.grace"),
        ("trusted_cas = []", "xsipura.trusted_cas"),
    ],
)
def test_bad_xsipura_settings(setting: str, key: str) -> None:
    err = error_of(config_text(setting))
    assert err.key == key
    if key in ("xsipura.grace", "xsipura.trusted_cas"):
        assert "unknown" in err.reason


def test_good_xsipura_settings() -> None:
    text = config_text(
        "grace_ms = 0\nhandshake_timeout_ms = 1\nstart_delay_ms = 0\n"
        'callerid_refresh = "reinvite"\nprobe_unadvertised = true\nsrtcp = true\n'
        'tone = "350@-19;10(*/0/1)"'
    )
    x = load(text).xsipura
    assert (x.grace_s, x.handshake_timeout_s, x.start_delay_s) == (0.0, 0.001, 0.0)
    assert x.callerid_refresh == "reinvite" and x.probe_unadvertised and x.srtcp
    assert x.tone == Tone.parse("350@-19;10(*/0/1)")
    assert load(config_text("tone = false")).xsipura.tone is None
    assert load(config_text("tone = true")).xsipura.tone == SECURE_CALL_TONE
    assert load(config_text('callerid_refresh = "off"')).xsipura.callerid_refresh == "off"


# --- secrets stay secret ------------------------------------------------------------------


def test_private_key_never_in_repr(mat: Material) -> None:
    security = load(config_text(lines=line(mat.line.mc_b64, mat.line.key_b64)))
    entry = security.lines[LINE_ID]
    config = parse_config(config_text(lines=line(mat.line.mc_b64, mat.line.key_b64)))
    texts = [repr(security), str(security), repr(entry), str(entry), repr(entry.private_key)]
    texts += [repr(config), str(config), repr(config.lines[0]), repr(config.lines)]
    for text in texts:
        for secret in secrets_of(mat.line.key):
            assert secret not in text


def test_private_key_never_in_any_error(mat: Material, tmp_path: Path) -> None:
    """Whatever is wrong around it, the key text never comes back in a message."""
    key = mat.line.key_b64
    cases = [
        line(mat.stranger.mc_b64, key),  # key of another MC
        line("garbage", key),  # MC broken, key fine
        line(key, key),  # the key pasted into mini_certificate
        line(mat.line.mc_b64, key + "!"),  # key corrupted
        line(mat.line.mc_b64, key[:-4]),  # key truncated
        line(key=key),  # key without an MC
        line(mat.line.mc_b64, key, secure_by_default="maybe"),
    ]
    for lines in cases:
        err = error_of(config_text(lines=lines))
        for secret in secrets_of(mat.line.key):
            assert secret not in str(err), (err.key, lines)
            assert secret not in repr(err)
    keyfile = tmp_path / "k"
    keyfile.write_text(f"<SRTP Private Key>\n{key}\n")
    err = error_of(config_text(lines=line(mat.stranger.mc_b64, f"@{keyfile}")))
    assert err.key == "line[0].srtp_private_key"
    assert all(secret not in str(err) for secret in secrets_of(mat.line.key))


# --- warnings and trust -------------------------------------------------------------------


def test_sample_ca_trusted_warns(tmp_path: Path) -> None:
    anchor = tmp_path / "sample.pub"
    anchor.write_bytes(dump_ca_public(rsa.PublicKey(SAMPLE_CA_MODULUS), CaKeyFormat.LINKSYS))
    security = load(config_text(f"trusted_ca = [{toml_str(str(anchor))}]"))
    assert len(security.warnings) == 1
    warning = security.warnings[0]
    assert warning.startswith("xsipura.trusted_ca[0]:") and "sample CA" in warning
    assert "\n" not in warning


def test_mc_under_the_sample_ca_warns(sample_ca: rsa.PrivateKey) -> None:
    party = issue(sample_ca, "Sample Joe", LINE_ID)
    security = load(config_text(lines=line(party.mc_b64, party.key_b64)))
    assert LINE_ID in security.lines
    assert len(security.warnings) == 1
    assert security.warnings[0].startswith("line[0].mini_certificate:")
    assert "sample CA" in security.warnings[0]


@pytest.mark.parametrize("mc_user", ["15550001111", "1408555123", "+14085551235"])
def test_user_id_mismatch_warns(mat: Material, mc_user: str) -> None:
    party = issue(mat.ca, "Wrong Number", mc_user)
    security = load(config_text(lines=line(party.mc_b64, party.key_b64)))
    assert LINE_ID in security.lines  # a warning, not an error
    (warning,) = security.warnings
    assert warning.startswith("line[0].mini_certificate:") and repr(mc_user) in warning


@pytest.mark.parametrize(
    ("line_user", "mc_user"), [(LINE_ID, "+" + LINE_ID), ("+" + LINE_ID, LINE_ID)]
)
def test_plus_is_not_a_user_id_mismatch(mat: Material, line_user: str, mc_user: str) -> None:
    party = issue(mat.ca, "Joe Plus", mc_user)
    security = load(config_text(lines=line(party.mc_b64, party.key_b64, user_id=line_user)))
    assert security.warnings == ()


def test_line_trusts_its_own_ca_and_the_configured_ones(mat: Material, tmp_path: Path) -> None:
    anchor = tmp_path / "other.pub"
    anchor.write_bytes(dump_ca_public(mat.other_ca.public, CaKeyFormat.PEM))
    # without trusted_ca: the line's own CA only
    entry = load(config_text(lines=line(mat.line.mc_b64, mat.line.key_b64))).lines[LINE_ID]
    assert mat.ca.public in entry.trust and len(entry.trust) == 1
    assert entry.trust.verify(mat.stranger.param.certificate, VALID_AT).status is McStatus.VALID
    assert entry.trust.verify(mat.foreign.param.certificate, VALID_AT).status is (
        McStatus.UNTRUSTED_CA
    )
    # with trusted_ca: both
    text = config_text(
        f"trusted_ca = [{toml_str(str(anchor))}]", line(mat.line.mc_b64, mat.line.key_b64)
    )
    entry = load(text).lines[LINE_ID]
    assert mat.ca.public in entry.trust and mat.other_ca.public in entry.trust
    assert entry.trust.verify(mat.foreign.param.certificate, VALID_AT).ok
    # a line under the other CA trusts that one, not ours
    lines = line(mat.foreign.mc_b64, mat.foreign.key_b64)
    entry = load(config_text(lines=lines)).lines[LINE_ID]
    assert mat.other_ca.public in entry.trust and mat.ca.public not in entry.trust


def test_two_lines_two_cas_do_not_share_trust(mat: Material) -> None:
    lines = line(mat.line.mc_b64, mat.line.key_b64) + line(
        mat.foreign.mc_b64, mat.foreign.key_b64, user_id="14085559999"
    )
    security = load(config_text(lines=lines))
    assert mat.other_ca.public not in security.lines[LINE_ID].trust
    assert mat.ca.public not in security.lines["14085559999"].trust
    # the warning about the second line's MC user id names that line
    assert [w.split(":")[0] for w in security.warnings] == ["line[1].mini_certificate"]
