"""proxy.demo.loopback: what the demo, the tests and the benches use to run proxies."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from proxy.demo.loopback import (
    DEFAULT_PORTS,
    LOOPBACK,
    AdminError,
    ProxyProcess,
    ProxyStartError,
    admin_get,
    config_text,
    free_port,
    free_port_block,
    port_free,
    stop_process,
)


def test_config_text_is_the_toml_of_its_tables_and_lines() -> None:
    tables = {
        "inside": {"listen": "127.0.0.1:25070", "media_ip": "127.0.0.1"},
        "outside": {"listen": "127.0.0.1:25080", "upstream": None},
        "media": {"port_min": 20000, "port_max": 20015, "workers": 0},
        "xsipura": {
            "trusted_ca": ["/tmp/a b/ca.pub", 'q"uote'],
            "grace_ms": 1500,
            "probe_unadvertised": False,
            "ratio": 0.5,
        },
    }
    lines = [{"user_id": "1001", "contact": None, "secure_by_default": True},
             {"user_id": "1002", "mini_certificate": "@/tmp/1002.mc"}]  # fmt: skip
    parsed = tomllib.loads(config_text(tables, lines))
    assert parsed == {
        "inside": tables["inside"],
        "outside": {"listen": "127.0.0.1:25080"},  # None: the key is left out
        "media": tables["media"],
        "xsipura": tables["xsipura"],
        "line": [{"user_id": "1001", "secure_by_default": True},
                 {"user_id": "1002", "mini_certificate": "@/tmp/1002.mc"}],
    }  # fmt: skip


def test_config_text_refuses_a_value_toml_cannot_hold() -> None:
    with pytest.raises(TypeError):
        config_text({"log": {"level": {"nested": "table"}}})


def test_free_port_is_free_for_udp_and_tcp_and_never_a_default() -> None:
    taken = {free_port() for _ in range(20)}
    assert taken.isdisjoint(DEFAULT_PORTS)
    for port in taken:
        assert port_free(port)
    port = free_port(avoid=taken)
    assert port not in taken


def test_port_free_sees_a_bound_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
        assert not port_free(port, tcp=False)


def test_free_port_block_is_even_consecutive_and_free() -> None:
    base = free_port_block(16, tcp=False)
    assert base % 2 == 0 and base >= 10000 and base + 16 <= 32768
    assert all(port_free(p, tcp=False) for p in range(base, base + 16))
    again = free_port_block(16, avoid=range(base, base + 16))
    assert not set(range(again, again + 16)) & set(range(base, base + 16))


def test_free_port_block_never_hands_out_a_default_port() -> None:
    with pytest.raises(RuntimeError, match="no 2 consecutive free ports"):
        free_port_block(2, low=5060, high=5062)  # the only candidate holds 5060
    with pytest.raises(ValueError):
        free_port_block(10, low=20000, high=20004)


def _serve_once(reply: bytes) -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((LOOPBACK, 0))
    server.listen(1)

    def answer() -> None:
        with server, server.accept()[0] as conn:
            conn.recv(4096)
            conn.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    port: int = server.getsockname()[1]
    return port


def test_admin_get_decodes_the_json_body() -> None:
    port = _serve_once(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"calls": []}')
    assert admin_get(port, "/status", timeout=5) == {"calls": []}


def test_admin_get_raises_for_a_reply_that_is_not_json() -> None:
    port = _serve_once(b"HTTP/1.0 200 OK\r\n\r\nnot json")
    with pytest.raises(ValueError):
        admin_get(port, timeout=5)


def test_admin_get_raises_for_a_refusal() -> None:
    port = _serve_once(b"HTTP/1.0 401 Unauthorized\r\n\r\n{}")
    with pytest.raises(AdminError, match="401"):
        admin_get(port, timeout=5)


def test_stop_process_kills_what_ignores_sigterm_with_its_children() -> None:
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(child.pid, flush=True); time.sleep(60)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    started = time.monotonic()
    assert stop_process(proc, timeout=0.5) == -9
    assert time.monotonic() - started < 10
    for _ in range(100):  # the child went with the group (reaped by init)
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} survived")
    proc.stdout.close()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_a_proxy_that_exits_at_start_up_is_reported_with_its_log(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[inside]\nlisten = 'not an address'\n")
    process = ProxyProcess.start(config, tmp_path / "bad.log", free_port())
    try:
        with pytest.raises(ProxyStartError, match="exited at start-up") as info:
            process.wait_ready(timeout=30)
        assert "bad.toml" in str(info.value)  # the proxy's own one-line reason
    finally:
        process.stop(timeout=5)
