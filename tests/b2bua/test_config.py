"""The B2BUA configuration file: the documented example, every error class, and fuzzing.

Error messages are part of the contract (one line, ``FILE: KEY: what is wrong``, exit 2
through the CLI), so the tests pin the key each error blames, not just that it fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.b2bua.config import (
    AdminConfig,
    Config,
    ConfigError,
    KeySource,
    LineConfig,
    MediaConfig,
    SideConfig,
    XsipuraConfig,
    load_config,
    parse_config,
)
from proxy.errors import UsageError
from proxy.media.tones import SECURE_CALL_TONE, Tone

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "proxy.example.toml"
SOURCE = "proxy.toml"

CONTRACT = """\
[inside]                       # where the legacy phones are
listen = "127.0.0.1:5070"      # SIP, UDP and TCP
media_ip = "127.0.0.1"
unknown_users = "relay"
[outside]
listen = "127.0.0.1:5080"
media_ip = "127.0.0.1"
upstream = "sip:127.0.0.1:5090"
registrar = "sip:127.0.0.1:5090"
[media]
port_min = 20000
port_max = 29999
[[line]]
user_id = "14085551234"
contact = "sip:127.0.0.1:5072"
"""


def base() -> dict[str, Any]:
    """The contract example as data, for tests to modify and re-emit."""
    return {
        "inside": {"listen": "127.0.0.1:5070", "media_ip": "127.0.0.1"},
        "outside": {"listen": "127.0.0.1:5080", "media_ip": "127.0.0.1"},
        "media": {"port_min": 20000, "port_max": 29999},
        "line": [{"user_id": "14085551234"}],
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(value)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def emit(doc: Mapping[str, Any]) -> str:
    """A small TOML writer: top-level scalars, tables, and arrays of tables."""
    out = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not is_table(v)]
    for name, value in doc.items():
        if isinstance(value, dict):
            out.append(f"[{toml_key(name)}]")
            out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        elif is_table(value):
            for item in value:
                out.append(f"[[{toml_key(name)}]]")
                out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(out) + "\n"


def is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(i, dict) for i in value)
    )


def with_(path: str, value: Any, doc: dict[str, Any] | None = None) -> str:
    """``base()`` with ``table.key`` set (or removed when value is ``...``), as TOML."""
    doc = doc or base()
    table, _, key = path.partition(".")
    if not key:
        if value is ...:
            del doc[table]
        else:
            doc[table] = value
        return emit(doc)
    target = doc.setdefault(table, {})
    if value is ...:
        del target[key]
    else:
        target[key] = value
    return emit(doc)


def expect_error(text: str, key: str, fragment: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    assert_one_line(info.value)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: {key}: "), message
    assert info.value.key == key
    assert fragment in message, message
    return info.value


def assert_one_line(error: ConfigError, source: str = SOURCE) -> None:
    message = str(error)
    assert message.isprintable(), repr(message)  # no \n, \r, \x85, \u2028 ...
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{source}: ")


# --------------------------------------------------------------------------- valid files


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.inside == SideConfig(
        "127.0.0.1", 5070, "127.0.0.1", unknown_users="relay", keepalive_s=30.0
    )
    assert config.outside.upstream == "sip:127.0.0.1:5090"
    assert config.outside.registrar == "sip:127.0.0.1:5090"
    assert (config.media.port_min, config.media.port_max) == (20000, 29999)
    assert [line.user_key for line in config.lines] == ["14085551234", "14085555678"]


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in (
        "listen", "media_ip", "advertise", "unknown_users", "upstream", "registrar",
        "port_min", "port_max", "rtp_timeout_s", "t1_ms", "t2_ms", "t4_ms", "transports",
        "user_agent", "max_forwards", "level", "format", "max_calls", "[admin]", "[[line]]",
        "user_id", "contact", "[xsipura]", "workers", "mini_certificate", "srtp_private_key",
        "keepalive_s", "rtp_timeout_onhold_s", "latch", "timer_c_s", "max_bindings_per_aor",
        "max_aors", "t38", "allowed_sources",
        "secure_by_default", "require_secure", "trusted_ca", "grace_ms", "handshake_timeout_ms",
        "probe_unadvertised", "callerid_refresh", "srtcp", "start_delay_ms", "tone",
    ):  # fmt: skip
        assert key in text, key


def test_contract_example_and_defaults() -> None:
    config = parse_config(CONTRACT)
    assert config.source == "<string>"
    assert config.inside.listen_host == "127.0.0.1"
    assert config.inside.listen_port == 5070
    assert config.inside.advertised == ("127.0.0.1", 5070)
    assert config.outside.unknown_users == "relay"
    assert config.lines == (LineConfig("14085551234", "14085551234", "sip:127.0.0.1:5072"),)
    line = config.lines[0]
    assert (line.mini_certificate, line.srtp_private_key) == (None, None)
    assert (line.secure_by_default, line.require_secure) == (True, False)
    sip = config.sip
    assert (sip.t1_s, sip.t2_s, sip.t4_s, sip.max_forwards) == (0.5, 4.0, 5.0, 70)
    assert sip.transports == ("udp", "tcp")
    assert sip.user_agent is not None
    assert sip.user_agent.startswith("sipura-proxy/")
    assert (config.log.level, config.log.format) == ("info", "text")
    assert config.limits.max_calls == 0
    assert config.media.rtp_timeout_s == 60
    assert config.admin == AdminConfig()
    assert not config.admin.enabled
    assert config.xsipura == XsipuraConfig()


def test_minimal_file_needs_only_the_addresses() -> None:
    doc = base()
    del doc["media"], doc["line"]
    config = parse_config(emit(doc))
    assert config.lines == ()
    assert config.media.port_pairs == 5000


def test_all_optional_keys() -> None:
    doc = base()
    doc["inside"].update(advertise="[2001:db8::1]:5070", unknown_users="reject")
    doc["outside"].update(advertise="sbc.example.com", upstream="sips:[::1]:5061;transport=tls")
    doc["media"]["rtp_timeout_s"] = 30
    doc["sip"] = {
        "t1_ms": 250,
        "t2_ms": 250,
        "t4_ms": 1,
        "transports": ["tcp", "tls"],
        "user_agent": "",
        "max_forwards": 255,
    }
    doc["log"] = {"level": "debug", "format": "json"}
    doc["limits"] = {"max_calls": 2500}
    doc["admin"] = {"listen": "127.0.0.1:5099"}
    config = parse_config(emit(doc))
    assert config.inside.advertised == ("2001:db8::1", 5070)
    assert config.inside.unknown_users == "reject"
    assert config.outside.advertised == ("sbc.example.com", 5080)
    assert config.outside.upstream == "sips:[::1]:5061;transport=tls"
    assert config.outside.registrar is None
    assert config.media.rtp_timeout_s == 30
    assert config.sip.transports == ("tcp", "tls")
    assert config.outside.sdes == "offer"  # a TLS upstream: SDES offered by default
    assert config.sip.user_agent is None
    assert (config.sip.t1_s, config.sip.t2_s, config.sip.max_forwards) == (0.25, 0.25, 255)
    assert config.sip.t4_s == 0.001
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert config.limits.max_calls == 2500
    assert (config.admin.listen_host, config.admin.listen_port) == ("127.0.0.1", 5099)
    assert config.admin.enabled


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:5070", "127.0.0.1", 5070),
        ("0.0.0.0:5060", "0.0.0.0", 5060),
        ("[::1]:5070", "::1", 5070),
        ("[2001:DB8:0:0::1]:65535", "2001:db8::1", 65535),
        ("pbx.example.com:1", "pbx.example.com", 1),
        ("localhost:5070", "localhost", 5070),
    ],
)
def test_host_port_forms(listen: str, host: str, port: int) -> None:
    config = parse_config(with_("inside.listen", listen))
    assert (config.inside.listen_host, config.inside.listen_port) == (host, port)


def test_ipv6_media_ip_is_normalised() -> None:
    assert parse_config(with_("outside.media_ip", "2001:DB8::0:1")).outside.media_ip == (
        "2001:db8::1"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "sip:127.0.0.1:5090",
        "sip:pbx.example.com",
        "SIP:pbx.example.com",
        "sips:alice@[2001:db8::1]:5061",
        "sip:+14085551234@gw.example.com;user=phone",
        "sip:alice:secret@10.0.0.1:5060;transport=tcp?subject=x",
    ],
)
def test_sip_uri_forms(uri: str) -> None:
    doc = base()
    doc["sip"] = {"transports": ["udp", "tcp", "tls"]}
    assert parse_config(with_("outside.upstream", uri, doc)).outside.upstream == uri


def test_xsipura_and_line_keys_are_typed_and_read_only(tmp_path: Path) -> None:
    doc = base()
    doc["xsipura"] = {"trusted_ca": ["a.pub", "/abs/b.pub"], "grace_ms": 1500}
    doc["media"]["workers"] = 4
    doc["limits"] = {"workers": "auto", "max_calls": 10}
    doc["line"][0].update(
        mini_certificate="AAAA", srtp_private_key="@keys/line.key", secure_by_default=True,
        require_secure=False,
    )  # fmt: skip
    config = parse_config(emit(doc), str(tmp_path / "proxy.toml"))
    assert config.xsipura.trusted_ca == (tmp_path / "a.pub", Path("/abs/b.pub"))
    assert config.xsipura.grace_s == 1.5
    assert config.media.workers == 4  # [limits] workers is only the fallback
    assert config.limits.max_calls == 10
    line = config.lines[0]
    assert line.mini_certificate == KeySource(inline="AAAA")
    assert line.srtp_private_key == KeySource(path=tmp_path / "keys" / "line.key")
    assert (line.secure_by_default, line.require_secure) == (True, False)
    with pytest.raises(AttributeError):
        config.xsipura.grace_s = 2.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        line.require_secure = True  # type: ignore[misc]


def test_durations_are_seconds_inside_the_code() -> None:
    """The file's keys keep their unit (ms or s); every field is seconds, converted once."""
    doc = base()
    doc["sip"] = {"t1_ms": 125, "t2_ms": 2500, "t4_ms": 7}
    doc["media"]["rtp_timeout_s"] = 45
    doc["xsipura"] = {"grace_ms": 1234, "handshake_timeout_ms": 3000, "start_delay_ms": 50}
    config = parse_config(emit(doc))
    assert (config.sip.t1_s, config.sip.t2_s, config.sip.t4_s) == (0.125, 2.5, 0.007)
    assert config.media.rtp_timeout_s == 45.0
    assert isinstance(config.media.rtp_timeout_s, float)
    x = config.xsipura
    assert (x.grace_s, x.handshake_timeout_s, x.start_delay_s) == (1.234, 3.0, 0.05)
    defaults = parse_config(emit(base()))
    assert durations(defaults) == (0.5, 4.0, 5.0, 60.0, 2.0, 5.0, 0.2)
    for value in (*durations(defaults), *durations(config)):
        assert isinstance(value, float)


def durations(config: Config) -> tuple[float, ...]:
    x = config.xsipura
    return (config.sip.t1_s, config.sip.t2_s, config.sip.t4_s, config.media.rtp_timeout_s,
            x.grace_s, x.handshake_timeout_s, x.start_delay_s)  # fmt: skip


def test_media_workers() -> None:
    doc = base()
    assert parse_config(emit(doc)).media.workers is None  # absent: "auto"
    for value, expected in (("auto", None), (0, 0), (3, 3)):
        doc["media"]["workers"] = value
        assert parse_config(emit(doc)).media.workers == expected
    del doc["media"]["workers"]
    doc["limits"] = {"workers": 2}  # the alias, used when [media] has none
    assert parse_config(emit(doc)).media.workers == 2
    doc["media"]["workers"] = "auto"
    assert parse_config(emit(doc)).media.workers is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "media.workers: must be >= 0"),
        ('"four"', 'media.workers: expected an integer >= 0 or "auto"'),
        ("true", "media.workers: expected an integer"),
        (3, "media.workers: 3 workers need 4 RTP/RTCP port pairs each; "
            "media.port_min..port_max holds 8 (room for 2)"),
    ],
)  # fmt: skip
def test_media_workers_errors(value: object, reason: str) -> None:
    text = CONTRACT.replace("[media]", f"[media]\nworkers = {value}", 1)
    text = re.sub(r"port_max = \d+", "port_max = 20015", text, count=1)
    text = re.sub(r"port_min = \d+", "port_min = 20000", text, count=1)
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert str(info.value) == f"<string>: {reason}" or str(info.value).startswith(
        f"<string>: {reason}"
    ), str(info.value)


def test_media_worker_count_auto_fits_the_range() -> None:
    assert MediaConfig(20000, 29999).worker_count(cpus=8) == 8
    assert MediaConfig(20000, 20015).worker_count(cpus=8) == 2  # 8 pairs, 4 each
    assert MediaConfig(20000, 20005).worker_count(cpus=8) == 0  # 3 pairs: in-process
    assert MediaConfig(20000, 29999, workers=0).worker_count(cpus=8) == 0
    assert MediaConfig(20000, 29999, workers=3).worker_count(cpus=8) == 3


def test_line_for_user_matches_on_user_key() -> None:
    doc = base()
    doc["line"] = [{"user_id": "+14085551234"}, {"user_id": "0049301234"}]
    config = parse_config(emit(doc))
    assert config.lines[0].user_key == "14085551234"
    assert config.lines[0].user_id == "+14085551234"
    assert config.line_for_user("14085551234") is config.lines[0]
    assert config.line_for_user("+14085551234") is config.lines[0]
    assert config.line_for_user("0049301234") is config.lines[1]
    assert config.line_for_user("49301234") is None
    assert config.line_for_user("") is None
    assert config.line_for_user("alice") is None


def test_direct_construction_indexes_lines() -> None:
    side = SideConfig("127.0.0.1", 5070, "127.0.0.1")
    line = LineConfig("+1555", "1555")
    config = Config(side, side, lines=(line,))
    assert config.line_for_user("1555") is line


def test_config_is_frozen() -> None:
    config = parse_config(CONTRACT)
    with pytest.raises(AttributeError):
        config.inside = config.outside  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


def test_error_is_a_usage_error_so_the_cli_exits_2() -> None:
    error = expect_error(with_("inside.listen", "5070"), "inside.listen")
    assert isinstance(error, UsageError)
    assert str(error) == 'proxy.toml: inside.listen: expected "host:port", got "5070"'
    assert (error.source, error.reason) == (SOURCE, 'expected "host:port", got "5070"')


@pytest.mark.parametrize(
    "listen",
    [
        "5070",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:50a",
        "127.0.0.1:+50",
        "127.0.0.1: 50",
        ":5070",
        "::1:5070",
        "[::1]",
        "[::1]5070",
        "[::1:5070",
        "[zz::1]:5070",
        "[127.0.0.1]:5070",
        "999.1.1.1:5070",
        "10.0.0:5070",
        "host_name:5070",
        "-bad.example:5070",
        "bad-.example:5070",
        "a..b:5070",
        "exämple.com:5070",
        "a b:5070",
        "",
    ],
)
def test_bad_host_port(listen: str) -> None:
    expect_error(with_("inside.listen", listen), "inside.listen", 'expected "host:port"')


@pytest.mark.parametrize("advertise", ["[::1", "host:port", "a b", "1.2.3.4:0", ""])
def test_bad_advertise(advertise: str) -> None:
    expect_error(with_("outside.advertise", advertise), "outside.advertise", "expected")


@pytest.mark.parametrize(
    ("media_ip", "fragment"),
    [
        ("localhost", "expected an IP address"),
        ("127.0.0.1:5070", "expected an IP address"),
        ("[::1]", "no [] brackets"),
        ("0.0.0.0", "unicast"),
        ("::", "unicast"),
        ("239.1.1.1", "unicast"),
        ("", "expected an IP address"),
    ],
)
def test_bad_media_ip(media_ip: str, fragment: str) -> None:
    expect_error(with_("outside.media_ip", media_ip), "outside.media_ip", fragment)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("127.0.0.1:5090", '"sip:" or "sips:"'),
        ("tel:+14085551234", '"sip:" or "sips:"'),
        ("http://pbx", '"sip:" or "sips:"'),
        ("sip:", "no host"),
        ("sip:alice@", "no host"),
        ("sip:;transport=tcp", "no host"),
        ("sip:@pbx", "empty user part"),
        ("sip:pbx example.com", "whitespace"),
        ("sip:pbx\tx", "whitespace"),
        ("sip:pbx:99999", "not a valid host"),
        ("sip:::1", "not a valid host"),
        ("sip:bad_host", "not a valid host"),
    ],
)
@pytest.mark.parametrize("key", ["outside.upstream", "outside.registrar"])
def test_bad_sip_uri(key: str, uri: str, fragment: str) -> None:
    expect_error(with_(key, uri), key, fragment)


def test_bad_line_contact() -> None:
    doc = base()
    doc["line"].append({"user_id": "2", "contact": "127.0.0.1:5072"})
    expect_error(emit(doc), "line[1].contact", '"sip:" or "sips:"')


@pytest.mark.parametrize(
    ("port_min", "port_max", "key", "fragment"),
    [
        (1023, 2000, "media.port_min", "must be an even number >= 1024, got 1023"),
        (1022, 2000, "media.port_min", "must be an even number >= 1024"),
        (20001, 29999, "media.port_min", "must be an even number >= 1024"),
        (-2, 29999, "media.port_min", "must be an even number >= 1024"),
        (65536, 70000, "media.port_min", "must be an even number >= 1024"),
        (20000, 65536, "media.port_max", "must be <= 65535"),
        (20000, 20000, "media.port_max", "must be greater than media.port_min (20000)"),
        (20000, 10000, "media.port_max", "must be greater than media.port_min"),
        (20000, 20001, "media.port_max", "at least 2 are needed"),
        (20000, 20002, "media.port_max", "holds 1 RTP/RTCP port pair"),
    ],
)
def test_bad_port_range(port_min: int, port_max: int, key: str, fragment: str) -> None:
    doc = base()
    doc["media"] = {"port_min": port_min, "port_max": port_max}
    expect_error(emit(doc), key, fragment)


def test_smallest_port_range() -> None:
    doc = base()
    doc["media"] = {"port_min": 65532, "port_max": 65535}
    assert parse_config(emit(doc)).media.port_pairs == 2


@pytest.mark.parametrize("user_id", ["", "+", "abc", "1408-555", "++1", " 1408", "1408 ", "١٢٣"])
def test_bad_user_id(user_id: str) -> None:
    doc = base()
    doc["line"][0]["user_id"] = user_id
    expect_error(emit(doc), "line[0].user_id", "expected digits with an optional leading '+'")


def test_numeric_user_id_asks_for_quotes() -> None:
    doc = base()
    doc["line"][0]["user_id"] = 14085551234
    expect_error(emit(doc), "line[0].user_id", "expected a string, got integer 14085551234")


def test_missing_user_id() -> None:
    doc = base()
    doc["line"][0] = {"contact": "sip:127.0.0.1:5072"}
    expect_error(emit(doc), "line[0].user_id", "missing")


def test_duplicate_user_id_after_normalisation() -> None:
    doc = base()
    doc["line"] = [{"user_id": "+14085551234"}, {"user_id": "1"}, {"user_id": "14085551234"}]
    error = expect_error(emit(doc), "line[2].user_id")
    assert str(error) == "proxy.toml: line[2].user_id: duplicate of line[0]"


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("inside.unknown_users", "drop", 'expected one of "relay", "reject", got "drop"'),
        ("inside.unknown_users", "Relay", "expected one of"),
        ("log.level", "verbose", '"debug", "info", "warning", "error"'),
        ("log.format", "xml", 'expected one of "text", "json"'),
        ("sip.transports", "udp", "expected an array, got string"),
        ("sip.transports", [], "at least one"),
    ],
)
def test_bad_enum(path: str, value: Any, fragment: str) -> None:
    expect_error(with_(path, value), path, fragment)


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        (["sctp"], "sip.transports[0]", 'expected one of "udp", "tcp", "tls", got "sctp"'),
        (["udp", "UDP"], "sip.transports[1]", "expected one of"),
        (["udp", "udp"], "sip.transports[1]", "listed twice"),
        (["udp", 1], "sip.transports[1]", "expected a string, got integer 1"),
    ],
)
def test_bad_transport_item(value: Any, key: str, fragment: str) -> None:
    expect_error(with_("sip.transports", value), key, fragment)


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("sip.t1_ms", 0, "must be a positive integer, got 0"),
        ("sip.t2_ms", -5, "must be a positive integer"),
        ("sip.t4_ms", 0, "must be a positive integer"),
        ("sip.t1_ms", 5000, None),  # then t2 (4000) < t1
        ("sip.max_forwards", 0, "must be 1..255, got 0"),
        ("sip.max_forwards", 256, "must be 1..255"),
        ("media.rtp_timeout_s", -1, "must be >= 0, got -1"),
        ("limits.max_calls", -1, "must be >= 0"),
    ],
)
def test_bad_number(path: str, value: int, fragment: str | None) -> None:
    if fragment is None:
        expect_error(with_(path, value), "sip.t2_ms", "must be >= sip.t1_ms (5000)")
    else:
        expect_error(with_(path, value), path, fragment)


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("sip.t1_ms", "500", 'expected an integer, got string "500"'),
        ("sip.t2_ms", 4000.0, "expected an integer, got float 4000.0"),
        ("sip.max_forwards", True, "expected an integer, got boolean true"),
        ("media.port_min", "20000", "expected an integer, got string"),
        ("media.port_max", [29999], "expected an integer, got an array"),
        ("media.rtp_timeout_s", {"s": 1}, "expected an integer, got a table"),
        ("limits.max_calls", 1.5, "expected an integer, got float"),
        ("inside.listen", 5070, "expected a string, got integer 5070"),
        ("inside.media_ip", ["127.0.0.1"], "expected a string, got an array"),
        ("inside.advertise", False, "expected a string, got boolean false"),
        ("inside.unknown_users", 1, "expected a string"),
        ("outside.upstream", {"host": "x"}, "expected a SIP URI or a non-empty array"),
        ("sip.user_agent", 1, "expected a string"),
        ("log.level", 20, "expected a string, got integer 20"),
        ("admin.listen", 5099, "expected a string"),
    ],
)
def test_wrong_type(path: str, value: Any, fragment: str) -> None:
    expect_error(with_(path, value), path, fragment)


def test_date_value_is_named() -> None:
    text = emit(base()) + "[sip]\nt1_ms = 2024-01-02\n"
    expect_error(text, "sip.t1_ms", "expected an integer, got date 2024-01-02")


@pytest.mark.parametrize(
    ("path", "value", "key", "fragment"),
    [
        ("inside", "x", "inside", "expected a table, got string"),
        ("media", [1], "media", "expected a table, got an array"),
        ("xsipura", 1, "xsipura", "expected a table, got integer 1"),
        ("line", {"user_id": "1"}, "line", "expected an array of tables ([[line]])"),
        ("line", [1], "line[0]", "expected a table, got integer 1"),
        ("line", "x", "line", "expected an array of tables"),
    ],
)
def test_wrong_table_type(path: str, value: Any, key: str, fragment: str) -> None:
    expect_error(with_(path, value), key, fragment)


@pytest.mark.parametrize(
    ("path", "key", "fragment"),
    [
        ("inside", "inside", "missing"),
        ("outside", "outside", "missing"),
        ("inside.listen", "inside.listen", "missing (required)"),
        ("inside.media_ip", "inside.media_ip", "missing (required)"),
        ("outside.listen", "outside.listen", "missing (required)"),
        ("outside.media_ip", "outside.media_ip", "missing (required)"),
    ],
)
def test_missing_required(path: str, key: str, fragment: str) -> None:
    expect_error(with_(path, ...), key, fragment)


def test_empty_file() -> None:
    expect_error("", "inside", "missing")


@pytest.mark.parametrize(
    ("path", "key", "fragment"),
    [
        ("insde", "insde", 'unknown table (did you mean "inside"?)'),
        ("foo", "foo", "unknown table"),
        ("inside.lisen", "inside.lisen", 'unknown key (did you mean "listen"?)'),
        ("media.port_minimum", "media.port_minimum", "unknown key"),
        ("sip.t3_ms", "sip.t3_ms", "unknown key"),
        ("log.file", "log.file", "unknown key"),
        ("limits.max_call", "limits.max_call", 'did you mean "max_calls"?'),
        ("admin.port", "admin.port", "unknown key"),
        ("outside.unknown_users", "outside.unknown_users", "only in [inside]"),
        ("inside.upstream", "inside.upstream", "only in [outside]"),
        ("inside.registrar", "inside.registrar", "only in [outside]"),
    ],
)
def test_unknown_keys_are_errors(path: str, key: str, fragment: str) -> None:
    value: Any = {"x": 1} if "." not in path else "sip:127.0.0.1:5090"
    expect_error(with_(path, value), key, fragment)


def test_unknown_top_level_scalar() -> None:
    expect_error("verbose = true\n" + emit(base()), "verbose", "unknown key")


def test_unknown_line_key() -> None:
    doc = base()
    doc["line"][0]["userid"] = "1"
    expect_error(emit(doc), "line[0].userid", 'did you mean "user_id"?')


def test_odd_key_names_stay_on_one_line() -> None:
    error = expect_error('"evil\\nkey\\u2028x" = 1\n' + emit(base()), '"evil\\nkey\\u2028x"')
    assert "unknown key" in str(error)


def test_user_agent_must_not_inject_headers() -> None:
    expect_error(with_("sip.user_agent", "x\r\nVia: evil"), "sip.user_agent", "one line")


def test_same_listen_address_on_both_sides() -> None:
    expect_error(with_("outside.listen", "127.0.0.1:5070"), "outside.listen", "inside.listen")
    expect_error(with_("outside.listen", "0.0.0.0:5070"), "outside.listen", "inside.listen")
    assert parse_config(with_("outside.listen", "127.0.0.2:5070")).outside.listen_port == 5070


def test_admin_listen_must_not_clash() -> None:
    expect_error(with_("admin.listen", "127.0.0.1:5080"), "admin.listen", "outside.listen")
    expect_error(with_("admin.listen", "127.0.0.1"), "admin.listen", 'expected "host:port"')


def test_max_calls_must_fit_the_port_range() -> None:
    doc = base()
    doc["media"] = {"port_min": 20000, "port_max": 20007}  # 4 pairs, 2 calls on one media_ip
    doc["limits"] = {"max_calls": 3}
    expect_error(emit(doc), "limits.max_calls", "room for 2 calls")
    doc["outside"]["media_ip"] = "127.0.0.2"  # separate addresses: a pair per call per side
    doc["limits"]["max_calls"] = 4
    assert parse_config(emit(doc)).limits.max_calls == 4


# --------------------------------------------------------------------------- x-sipura keys


@pytest.mark.parametrize(
    ("setting", "value", "fragment"),
    [
        ("grace_ms", -1, "must be >= 0, got -1"),
        ("grace_ms", "2000", 'expected an integer, got string "2000"'),
        ("grace_ms", 2.5, "expected an integer, got float 2.5"),
        ("grace_ms", True, "expected an integer, got boolean true"),
        ("handshake_timeout_ms", 0, "must be a positive integer, got 0"),
        ("handshake_timeout_ms", -5, "must be a positive integer"),
        ("handshake_timeout_ms", "5s", "expected an integer"),
        ("start_delay_ms", -1, "must be >= 0"),
        ("callerid_refresh", "sometimes", 'expected one of "update", "reinvite", "off"'),
        ("callerid_refresh", 1, "expected a string, got integer 1"),
        ("callerid_refresh", False, "expected a string, got boolean false"),
        ("tone", "not a tonescript", "not a ToneScript"),
        ("tone", "350@-19;5(", "not a ToneScript"),
        ("tone", 5, "expected a ToneScript string or false, got integer 5"),
        ("probe_unadvertised", "yes", 'expected true or false, got string "yes"'),
        ("srtcp", 1, "expected true or false, got integer 1"),
        ("trusted_ca", 5, "expected an array of file paths, got integer 5"),
        ("trusted_ca", {"a": "b"}, "expected an array of file paths, got a table"),
        ("grace", 2000, 'unknown key (did you mean "grace_ms"?)'),
        ("trusted_cas", [], 'unknown key (did you mean "trusted_ca"?)'),
    ],
)
def test_bad_xsipura_keys_blamed_by_the_parser(setting: str, value: Any, fragment: str) -> None:
    expect_error(with_(f"xsipura.{setting}", value), f"xsipura.{setting}", fragment)


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        ([5], "xsipura.trusted_ca[0]", "expected a file path, got integer 5"),
        (["a.pub", ""], "xsipura.trusted_ca[1]", 'expected a file path, got ""'),
        (["  "], "xsipura.trusted_ca[0]", "expected a file path"),
        (["a\nb.pub"], "xsipura.trusted_ca[0]", "expected a file path"),
    ],
)
def test_bad_trusted_ca_entry(value: Any, key: str, fragment: str) -> None:
    expect_error(with_("xsipura.trusted_ca", value), key, fragment)


def test_xsipura_choices_and_tone() -> None:
    x = parse_config(
        with_("xsipura", {"callerid_refresh": "off", "probe_unadvertised": True, "srtcp": True})
    ).xsipura
    assert (x.callerid_refresh, x.probe_unadvertised, x.srtcp) == ("off", True, True)
    assert parse_config(with_("xsipura.tone", False)).xsipura.tone is None
    assert parse_config(with_("xsipura.tone", True)).xsipura.tone == SECURE_CALL_TONE
    script = "350@-19;10(*/0/1)"
    assert parse_config(with_("xsipura.tone", script)).xsipura.tone == Tone.parse(script)


def line_doc(**keys: Any) -> str:
    doc = base()
    doc["line"] = [{"user_id": "1"}, {"user_id": "14085551234", **keys}]
    return emit(doc)


@pytest.mark.parametrize(
    ("keys", "key", "fragment"),
    [
        ({"mini_certificate": "AAAA"}, "line[1].srtp_private_key", "required with mini_certif"),
        ({"srtp_private_key": "BBBB"}, "line[1].srtp_private_key", "needs mini_certificate"),
        ({"require_secure": True}, "line[1].require_secure", "needs mini_certificate too"),
        ({"mini_certificate": 42}, "line[1].mini_certificate", "expected a base64 string or @"),
        ({"mini_certificate": ""}, "line[1].mini_certificate", "expected a base64 string"),
        ({"mini_certificate": "  "}, "line[1].mini_certificate", "expected a base64 string"),
        ({"mini_certificate": "@"}, "line[1].mini_certificate", "expected a file path"),
        (
            {"mini_certificate": "AAAA", "srtp_private_key": "@"},
            "line[1].srtp_private_key",
            "expected a file path",
        ),
        (
            {"mini_certificate": "AAAA", "srtp_private_key": ["x"]},
            "line[1].srtp_private_key",
            "expected a base64 string or @path",
        ),
        ({"secure_by_default": "yes"}, "line[1].secure_by_default", "expected true or false"),
        (
            {"mini_certificate": "A", "srtp_private_key": "B", "require_secure": 1},
            "line[1].require_secure",
            "expected true or false, got integer 1",
        ),
        ({"mini_certifcate": "A"}, "line[1].mini_certifcate", 'did you mean "mini_certificate"'),
    ],
)
def test_bad_line_keys_blamed_by_the_parser(keys: dict[str, Any], key: str, fragment: str) -> None:
    expect_error(line_doc(**keys), key, fragment)


def test_private_key_text_is_never_echoed_or_shown() -> None:
    secret = "c2VjcmV0IGtleSBtYXRlcmlhbA=="
    config = parse_config(line_doc(mini_certificate="AAAA", srtp_private_key=secret))
    assert config.lines[1].srtp_private_key == KeySource(inline=secret)
    assert secret not in repr(config) and secret not in repr(config.lines[1].srtp_private_key)
    error = expect_error(line_doc(srtp_private_key=secret), "line[1].srtp_private_key")
    assert secret not in str(error)


def test_secure_by_default_alone_is_allowed_and_kept() -> None:
    assert parse_config(line_doc(secure_by_default=False)).lines[1].secure_by_default is False


# --------------------------------------------------------------------------- file paths


def write_config(path: Path, xsipura: dict[str, Any], **line_keys: Any) -> Path:
    doc = base()
    doc["xsipura"] = xsipura
    doc["line"][0].update(line_keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(emit(doc), encoding="utf-8")
    return path


def test_relative_paths_resolve_against_the_config_dir_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = write_config(
        tmp_path / "etc" / "proxy.toml",
        {"trusted_ca": ["ca.pub", "../shared/other.pub", "/abs/root.pub"]},
        mini_certificate="@keys/line.mc",
        srtp_private_key="@/abs/line.key",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for path in (conf, Path("..") / "etc" / "proxy.toml"):
        config = load_config(path)
        etc = tmp_path / "etc"
        anchors = [p.resolve() for p in config.xsipura.trusted_ca]
        assert anchors == [etc / "ca.pub", tmp_path / "shared" / "other.pub", Path("/abs/root.pub")]
        assert all(p.is_absolute() for p in config.xsipura.trusted_ca)
        line = config.lines[0]
        assert line.mini_certificate is not None and line.mini_certificate.path is not None
        assert line.mini_certificate.path.resolve() == etc / "keys" / "line.mc"
        assert line.srtp_private_key == KeySource(path=Path("/abs/line.key"))
    # a later change of directory does not move them: they were resolved at load time
    config = load_config(Path("..") / "etc" / "proxy.toml")
    monkeypatch.chdir(tmp_path)
    assert config.xsipura.trusted_ca[0].resolve() == tmp_path / "etc" / "ca.pub"


def test_home_relative_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write_config(tmp_path / "proxy.toml", {"trusted_ca": "~/ca.pub"}))
    assert config.xsipura.trusted_ca == (tmp_path / "home" / "ca.pub",)


def test_parse_config_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = with_("xsipura.trusted_ca", ["ca.pub"])
    monkeypatch.chdir(tmp_path)
    # text from no file: the working directory; a named source: its directory
    assert parse_config(text).xsipura.trusted_ca == (tmp_path / "ca.pub",)
    assert parse_config(text, "/etc/sipura/p.toml").xsipura.trusted_ca == (
        Path("/etc/sipura/ca.pub"),
    )
    chosen = parse_config(text, "p.toml", base_dir=Path("/srv/conf")).xsipura.trusted_ca
    assert chosen == (Path("/srv/conf/ca.pub"),)


# --------------------------------------------------------------------------- syntax, files


def test_syntax_error_names_the_line() -> None:
    text = '[inside]\nlisten = "127.0.0.1:5070"\nmedia_ip = 127.0.0.1\n'
    error = expect_error(text, "line 3", "column")
    assert re.fullmatch(r"proxy\.toml: line 3: .+ \(column \d+\)", str(error)), str(error)


def test_syntax_error_at_end_of_file() -> None:
    error = expect_error("[inside]\nlisten = ", "line 2", "end of file")
    assert_one_line(error)


def test_duplicate_toml_key_is_a_syntax_error() -> None:
    expect_error('[inside]\nlisten = "a:1"\nlisten = "b:2"\n', "line 3")


def test_deep_nesting_does_not_crash() -> None:
    expect_error("x = " + "[" * 50_000 + "]" * 50_000 + "\n", "line 1", "nested")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: cannot read: ")
    assert_one_line(info.value, str(tmp_path))


def test_load_reports_errors_under_the_given_name(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(with_("media.port_min", 1023), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: media.port_min: must be an even number >= 1024, got 1023")


def test_load_rejects_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(emit(base()).encode() + b'\n[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line ")
    assert "UTF-8" in str(info.value)


def test_load_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(b"\xef\xbb\xbf" + CONTRACT.encode())
    assert load_config(path).inside.listen_port == 5070


def test_source_with_control_characters_stays_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("", "a\nb.toml")
    assert str(info.value).startswith("a\\nb.toml: inside: ")


# --------------------------------------------------------------------------- fuzzing


def check_outcome(text: str) -> None:
    """The property: a Config or a one-line ConfigError naming the source, nothing else."""
    try:
        config = parse_config(text, SOURCE)
    except ConfigError as error:
        assert_one_line(error)
        assert error.key, str(error)
    else:
        assert isinstance(config, Config)


TOKENS = st.sampled_from(list("[]{}=,.\"'#:+-_ \n\t\r\\0123456789abcdefinstruelo@;ä")) | (
    st.sampled_from(
        ["inside", "outside", "media", "line", "listen", "media_ip", "port_min", "sip:", "[["]
    )
)
TOMLISH = st.lists(TOKENS, max_size=120).map("".join)


@settings(max_examples=200, deadline=None)
@given(TOMLISH)
def test_garbage_raises_only_config_error(text: str) -> None:
    check_outcome(text)


NAMES = st.sampled_from(
    [
        "inside", "outside", "media", "sip", "line", "log", "limits", "admin", "xsipura",
        "listen", "media_ip", "advertise", "unknown_users", "upstream", "registrar",
        "port_min", "port_max", "rtp_timeout_s", "workers", "t1_ms", "t2_ms", "t4_ms",
        "transports", "user_agent", "max_forwards", "level", "format", "max_calls",
        "user_id", "contact", "mini_certificate", "require_secure",
    ]
) | st.text(min_size=1, max_size=8)  # fmt: skip
STRINGS = st.sampled_from(
    [
        "127.0.0.1:5070", "[::1]:5080", "::1", "127.0.0.1", "sip:127.0.0.1:5090", "sips:[::1]",
        "relay", "reject", "udp", "tcp", "info", "json", "+14085551234", "1408", "", "0.0.0.0",
    ]
) | st.text(max_size=20)  # fmt: skip
SCALARS = (
    STRINGS
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.sampled_from([0, 1, 1024, 20000, 29999, 65535, 65536])
    | st.booleans()
    | st.floats(allow_nan=False)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=6,
)
DOCS = st.dictionaries(
    NAMES,
    st.dictionaries(NAMES, VALUES, max_size=6)
    | st.lists(st.dictionaries(NAMES, VALUES, max_size=4), min_size=1, max_size=3)
    | VALUES,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(DOCS)
def test_random_documents_raise_only_config_error(doc: dict[str, Any]) -> None:
    check_outcome(emit(doc))


KNOWN_PATHS = st.sampled_from(
    [
        ("inside", "listen"), ("inside", "media_ip"), ("inside", "advertise"),
        ("inside", "unknown_users"), ("outside", "listen"), ("outside", "media_ip"),
        ("outside", "advertise"), ("outside", "upstream"), ("outside", "registrar"),
        ("media", "port_min"), ("media", "port_max"), ("media", "rtp_timeout_s"),
        ("media", "workers"), ("sip", "t1_ms"), ("sip", "t2_ms"), ("sip", "t4_ms"),
        ("sip", "transports"), ("sip", "user_agent"), ("sip", "max_forwards"),
        ("log", "level"), ("log", "format"), ("limits", "max_calls"), ("admin", "listen"),
        ("line", "user_id"), ("line", "contact"), ("line", "mini_certificate"),
        ("line", "srtp_private_key"), ("line", "secure_by_default"), ("line", "require_secure"),
        ("xsipura", "trusted_ca"), ("xsipura", "grace_ms"), ("xsipura", "handshake_timeout_ms"),
        ("xsipura", "probe_unadvertised"), ("xsipura", "callerid_refresh"), ("xsipura", "srtcp"),
        ("xsipura", "start_delay_ms"), ("xsipura", "tone"),
    ]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KNOWN_PATHS, VALUES | STRINGS), min_size=1, max_size=4))
def test_random_values_at_known_keys_raise_only_config_error(
    changes: list[tuple[tuple[str, str], Any]],
) -> None:
    doc = base()
    for (table, key), value in changes:
        target = doc["line"][-1] if table == "line" else doc.setdefault(table, {})
        target[key] = value
    check_outcome(emit(doc))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_example_raises_only_config_error(data: st.DataObject) -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["drop", "value", "dup", "garble"]))
        line = lines[index]
        if action == "drop":
            del lines[index]
        elif action == "dup":
            lines.insert(index, line)
        elif action == "value" and "=" in line:
            lines[index] = line.partition("=")[0] + "= " + toml_value(data.draw(SCALARS))
        else:
            lines[index] = data.draw(st.text(max_size=30))
        if not lines:
            break
    check_outcome("\n".join(lines) + "\n")
