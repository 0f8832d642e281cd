"""A throwaway CA for tests and benches, and its lines' credentials.

Issuing goes through :func:`proxy.xsipura.provision.issue_line`, the code behind
``mc issue``; this adds what harnesses repeat: an expiry some days ahead, the CA's key
and public files, a trust store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy.keyperms import write_private
from proxy.xsipura import keyfiles, rsa
from proxy.xsipura.keyfiles import (
    CaKeyFormat,
    dump_ca_key,
    dump_ca_public,
    generate_ca_key,
    load_ca_private_key,
)
from proxy.xsipura.provision import LineCredentials, issue_line
from proxy.xsipura.rsa import PrivateKey
from proxy.xsipura.trust import TrustStore


def days_ahead(days: int) -> datetime:
    """Now + ``days``, UTC, whole seconds (what an MC can hold)."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


@dataclass(frozen=True)
class TestCa:
    """An RSA-1024 CA key (fresh unless given) that issues lines' MCs."""

    __test__ = False  # not a pytest class

    key: PrivateKey = field(default_factory=generate_ca_key, repr=False)

    @classmethod
    def load(cls, path: Path) -> TestCa:
        """A CA from a key file (Linksys ``ca-key`` or PEM), e.g. one another
        implementation wrote."""
        return cls(load_ca_private_key(path.read_bytes()))

    @property
    def trust(self) -> TrustStore:
        return TrustStore([self.key.public])

    def issue(
        self, name: str, user_id: str, *, days: int = 30, expires: datetime | None = None,
        key: PrivateKey | None = None,
    ) -> LineCredentials:  # fmt: skip
        """A line's MC (valid ``days`` from now, or until ``expires``) and key."""
        return issue_line(self.key, name, user_id, expires or days_ahead(days), key)

    def write_key(self, path: Path, fmt: CaKeyFormat = CaKeyFormat.LINKSYS) -> Path:
        """The CA private key file (mode 0600), as ``mc ca-new`` writes it."""
        write_private(path, dump_ca_key(self.key, fmt), force=True)
        return path

    def write_public(self, path: Path, fmt: CaKeyFormat = CaKeyFormat.LINKSYS) -> Path:
        """The trust anchor file, as ``mc ca-pub`` writes it (``[xsipura] trusted_ca``)."""
        path.write_bytes(dump_ca_public(self.key.public, fmt))
        return path


# --- an in-memory subscriber PKI for the unit tests ---------------------------------

NOW_UTC = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
"""A wall-clock instant at which every vector and test-PKI MC is valid."""

Party = LineCredentials
"""One subscriber: its MC (``certificate``), private key and provisioning ``param``."""


@dataclass(frozen=True)
class Pki:
    ca: rsa.PrivateKey
    other_ca: rsa.PrivateKey
    alice: Party
    bob: Party
    trust: TrustStore

    def issue(
        self,
        name: str,
        user_id: str,
        expires: datetime,
        key: rsa.PrivateKey | None = None,
        ca: rsa.PrivateKey | None = None,
    ) -> Party:
        return issue_line(ca or self.ca, name, user_id, expires, key)


def make_pki() -> Pki:
    ca = keyfiles.generate_ca_key()
    other_ca = keyfiles.generate_ca_key()
    alice = issue_line(ca, "Alice Caller", "15550001111", datetime(2031, 1, 1, tzinfo=UTC))
    bob = issue_line(ca, "Bob Callee", "15550002222", datetime(2032, 2, 2, 2, 2, 2, tzinfo=UTC))
    return Pki(ca, other_ca, alice, bob, TrustStore([ca.public]))
