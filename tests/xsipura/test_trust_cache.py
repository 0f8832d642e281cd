"""TrustStore.check: a peer MC decoded and verified once, its verdict judged at every use."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from proxy.xsipura import trust
from proxy.xsipura.mc import MalformedCertificate, MiniCertificate
from proxy.xsipura.trust import CheckedCache, McStatus, TrustStore, ca_fingerprint

if TYPE_CHECKING:
    from testkit.pki import Pki

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[CheckedCache]:
    fresh = CheckedCache(max_entries=3, max_age=timedelta(minutes=10))
    monkeypatch.setattr(trust, "CHECKED_MCS", fresh)
    yield fresh


def test_check_gives_what_decode_and_verify_give(pki: Pki, cache: CheckedCache) -> None:
    store = TrustStore([pki.ca.public])
    raw = pki.bob.certificate.raw
    for _ in range(3):
        certificate, verdict = store.check(raw, NOW)
        assert certificate == MiniCertificate.decode(raw)
        assert verdict == store.verify(MiniCertificate.decode(raw), NOW)
        assert verdict.status is McStatus.VALID and verdict.ca == pki.ca.public
    assert cache.snapshot() == {"entries": 1, "hits": 2, "misses": 1}
    assert store.fingerprint(pki.ca.public) == ca_fingerprint(pki.ca.public)


def test_expiry_is_judged_at_every_use(pki: Pki, cache: CheckedCache) -> None:
    store = TrustStore([pki.ca.public])
    raw = pki.bob.certificate.raw
    expires = pki.bob.certificate.expires
    assert store.check(raw, expires)[1].status is McStatus.VALID
    later = expires + timedelta(seconds=1)
    assert store.check(raw, later)[1].status is McStatus.EXPIRED
    assert store.check(raw, later.replace(tzinfo=None))[1].status is McStatus.EXPIRED
    assert cache.hits == 2 and cache.misses == 1


def test_verdicts_are_per_anchor_set(pki: Pki, cache: CheckedCache) -> None:
    raw = pki.bob.certificate.raw
    trusted, other = TrustStore([pki.ca.public]), TrustStore([pki.other_ca.public])
    assert trusted.check(raw, NOW)[1].ok
    assert other.check(raw, NOW)[1].status is McStatus.UNTRUSTED_CA
    assert TrustStore([pki.other_ca.public, pki.ca.public]).check(raw, NOW)[1].ok
    assert cache.misses == 3
    # a store over the same anchors (a reload, another line) shares the entry
    assert TrustStore([pki.ca.public]).check(raw, NOW)[1].ok
    assert cache.hits == 1


def test_malformed_mcs_raise_every_time_and_are_not_kept(pki: Pki, cache: CheckedCache) -> None:
    store = TrustStore([pki.ca.public])
    bad = b"\x01" + pki.bob.certificate.raw[1:]  # a control character in the name
    for _ in range(2):
        with pytest.raises(MalformedCertificate):
            store.check(bad, NOW)
    assert cache.snapshot()["entries"] == 0


def test_bounded_in_entries_and_age(pki: Pki, cache: CheckedCache) -> None:
    store = TrustStore([pki.ca.public])
    raws = [
        pki.issue(f"Peer {i}", f"1555000{i:04d}", datetime(2031, 1, 1, tzinfo=UTC)).certificate.raw
        for i in range(4)
    ]
    for raw in raws[:3]:
        store.check(raw, NOW)
    store.check(raws[0], NOW)  # used: the least recently used is now raws[1]
    store.check(raws[3], NOW)
    assert len(cache.table) == 3
    assert {key[1] for key in cache.table} == {raws[0], raws[2], raws[3]}
    misses = cache.misses
    store.check(raws[0], NOW + timedelta(minutes=11))  # older than max_age: checked again
    assert cache.misses == misses + 1
    store.check(raws[0], NOW + timedelta(minutes=12))
    assert cache.misses == misses + 1
    store.check(raws[0], NOW - timedelta(minutes=1))  # the clock went back: checked again
    assert cache.misses == misses + 2
