"""`sipura-proxy mc`: the gen_mc-compatible CA and Mini-Certificate toolkit.

The command names, flags, output blocks, JSON keys and exit codes are a contract that
provisioning scripts depend on (see README): extend, never rename.

* ``mc ca-new``  new RSA-1024 CA key (Linksys ``ca-key`` or PEM), mode 0600
* ``mc ca-pub``  the public half of a CA key, to distribute as a trust anchor
* ``mc issue``   subscriber key + signed MC, printed exactly like the vendor's gen_mc
* ``mc show``    decode an MC (param, file, or raw hex) and print who it names
* ``mc verify``  check an MC against trusted CAs: exit 0 valid, 1 invalid, 2 bad input
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import re
import string
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.errors import UsageError
from proxy.keyperms import write_private
from proxy.xsipura.keyfiles import (
    CaKeyFormat,
    KeyFileError,
    dump_ca_key,
    dump_ca_public,
    extract_param_text,
    generate_ca_key,
    load_ca_private_key,
    load_trust_anchor,
)
from proxy.xsipura.mc import (
    MC_LENGTH,
    NAME_LENGTH,
    PARAM_LENGTH,
    USER_ID_LENGTH,
    MalformedCertificate,
    MiniCertificate,
    MiniCertificateParam,
    as_utc,
    iso_z,
    strict_b64decode,
)
from proxy.xsipura.provision import issue_line
from proxy.xsipura.rsa import PrivateKey, PublicKey, verify_raw
from proxy.xsipura.trust import (
    SAMPLE_CA_MODULUS,
    McStatus,
    TrustStore,
    ca_fingerprint,
    is_sample_ca,
)

SAMPLE_CA_WARNING = (
    "warning: the public sample CA from the Linksys guide is involved; "
    "anyone can issue MCs under it: not secure"
)
_SAMPLE_CA = PublicKey(SAMPLE_CA_MODULUS)
_PRINTABLE = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


# --- argument parsing -----------------------------------------------------------------------


def add_mc_commands(commands: Any) -> None:
    """Register ``mc`` and its sub-commands on the top-level sub-parser collection."""
    mc = commands.add_parser(
        "mc",
        help="CA and Mini-Certificate tooling (gen_mc compatible)",
        description="Create CA keys, issue, inspect and verify x-sipura Mini Certificates.",
    )
    sub = mc.add_subparsers(dest="mc_command", metavar="MC_COMMAND", parser_class=type(mc))
    sub.required = True

    ca_new = sub.add_parser("ca-new", help="create a new RSA-1024 CA key")
    ca_new.add_argument("--out", required=True, metavar="FILE", help="where to write the key")
    ca_new.add_argument("--format", choices=[f.value for f in CaKeyFormat], default="linksys")
    ca_new.add_argument("--force", action="store_true", help="overwrite an existing file")
    ca_new.set_defaults(handler=cmd_ca_new)

    ca_pub = sub.add_parser("ca-pub", help="print the public half of a CA key (trust anchor)")
    ca_pub.add_argument("--ca", required=True, metavar="FILE")
    ca_pub.add_argument("--format", choices=[f.value for f in CaKeyFormat], default="linksys")
    ca_pub.set_defaults(handler=cmd_ca_pub)

    issue = sub.add_parser("issue", help="issue a subscriber key and Mini Certificate")
    issue.add_argument("--ca", required=True, metavar="FILE", help="CA private key file")
    issue.add_argument("--name", required=True, help=f"display name, 1..{NAME_LENGTH} ASCII")
    issue.add_argument("--user-id", required=True, help=f"user id, 1..{USER_ID_LENGTH} chars")
    expiry = issue.add_mutually_exclusive_group(required=True)
    expiry.add_argument("--expires", metavar="YYYY-MM-DD[THH:MM:SS]", help="expiry, UTC")
    expiry.add_argument("--days", type=int, metavar="N", help="expire N days from now")
    issue.add_argument("--json", action="store_true", help="print one JSON object")
    issue.add_argument(
        "--out", metavar="FILE", help="write to FILE, mode 0600 (it holds the private key)"
    )
    issue.add_argument("--force", action="store_true", help="overwrite an existing --out FILE")
    issue.set_defaults(handler=cmd_issue)

    show = sub.add_parser("show", help="decode a Mini Certificate and print its fields")
    show.add_argument("mc", metavar="MC", help="param (base64), a file holding it, or MC hex")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_show)

    verify = sub.add_parser("verify", help="verify a Mini Certificate against trusted CAs")
    verify.add_argument(
        "--ca",
        required=True,
        action="append",
        metavar="FILE",
        help="trusted CA: Linksys ca-key, PEM key, or a Mini Certificate param (repeatable)",
    )
    verify.add_argument("mc", metavar="MC", help="param (base64), a file holding it, or MC hex")
    verify.add_argument("--at", metavar="ISO8601", help="verify as of this instant (UTC)")
    verify.set_defaults(handler=cmd_verify)


# --- input helpers ---------------------------------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc


def _load_ca_private(path: str) -> PrivateKey:
    try:
        return load_ca_private_key(_read_file(path, "CA key file"))
    except KeyFileError as exc:
        raise UsageError(f"CA key file {path!r}: {exc}") from exc


def _load_anchor(path: str) -> PublicKey:
    try:
        return load_trust_anchor(_read_file(path, "CA file"))
    except KeyFileError as exc:
        raise UsageError(f"CA file {path!r}: {exc}") from exc


def _is_file(argument: str) -> bool:
    try:
        return bool(argument) and Path(argument).is_file()
    except (OSError, ValueError):  # name too long, NUL byte: not a path, so not a file
        return False


_HEX = re.compile(r"[0-9a-fA-F]+")


def _mc_bytes(argument: str) -> bytes:
    """Turn the MC argument (param base64, file holding it, raw MC hex) into bytes.

    Raises UsageError when the input is not an MC in any accepted form (exit 2).
    Returns bytes of any length: a wrong length is a *malformed* MC, judged by callers.
    """
    text = argument
    if _is_file(argument):
        raw = _read_file(argument, "MC file")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise UsageError(f"MC file {argument!r} is not text") from exc
        text = extract_param_text(text) or text
    compact = "".join(text.split())
    if not compact:
        raise UsageError("MC input is empty")
    if _HEX.fullmatch(compact) and len(compact) % 2 == 0:
        return binascii.unhexlify(compact)
    try:
        return strict_b64decode(compact)
    except MalformedCertificate:
        pass
    if os.sep in argument:
        raise UsageError(f"{argument!r} is not a readable file holding a Mini Certificate")
    raise UsageError(
        "not a Mini Certificate in any accepted form "
        "(expected the param in base64, a file holding it, or a 252-byte MC in hex)"
    )


def _parse_mc(data: bytes) -> tuple[MiniCertificate, PublicKey | None]:
    """Raises MalformedCertificate when the decoded bytes are not a valid MC structure."""
    if len(data) == PARAM_LENGTH:
        param = MiniCertificateParam.decode(data)
        return param.certificate, param.ca_key
    if len(data) == MC_LENGTH:
        return MiniCertificate.decode(data), None
    raise MalformedCertificate(
        f"{len(data)} bytes; expected {PARAM_LENGTH} (param) or {MC_LENGTH} (MC)"
    )


def _parse_instant(text: str, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise UsageError(f"{what}: {text!r} is not an ISO 8601 date/time") from exc
    return as_utc(parsed)


def _check_text(value: str, width: int, what: str) -> str:
    if not 1 <= len(value) <= width:
        raise UsageError(f"{what} must be 1..{width} characters, got {len(value)}")
    if not set(value) <= _PRINTABLE:
        raise UsageError(f"{what} must be printable ASCII")
    return value


def _expiry(args: argparse.Namespace, now: datetime) -> datetime:
    if args.days is not None:
        days: int = args.days
        if days < 1:
            raise UsageError("--days must be at least 1")
        try:
            expires = now + timedelta(days=days)
        except OverflowError as exc:
            raise UsageError("--days is out of range") from exc
    else:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}Z?)?", args.expires.strip()):
            raise UsageError(f"--expires: {args.expires!r} is not YYYY-MM-DD[THH:MM:SS]")
        expires = _parse_instant(args.expires, "--expires")
    expires = expires.replace(microsecond=0)
    if not 2000 <= expires.year <= 2099:
        raise UsageError(f"expiry {iso_z(expires)} is outside 2000..2099 (the MC holds YY)")
    if expires <= now:
        raise UsageError(f"expiry {iso_z(expires)} is not in the future")
    return expires


# --- commands --------------------------------------------------------------------------------


def cmd_ca_new(args: argparse.Namespace) -> int:
    fmt = CaKeyFormat(args.format)
    key = generate_ca_key()
    write_private(args.out, dump_ca_key(key, fmt), force=args.force)
    print(f"wrote RSA-1024 CA key ({fmt.value}) to {args.out}")
    print(f"CA SHA-256: {ca_fingerprint(key.public)}")
    return 0


def cmd_ca_pub(args: argparse.Namespace) -> int:
    anchor = _load_anchor(args.ca)
    if is_sample_ca(anchor):
        _warn(SAMPLE_CA_WARNING)
    sys.stdout.write(dump_ca_public(anchor, CaKeyFormat(args.format)).decode("ascii"))
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    name = _check_text(args.name, NAME_LENGTH, "--name")
    user_id = _check_text(args.user_id, USER_ID_LENGTH, "--user-id")
    expires = _expiry(args, datetime.now(UTC))
    ca_key = _load_ca_private(args.ca)
    if is_sample_ca(ca_key.public):
        _warn(SAMPLE_CA_WARNING)
    line = issue_line(ca_key, name, user_id, expires)
    if args.json:
        certificate = line.certificate
        output = (
            json.dumps(
                {
                    "mini_certificate": line.mini_certificate,
                    "srtp_private_key": line.srtp_private_key,
                    "name": certificate.name,
                    "user_id": certificate.user_id,
                    "expires": iso_z(certificate.expires),
                    "key_sha256": certificate.key_sha256,
                    "ca_sha256": line.param.ca_sha256,
                }
            )
            + "\n"
        )
    else:
        output = line.gen_mc_text()  # byte for byte what gen_mc prints
    if args.out:
        write_private(args.out, output.encode("ascii"), force=args.force)
        print(f"wrote the Mini Certificate and its private key to {args.out} (mode 0600)")
    else:
        sys.stdout.write(output)
    return 0


def _describe(argument: str) -> dict[str, Any]:
    data = _mc_bytes(argument)
    try:
        certificate, ca_key = _parse_mc(data)
    except MalformedCertificate as exc:
        raise UsageError(f"malformed Mini Certificate: {exc}") from exc
    sample = (ca_key is not None and is_sample_ca(ca_key)) or verify_raw(
        _SAMPLE_CA, certificate.digest, certificate.signature
    )
    return {
        "name": certificate.name,
        "user_id": certificate.user_id,
        "expires": iso_z(certificate.expires),
        "key_sha256": certificate.key_sha256,
        "ca_sha256": None if ca_key is None else ca_fingerprint(ca_key),
        "sample_ca": sample,
        "expired": certificate.is_expired(datetime.now(UTC)),
        "ca_signature_valid": (
            None
            if ca_key is None
            else verify_raw(ca_key, certificate.digest, certificate.signature)
        ),
    }


def cmd_show(args: argparse.Namespace) -> int:
    info = _describe(args.mc)
    if info["sample_ca"]:
        _warn(SAMPLE_CA_WARNING)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"Name:        {info['name']}")
    print(f"User ID:     {info['user_id']}")
    print(f"Expires:     {info['expires']}{'  (EXPIRED)' if info['expired'] else ''}")
    print(f"Key SHA-256: {info['key_sha256']}")
    if info["ca_sha256"] is None:
        print("CA SHA-256:  (no CA appended: raw MC)")
    else:
        signed = "signature verifies" if info["ca_signature_valid"] else "SIGNATURE INVALID"
        print(f"CA SHA-256:  {info['ca_sha256']}  ({signed})")
    if info["sample_ca"]:
        print("Sample CA:   yes - the public sample CA from the vendor guide: NOT SECURE")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    at = datetime.now(UTC) if args.at is None else _parse_instant(args.at, "--at")
    trust = TrustStore(_load_anchor(path) for path in args.ca)
    data = _mc_bytes(args.mc)
    try:
        certificate, _ = _parse_mc(data)  # the appended CA is never trusted by itself
    except MalformedCertificate as exc:
        print(f"invalid: malformed ({exc})", file=sys.stderr)
        return 1
    verdict = trust.verify(certificate, at)
    if verdict.status is not McStatus.VALID:
        detail = f" on {iso_z(certificate.expires)}" if verdict.status is McStatus.EXPIRED else ""
        print(f"invalid: {verdict.message}{detail}", file=sys.stderr)
        return 1
    if verdict.sample_ca:
        _warn(SAMPLE_CA_WARNING)
    assert verdict.ca is not None  # VALID always names the CA that signed
    print(
        f"valid: {certificate.name} <{certificate.user_id}>, "
        f"expires {iso_z(certificate.expires)}, CA SHA-256 {ca_fingerprint(verdict.ca)}"
    )
    return 0
