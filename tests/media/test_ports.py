"""RTP/RTCP port pair allocation (proxy.media.ports)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.media.ports import PortAllocator, PortsExhausted


def test_even_rtp_ports_with_rtcp_in_range() -> None:
    ports = PortAllocator(10001, 10010)  # odd start rounds up; 10010 has no RTCP port
    assert ports.capacity == 4
    got = [ports.allocate() for _ in range(4)]
    assert got == [10002, 10004, 10006, 10008]
    assert all(p % 2 == 0 and p + 1 <= 10010 for p in got)
    with pytest.raises(PortsExhausted):
        ports.allocate()


def test_release_returns_to_the_back_of_the_queue() -> None:
    ports = PortAllocator(20000, 20005)
    a, b, c = ports.allocate(), ports.allocate(), ports.allocate()
    assert ports.available == 0
    ports.release(b)
    ports.release(a)
    assert ports.allocate() == b
    assert ports.allocate() == a
    ports.release(c)
    assert ports.allocate() == c


def test_double_and_foreign_release_are_harmless() -> None:
    ports = PortAllocator(20000, 20003)
    a = ports.allocate()
    ports.release(a)
    ports.release(a)
    ports.release(12345)
    ports.release(20001)
    assert ports.available == ports.capacity == 2
    assert sorted([ports.allocate(), ports.allocate()]) == [20000, 20002]
    with pytest.raises(PortsExhausted):
        ports.allocate()


def test_skipping_a_port_that_fails_to_bind() -> None:
    ports = PortAllocator(20000, 20005)
    bad = ports.allocate()  # say bind() failed: keep it while allocating another
    good = ports.allocate()
    ports.release(bad)
    assert good != bad
    assert ports.available == 2


@pytest.mark.parametrize(("low", "high"), [(0, 100), (100, 99), (5000, 5000), (65535, 65535)])
def test_bad_ranges(low: int, high: int) -> None:
    with pytest.raises(ValueError):
        PortAllocator(low, high)


def test_smallest_range_and_top_of_port_space() -> None:
    ports = PortAllocator(65534, 65535)
    assert ports.allocate() == 65534
    with pytest.raises(PortsExhausted):
        ports.allocate()
    assert "0/1 free" in repr(ports)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=80))
def test_allocated_ports_are_unique(ops: list[tuple[bool, int]]) -> None:
    ports = PortAllocator(30000, 30019)
    held: list[int] = []
    for allocate, pick in ops:
        if allocate:
            try:
                port = ports.allocate()
            except PortsExhausted:
                assert len(held) == ports.capacity
                continue
            assert port not in held
            held.append(port)
        elif held:
            ports.release(held.pop(pick % len(held)))
        assert ports.available + len(held) == ports.capacity
