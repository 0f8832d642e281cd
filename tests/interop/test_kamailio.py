"""Scale-out: Kamailio (the recipe in ``conf/kamailio/``) in front of two proxies.

The test generates Kamailio's configuration from the recipe, substituting only its
``#!substdef`` values (free loopback ports, the dispatcher list, a 1 s probing interval,
the control socket), and runs ``kamailio`` in the foreground. SIPp calls through it are
spread over both proxies (Call-ID hash); one proxy is sent SIGTERM while calls are up
and new ones keep coming: within the probing interval Kamailio marks it inactive (its
OPTIONS answer 503), the INVITEs it refused before that were retried on the other proxy
by Kamailio's failure route, so no call fails; after that it receives no INVITE at all,
and its own calls finish before it exits 0.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Proxy, ProxyFactory, Sipp

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "conf" / "kamailio" / "kamailio.cfg"
PING_INTERVAL_S = 1


def kamailio_binary() -> str:
    path = shutil.which("kamailio")
    if path is None:
        pytest.skip("kamailio is not installed (Debian/Ubuntu package kamailio)")
    return path


def configure(tmp_path: Path, values: dict[str, str]) -> Path:
    """The recipe with its ``#!substdef`` values replaced (and nothing else changed)."""
    text = RECIPE.read_text()
    for name, value in values.items():
        text, count = re.subn(
            rf'^#!substdef "!{name}!.*!g"$', f'#!substdef "!{name}!{value}!g"', text, flags=re.M
        )
        assert count == 1, f"the recipe has no substdef for {name}"
    path = tmp_path / "kamailio.cfg"
    path.write_text(text)
    return path


class Kamailio:
    def __init__(self, binary: str, config: Path, ctl: str, log: Path) -> None:
        self.ctl = ctl
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "-f", str(config), "-DD", "-E", "-x", "tlsf", "-X", "tlsf",
                 "-m", "64", "-n", "2"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def destinations(self) -> dict[str, str]:
        """URI -> dispatcher flags (``AP`` active and probed, ``IP`` inactive...)."""
        done = subprocess.run(
            ["kamcmd", "-s", self.ctl, "dispatcher.list"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
        uris = re.findall(r"URI: (\S+)\s+FLAGS: (\S+)", done.stdout)
        return dict(uris)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture
def kamailio(tmp_path: Path) -> Generator[Callable[..., Kamailio], None, None]:
    binary = kamailio_binary()
    started: list[Kamailio] = []

    def start(config: Path, ctl: str) -> Kamailio:
        k = Kamailio(binary, config, ctl, tmp_path / "kamailio.log")
        started.append(k)
        return k

    yield start
    for k in started:
        k.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic()


def calls_up(proxy: Proxy) -> int:
    return len(proxy.status()["calls"])


def test_dispatcher_spreads_calls_and_fails_over_on_drain(
    start_proxy: ProxyFactory,
    sipp: Sipp,
    kamailio: Callable[..., Kamailio],
    new_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    held, stream = 16, 30
    uas_port = new_port()
    callee = sipp.uas("uas_call.xml", uas_port, "udp", calls=held + stream)
    a = start_proxy(f"sip:{HOST}:{uas_port}", media_pairs=24, run={"drain_s": 20})
    b = start_proxy(f"sip:{HOST}:{uas_port}", media_pairs=48)
    phones, trunk = new_port(), new_port()
    ds_list = tmp_path / "dispatcher.list"
    ds_list.write_text(
        f"1 sip:{HOST}:{a.inside} 0 0 socket=udp:{HOST}:{phones}\n"
        f"1 sip:{HOST}:{b.inside} 0 0 socket=udp:{HOST}:{phones}\n"
        f"2 sip:{HOST}:{a.outside} 0 0 socket=udp:{HOST}:{trunk}\n"
        f"2 sip:{HOST}:{b.outside} 0 0 socket=udp:{HOST}:{trunk}\n"
    )
    ctl = f"unix:{tmp_path / 'kamailio.ctl'}"
    config = configure(tmp_path, {
        "PHONES_ADDR": f"{HOST}:{phones}", "TRUNK_ADDR": f"{HOST}:{trunk}",
        "DS_LIST": str(ds_list), "PING_INTERVAL": str(PING_INTERVAL_S), "CTL_SOCKET": ctl,
    })  # fmt: skip
    k = kamailio(config, ctl)
    a_uri, b_uri = f"sip:{HOST}:{a.inside}", f"sip:{HOST}:{b.inside}"
    try:

        def up() -> bool:
            assert k.process.poll() is None, "kamailio exited"
            return k.destinations().get(a_uri, "").startswith("A")

        wait_until(up, "Kamailio up", 10)
        # Phase 1: calls held 6 s, spread over both proxies by the Call-ID hash.
        cid = ["-cid_str", "caller-cid-%u-%p@%s"]
        long = sipp.uac("uac_call_long.xml", phones, "udp", calls=held,
                        extra=[*cid, "-l", str(held), "-r", "50", "-d", "6000"])  # fmt: skip
        wait_until(lambda: calls_up(a) + calls_up(b) == held, "the held calls up", 10)
        on_a, on_b = calls_up(a), calls_up(b)
        assert on_a >= 1 and on_b >= 1, (on_a, on_b)
        a_total = a.status()["stats"]["calls_total"]
        assert a_total == on_a

        # Phase 2: new calls keep coming (10/s for 3 s) while proxy A starts draining.
        flow = sipp.uac("uac_call.xml", phones, "udp", calls=stream,
                        extra=[*cid, "-r", "10", "-l", str(stream)])  # fmt: skip
        time.sleep(0.4)
        assert a.process is not None
        sigterm = time.monotonic()
        a.process.send_signal(signal.SIGTERM)
        marked = wait_until(
            lambda: k.destinations().get(a_uri, "").startswith("I"),
            "proxy A marked inactive", 3 * PING_INTERVAL_S + 2,
        )  # fmt: skip
        failover_s = marked - sigterm
        refused_then = a.status()["drain"]["refused"].get("INVITE", 0)
        assert k.destinations()[b_uri].startswith("A")
        sipp.check(flow)  # every new call succeeded, on B or retried there
        drain = a.status()["drain"]
        assert drain["refused"].get("INVITE", 0) == refused_then, "INVITEs after marking"
        assert drain["refused"].get("OPTIONS", 0) >= 1
        before_drain = a.status()["stats"]["calls_total"] - a_total  # in the first 0.4 s
        assert b.status()["stats"]["calls_total"] == on_b + stream - before_drain
        sipp.check(long, callee)  # A's own calls finished normally
        assert a.process.wait(timeout=10) == 0
        print(
            f"kamailio failover: proxy A inactive {failover_s:.2f} s after SIGTERM "
            f"(ping interval {PING_INTERVAL_S} s); {refused_then} INVITEs refused by A "
            f"and retried on B before that; held calls {on_a}/{on_b} on A/B"
        )
    except BaseException:
        print(f"===== kamailio log =====\n{k.log()[-20000:]}")
        raise
