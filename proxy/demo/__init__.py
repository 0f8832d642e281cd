"""``sipura-proxy demo``: two sites, two legacy phones, one call that becomes secure.

Everything lives in a temporary directory and on 127.0.0.1: a CA, one Mini Certificate
per line, site A's and site B's proxies (real ``sipura-proxy run`` processes), and two
simulated plain-SIP phones. Phone A calls phone B's number through proxy A, which
routes it to proxy B; the proxies run x-sipura between them, the phones never know.
The demo prints the handshake as the proxies log it, both identities, live media
counters, and a verdict; it exits 0 only if the call became secure and every audio
packet arrived intact both ways (apart from the secure-call tone mixed toward the
phones, which is counted separately).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.demo.loopback import (
    LOOPBACK,
    ProxyProcess,
    ProxyStartError,
    config_text,
    free_port,
    free_port_block,
)
from proxy.demo.phone import Phone
from proxy.xsipura.keyfiles import CaKeyFormat, dump_ca_public, generate_ca_key
from proxy.xsipura.provision import LineFiles, issue_line
from proxy.xsipura.rsa import PrivateKey

LINE_A = ("14085551234", "Alice Smith")
LINE_B = ("14085559876", "Bob Jones")
MEDIA_PAIRS = 8


def _issue(ca: PrivateKey, user_id: str, name: str, directory: Path) -> LineFiles:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    return issue_line(ca, name, user_id, expires).write_files(directory)


def _config(
    directory: Path, site: str, ports: dict[str, int], upstream: int | None,
    line: tuple[str, str], phone_port: int, files: LineFiles,
) -> Path:  # fmt: skip
    media = free_port_block(2 * MEDIA_PAIRS, tcp=False)
    tables: dict[str, dict[str, Any]] = {
        "inside": {"listen": f"{LOOPBACK}:{ports['inside']}", "media_ip": LOOPBACK},
        "outside": {
            "listen": f"{LOOPBACK}:{ports['outside']}",
            "media_ip": LOOPBACK,
            "upstream": None if upstream is None else f"sip:{LOOPBACK}:{upstream}",
        },
        "media": {"port_min": media, "port_max": media + 2 * MEDIA_PAIRS - 1},
        "sip": {"transports": ["udp"]},
        "admin": {"listen": f"{LOOPBACK}:{ports['admin']}"},
        "log": {"level": "info"},
        "xsipura": {
            "trusted_ca": ["ca.pub"],  # relative: resolved against this file's directory
            "grace_ms": 2000,
            "handshake_timeout_ms": 5000,
        },
    }
    lines = [{
        "user_id": line[0],
        "contact": f"sip:{line[0]}@{LOOPBACK}:{phone_port}",
        "mini_certificate": f"@{files.mini_certificate.relative_to(directory)}",
        "srtp_private_key": f"@{files.srtp_private_key.relative_to(directory)}",
        "secure_by_default": True,
    }]  # fmt: skip
    path = directory / f"site-{site}.toml"
    path.write_text(config_text(tables, lines))
    return path


@contextlib.contextmanager
def _proxy(config: Path, log: Path, admin_port: int) -> Iterator[ProxyProcess]:
    process = ProxyProcess.start(config, log, admin_port)
    try:
        yield process
    finally:
        process.stop(timeout=5)


class _LogTail:
    """Prints the proxies' x-sipura log lines as they are written."""

    def __init__(self, logs: dict[str, Path]) -> None:
        self.logs = logs
        self.offsets = dict.fromkeys(logs, 0)

    def show(self) -> None:
        for site, path in self.logs.items():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            new, self.offsets[site] = data[self.offsets[site] :], len(data)
            for line in new.decode("utf-8", "replace").splitlines():
                if "x-sipura" in line or "ERROR" in line or "Traceback" in line:
                    print(f"  [proxy {site}] {line.split(': ', 1)[-1]}")


def _outside_stats(call: dict[str, Any]) -> dict[str, int]:
    media = call.get("media") or {}
    outside = (media.get("outside") or [{}])[0]
    inside = (media.get("inside") or [{}])[0]
    drops = outside.get("drops", {})
    return {
        "encrypted": int(outside.get("packets_encrypted", 0)),
        "decrypted": int(outside.get("packets_decrypted", 0)),
        "dropped": int(sum(drops.values())) if isinstance(drops, dict) else 0,
        "tone": int(inside.get("tone_packets", 0)),
    }


async def _settled_stats(
    sites: dict[str, ProxyProcess], last: dict[str, dict[str, int]], timeout: float = 5.0
) -> dict[str, dict[str, int]]:
    """Each site's call counters once two reads 0.3 s apart agree (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    previous: dict[str, dict[str, int]] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        current = dict(last)
        for site, proxy in sites.items():
            calls = await asyncio.to_thread(proxy.calls)
            if calls:
                current[site] = _outside_stats(calls[0])
        if current == previous:
            return current
        previous = current
    return previous or last


async def _run(seconds: float, directory: Path) -> int:
    print(f"sipura-proxy demo: everything in {directory}, on 127.0.0.1\n")
    ca = generate_ca_key()
    (directory / "ca.pub").write_bytes(dump_ca_public(ca.public, CaKeyFormat.LINKSYS))
    files_a = _issue(ca, *LINE_A, directory)
    files_b = _issue(ca, *LINE_B, directory)
    print(f"  CA created; Mini Certificates issued for {LINE_A[1]} <{LINE_A[0]}> (site A)"
          f" and {LINE_B[1]} <{LINE_B[0]}> (site B)")  # fmt: skip
    ports = {site: {k: free_port() for k in ("inside", "outside", "admin")} for site in "AB"}
    phone_ports = {k: free_port() for k in ("a_sip", "b_sip")}
    rtp_a, rtp_b = free_port_block(2, tcp=False), free_port_block(2, tcp=False)
    config_a = _config(directory, "A", ports["A"], ports["B"]["outside"],
                       LINE_A, phone_ports["a_sip"], files_a)  # fmt: skip
    config_b = _config(directory, "B", ports["B"], None,
                       LINE_B, phone_ports["b_sip"], files_b)  # fmt: skip
    logs = {"A": directory / "site-A.log", "B": directory / "site-B.log"}
    tail = _LogTail(logs)
    phone_a = Phone(LINE_A[1], LINE_A[0], phone_ports["a_sip"], rtp_a, 0xA, 0xB)
    phone_b = Phone(LINE_B[1], LINE_B[0], phone_ports["b_sip"], rtp_b, 0xB, 0xA)
    with (
        _proxy(config_a, logs["A"], ports["A"]["admin"]) as proxy_a,
        _proxy(config_b, logs["B"], ports["B"]["admin"]) as proxy_b,
    ):
        try:
            for proxy in (proxy_a, proxy_b):
                await asyncio.to_thread(proxy.wait_ready, 10)
        except ProxyStartError:
            tail.show()
            print("\nVERDICT: FAIL - the proxies did not start")
            return 1
        print("  proxies up: site A and site B\n")
        await phone_a.start()
        await phone_b.start()
        try:
            return await _call(seconds, ports["A"]["inside"], (proxy_a, proxy_b),
                               phone_a, phone_b, tail)  # fmt: skip
        finally:
            phone_a.close()
            phone_b.close()
            await asyncio.sleep(0.2)
            tail.show()


async def _call(
    seconds: float, inside_a: int, proxies: tuple[ProxyProcess, ProxyProcess],
    phone_a: Phone, phone_b: Phone, tail: _LogTail,
) -> int:  # fmt: skip
    """Place the call, show the handshake and the counters, hang up, judge."""
    sites = dict(zip("AB", proxies, strict=True))
    print(f"{LINE_A[1]} dials {LINE_B[0]} (plain SIP/RTP phone -> proxy A)")
    phone_a.call(LINE_B[0], (LOOPBACK, inside_a))
    try:
        await asyncio.wait_for(phone_a.answered.wait(), 10)
    except TimeoutError:
        tail.show()
        print("\nVERDICT: FAIL - the call was not answered")
        return 1
    print("call answered; handshake on the proxy-to-proxy leg:")
    states = await _handshake_outcome(sites, tail)
    last = await _show_counters(sites, seconds)
    # The verdict compares what the phones received with what the proxies counted; the
    # workers report counters every 100 ms, so stop the audio and read them once they
    # have stopped moving (packets still in flight included), never at a fixed moment.
    phone_a.stop_media()
    phone_b.stop_media()
    last = await _settled_stats(sites, last)
    phone_a.hang_up()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(phone_b.ended.wait(), 5)
    print(f"\n{LINE_A[1]} hangs up.")
    for name, phone in (("A", phone_a), ("B", phone_b)):
        print(f"  phone {name}: sent {phone.sent}, received {phone.rx.packets} "
              f"({phone.rx.intact} intact, {phone.rx.altered} with the secure-call tone); "
              f"caller ID shown: {phone.identities[-1] if phone.identities else '-'}")  # fmt: skip
    return _verdict(seconds, states, last, phone_a, phone_b)


async def _handshake_outcome(
    sites: dict[str, ProxyProcess], tail: _LogTail, timeout: float = 10.0
) -> dict[str, dict[str, Any]]:
    """Each site's x-sipura state once both have a verdict (secure or clear), printed."""
    secure: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(secure) < 2:
        tail.show()
        for site, proxy in sites.items():
            calls = proxy.calls()
            if calls and (calls[0].get("secure") or {}).get("state") in ("secure", "clear"):
                secure[site] = calls[0]
        await asyncio.sleep(0.2)
    tail.show()
    states = {site: (call.get("secure") or {}) for site, call in secure.items()}
    print()
    for site, state in states.items():
        print(f"  site {site}: {state.get('state', '?').upper()} as x-sipura {state.get('role')};"
              f" peer MC: {state.get('peer_name')} <{state.get('peer_user_id')}>"
              + (f"; reason {state['reason']}" if state.get("reason") else ""))  # fmt: skip
    return states


async def _show_counters(
    sites: dict[str, ProxyProcess], seconds: float
) -> dict[str, dict[str, int]]:
    """The proxy-to-proxy leg's SRTP counters, once a second for ``seconds``."""
    print(f"\nlive media counters (proxy-to-proxy leg), {seconds:.0f} s:")
    print("   t   A encrypted  A decrypted  B encrypted  B decrypted  dropped")
    last: dict[str, dict[str, int]] = {}
    for tick in range(int(seconds)):
        await asyncio.sleep(1)
        for site, proxy in sites.items():
            calls = proxy.calls()
            if calls:
                last[site] = _outside_stats(calls[0])
        a, b = last.get("A", {}), last.get("B", {})
        print(f"  {tick + 1:2d}s {a.get('encrypted', 0):11d} {a.get('decrypted', 0):12d}"
              f" {b.get('encrypted', 0):12d} {b.get('decrypted', 0):12d}"
              f" {a.get('dropped', 0) + b.get('dropped', 0):8d}")  # fmt: skip
    return last


def _verdict(
    seconds: float, states: dict[str, dict[str, Any]], last: dict[str, dict[str, int]],
    phone_a: Phone, phone_b: Phone,
) -> int:  # fmt: skip
    """0 only if both sites are secure, SRTP flowed both ways, and every packet a phone
    received is what the other sent, but for the ones the proxies counted as toned."""
    tone = sum(last.get(site, {}).get("tone", 0) for site in "AB")
    both_secure = all(states.get(site, {}).get("state") == "secure" for site in "AB")
    crypto = all(
        last.get(site, {}).get("encrypted", 0) > 0 and last.get(site, {}).get("decrypted", 0) > 0
        for site in "AB"
    )
    audio = (
        min(phone_a.rx.intact, phone_b.rx.intact) >= 0.8 * seconds * 50
        and phone_a.rx.altered + phone_b.rx.altered <= tone + 2
    )
    print()
    if both_secure and crypto and audio:
        print("VERDICT: SECURE - both proxies switched the call to SRTP (x-sipura) and audio "
              "passed intact both ways.")  # fmt: skip
        return 0
    problems = [
        text
        for ok, text in (
            (both_secure, "the call did not become secure on both sites"),
            (crypto, "no SRTP both ways on the proxy-to-proxy leg"),
            (audio, "audio did not arrive intact both ways"),
        )
        if not ok
    ]
    print("VERDICT: FAIL - " + "; ".join(problems))
    return 1


def run_demo(seconds: float = 4.0, keep: bool = False) -> int:
    directory = Path(tempfile.mkdtemp(prefix="sipura-demo-"))
    try:
        return asyncio.run(_run(seconds, directory))
    finally:
        if keep:
            print(f"(files kept in {directory})")
        else:
            shutil.rmtree(directory, ignore_errors=True)
