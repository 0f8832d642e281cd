"""The transport part of the config schema: [tls], [dns], TLS listeners, SDES policy,
upstream failover lists. Each error names the key it blames (one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.b2bua.config import ConfigError, parse_config
from proxy.b2bua.config_transport import DnsServer

SOURCE = "proxy.toml"

BASE = """\
[inside]
listen = "127.0.0.1:5070"
media_ip = "127.0.0.1"
[outside]
listen = "127.0.0.1:5080"
media_ip = "127.0.0.1"
{outside}
[sip]
transports = {transports}
{tables}
"""


def text(outside: str = "", transports: str = '["udp", "tcp", "tls"]', tables: str = "") -> str:
    return BASE.format(outside=outside, transports=transports, tables=tables)


TLS = '[tls]\ncertificate = "proxy.crt"\nprivate_key = "@proxy.key"\n'


def error(config_text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_text, SOURCE)
    message = str(info.value)
    assert info.value.key == key, message
    assert fragment in message, message
    assert len(message.splitlines()) == 1


def test_tls_listeners_and_keys(tmp_path: Path) -> None:
    config = parse_config(
        text('tls_listen = "127.0.0.1:5081"', tables=TLS + 'ca = "ca.pem"\nverify_peer = false\n'
             'client_certificate = true\nhandshake_timeout_ms = 3000\n'),
        str(tmp_path / "proxy.toml"),
    )  # fmt: skip
    assert config.sip.transports == ("udp", "tcp", "tls")
    assert config.outside.tls_listen == ("127.0.0.1", 5081)
    assert config.inside.tls_listen is None
    tls = config.tls
    assert tls.certificate == tmp_path / "proxy.crt"
    assert tls.private_key == tmp_path / "proxy.key"
    assert tls.ca == tmp_path / "ca.pem"
    assert (tls.verify_peer, tls.client_certificate, tls.handshake_timeout_s) == (
        False, True, 3.0
    )  # fmt: skip
    assert config.outside.sdes == "offer"  # TLS outside: SDES offered by default


def test_tls_defaults() -> None:
    config = parse_config(text())
    assert config.tls.verify_peer is True
    assert config.tls.ca is None  # the system store
    assert config.tls.client_certificate is False
    assert config.outside.sdes == "off"  # nothing TLS outside: no SDES


@pytest.mark.parametrize(
    ("outside", "transports", "tables", "key", "fragment"),
    [
        ('tls_listen = "127.0.0.1:5081"', '["udp"]', TLS, "outside.tls_listen", '"tls" in sip'),
        ('tls_listen = "127.0.0.1:5081"', '["tls"]', "", "outside.tls_listen", "certificate"),
        ('tls_listen = "127.0.0.1:5080"', '["tls"]', TLS, "outside.tls_listen", "same address"),
        ('upstream = "sips:pbx.example.com"', '["udp"]', "", "outside.upstream", '"tls" in'),
        ("", '["tls"]', '[tls]\ncertificate = "a.crt"\n', "tls.private_key", "required"),
        ("", '["tls"]', '[tls]\ncertificate = "a"\nprivate_key = "a.key"\n', "tls.private_key",
         '"@path"'),
        ("", '["tls"]', "[tls]\nclient_certificate = true\n", "tls.client_certificate",
         "needs tls.certificate"),
        ("", '["tls"]', "[tls]\nverify_peer = 1\n", "tls.verify_peer", "true or false"),
        ("", '["tls"]', "[tls]\ncertficate = 1\n", "tls.certficate", "did you mean"),
    ],
)  # fmt: skip
def test_tls_errors(outside: str, transports: str, tables: str, key: str, fragment: str) -> None:
    error(text(outside, transports, tables), key, fragment)


def test_sdes_modes_and_the_insecure_transport_rule() -> None:
    tls_up = 'upstream = "sip:pbx.example.com;transport=tls"'
    assert parse_config(text(tls_up)).outside.sdes == "offer"
    assert parse_config(text(tls_up + '\nsdes = "require"')).outside.sdes == "require"
    assert parse_config(text(tls_up + '\nsdes = "off"')).outside.sdes == "off"
    error(text('sdes = "offer"'), "outside.sdes", "sdes_over_insecure_transport")
    relaxed = parse_config(text('sdes = "offer"\nsdes_over_insecure_transport = true'))
    assert (relaxed.outside.sdes, relaxed.outside.sdes_over_insecure_transport) == ("offer", True)
    error(text('sdes = "maybe"'), "outside.sdes", 'expected one of "off", "offer", "require"')
    error(
        BASE.format(outside="", transports='["udp"]', tables="").replace(
            'media_ip = "127.0.0.1"\n', 'media_ip = "127.0.0.1"\nsdes = "offer"\n', 1
        ),
        "inside.sdes",
        "only in [outside]",
    )


def test_require_secure_without_a_certificate_needs_sdes() -> None:
    line = '[[line]]\nuser_id = "100"\nrequire_secure = true\n'
    error(text(tables=line), "line[0].require_secure", "needs mini_certificate")
    config = parse_config(text('upstream = "sips:pbx.example.com"', tables=line))
    assert config.lines[0].require_secure is True


def test_upstream_list_for_failover() -> None:
    config = parse_config(
        text('upstream = ["sip:a.example.com", "sip:192.0.2.7:5070"]\nfailover_hold_down_s = 5')
    )
    outside = config.outside
    assert outside.upstream_uris == ("sip:a.example.com", "sip:192.0.2.7:5070")
    assert outside.upstream == "sip:a.example.com"
    assert outside.failover_hold_down_s == 5.0
    assert parse_config(text()).outside.upstream_uris == ()
    error(text("upstream = []"), "outside.upstream", "non-empty array")
    error(text('upstream = ["sip:a", 5]'), "outside.upstream[1]", "expected a SIP URI")
    error(text('upstream = ["sip:a", "http://x"]'), "outside.upstream[1]", '"sip:" or "sips:"')
    error(text("failover_hold_down_s = -1"), "outside.failover_hold_down_s", ">= 0")


def test_dns_servers() -> None:
    config = parse_config(
        text(tables='[dns]\nservers = ["127.0.0.1:5353", "::1", "[::1]:53"]\ntimeout_ms = 500')
    )
    assert config.dns.servers == (
        DnsServer("127.0.0.1", 5353), DnsServer("::1", 53), DnsServer("::1", 53)
    )  # fmt: skip
    assert config.dns.timeout_s == 0.5
    assert parse_config(text()).dns.servers == ()  # the system's resolvers
    error(text(tables='[dns]\nservers = ["ns.example.com"]'), "dns.servers[0]", "IP address")
    error(text(tables="[dns]\nservers = [53]"), "dns.servers[0]", "expected a string")
    error(text(tables="[dns]\ntimeout_ms = 0"), "dns.timeout_ms", "positive")
