"""The tests' own support package: the guarantees the harnesses rely on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.demo.loopback import DEFAULT_PORTS
from testkit.pki import TestCa
from testkit.ports import (
    PortBlock,
    free_port,
    free_port_range,
    media_range,
    port_free,
    reserve_udp,
)
from testkit.processes import Processes, run, wait_for
from testkit.proxy import LocalProxy


def test_ports_are_never_handed_out_twice() -> None:
    singles = [free_port() for _ in range(30)]
    lo, hi = free_port_range(40)
    media = media_range(4)
    handed = singles + list(range(lo, hi + 1)) + list(range(media[0], media[1] + 1))
    assert len(handed) == len(set(handed)) == 30 + 40 + 8
    assert set(handed).isdisjoint(DEFAULT_PORTS)
    assert lo % 2 == 0 and media[0] % 2 == 0


def test_a_reserved_port_stays_bound_until_closed() -> None:
    sock = reserve_udp(2)
    port = sock.getsockname()[1]
    assert not port_free(port, tcp=False)
    sock.close()
    assert port_free(port, tcp=False)


def test_port_block_hands_out_even_starts_and_runs_out() -> None:
    block = PortBlock(21001, 21010)
    assert block.take(1) == 21002
    assert block.take(3) == 21004
    with pytest.raises(RuntimeError, match="exhausted"):
        block.take(4)


def test_local_proxy_config_merges_tables_and_lines(tmp_path: Path) -> None:
    proxy = LocalProxy("p", tmp_path, media=(20000, 20015))
    path = proxy.write_config(
        upstream=proxy.admin + 1, lines=[{"user_id": "1001", "contact": None}],
        media={"workers": 2}, sip={"transports": ["udp"]}, log_level="warning",
    )  # fmt: skip
    config = tomllib.loads(path.read_text())
    assert config["inside"] == {"listen": f"127.0.0.1:{proxy.inside}", "media_ip": "127.0.0.1"}
    assert config["outside"]["upstream"] == f"sip:127.0.0.1:{proxy.admin + 1}"
    assert config["media"] == {"port_min": 20000, "port_max": 20015, "workers": 2}
    assert config["admin"] == {"listen": f"127.0.0.1:{proxy.admin}"}
    assert config["log"] == {"level": "warning"} and config["sip"] == {"transports": ["udp"]}
    assert config["line"] == [{"user_id": "1001"}]


def test_test_ca_files_and_lines(tmp_path: Path) -> None:
    ca = TestCa()
    key_file = ca.write_key(tmp_path / "ca.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert TestCa.load(key_file).key.n == ca.key.n
    assert ca.write_public(tmp_path / "ca.pub").read_bytes()
    line = ca.issue("Joe", "1001", days=2)
    assert line.param.ca_key == ca.key.public and line.certificate.user_id == "1001"


def test_processes_are_stopped_and_output_collected(tmp_path: Path) -> None:
    procs = Processes()
    proc = procs.start(["sleep", "60"], tmp_path / "sleep.log")
    procs.stop_all(timeout=2)
    assert proc.poll() is not None
    result = run(["echo", "hello"], timeout=10)
    assert result.returncode == 0 and result.stdout == "hello\n"
    with pytest.raises(AssertionError, match="waiting for never"):
        wait_for(lambda: False, 0.1, "never")
