#!/usr/bin/env python3
"""Crypto costs on this machine: SRTP per packet, MC verification, handshakes, keygen.

Usage (from the repo root; works from a checkout without installing)::

    python bench/crypto.py            # full run: N = 50 000 packets x 7 rounds
    python bench/crypto.py --quick    # N = 10 000 x 3 rounds, shorter timed loops
    python bench/crypto.py --json     # one JSON object instead of the table

Method
------
* SRTP (AES_CM_128_HMAC_SHA1_80, one 30-byte key): N G.711 RTP packets of 172 bytes
  (12-byte header + 160-byte payload) are pre-built with increasing sequence numbers and
  timestamps, so libsrtp's replay protection never fires. Each measurement is one timed
  loop (``time.perf_counter_ns``, GC disabled) over the N packets through a *fresh*
  context: a libsrtp session keeps the indexes it has seen, so reusing one across rounds
  would make every packet a replay. For unprotect, the N packets are protected once by a
  separate sender and each round decrypts them on a fresh receiving context.
  Variants: ``bare`` = ``pylibsrtp.Session`` (Policy ``ssrc_any_outbound`` /
  ``ssrc_any_inbound``); ``wrapper`` = the project's ``SrtpContext.protect`` /
  ``unprotect``; ``bound`` = the bound libsrtp method the wrapper holds (its private
  ``_protect`` / ``_unprotect``), i.e. the wrapper minus its own Python frame and
  ``try``. ``bound`` vs ``bare`` is the noise floor; ``wrapper`` vs ``bound`` is what the
  wrapper costs. The variants are interleaved (bare, wrapper, bound, bare, ...) over the
  rounds and each figure is the median, because the machine is shared and noisy.
  Target: wrapper at most 1.3x bare, per direction.
* Rates (MC verifications, complete handshakes): each round calls the operation until
  a time budget is spent; the figure is the median rate over the rounds, again with the
  variants interleaved.
* MC verification: ``TrustStore.verify`` of a valid MC against a store holding 1 CA,
  and 4 CAs with the signer last (the store tries the CAs in order). The 3 other CAs are
  drawn so that each costs a full RSA public operation (the worst case; see
  ``costly_decoy_cas``).
* Handshake: a fresh ``CallerHandshake`` and ``CalleeHandshake`` (test users under a
  generated CA) run Hello, Callee Hello, Final, Callee Final in memory until both
  report ``Secured`` with the same keys. Includes both MC verifications, two RSA-512
  encryptions and two CRT decryptions, base64 and the state machines.
* Subscriber key generation (``rsa.generate_subscriber_key``, pure Python): a few
  samples; the rate is samples / total time (the prime search makes single runs vary).

It is a benchmark, not a test: the exit code is 0 whatever the figures are.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("proxy") is None:
    sys.path.insert(0, str(REPO_ROOT))

import pylibsrtp  # noqa: E402

from proxy.media.srtp import SrtpContext, libsrtp_key  # noqa: E402
from proxy.xsipura import keyfiles, rsa  # noqa: E402
from proxy.xsipura.handshake import CalleeHandshake, CallerHandshake, Secured  # noqa: E402
from proxy.xsipura.mc import MiniCertificate  # noqa: E402
from proxy.xsipura.provision import issue_line  # noqa: E402
from proxy.xsipura.trust import TrustStore  # noqa: E402

TARGET_RATIO = 1.3
MASTER_KEY = bytes(range(16))
MASTER_SALT = bytes(range(16, 32))
SENDER_SSRC = 0x51505152
PAYLOAD = b"\xd5" * 160  # G.711 A-law silence, 20 ms at 8 kHz

PacketFn = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Settings:
    packets: int
    rounds: int
    rate_seconds: float
    rate_rounds: int
    keygen_samples: int


FULL = Settings(packets=50_000, rounds=7, rate_seconds=1.0, rate_rounds=5, keygen_samples=20)
QUICK = Settings(packets=10_000, rounds=3, rate_seconds=0.3, rate_rounds=3, keygen_samples=5)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "pylibsrtp": package_version("pylibsrtp"),
        "cryptography": package_version("cryptography"),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --------------------------------------------------------------------------- helpers


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each variant once per round, in turn, and return the median per variant."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second: call ``operation`` until ``seconds`` have elapsed."""
    count = 0
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    now = start
    while now < deadline:
        operation()
        count += 1
        now = time.perf_counter_ns()
    return count * 1e9 / (now - start)


# --------------------------------------------------------------------------- SRTP


def rtp_packets(count: int) -> list[bytes]:
    """V=2, PT=0 (PCMU) packets with sequence numbers 0.. and timestamps step 160."""
    return [
        struct.pack("!BBHII", 0x80, 0x00, i & 0xFFFF, (i * 160) & 0xFFFFFFFF, SENDER_SSRC) + PAYLOAD
        for i in range(count)
    ]


def bare_session(ssrc_type: int) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(
        key=libsrtp_key(MASTER_KEY, MASTER_SALT),
        ssrc_type=ssrc_type,
        srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    )
    return pylibsrtp.Session(policy=policy)


def wrapper_context() -> SrtpContext:
    return SrtpContext(MASTER_KEY, MASTER_SALT)


PROTECT_VARIANTS: dict[str, Callable[[], PacketFn]] = {
    "bare": lambda: bare_session(pylibsrtp.Policy.SSRC_ANY_OUTBOUND).protect,
    "wrapper": lambda: wrapper_context().protect,
    "bound": lambda: wrapper_context()._protect,
}
UNPROTECT_VARIANTS: dict[str, Callable[[], PacketFn]] = {
    "bare": lambda: bare_session(pylibsrtp.Policy.SSRC_ANY_INBOUND).unprotect,
    "wrapper": lambda: wrapper_context().unprotect,
    "bound": lambda: wrapper_context()._unprotect,
}


def time_loop(process: PacketFn, packets: list[bytes]) -> float:
    """Microseconds per packet for one pass of ``process`` over ``packets``."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for packet in packets:
            process(packet)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(packets) / 1000


def check_variants(
    protect: dict[str, Callable[[], PacketFn]],
    unprotect: dict[str, Callable[[], PacketFn]],
    rtp: list[bytes],
    srtp: list[bytes],
) -> None:
    """Every variant must produce the same bytes, or the comparison is meaningless."""
    for name, factory in protect.items():
        if factory()(rtp[0]) != srtp[0]:
            raise RuntimeError(f"protect variant {name!r} disagrees with bare libsrtp")
    for name, factory in unprotect.items():
        if factory()(srtp[0]) != rtp[0]:
            raise RuntimeError(f"unprotect variant {name!r} does not round-trip")


def direction_figures(
    variants: dict[str, Callable[[], PacketFn]], packets: list[bytes], rounds: int
) -> dict[str, Any]:
    for factory in variants.values():  # warm-up: first-call and allocator effects
        time_loop(factory(), packets[:1000])
    medians = interleaved(
        {name: (lambda f=factory: time_loop(f(), packets)) for name, factory in variants.items()},
        rounds,
    )
    ratio = medians["wrapper"] / medians["bare"]
    return {
        **{name: round(value, 3) for name, value in medians.items()},
        "ratio": round(ratio, 3),
        "bound_ratio": round(medians["bound"] / medians["bare"], 3),
        "pass": ratio <= TARGET_RATIO,
    }


def bench_srtp(settings: Settings) -> dict[str, Any]:
    rtp = rtp_packets(settings.packets)
    sender = bare_session(pylibsrtp.Policy.SSRC_ANY_OUTBOUND).protect
    srtp = [sender(packet) for packet in rtp]
    check_variants(PROTECT_VARIANTS, UNPROTECT_VARIANTS, rtp, srtp)
    return {
        "packet_bytes": len(rtp[0]),
        "packets": settings.packets,
        "rounds": settings.rounds,
        "target_ratio": TARGET_RATIO,
        "protect_us": direction_figures(PROTECT_VARIANTS, rtp, settings.rounds),
        "unprotect_us": direction_figures(UNPROTECT_VARIANTS, srtp, settings.rounds),
    }


# --------------------------------------------------------------------------- x-sipura


@dataclass(frozen=True)
class User:
    key: rsa.PrivateKey
    certificate: MiniCertificate


@dataclass(frozen=True)
class Pki:
    ca: rsa.PrivateKey
    other_cas: tuple[rsa.PublicKey, ...]
    caller: User
    callee: User


def make_user(ca: rsa.PrivateKey, name: str, user_id: str) -> User:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)
    line = issue_line(ca, name, user_id, expires)
    return User(line.key, line.certificate)


def costly_decoy_cas(signature: bytes, count: int) -> tuple[rsa.PublicKey, ...]:
    """Other CAs that each cost a full public operation on ``signature``.

    ``verify_raw`` rejects a signature that is not below the modulus without any RSA
    work, and a random CA modulus is below a given signature fairly often, which would
    make the "4 CAs" figure depend on the keys drawn. Only moduli above it are kept.
    """
    value = rsa.bytes_to_int(signature)
    decoys: list[rsa.PublicKey] = []
    while len(decoys) < count:
        key = keyfiles.generate_ca_key().public
        if key.n > value:
            decoys.append(key)
    return tuple(decoys)


def make_pki() -> Pki:
    ca = keyfiles.generate_ca_key()
    caller = make_user(ca, "Bench Caller", "1001")
    return Pki(
        ca=ca,
        other_cas=costly_decoy_cas(caller.certificate.signature, 3),
        caller=caller,
        callee=make_user(ca, "Bench Callee", "1002"),
    )


def bench_mc_verify(pki: Pki, settings: Settings) -> dict[str, float]:
    now = datetime.now(UTC)
    certificate = pki.caller.certificate
    stores = {
        "1_ca": TrustStore([pki.ca.public]),
        "4_cas_signer_last": TrustStore([*pki.other_cas, pki.ca.public]),
    }
    for name, store in stores.items():
        if not store.verify(certificate, now).ok:
            raise RuntimeError(f"MC does not verify against store {name!r}")
    measures = {
        name: (lambda s=store: rate(lambda: s.verify(certificate, now), settings.rate_seconds))
        for name, store in stores.items()
    }
    return {
        name: round(value, 1) for name, value in interleaved(measures, settings.rate_rounds).items()
    }


def secured(events: list[Any]) -> Secured:
    for event in events:
        if isinstance(event, Secured):
            return event
    raise RuntimeError(f"handshake did not secure: {events!r}")


def handshake(pki: Pki, trust: TrustStore, now_utc: datetime) -> None:
    """One complete stage 2 in memory; raises unless both sides secure with one key."""
    caller = CallerHandshake(
        certificate=pki.caller.certificate,
        trust=trust,
        dialled_user_id=pki.callee.certificate.user_id,
        local_ssrc=0x1111,
    )
    callee = CalleeHandshake(
        certificate=pki.callee.certificate,
        private_key=pki.callee.key,
        trust=trust,
        local_ssrc=0x2222,
    )
    (hello,) = caller.start(0.0)
    callee_hello = callee.receive_request(hello.body, 0.0, now_utc)[0]
    final = caller.receive_response(200, callee_hello.body, 0.0, now_utc)[-1]
    callee_final, *callee_done = callee.receive_request(final.body, 0.0, now_utc)
    caller_done = caller.receive_response(200, callee_final.body, 0.0, now_utc)
    if secured(caller_done).session.keys != secured(callee_done).session.keys:
        raise RuntimeError("caller and callee derived different SRTP keys")


def bench_handshakes(pki: Pki, settings: Settings) -> float:
    trust = TrustStore([pki.ca.public])
    now_utc = datetime.now(UTC)
    handshake(pki, trust, now_utc)  # correctness and warm-up
    measure = {
        "handshake": lambda: rate(lambda: handshake(pki, trust, now_utc), settings.rate_seconds)
    }
    return interleaved(measure, settings.rate_rounds)["handshake"]


def bench_keygen(samples: int) -> dict[str, float]:
    times_ms = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        rsa.generate_subscriber_key()
        times_ms.append((time.perf_counter_ns() - start) / 1e6)
    return {
        "per_s": round(1000 * samples / sum(times_ms), 2),
        "median_ms": round(statistics.median(times_ms), 2),
        "min_ms": round(min(times_ms), 2),
        "max_ms": round(max(times_ms), 2),
        "samples": samples,
    }


# --------------------------------------------------------------------------- report


def run(settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_info()}
    results["srtp"] = bench_srtp(settings)
    pki = make_pki()
    results["mc_verify_per_s"] = bench_mc_verify(pki, settings)
    handshakes = bench_handshakes(pki, settings)
    results["handshakes_per_s"] = round(handshakes, 1)
    results["handshake_ms"] = round(1000 / handshakes, 3)
    keygen = bench_keygen(settings.keygen_samples)
    results["keygen_per_s"] = keygen["per_s"]
    results["keygen_ms"] = {k: v for k, v in keygen.items() if k != "per_s"}
    return results


def srtp_lines(name: str, figures: dict[str, Any]) -> list[str]:
    verdict = "PASS" if figures["pass"] else "FAIL"
    return [
        f"  {name:<10} bare {figures['bare']:7.3f}  wrapper {figures['wrapper']:7.3f}"
        f"  bound {figures['bound']:7.3f} µs/packet",
        f"  {'':<10} wrapper/bare {figures['ratio']:.3f}x  bound/bare {figures['bound_ratio']:.3f}x"
        f"  -> {verdict} (target <= {TARGET_RATIO}x)",
    ]


def report(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["srtp"]
    keygen = results["keygen_ms"]
    lines = [
        f"machine   {m['cpu']}, {m['cpu_count']} CPUs, load {m['load_avg_1m']}",
        f"          Python {m['python']}, pylibsrtp {m['pylibsrtp']},"
        f" cryptography {m['cryptography']}, {m['date_utc']}",
        f"SRTP      {s['packet_bytes']}-byte RTP, AES_CM_128_HMAC_SHA1_80,"
        f" N={s['packets']} x {s['rounds']} rounds (median)",
        *srtp_lines("protect", s["protect_us"]),
        *srtp_lines("unprotect", s["unprotect_us"]),
    ]
    for name, value in results["mc_verify_per_s"].items():
        lines.append(f"MC verify {name:<18} {value:10.0f} /s  ({1e6 / value:.1f} µs)")
    lines.append(
        f"handshake {'caller+callee':<18} {results['handshakes_per_s']:10.1f} /s"
        f"  ({results['handshake_ms']:.3f} ms)"
    )
    lines.append(
        f"keygen    {'RSA-512 subscriber':<18} {results['keygen_per_s']:10.2f} /s"
        f"  (median {keygen['median_ms']:.1f} ms, {keygen['min_ms']:.1f}..{keygen['max_ms']:.1f},"
        f" {keygen['samples']} samples)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k packets x 3 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    results = run(QUICK if args.quick else FULL)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
