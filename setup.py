"""The one compiled part: proxy.media._fastrelay, the relay's per-packet path (csrc/).

Everything else is in pyproject.toml. The extension needs a C compiler, Python's headers,
libsrtp2 (Debian: libsrtp2-dev) and OpenSSL's libcrypto (libssl-dev). It is optional: if
it does not build, the install goes on without it and the relay runs its Python packet
path (``[media] fast_path = "auto"``; proxy/media/packet_path.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def pkg_config(*args: str) -> list[str]:
    """Flags for libsrtp2 and libcrypto from pkg-config, if it knows them."""
    if shutil.which("pkg-config") is None:
        return []
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libsrtp2", "libcrypto"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


class OptionalBuildExt(build_ext):
    """A failed build of the extension (no compiler, no libsrtp2) is a warning, never a
    failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # whatever went wrong: install without it
            self._skipped(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skipped(exc)

    def _skipped(self, exc: Exception) -> None:
        print(
            f"warning: the compiled packet path (proxy.media._fastrelay) was not built: {exc}; "
            "the media relay will run its Python packet path",
            file=sys.stderr,
        )


FASTRELAY = Extension(
    "proxy.media._fastrelay",
    sources=[
        "csrc/module.c",
        "csrc/relay.c",
        "csrc/packets.c",
        "csrc/leg.c",
        "csrc/srtp_type.c",
        "csrc/tone.c",
        "csrc/rules.c",
        "csrc/fastcrypto.c",
    ],
    depends=["csrc/fastrelay.h", "csrc/rules.h", "csrc/fastcrypto.h"],
    libraries=["srtp2", "crypto"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", *pkg_config("--cflags")],
    extra_link_args=pkg_config("--libs-only-L"),
    optional=True,
)

setup(ext_modules=[FASTRELAY], cmdclass={"build_ext": OptionalBuildExt})
