"""Which CAs are trusted, and the verdict on a peer's Mini-Certificate.

An MC is valid iff its signature verifies under a trusted CA modulus and it has not
expired (profile §1). The CA modulus that travels with an MC is never trusted because
it is there: trust comes only from the operator's configuration (and a line's own
``Mini Certificate`` param, as on an SPA device).

The sample CA printed in the Linksys administration guide is public, so anyone can
issue MCs under it. It stays usable (labs, interop tests) but every verdict that relies
on it says so, and the CLI and the proxy surface that as a warning.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from proxy.xsipura.mc import CA_MODULUS_LENGTH, MiniCertificate, as_utc
from proxy.xsipura.rsa import PublicKey, Type1Verifier, int_to_bytes

SAMPLE_CA_MODULUS = int(
    "f420bd6985355f9949b94f840599a2dc099ca84f54d4bc44386c28a5a1b218e8"
    "7757284a822e89695b5066df3b3e224834a5bc5d08f707d42a7b756063158240"
    "d6b7df96029c3b1e9c049e071b8c2046810987759757d512874964e1b05f07c0"
    "75ed0c85c6c3d248fb2d597372c4f29364d961371c9d9ef94ee4e38f5deabd8b",
    16,
)
"""The public sample CA from the vendor guide (vectors ``ca.n_hex``). Never secure."""


def is_sample_ca(key: PublicKey) -> bool:
    return key.n == SAMPLE_CA_MODULUS


def ca_fingerprint(key: PublicKey) -> str:
    """SHA-256 hex of the 128-byte CA modulus (what `mc show` prints as ``ca_sha256``)."""
    return hashlib.sha256(int_to_bytes(key.n, CA_MODULUS_LENGTH)).hexdigest()


class McStatus(StrEnum):
    """Outcome of checking an MC; values double as machine-readable reasons."""

    VALID = "valid"
    UNTRUSTED_CA = "untrusted_ca"
    EXPIRED = "expired"


_MESSAGES = {
    McStatus.VALID: "valid",
    McStatus.UNTRUSTED_CA: "not signed by a trusted CA",
    McStatus.EXPIRED: "expired",
}


@dataclass(frozen=True, slots=True)
class McVerdict:
    status: McStatus
    ca: PublicKey | None = None
    """The trusted CA whose signature verified (None when none did)."""

    @property
    def ok(self) -> bool:
        return self.status is McStatus.VALID

    @property
    def sample_ca(self) -> bool:
        """True when the MC is vouched for only by the public sample CA: not secure."""
        return self.ca is not None and is_sample_ca(self.ca)

    @property
    def message(self) -> str:
        return _MESSAGES[self.status]


class CheckedCache:
    """Peer MCs already decoded and checked against a set of anchors, by their bytes.

    A secured call verifies the peer's MC (decode, SHA-1, the CA's RSA signature, the
    CA's fingerprint), and a proxy calls the same few peers (an ITSP's SPA, another
    site) over and over, so the outcome is kept: it is a pure function of the 252 bytes
    and the anchor set (only the expiry depends on the time, and that is judged at every
    use). Bounded in entries (least recently used out first) and in age (an entry older
    than ``max_age`` is checked again), so it holds at most ``max_entries`` x (252 bytes
    + one decoded MC), ~4 MB. A malformed MC raises every time and is never stored.
    """

    def __init__(self, max_entries: int = 4096, max_age: timedelta = timedelta(hours=1)) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.table: OrderedDict[tuple[frozenset[int], bytes], tuple[datetime, _Checked]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def snapshot(self) -> dict[str, int]:
        """For ``/status``."""
        return {"entries": len(self.table), "hits": self.hits, "misses": self.misses}

    def clear(self) -> None:
        self.table.clear()


@dataclass(frozen=True, slots=True)
class _Checked:
    certificate: MiniCertificate
    signer: PublicKey | None


CHECKED_MCS = CheckedCache()
"""One cache for every :class:`TrustStore` (each line has its own store, usually over
the same anchors): the key includes the store's anchor set."""


class TrustStore:
    """A set of trusted CA moduli. Immutable after construction; cheap to share."""

    __slots__ = ("_anchor_set", "_fingerprints", "_keys", "_verifiers")

    def __init__(self, anchors: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[int, PublicKey] = {}
        for anchor in anchors:
            self._keys.setdefault(anchor.n, anchor)
        # Built once: a handshake verifies one MC per side against every anchor.
        self._verifiers = [(key, Type1Verifier(key)) for key in self._keys.values()]
        self._fingerprints = {n: ca_fingerprint(key) for n, key in self._keys.items()}
        self._anchor_set = frozenset(self._keys)
        """The part of :data:`CHECKED_MCS`'s key that names these anchors (a frozenset
        keeps its hash, so a lookup hashes no modulus)."""

    def with_anchor(self, anchor: PublicKey) -> TrustStore:
        return TrustStore([*self._keys.values(), anchor])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, PublicKey) and key.n in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def anchors(self) -> tuple[PublicKey, ...]:
        return tuple(self._keys.values())

    @property
    def includes_sample_ca(self) -> bool:
        return SAMPLE_CA_MODULUS in self._keys

    def signer_of(self, certificate: MiniCertificate) -> PublicKey | None:
        """The trusted CA whose signature the MC carries, if any."""
        digest = certificate.digest
        for key, verifier in self._verifiers:
            if verifier.verify(digest, certificate.signature):
                return key
        return None

    def verify(self, certificate: MiniCertificate, now: datetime) -> McVerdict:
        """Signature first, then expiry (the order the profile lists the checks in)."""
        return self._verdict(certificate, self.signer_of(certificate), now)

    @staticmethod
    def _verdict(
        certificate: MiniCertificate, signer: PublicKey | None, now: datetime
    ) -> McVerdict:
        if signer is None:
            return McVerdict(McStatus.UNTRUSTED_CA)
        if certificate.is_expired(now):
            return McVerdict(McStatus.EXPIRED, signer)
        return McVerdict(McStatus.VALID, signer)

    def check(self, raw: bytes, now: datetime) -> tuple[MiniCertificate, McVerdict]:
        """A peer's MC from its bytes, and the verdict on it at ``now``: what decoding it
        (:meth:`MiniCertificate.decode`, which raises ``MalformedCertificate``) and
        :meth:`verify` give, remembered in :data:`CHECKED_MCS` (a handshake's costliest
        step after the SIP messages themselves)."""
        cache = CHECKED_MCS
        at = as_utc(now)  # naive datetimes are UTC, as for expiry
        key = (self._anchor_set, raw)
        entry = cache.table.get(key)
        if entry is not None and timedelta(0) <= at - entry[0] <= cache.max_age:
            cache.hits += 1
            cache.table.move_to_end(key)
            checked = entry[1]
        else:
            cache.misses += 1
            certificate = MiniCertificate.decode(raw)
            checked = _Checked(certificate, self.signer_of(certificate))
            cache.table[key] = (at, checked)
            cache.table.move_to_end(key)
            if len(cache.table) > cache.max_entries:
                cache.table.popitem(last=False)
        return checked.certificate, self._verdict(checked.certificate, checked.signer, now)

    def fingerprint(self, key: PublicKey) -> str:
        """:func:`ca_fingerprint` of one of the anchors, computed once."""
        known = self._fingerprints.get(key.n)
        return known if known is not None else ca_fingerprint(key)
