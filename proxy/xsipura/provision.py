"""Provisioning a line: a fresh RSA-512 key and the MC a CA signs for it (profile §1).

Every producer of line credentials goes through :func:`issue_line`: ``mc issue``, the
demo's two sites, the tests' and the bench's PKIs. What comes out is what an SPA's web
page and the proxy's ``[[line]]`` take: the ``Mini Certificate`` param (the MC followed
by the CA modulus, the line's trust anchor) and the ``SRTP Private Key`` param. The key
file is written by :func:`proxy.keyperms.write_private`: mode 0600 from its creation on
(never readable by others, not even between a create and a chmod), because it holds the
line's private exponent.

No clock is read here: the caller passes the expiry, so tests can pin it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from proxy.keyperms import write_private
from proxy.xsipura.mc import (
    MiniCertificate,
    MiniCertificateParam,
    decode_private_key_param,
    encode_private_key_param,
)
from proxy.xsipura.rsa import PrivateKey, generate_subscriber_key


@dataclass(frozen=True)
class LineFiles:
    """Where :meth:`LineCredentials.write_files` put a line's two params."""

    mini_certificate: Path
    srtp_private_key: Path


@dataclass(frozen=True)
class LineCredentials:
    """A line's MC (with its CA) and private key, plus their provisioning-param forms."""

    param: MiniCertificateParam
    key: PrivateKey = field(repr=False)

    @classmethod
    def from_params(cls, mini_certificate: str, srtp_private_key: str) -> LineCredentials:
        """Back from the two params (``mc issue --json``, a provisioning file). Raises
        ``MalformedCertificate`` when they do not decode or the key is not the MC's."""
        param = MiniCertificateParam.from_base64(mini_certificate)
        return cls(param, decode_private_key_param(srtp_private_key, param.certificate))

    @property
    def certificate(self) -> MiniCertificate:
        return self.param.certificate

    @property
    def mini_certificate(self) -> str:
        """The ``Mini Certificate`` param: base64(MC ‖ CA modulus), one line."""
        return self.param.to_base64()

    @property
    def srtp_private_key(self) -> str:
        """The ``SRTP Private Key`` param: base64(d), leading zero bytes stripped."""
        return encode_private_key_param(self.key)

    def gen_mc_text(self) -> str:
        """Both params exactly as the vendor's ``gen_mc`` prints them."""
        return (
            f"\n<Mini Certificate>\n{self.mini_certificate}\n"
            f"\n<SRTP Private Key>\n{self.srtp_private_key}\n\n"
        )

    def write_files(self, directory: Path, stem: str | None = None) -> LineFiles:
        """``STEM.mc`` (the MC param) and ``STEM.key`` (the private key param, mode 0600)
        in ``directory``; ``STEM`` defaults to the user id. Both end in a newline and
        work as ``@path`` values of ``mini_certificate`` / ``srtp_private_key``."""
        stem = stem or self.certificate.user_id
        files = LineFiles(directory / f"{stem}.mc", directory / f"{stem}.key")
        files.mini_certificate.write_text(self.mini_certificate + "\n", encoding="ascii")
        write_private(files.srtp_private_key, (self.srtp_private_key + "\n").encode(), force=True)
        return files


def issue_line(
    ca: PrivateKey,
    name: str,
    user_id: str,
    expires: datetime,
    key: PrivateKey | None = None,
) -> LineCredentials:
    """Sign an MC for ``user_id`` under ``ca``: with a fresh RSA-512 key (~10 ms), or
    with ``key`` when the caller needs one it already has (re-issue, tests).

    Raises ``MalformedCertificate`` for a name or user id the MC cannot hold."""
    key = key or generate_subscriber_key()
    certificate = MiniCertificate.issue(ca, name, user_id, expires, key.public)
    return LineCredentials(MiniCertificateParam(certificate, ca.public), key)
