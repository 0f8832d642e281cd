#!/usr/bin/env python3
"""Per-packet SRTP cost of the system libsrtp2: its own crypto backend against the
kept-state AES-CM / HMAC-SHA1 the compiled packet path installs (csrc/fastcrypto.c).

Usage: ``python bench/srtp_crypto.py [--packets N] [--rounds R]``. Builds
``bench/srtp_crypto.c`` with gcc (needs libsrtp2-dev and libssl-dev) into a temp dir and
runs it R times per variant, interleaved; prints the medians (µs per 172-byte packet,
protect then unprotect, one process, no sockets). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(where: Path) -> Path:
    exe = where / "srtp_crypto"
    subprocess.run(
        ["gcc", "-O2", f"-I{ROOT / 'csrc'}", str(ROOT / "bench" / "srtp_crypto.c"),
         str(ROOT / "csrc" / "fastcrypto.c"), "-lsrtp2", "-lcrypto", "-o", str(exe)],
        check=True,
    )  # fmt: skip
    return exe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = build(Path(tmp))
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"cannot build bench/srtp_crypto.c: {exc}", file=sys.stderr)
            return 2
        runs: dict[str, list[dict[str, float]]] = {"libsrtp": [], "kept": []}
        for _ in range(args.rounds):
            for variant in runs:
                out = subprocess.run(
                    [str(exe), variant, str(args.packets)], capture_output=True, text=True
                )
                if out.returncode:
                    print(f"{variant}: failed ({out.stderr.strip()})", file=sys.stderr)
                    return 2
                runs[variant].append(json.loads(out.stdout))
    print(f"machine: {platform.processor() or platform.machine()}, {platform.platform()}, "
          f"{runs['kept'][0].get('libsrtp')}")  # fmt: skip
    for variant, results in runs.items():
        protect = statistics.median(r["protect_us"] for r in results)
        unprotect = statistics.median(r["unprotect_us"] for r in results)
        print(f"{variant:>8}: protect {protect:.2f} µs, unprotect {unprotect:.2f} µs per packet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
