"""Operations against a real running proxy with SIPp calls: the admin endpoint (health,
token, 404/405), ``/metrics`` parsed with prometheus_client's parser, SIGHUP reload,
SIGTERM drain, and ``sipura-proxy calls`` / ``reload``."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Proxy, ProxyFactory, Sipp

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "t0ken-for-tests-0123456789"


def request(
    proxy: Proxy, method: str, path: str, token: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection(HOST, proxy.admin, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def scrape(proxy: Proxy, token: str | None = TOKEN) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``name{label="v",...}`` -> value, via the parser."""
    status, body, headers = request(proxy, "GET", "/metrics", token)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip


def token_proxy(
    start_proxy: ProxyFactory, new_port: Callable[[], int], tmp_path: Path,
    **tables: dict[str, Any],
) -> tuple[Proxy, int]:  # fmt: skip
    """A proxy with an admin token whose upstream is a fresh port (for a SIPp uas);
    ``tables``: more config keys per table."""
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    uas_port = new_port()
    admin = {"token": "@admin.token"}
    proxy = start_proxy(f"sip:{HOST}:{uas_port}", token=TOKEN, admin=admin, **tables)
    return proxy, uas_port


def test_admin_endpoint_and_metrics_with_calls(
    start_proxy: ProxyFactory, sipp: Sipp, new_port: Callable[[], int], tmp_path: Path
) -> None:
    proxy, uas_port = token_proxy(start_proxy, new_port, tmp_path)
    assert request(proxy, "GET", "/health")[:2] == (200, b"ok")
    assert request(proxy, "GET", "/status")[0] == 401
    assert request(proxy, "GET", "/status", "wrong")[0] == 401
    assert request(proxy, "GET", "/status", TOKEN)[0] == 200
    assert request(proxy, "GET", "/nope", TOKEN)[0] == 404
    status, _, headers = request(proxy, "DELETE", "/metrics", TOKEN)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    head = request(proxy, "HEAD", "/metrics", TOKEN)
    assert head[0] == 200 and head[1] == b""

    before = scrape(proxy)
    assert before["sipura_media_workers_alive"] >= 1
    free_before = before["sipura_media_ports_free"]
    assert free_before > 0
    assert "process_cpu_seconds_total" in before and "process_resident_memory_bytes" in before
    assert before['sipura_calls_active{secure="no"}'] == 0

    callee = sipp.uas("uas_call.xml", uas_port, "udp", calls=3)
    caller = sipp.uac("uac_call.xml", proxy.inside, "udp", calls=3,
                      extra=["-cid_str", "caller-cid-%u-%p@%s", "-l", "1"])  # fmt: skip
    sipp.check(caller, callee)
    proxy.wait_idle()

    after = scrape(proxy)
    assert after['sipura_sip_responses_total{code="200"}'] >= 3
    assert after['sipura_calls_active{secure="no"}'] == 0
    assert after["sipura_media_ports_free"] == free_before  # every pair back
    assert after["sipura_media_worker_restarts_total"] == 0
    for side in ("inside", "outside"):
        for direction in ("in", "out"):
            key = f'sipura_media_packets_total{{direction="{direction}",side="{side}"}}'
            assert key in after
    assert 'sipura_media_drops_total{reason="wrong_source"}' in after
    assert after["sipura_handshake_seconds_count"] == 0


def test_metrics_fed_by_the_core_survive_the_calls(
    start_proxy: ProxyFactory, sipp: Sipp, new_port: Callable[[], int], tmp_path: Path
) -> None:
    """Calls by direction and the media counters: after the calls ended, the packets
    they relayed are still counted (a session's last counters join the totals)."""
    proxy, uas_port = token_proxy(start_proxy, new_port, tmp_path)
    (tmp_path / "tone.ulaw").write_bytes(bytes(range(256)) * 31 + bytes(64))  # 1 s, 8 kHz
    before = scrape(proxy)
    assert before['sipura_calls_total{direction="outbound"}'] == 0
    echo = ["-rtp_echo", "-mp", str(new_port())]
    callee = sipp.uas("uas_call.xml", uas_port, "udp", calls=2, extra=echo)
    stream = ["-cid_str", "caller-cid-%u-%p@%s", "-mp", str(new_port())]
    caller = sipp.uac("uac_rtp.xml", proxy.inside, "udp", calls=2, extra=stream)
    sipp.check(caller, callee)
    proxy.wait_idle()
    after = scrape(proxy)
    assert after['sipura_calls_total{direction="outbound"}'] == 2
    assert after['sipura_calls_total{direction="inbound"}'] == 0
    assert after['sipura_calls_active{secure="no"}'] == 0
    packets = {
        (side, direction): after[
            f'sipura_media_packets_total{{direction="{direction}",side="{side}"}}'
        ]
        for side in ("inside", "outside")
        for direction in ("in", "out")
    }
    # 2 calls x 50 packets from the phone, relayed out and echoed back by the uas
    assert packets[("inside", "in")] >= 90 and packets[("outside", "out")] >= 90, packets
    assert packets[("outside", "in")] >= 90 and packets[("inside", "out")] >= 90, packets
    ended = [line for line in proxy.log_text().splitlines() if " ended (clear): outbound" in line]
    assert len(ended) == 2 and all("ended by phone (BYE)" in line for line in ended), ended
    assert all("inside in " in line and "drops 0" in line for line in ended)


def test_sighup_reload_applies_and_rejects(
    start_proxy: ProxyFactory, new_port: Callable[[], int], tmp_path: Path
) -> None:
    proxy, _ = token_proxy(start_proxy, new_port, tmp_path)
    assert proxy.process is not None
    original = proxy.config_path.read_text()
    # A new line and a new log level: applied. A new inside listen port: needs a restart.
    changed = original.replace('level = "debug"', 'level = "info"') + (
        '\n[[line]]\nuser_id = "15550001234"\n'
    )
    changed = changed.replace(f"{HOST}:{proxy.inside}", f"{HOST}:{new_port()}")
    proxy.config_path.write_text(changed)
    proxy.process.send_signal(signal.SIGHUP)
    _wait_for_log(proxy, "reloaded ")
    assert "inside.listen changed; takes effect only after a restart" in proxy.log_text()
    assert proxy.alive() and proxy.options("inside") is not None  # still on the old port

    proxy.config_path.write_text(original.replace('level = "debug"', 'level = "loud"'))
    proxy.process.send_signal(signal.SIGHUP)
    _wait_for_log(proxy, "reload rejected")
    assert proxy.alive()
    assert "log.level" in proxy.log_text().split("reload rejected", 1)[1].split("\n", 1)[0]

    # The same through the admin endpoint and the CLI (token from the config file).
    proxy.config_path.write_text(original)
    done = cli("reload", "--config", str(proxy.config_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reloaded ")
    proxy.config_path.write_text("[inside]\n")
    refused = cli("reload", "--admin", f"{HOST}:{proxy.admin}", "--token-file",
                  str(tmp_path / "admin.token"))  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "rejected" in refused.stderr
    proxy.config_path.write_text(original)
    assert cli("reload", "--admin", f"{HOST}:{proxy.admin}").returncode == 2  # no token: 401


def test_sigterm_drains_calls_then_exits_zero(
    start_proxy: ProxyFactory, sipp: Sipp, new_port: Callable[[], int], tmp_path: Path
) -> None:
    proxy, uas_port = token_proxy(start_proxy, new_port, tmp_path, run={"drain_s": 20})
    assert proxy.process is not None
    callee = sipp.uas("uas_call.xml", uas_port, "udp", calls=2)
    hold = ["-cid_str", "caller-cid-%u-%p@%s", "-l", "2", "-d", "3000"]
    caller = sipp.uac("uac_call_long.xml", proxy.inside, "udp", calls=2, extra=hold)
    deadline = time.monotonic() + 10
    while len(proxy.status()["calls"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    listed = cli("calls", "--config", str(proxy.config_path))
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "DIRECTION", "STATE", "SECURE"]
    assert len(rows) == 2 and all("clear (not requested)" in row for row in rows)

    sent = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proxy.alive()  # calls in progress keep it up
    assert request(proxy, "GET", "/health")[:2] == (503, b"draining\n")
    # new work is refused, so a dispatcher in front fails over: OPTIONS and INVITE 503
    for side in ("inside", "outside"):
        probe = proxy.options(side)
        assert probe is not None and probe.startswith(b"SIP/2.0 503 "), probe
        assert b"\r\nRetry-After: " in probe
    refused = sipp.uac("uac_draining.xml", proxy.inside, "udp", calls=1)
    sipp.check(refused)
    drain = proxy.status()["drain"]
    assert drain["active"] and drain["calls_left"] == 2 and drain["calls_at_start"] == 2
    assert drain["refused"] == {"OPTIONS": 2, "INVITE": 1}
    sipp.check(caller, callee)  # both calls completed normally
    code = proxy.process.wait(timeout=10)
    drained = time.monotonic() - sent
    assert code == 0
    assert drained < 5, drained
    assert "drained in" in proxy.log_text()
    print(f"SIGTERM with 2 calls ending on their own: exit 0 after {drained:.2f} s")


def sigterm_once_up(proxy: Proxy, calls: int, state: str) -> float:
    """Wait (bounded) until ``calls`` calls are in ``state``, send SIGTERM, and return
    how long the process took to exit, which it must do with status 0."""
    assert proxy.process is not None
    deadline = time.monotonic() + 10
    while len(proxy.status()["calls"]) < calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c["state"] for c in proxy.status()["calls"]] == [state] * calls
    sent = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    code = proxy.process.wait(timeout=10)
    took = time.monotonic() - sent
    assert code == 0
    return took


def test_drain_timeout_hangs_up_with_a_reason_and_exits_zero(
    start_proxy: ProxyFactory, sipp: Sipp, new_port: Callable[[], int], tmp_path: Path
) -> None:
    """Calls outliving ``drain_s`` get a BYE on both legs with the shutdown Reason (the
    SIPp peers check the header), and the process exits 0 once those are answered."""
    proxy, uas_port = token_proxy(start_proxy, new_port, tmp_path, run={"drain_s": 1})
    assert proxy.process is not None
    callee = sipp.uas("uas_hung_up.xml", uas_port, "udp", calls=3)
    caller = sipp.uac("uac_hung_up.xml", proxy.inside, "udp", calls=3,
                      extra=["-l", "3", "-r", "10"])  # fmt: skip
    took = sigterm_once_up(proxy, 3, "confirmed")
    sipp.check(caller, callee)  # every BYE carried the Reason, both sides answered it
    assert 1.0 <= took < 3.0, took
    log = proxy.log_text()
    assert "hung up 3 calls (proxy shutting down)" in log
    assert log.count("ended by proxy (proxy shutting down)") == 3
    print(f"SIGTERM with 3 calls up, drain_s = 1: exit 0 after {took:.2f} s")


def test_drain_timeout_ends_ringing_calls_with_a_reason_on_both_sides(
    start_proxy: ProxyFactory, sipp: Sipp, new_port: Callable[[], int], tmp_path: Path
) -> None:
    """Calls still ringing when ``drain_s`` runs out: the callee gets a CANCEL and the
    caller a 503 with Retry-After, both with the shutdown Reason (the SIPp peers check
    the headers), one log line per call, and the process exits 0 once the callee's 487s
    are in."""
    proxy, uas_port = token_proxy(start_proxy, new_port, tmp_path, run={"drain_s": 1})
    assert proxy.process is not None
    callee = sipp.uas("uas_ringing_drained.xml", uas_port, "udp", calls=2)
    caller = sipp.uac("uac_ringing_drained.xml", proxy.inside, "udp", calls=2,
                      extra=["-l", "2", "-r", "10"])  # fmt: skip
    took = sigterm_once_up(proxy, 2, "early")
    sipp.check(caller, callee)  # the CANCELs and the 503s carried the Reason
    assert 1.0 <= took < 3.0, took
    log = proxy.log_text()
    assert log.count("ringing at the drain's end: 503 to the caller, CANCEL to the callee") == 2
    assert log.count("ended by proxy (proxy shutting down)") == 2
    print(f"SIGTERM with 2 calls ringing, drain_s = 1: exit 0 after {took:.2f} s")


def _wait_for_log(proxy: Proxy, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{proxy.log_text()}"
        time.sleep(0.05)
