"""Structured header values: SipUri, NameAddr, Via, CSeq, host:port, value splitting."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.headers import (
    MAGIC_COOKIE,
    MEMO_MAX_TEXT,
    MEMOS,
    CSeq,
    NameAddr,
    SipHeaderError,
    SipUri,
    Via,
    bare_host,
    format_hostport,
    has_uri_scheme,
    parse_decimal,
    parse_hostport,
    split_header_values,
)
from proxy.sip.memo import memoise_text
from proxy.sip.message import CANONICAL_MEMO, canonical

# --- split_header_values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a, b,c", ["a", "b", "c"]),
        ("", []),
        (" , ,a,, ", ["a"]),
        ('"Bell, Alexander" <sip:a@b>, <sip:c@d>', ['"Bell, Alexander" <sip:a@b>', "<sip:c@d>"]),
        ('"a \\", b" <sip:x>, y', ['"a \\", b" <sip:x>', "y"]),  # escaped quote
        ("<sip:a@b;x=1,2>, <sip:c>", ["<sip:a@b;x=1,2>", "<sip:c>"]),  # comma inside <>
        ("<sip:a>>, b", ["<sip:a>>", "b"]),  # stray '>' cannot go negative
        ('"unterminated, x', ['"unterminated, x']),
        (
            "SIP/2.0/UDP a;branch=z9hG4bK1 , SIP/2.0/TCP [::1]:5060",
            ["SIP/2.0/UDP a;branch=z9hG4bK1", "SIP/2.0/TCP [::1]:5060"],
        ),
    ],
)
def test_split_header_values(value: str, expected: list[str]) -> None:
    assert split_header_values(value) == expected


# --- host:port -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("example.com", "example.com", None),
        (" example.com:5060 ", "example.com", 5060),
        ("192.0.2.1:65535", "192.0.2.1", 65535),
        ("[2001:db8::1]", "[2001:db8::1]", None),
        ("[2001:db8::1]:5070", "[2001:db8::1]", 5070),
        ("[::ffff:192.0.2.1]:1", "[::ffff:192.0.2.1]", 1),
        ("[2001:db8::10:5070]", "[2001:db8::10:5070]", None),  # RFC 5118 §4.4: no port
    ],
)
def test_parse_hostport(text: str, host: str, port: int | None) -> None:
    assert parse_hostport(text) == (host, port)


@pytest.mark.parametrize(
    "text",
    ["", ":5060", "host:", "host:0", "host:65536", "host:123456", "host:５０６０", "2001:db8::1",
     "[2001:db8::1", "[2001:db8:::1]", "[::g]", "[]", "host name", "user@host", "host;x"],
)  # fmt: skip
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(SipHeaderError):
        parse_hostport(text)


def test_format_and_bare_host() -> None:
    assert format_hostport("::1", 5060) == "[::1]:5060"
    assert format_hostport("[::1]", None) == "[::1]"
    assert format_hostport("example.com", None) == "example.com"
    assert bare_host("[::1]") == "::1"
    assert bare_host("192.0.2.1") == "192.0.2.1"


def test_has_uri_scheme() -> None:
    assert has_uri_scheme("sip:a")
    assert has_uri_scheme("soap.beep://x")
    assert has_uri_scheme("isbn:2983792873")
    assert not has_uri_scheme("<sip:a>")
    assert not has_uri_scheme("1sip:a")
    assert not has_uri_scheme("sip:")
    assert not has_uri_scheme("nocolon")


# --- SipUri --------------------------------------------------------------------------------

CANONICAL_URIS = [
    "sip:example.com",
    "sip:alice@example.com",
    "sips:alice@example.com:5061",
    "sip:alice:secret@192.0.2.1:5060;transport=tcp;lr",
    "sip:+15551234567@gw.example.com;user=phone",
    "sip:[2001:db8::10]:5070;maddr=[2001:db8::1]",
    "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
    "sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31",
    "sip:user;par=u%40example.net@example.com",
]


@pytest.mark.parametrize("text", CANONICAL_URIS)
def test_sip_uri_round_trip(text: str) -> None:
    assert str(SipUri.parse(text)) == text


def test_sip_uri_parts() -> None:
    uri = SipUri.parse("SIPS:alice:pw@[2001:db8::1]:5071;Transport=TLS;lr;x=1?h=v&i=w")
    assert (uri.scheme, uri.user, uri.password) == ("sips", "alice", "pw")
    assert (uri.host, uri.port) == ("[2001:db8::1]", 5071)
    assert uri.params == [("Transport", "TLS"), ("lr", None), ("x", "1")]
    assert uri.headers == "h=v&i=w"
    assert uri.param("transport") == "TLS"
    assert uri.param("lr") == ""
    assert uri.param("nope") is None
    assert uri.transport == "tls"
    assert uri.default_port == 5061
    assert SipUri.parse("sip:a@b").transport == "udp"
    assert SipUri.parse("sip:a@b").default_port == 5060


def test_sip_uri_userinfo_with_reserved_chars() -> None:
    # RFC 3261 user-unreserved allows ; ? , / in the user part (RFC 4475 intmeth, semiuri)
    uri = SipUri.parse("sip:a;b?c,d/e:p?w@example.com;lr?x=y")
    assert (uri.user, uri.password, uri.host) == ("a;b?c,d/e", "p?w", "example.com")
    assert (uri.params, uri.headers) == ([("lr", None)], "x=y")


def test_sip_uri_with_and_without_param() -> None:
    uri = SipUri.parse("sip:a@b;transport=udp;lr")
    assert str(uri.with_param("transport", "tcp")) == "sip:a@b;lr;transport=tcp"
    assert str(uri.with_param("ob")) == "sip:a@b;transport=udp;lr;ob"
    assert str(uri.without_param("LR")) == "sip:a@b;transport=udp"
    assert str(uri) == "sip:a@b;transport=udp;lr"  # frozen: the original is unchanged


@pytest.mark.parametrize(
    "text",
    ["tel:+15551234567", "sip", "<sip:a@b>", "sip:@example.com", "sip:a@", "sip:a@b:0",
     "sip:a@b:99999", "sip:2001:db8::1", "sip:a b@c", "sip:a@b;;lr", "sip:a@b;", "sip:a@b;=x",
     'sip:a@b;x="y', "sip:a@b;x=a b", "sip:a@b\r\nX: y", "sip:a@[::1"],
)  # fmt: skip
def test_sip_uri_rejects(text: str) -> None:
    with pytest.raises(SipHeaderError):
        SipUri.parse(text)


# --- NameAddr ------------------------------------------------------------------------------

CANONICAL_NAME_ADDRS = [
    "<sip:alice@example.com>",
    "<sip:alice@example.com>;tag=1928301774",
    '"Alice" <sip:alice@example.com>;tag=1',
    '"Bell, Alexander" <sip:a.g.bell@example.com>;tag=43',
    '"a <b> \\"c\\"" <sip:x@example.com>',
    "Alice Smith <sip:alice@example.com>",
    "sip:alice@example.com",
    "sip:alice@example.com;tag=1;expires=60",
    "<sip:alice@example.com;transport=tcp>;expires=60;q=0.5",
    "<tel:+15551234567>",
    "isbn:2983792873",
    "*",
]


@pytest.mark.parametrize("text", CANONICAL_NAME_ADDRS)
def test_name_addr_round_trip(text: str) -> None:
    assert str(NameAddr.parse(text)) == text


def test_name_addr_quoted_display_with_comma_and_angle() -> None:
    addr = NameAddr.parse('"Watson, <Thomas>" <sip:t.watson@example.org>;tag=x')
    assert addr.display == '"Watson, <Thomas>"'
    assert addr.uri == "sip:t.watson@example.org"
    assert addr.tag == "x"
    escaped = NameAddr.parse('"J Rosenberg \\\\\\""  <sip:jdrosen@example.com> ; tag = 98')
    assert escaped.display == '"J Rosenberg \\\\\\""'
    assert escaped.params == [("tag", "98")]


def test_name_addr_addr_spec_params_belong_to_header() -> None:
    addr = NameAddr.parse("sip:+19725552222@gw1.example.net;unknownparam;tag=5")
    assert addr.uri == "sip:+19725552222@gw1.example.net"
    assert addr.params == [("unknownparam", None), ("tag", "5")]
    assert not addr.bracketed
    inside = NameAddr.parse("<sip:+19725552222@gw1.example.net;unknownparam>;tag=5")
    assert inside.uri == "sip:+19725552222@gw1.example.net;unknownparam"
    assert inside.params == [("tag", "5")]
    assert inside.sip_uri().params == [("unknownparam", None)]


def test_name_addr_star_and_foreign_schemes() -> None:
    star = NameAddr.parse(" * ")
    assert (star.uri, star.display, star.params, star.bracketed) == ("*", "", [], False)
    assert NameAddr.parse("<name:John_Smith>").uri == "name:John_Smith"
    assert NameAddr.parse("<http://www.example.com>;tag=3").uri == "http://www.example.com"
    with pytest.raises(SipHeaderError):
        NameAddr.parse("<tel:+1555>").sip_uri()


def test_name_addr_no_space_before_angle() -> None:  # RFC 4475 lwsdisp
    addr = NameAddr.parse("caller<sip:caller@example.com>;tag=323")
    assert (addr.display, addr.uri, addr.tag) == ("caller", "sip:caller@example.com", "323")
    assert str(addr) == "caller <sip:caller@example.com>;tag=323"


def test_name_addr_edits() -> None:
    addr = NameAddr.parse("sip:bob@example.com;tag=")
    assert addr.tag is None  # empty tag counts as none
    tagged = addr.with_param("tag", "abc")
    assert tagged.tag == "abc"
    assert str(tagged) == "sip:bob@example.com;tag=abc"
    assert str(tagged.without_param("TAG")) == "sip:bob@example.com"
    assert tagged.param("missing") is None
    moved = NameAddr.parse('"Bob" <sip:bob@a>;tag=1').with_uri("sip:bob@b;transport=tcp")
    assert str(moved) == '"Bob" <sip:bob@b;transport=tcp>;tag=1'
    # an addr-spec URI that gains ';' or '?' must be bracketed when written out
    assert str(NameAddr("", "sip:a@b;lr", [], False)) == "<sip:a@b;lr>"
    assert str(NameAddr("", "sip:a@b?x=y", [("tag", "1")], False)) == "<sip:a@b?x=y>;tag=1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '"Mr. J. User <sip:j.user@example.com>',  # quotbal
        "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",  # baddn
        '"Watson, Thomas" < sip:t.watson@example.org >',  # badaspec
        "sip:user@example.com?Route=%3Csip:sip.example.com%3E",  # regbadct
        "<sip:a@b",
        "<>",
        "<nocolon>",
        "<sip:a@b> garbage;tag=1",
        "<sip:a@b>, <sip:c@d>",
        "<sip:a@b>;;;;",
        "<sip:a@b>;tag=1;",
        "<sip:a@b>;tag=a b",
        '<sip:a@b>;tag="open',
        "sip:a@b, sip:c@d",
        "sip:a b@c",
        "Joe @ Home <sip:a@b>",
        '"x" y <sip:a@b>',
        "nocolon",
    ],
)
def test_name_addr_rejects(text: str) -> None:
    with pytest.raises(SipHeaderError):
        NameAddr.parse(text)


# --- Via -----------------------------------------------------------------------------------

CANONICAL_VIAS = [
    "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds;rport",
    "SIP/2.0/TCP client.example.com;branch=z9hG4bK74bf9;received=192.0.2.2",
    "SIP/2.0/TLS [2001:db8::9:1]:5061;branch=z9hG4bKas3;received=[2001:db8::9:255]",
    "SIP/2.0/UNKNOWN t4.example.com",
    "SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bK56sdasks",
]


@pytest.mark.parametrize("text", CANONICAL_VIAS)
def test_via_round_trip(text: str) -> None:
    assert str(Via.parse(text)) == text


def test_via_whitespace_everywhere() -> None:
    via = Via.parse("SIP  /   2.0 / udp   host.example.com  :  5070  ;  branch = z9hG4bK1 ; rport")
    assert (via.transport, via.host, via.port) == ("UDP", "host.example.com", 5070)
    assert via.params == [("branch", "z9hG4bK1"), ("rport", None)]
    assert str(via) == "SIP/2.0/UDP host.example.com:5070;branch=z9hG4bK1;rport"
    six = Via.parse("SIP/2.0/UDP [2001:db8::9:1] : 5060;branch=z9hG4bK1")
    assert (six.host, six.port, six.sent_by) == ("[2001:db8::9:1]", 5060, ("[2001:db8::9:1]", 5060))


def test_via_params() -> None:
    via = Via.parse("SIP/2.0/UDP Host.Example.com;Branch=z9hG4bKabc;received=192.0.2.9;rport=1")
    assert via.branch == "z9hG4bKabc"
    assert via.branch.startswith(MAGIC_COOKIE)
    assert via.param("RECEIVED") == "192.0.2.9"
    assert via.sent_by == ("host.example.com", 5060)
    updated = via.with_param("rport", "5062").with_param("received", "198.51.100.1")
    assert str(updated) == (
        "SIP/2.0/UDP Host.Example.com;Branch=z9hG4bKabc;rport=5062;received=198.51.100.1"
    )
    assert Via.parse("SIP/2.0/UDP a").branch is None
    assert Via.parse("SIP/2.0/UDP a;branch").branch is None
    assert Via.parse("SIP/2.0/UDP a;branch=z9hG4bK").branch == "z9hG4bK"  # badbranch


@pytest.mark.parametrize(
    "text",
    ["", "SIP/2.0/UDP", "SIP/2.0 UDP host", "SIP/7.0/UDP host", "SIP/2.0/UDP host:abc",
     "SIP/2.0/UDP host:0", "SIP/2.0/UDP 2001:db8::1", "SIP/2.0/UDP host garbage",
     "SIP/2.0/UDP host;", "SIP/2.0/UDP host;;branch=1", "SIP/2.0/UDP host;branch=a b",
     "SIP/2.0/UDP host, SIP/2.0/UDP other", "SIP/2.0/UDP [::1", "HTTP/1.1/TCP host"],
)  # fmt: skip
def test_via_rejects(text: str) -> None:
    with pytest.raises(SipHeaderError):
        Via.parse(text)


# --- CSeq ----------------------------------------------------------------------------------


def test_cseq() -> None:
    assert CSeq.parse("314159 INVITE") == CSeq(314159, "INVITE")
    assert str(CSeq.parse("314159 INVITE")) == "314159 INVITE"
    assert CSeq.parse("  0009 \t INVITE ") == CSeq(9, "INVITE")  # wsinv, unfolded
    assert CSeq.parse("2147483647 NEWMETHOD") == CSeq(2**31 - 1, "NEWMETHOD")
    assert CSeq.parse("0" * 100 + "1 ACK") == CSeq(1, "ACK")
    assert CSeq.parse("1 RE%47IST%45R").method == "RE%47IST%45R"


@pytest.mark.parametrize(
    "text",
    ["", "1", "INVITE", "-1 INVITE", "+1 INVITE", "1 INVITE extra", "2147483648 INVITE",
     "36893488147419103232 REGISTER", "9" * 5000 + " INVITE", "² INVITE", "١ INVITE",
     "1 IN<VITE", "1.0 INVITE", "1,INVITE"],
)  # fmt: skip
def test_cseq_rejects(text: str) -> None:
    with pytest.raises(SipHeaderError):
        CSeq.parse(text)


# --- properties ----------------------------------------------------------------------------

HEADERISH = st.text(
    alphabet=st.sampled_from(list("sip:SIP/2.0UDP @[]:;,=<>\"\\ \t.-_%*+!~'?&$()abc019\x00é")),
    max_size=60,
) | st.text(max_size=40)


@settings(max_examples=400, deadline=None)
@given(HEADERISH)
def test_header_parsers_raise_only_header_error(text: str) -> None:
    for parser in (SipUri.parse, NameAddr.parse, Via.parse, CSeq.parse, parse_hostport):
        with contextlib.suppress(SipHeaderError):
            parser(text)


@settings(max_examples=200, deadline=None)
@given(HEADERISH)
def test_prefixed_values_raise_only_header_error(text: str) -> None:
    for parser, prefix in ((SipUri.parse, "sip:"), (NameAddr.parse, '"'), (NameAddr.parse, "<sip:"),
                           (Via.parse, "SIP/2.0/UDP "), (CSeq.parse, "1 ")):  # fmt: skip
        with contextlib.suppress(SipHeaderError):
            parser(prefix + text)


@settings(max_examples=200, deadline=None)
@given(HEADERISH)
def test_split_header_values_total(text: str) -> None:
    values = split_header_values(text)
    assert all(v and v == v.strip() for v in values)
    assert len(values) <= text.count(",") + 1


TOKEN = st.text(alphabet="abcdefXYZ0189-.!%*_+`'~", min_size=1, max_size=8)
HOST = st.one_of(
    st.from_regex(r"[a-z][a-z0-9\-]{0,8}(\.[a-z][a-z0-9\-]{0,8}){0,2}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
PORT = st.none() | st.integers(1, 65535)
PARAMS = st.lists(st.tuples(TOKEN, st.none() | TOKEN), max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["UDP", "TCP", "TLS", "SCTP"]), HOST, PORT, PARAMS)
def test_via_generated_round_trip(
    transport: str, host: str, port: int | None, params: list[tuple[str, str | None]]
) -> None:
    via = Via(transport, host, port, params)
    assert Via.parse(str(via)) == via
    assert str(Via.parse(str(via))) == str(via)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["sip", "sips"]), st.none() | TOKEN, HOST, PORT, PARAMS)
def test_sip_uri_generated_round_trip(
    scheme: str, user: str | None, host: str, port: int | None,
    params: list[tuple[str, str | None]],
) -> None:  # fmt: skip
    uri = SipUri(scheme, user, None, host, port, params)
    assert SipUri.parse(str(uri)) == uri
    addr = NameAddr('"Some, One"', str(uri), [("tag", "x")])
    assert NameAddr.parse(str(addr)) == addr


# --- numbers: one ASCII-only rule --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("3600", 3600), (" 70\t", 70), ("0000000000000042", 42), ("4294967295", 2**32 - 1)],
)
def test_parse_decimal_accepts_ascii_digits(text: str, expected: int) -> None:
    assert parse_decimal(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "²", "٣", "１２", "3²", "+5", "-1", "1.5", "1e3", "0x10", "12 34", "4294967296",
     "9" * 5000, "7\n", "\u00a05"],
)  # fmt: skip
def test_parse_decimal_rejects_everything_else(text: str) -> None:
    """Regression: ``Expires: ²`` passed ``str.isdigit`` and raised deep in the core."""
    with pytest.raises(SipHeaderError):
        parse_decimal(text)


def test_parse_decimal_maximum_and_what() -> None:
    assert parse_decimal("255", maximum=255) == 255
    with pytest.raises(SipHeaderError, match="Max-Forwards out of range"):
        parse_decimal("256", maximum=255, what="Max-Forwards")
    with pytest.raises(SipHeaderError, match="Expires is not a number"):
        parse_decimal("²", what="Expires")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_parse_decimal_is_total(text: str) -> None:
    try:
        value = parse_decimal(text)
    except SipHeaderError:
        return
    assert 0 <= value <= 2**32 - 1
    assert text.strip(" \t").isascii()


@pytest.mark.parametrize("value", ["²", "1²", "\u0663"])
def test_non_ascii_digits_in_cseq_and_port_are_rejected(value: str) -> None:
    with pytest.raises(SipHeaderError):
        CSeq.parse(f"{value} INVITE")
    with pytest.raises(SipHeaderError):
        parse_hostport(f"example.com:{value}")


# --- caches: bounded in entries and in value size -----------------------------------------------


def test_memo_bounds_entries_and_text_size() -> None:
    calls: list[str] = []

    def compute(text: str) -> int:
        calls.append(text)
        return len(text)

    cached, memo = memoise_text(compute, max_entries=3, max_text=5)
    assert [cached("ab"), cached("ab")] == [2, 2]
    assert calls == ["ab"]
    assert cached("x" * 6) == 6 and cached("x" * 6) == 6
    assert len(memo) == 1 and calls.count("x" * 6) == 2  # too long: never stored
    for text in ("c", "d", "e"):
        cached(text)
    assert len(memo) <= 3
    assert memo.text_chars() <= 3 * 5


def test_unique_huge_header_values_do_not_fill_the_caches() -> None:
    """Regression: 2,100 datagrams with unique 30 KB values pinned 252 MB."""
    for index in range(300):
        pad = f"{index:04d}" + "x" * 30_000
        NameAddr.parse(f'"{pad}" <sip:a@example.com>;tag={index}')
        SipUri.parse(f"sip:{pad}@example.com")
        with contextlib.suppress(SipHeaderError):
            Via.parse(f"SIP/2.0/UDP example.com;branch=z9hG4bK{pad}")
        canonical(f"X-{pad}")
    for memo in (*MEMOS.values(), CANONICAL_MEMO):
        assert memo.text_chars() <= memo.max_entries * memo.max_text
        assert all(len(text) <= memo.max_text for text in memo.table)
    assert MEMO_MAX_TEXT <= 256


def test_memoised_parse_still_returns_equal_values() -> None:
    text = '"Alice" <sip:alice@example.com>;tag=1'
    assert NameAddr.parse(text) is NameAddr.parse(text)  # short: served from the cache
    long = '"' + "A" * 300 + '" <sip:alice@example.com>;tag=1'
    assert NameAddr.parse(long) == NameAddr.parse(long)
    assert NameAddr.parse(long) is not NameAddr.parse(long)


def _split_reference(value: str) -> list[str]:
    """The character-by-character splitter the scanning versions replaced."""
    values: list[str] = []
    depth, quoted, escaped, start = 0, False, False, 0
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            depth += 1
        elif char == ">":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            values.append(value[start:index].strip())
            start = index + 1
    values.append(value[start:].strip())
    return [v for v in values if v]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='",<>\\; ab', max_size=40))
def test_scanning_splitters_agree_with_the_character_loop(value: str) -> None:
    assert split_header_values(value) == _split_reference(value)
    try:
        parsed = NameAddr.parse(f"{value} <sip:a@b>")
    except SipHeaderError:
        return
    assert parsed.uri == "sip:a@b"


def test_forget_all_empties_every_memo() -> None:
    from proxy.sip.memo import forget_all

    NameAddr.parse('"A" <sip:a@example.com>;tag=1')
    canonical("X-Forget-Me")
    assert len(MEMOS["name_addr"]) and len(CANONICAL_MEMO)
    forget_all()
    assert all(len(memo) == 0 for memo in (*MEMOS.values(), CANONICAL_MEMO))
    assert NameAddr.parse('"A" <sip:a@example.com>;tag=1').tag == "1"  # refills on use
