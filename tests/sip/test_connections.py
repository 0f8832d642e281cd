"""The TCP connection table (proxy.sip.connections), sans-IO with a fake clock."""

from __future__ import annotations

import pytest

from proxy.sip.connections import (
    Closing,
    ConnectionTable,
    Refusal,
    TcpLimits,
    auto_max_connections,
)

LIMITS = TcpLimits(max_connections=5, max_per_source=2, idle_timeout_s=600, message_timeout_s=10)


def table(**overrides: float) -> ConnectionTable:
    fields = {
        "max_connections": LIMITS.max_connections,
        "max_per_source": LIMITS.max_per_source,
        "idle_timeout_s": LIMITS.idle_timeout_s,
        "message_timeout_s": LIMITS.message_timeout_s,
    }
    fields.update(overrides)
    return ConnectionTable(TcpLimits(**fields))  # type: ignore[arg-type]


def test_per_source_and_total_caps_refuse_and_count() -> None:
    t = table()
    assert t.admit(1, "192.0.2.1", 0.0) is None
    assert t.admit(2, "192.0.2.1", 0.0) is None
    assert t.admit(3, "192.0.2.1", 0.0) is Refusal.MAX_PER_SOURCE
    for conn, host in ((4, "192.0.2.2"), (5, "192.0.2.2"), (6, "192.0.2.3")):
        assert t.admit(conn, host, 0.0) is None
    assert t.admit(7, "192.0.2.4", 0.0) is Refusal.MAX_CONNECTIONS
    assert len(t) == 5 and 3 not in t and 7 not in t
    snap = t.snapshot()
    assert snap["refused"] == {"max_tcp_connections_per_source": 1, "max_tcp_connections": 1}
    assert (snap["accepted"], snap["opened"], snap["sources"]) == (5, 0, 3)
    t.remove(1)  # frees a place overall and in its source's share
    assert t.admit(8, "192.0.2.1", 1.0) is None
    assert t.admit(9, "192.0.2.5", 1.0) is Refusal.MAX_CONNECTIONS


def test_opened_connections_have_their_own_cap() -> None:
    """A flood of accepted connections never stops the proxy reaching its upstream."""
    t = table()
    for conn in range(5):
        assert t.admit(conn, f"192.0.2.{conn}", 0.0) is None
    for conn in range(10, 15):
        assert t.admit(conn, "198.51.100.1", 0.0, inbound=False) is None  # no per-source cap
    assert t.admit(15, "198.51.100.1", 0.0, inbound=False) is Refusal.MAX_CONNECTIONS
    assert t.snapshot()["opened"] == 5


def test_silent_new_connection_closed_after_the_message_timeout() -> None:
    t = table()
    t.admit(1, "192.0.2.1", 100.0)
    assert t.next_deadline() == 110.0
    assert t.expired(109.9) == []
    assert t.expired(110.0) == [(1, Closing.MESSAGE)]
    assert t.expired(111.0) == []  # reported once, until removed
    t.remove(1)
    assert t.snapshot()["closed"] == {"message_timeout": 1}


def test_slow_message_closed_unless_it_completes_in_time() -> None:
    t = table()
    t.admit(1, "192.0.2.1", 0.0)
    t.received(1, 1.0, pending=0)  # a complete first message: only idleness counts now
    assert t.next_deadline() == 601.0
    t.received(1, 50.0, pending=300)  # a new message starts...
    t.received(1, 59.0, pending=900)  # ...and trickles in: the clock does not restart
    assert t.expired(59.9) == []
    assert t.expired(60.0) == [(1, Closing.MESSAGE)]
    t2 = table()
    t2.admit(2, "192.0.2.1", 0.0)
    t2.received(2, 5.0, pending=10)
    t2.received(2, 9.0, pending=0)  # completed in time
    assert t2.expired(20.0) == []


def test_idle_timeout_counts_bytes_both_ways_and_spares_held_flows() -> None:
    t = table()
    for conn in (1, 2):
        t.admit(conn, "192.0.2.1", 0.0)
        t.received(conn, 1.0, pending=0)
    t.sent(1, 300.0)
    assert t.hold(2, True)
    assert t.expired(601.0) == []
    assert t.expired(900.0) == [(1, Closing.IDLE)]
    assert t.expired(10_000.0) == []  # the registration's flow stays
    assert t.hold(2, False)
    assert t.expired(10_000.0) == [(2, Closing.IDLE)]
    assert not t.hold(99, True)


def test_held_flows_do_not_count_toward_their_source_share() -> None:
    """A NAT in front of many registered phones is not an attack."""
    t = table()
    for conn in (1, 2):
        t.admit(conn, "192.0.2.1", 0.0)
        t.hold(conn, True)
    assert t.admit(3, "192.0.2.1", 0.0) is None
    assert t.admit(4, "192.0.2.1", 0.0) is None
    assert t.admit(5, "192.0.2.1", 0.0) is Refusal.MAX_PER_SOURCE
    t.hold(1, False)  # the binding ended: counts again (no eviction)
    t.remove(1)
    t.remove(2)
    assert t.snapshot()["sources"] == 1
    assert t.admit(6, "192.0.2.1", 0.0) is Refusal.MAX_PER_SOURCE


def test_held_flow_with_a_stalled_message_is_still_closed() -> None:
    t = table()
    t.admit(1, "192.0.2.1", 0.0)
    t.received(1, 1.0, pending=0)
    t.hold(1, True)
    assert t.next_deadline() is None
    t.received(1, 100.0, pending=50)
    assert t.expired(110.0) == [(1, Closing.MESSAGE)]


def test_unknown_connections_are_ignored() -> None:
    t = table()
    t.received(9, 0.0, pending=10)
    t.sent(9, 0.0)
    t.remove(9)
    assert len(t) == 0 and t.next_deadline() is None


@pytest.mark.parametrize(
    ("limit", "expected"), [(64, 16), (1024, 192), (20000, 4936), (1 << 20, 10_000)]
)
def test_auto_max_connections(limit: int, expected: int) -> None:
    assert auto_max_connections(limit) == expected
