"""The shared log rate limiter: one line per (reason, source) per interval, counts kept."""

from __future__ import annotations

import logging

import pytest

from proxy.ratelimit import OVERFLOW_SOURCE, LogLimiter, RateLimiter, Suppressed


def test_first_event_passes_then_counted_until_the_interval_ends() -> None:
    limiter = RateLimiter(interval_s=10, max_keys=8)
    assert limiter.allow("malformed", "192.0.2.1", 0.0) == 0
    assert [limiter.allow("malformed", "192.0.2.1", t) for t in (1.0, 2.0, 9.9)] == [None] * 3
    assert limiter.allow("malformed", "192.0.2.1", 10.0) == 3  # carries what it held back
    assert limiter.allow("malformed", "192.0.2.1", 10.5) is None
    assert limiter.suppressed_total == 4


def test_keys_are_independent() -> None:
    limiter = RateLimiter(interval_s=10)
    assert limiter.allow("malformed", "a", 0.0) == 0
    assert limiter.allow("malformed", "b", 0.0) == 0
    assert limiter.allow("wrong_source", "a", 0.0) == 0
    assert limiter.allow("malformed", "a", 0.1) is None


def test_expired_reports_counts_no_later_event_carried() -> None:
    limiter = RateLimiter(interval_s=10)
    limiter.allow("malformed", "a", 0.0)
    limiter.allow("malformed", "a", 1.0)
    limiter.allow("malformed", "a", 2.0)
    limiter.allow("quiet", "b", 5.0)
    assert limiter.expired(9.0) == []
    assert limiter.expired(12.0) == [Suppressed("malformed", "a", 2)]
    assert limiter.expired(20.0) == []  # "quiet" held nothing back: closed silently
    assert len(limiter) == 0
    assert limiter.allow("malformed", "a", 21.0) == 0  # a fresh window


def test_memory_is_bounded_under_a_spoofed_source_flood() -> None:
    limiter = RateLimiter(interval_s=10, max_keys=100)
    let_through = sum(
        limiter.allow("malformed", f"10.{i >> 8 & 255}.{i & 255}.1", 1.0) is not None
        for i in range(10_000)
    )
    assert len(limiter) <= 101
    # 100 keys of their own, then one line for the whole overflow bucket.
    assert let_through == 101
    assert limiter.allow("malformed", "another", 2.0) is None
    # Once the quiet windows expired there is room again: a key of its own.
    assert limiter.allow("malformed", "another", 11.0) == 0
    # The bucket's count is not lost: 9,899 flood events plus the one at t=2.
    assert Suppressed("malformed", OVERFLOW_SOURCE, 9_900) in limiter.expired(30.0)


def test_full_table_reuses_room_of_expired_quiet_windows() -> None:
    limiter = RateLimiter(interval_s=10, max_keys=2)
    limiter.allow("r", "a", 0.0)
    limiter.allow("r", "b", 0.0)
    assert limiter.allow("r", "c", 1.0) == 0  # bucket "*" takes it
    assert ("r", OVERFLOW_SOURCE) in limiter._windows
    assert limiter.allow("r", "d", 20.0) == 0
    assert ("r", "d") in limiter._windows


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(interval_s=0)
    with pytest.raises(ValueError):
        RateLimiter(max_keys=0)


def test_log_limiter_annotates_and_flushes(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("sipura.test.ratelimit")
    limited = LogLimiter(logger, interval_s=5)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for i in range(50):
            limited.log(logging.INFO, "malformed", "198.51.100.7", i * 0.01, "bad from %s", "x")
        limited.log(logging.INFO, "malformed", "198.51.100.7", 6.0, "bad from %s", "y")
        limited.log(logging.INFO, "malformed", "198.51.100.7", 6.1, "bad from %s", "z")
        limited.flush(20.0)
    texts = [r.getMessage() for r in caplog.records]
    assert texts == [
        "bad from x",
        "bad from y (49 similar suppressed)",
        "1 more malformed from 198.51.100.7 suppressed in the last 5 s",
    ]


def test_next_expiry_is_when_expired_closes_the_oldest_window() -> None:
    limiter = RateLimiter(interval_s=10.0)
    assert limiter.next_expiry() is None
    limiter.allow("malformed", "a", 1000.1)
    limiter.allow("malformed", "a", 1001.0)  # held back
    limiter.allow("malformed", "b", 1003.3)
    when = limiter.next_expiry()
    assert when == 1010.1
    assert limiter.expired(when) == [Suppressed("malformed", "a", 1)]  # exactly at it
    assert limiter.next_expiry() == 1013.3
