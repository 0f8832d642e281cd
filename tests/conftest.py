"""Shared fixtures: the x-sipura test vectors and a freshly generated test PKI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `proxy` and `testkit` import from the repo root
    sys.path.insert(0, str(ROOT))

from proxy.xsipura import keyfiles, rsa  # noqa: E402
from proxy.xsipura.mc import MiniCertificateParam  # noqa: E402
from testkit.pki import Party, Pki, make_pki  # noqa: E402

# Files the tests write (keys, configs holding inline keys) are private, as an operator's
# are: `run` refuses a private key that group or others can read (proxy/keyperms.py).
# The tests of that refusal loosen the mode explicitly.
os.umask(0o077)

VECTORS_PATH = ROOT / "tests" / "data" / "xsipura_vectors.json"


def load_vectors() -> dict[str, Any]:
    with VECTORS_PATH.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


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
