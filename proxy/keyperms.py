"""Private files: written mode 0600, refused when group or others can read them.

As ssh does with identity files: a private key (a line's SRTP key, a CA key) or the admin
token that anyone on the host can read is as good as published, so ``run`` and
``run --check`` stop with one line naming the file and the fix instead of starting with
it. Every writer of such a file (``mc ca-new``, ``mc issue --out``) goes through
:func:`write_private`, which creates it 0600 and also tightens a file it overwrites.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from proxy.errors import UsageError

__all__ = [
    "TOO_OPEN",
    "KeyPermissionError",
    "check_private_file",
    "holds_private_ca_key",
    "too_open",
    "write_private",
]

TOO_OPEN: Final = 0o077
"""Any group or other permission bit (read, write or execute) makes a key file too open."""


class KeyPermissionError(UsageError):
    """A private file readable (or writable) by group or others: one line, exit 2."""


def too_open(path: str | Path) -> str | None:
    """Why ``path`` is too open to hold a secret, or None when it is fine.

    Following symlinks, as a reader does; a file that cannot be stat'ed is left to the
    reader, which reports it with its own reason."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode) or not mode & TOO_OPEN:
        return None
    return (
        f"{path} has permissions {stat.S_IMODE(mode):04o}: a private key must not be"
        f" accessible by group or others (chmod 600 {path})"
    )


def check_private_file(path: str | Path, what: str) -> None:
    """Raise :class:`KeyPermissionError` when ``path`` has group/other permission bits."""
    reason = too_open(path)
    if reason is not None:
        raise KeyPermissionError(f"{what}: {reason}")


def holds_private_ca_key(data: bytes) -> bool:
    """True for a PEM private key or a Linksys ``ca-key`` (two base64 lines: n and d);
    False for public forms (one line, a PEM public key, a Mini Certificate param)."""
    if b"PRIVATE KEY" in data:
        return True
    if b"-----BEGIN" in data or b"<" in data:
        return False
    lines = [line for line in data.split() if line]
    return len(lines) == 2


def write_private(path: str | Path, data: bytes, *, force: bool) -> None:
    """Create ``path`` mode 0600 with ``data``; an existing file is an error unless
    ``force``, and then it is truncated and its mode tightened to 0600 too."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise UsageError(f"{str(path)!r} exists; use --force to overwrite it") from exc
    except OSError as exc:
        raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)
