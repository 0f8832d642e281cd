"""RFC 3263 record choice and RFC 2782 ordering, as pure functions."""

from __future__ import annotations

import random
from collections import Counter

from proxy.sip.rfc3263 import Naptr, Srv, naptr_choices, order_srv, srv_name


def test_srv_names() -> None:
    assert srv_name("example.com.", "udp") == "_sip._udp.example.com"
    assert srv_name("example.com", "tcp") == "_sip._tcp.example.com"
    assert srv_name("example.com", "tls") == "_sips._tcp.example.com"


def test_naptr_best_first_and_only_what_the_proxy_runs() -> None:
    records = [
        Naptr(50, 50, "s", "SIP+D2U", "_sip._udp.example.com."),
        Naptr(40, 10, "S", "SIPS+D2T", "_sips._tcp.example.com."),
        Naptr(40, 20, "s", "SIP+D2T", "_sip._tcp.example.com."),
        Naptr(10, 10, "s", "SIP+D2S", "_sip._sctp.example.com."),  # not a transport we run
        Naptr(5, 10, "u", "SIP+D2U", "!^.*$!sip:x@y!"),  # not an S record
    ]
    assert naptr_choices(records, ("udp", "tcp", "tls")) == [
        ("tls", "_sips._tcp.example.com"),
        ("tcp", "_sip._tcp.example.com"),
        ("udp", "_sip._udp.example.com"),
    ]
    assert naptr_choices(records, ("udp",)) == [("udp", "_sip._udp.example.com")]


def test_srv_priority_first_and_weights_spread_load() -> None:
    records = [
        Srv(20, 0, 5060, "backup.example.com."),
        Srv(10, 80, 5060, "a.example.com."),
        Srv(10, 20, 5060, "b.example.com."),
    ]
    firsts: Counter[str] = Counter()
    rng = random.Random(7)
    for _ in range(2000):
        ordered = order_srv(records, rng)
        assert ordered[-1].target == "backup.example.com."  # the higher priority value last
        assert {r.target for r in ordered[:2]} == {"a.example.com.", "b.example.com."}
        firsts[ordered[0].target] += 1
    assert 0.7 < firsts["a.example.com."] / 2000 < 0.9  # 80 % of the weight


def test_srv_dot_target_means_no_service() -> None:
    assert order_srv([Srv(0, 0, 0, ".")]) == []
