"""Shared fixtures: the x-sipura test vectors and a freshly generated test PKI."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `proxy` and `testkit` import from the repo root
    sys.path.insert(0, str(ROOT))

from proxy.xsipura import keyfiles, rsa  # noqa: E402
from proxy.xsipura.mc import MiniCertificateParam  # noqa: E402
from proxy.xsipura.provision import LineCredentials, issue_line  # noqa: E402
from proxy.xsipura.trust import TrustStore  # noqa: E402

# Files the tests write (keys, configs holding inline keys) are private, as an operator's
# are: `run` refuses a private key that group or others can read (proxy/keyperms.py).
# The tests of that refusal loosen the mode explicitly.
os.umask(0o077)

VECTORS_PATH = ROOT / "tests" / "data" / "xsipura_vectors.json"

NOW_UTC = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
"""A wall-clock instant at which every vector and test-PKI MC is valid."""

Party = LineCredentials
"""One subscriber: its MC (``certificate``), private key and provisioning ``param``."""


def load_vectors() -> dict[str, Any]:
    with VECTORS_PATH.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


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


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return load_vectors()


@pytest.fixture(scope="session")
def sample_ca(vectors: dict[str, Any]) -> rsa.PrivateKey:
    return keyfiles.load_ca_private_key(vectors["ca"]["ca_key_file"].encode("ascii"))


@pytest.fixture(scope="session")
def vector_users(vectors: dict[str, Any]) -> dict[str, Party]:
    """joe and jane from the vectors, loaded through their provisioning params."""
    from proxy.xsipura.mc import decode_private_key_param

    users = {}
    for name, user in vectors["users"].items():
        param = MiniCertificateParam.from_base64(user["mini_certificate_param_b64"])
        key = decode_private_key_param(user["srtp_private_key_param_b64"], param.certificate)
        users[name] = Party(param, key)
    return users


@pytest.fixture(scope="module")
def pki() -> Pki:
    """A test CA, a second unrelated CA and two subscribers, generated once per module."""
    return make_pki()
