"""rtpengine for tests and benches: its ng-protocol client and a loopback instance.

:class:`NG` is bencode over UDP with a cookie prefix (copied from the rtpengine peer
kit's ngclient.py, typed and linted). Wire format (rtpengine docs/ng_control_protocol.md):
``b"<cookie> <bencoded dict>"``; the reply carries the same cookie.

:func:`start_rtpengine` runs a userspace-only rtpengine (``--table=-1``, no kernel
module) on 127.0.0.1 with a free ng port and a free media port range, as a
:class:`testkit.processes.Processes` member (stopped by its PID), and waits until it
answers an ng ``ping``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testkit.ports import HOST, free_port, free_port_range
from testkit.processes import Processes


def bencode(obj: Any) -> bytes:
    if isinstance(obj, bool):
        obj = int(obj)
    if isinstance(obj, int):
        return b"i%de" % obj
    if isinstance(obj, str):
        obj = obj.encode()
    if isinstance(obj, bytes | bytearray):
        return b"%d:%s" % (len(obj), bytes(obj))
    if isinstance(obj, list | tuple):
        return b"l" + b"".join(bencode(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        out = [b"d"]
        for k in sorted(obj, key=lambda k: k.encode() if isinstance(k, str) else k):
            out.append(bencode(k))
            out.append(bencode(obj[k]))
        out.append(b"e")
        return b"".join(out)
    raise TypeError(f"cannot bencode {type(obj)}")


def bdecode(data: bytes) -> Any:
    def dec(i: int) -> tuple[Any, int]:
        c = data[i : i + 1]
        if c == b"i":
            j = data.index(b"e", i)
            return int(data[i + 1 : j]), j + 1
        if c == b"l":
            i += 1
            items = []
            while data[i : i + 1] != b"e":
                v, i = dec(i)
                items.append(v)
            return items, i + 1
        if c == b"d":
            i += 1
            table: dict[Any, Any] = {}
            while data[i : i + 1] != b"e":
                k, i = dec(i)
                v, i = dec(i)
                table[k.decode() if isinstance(k, bytes) else k] = v
            return table, i + 1
        if c.isdigit():
            j = data.index(b":", i)
            n = int(data[i:j])
            s: Any = data[j + 1 : j + 1 + n]
            with contextlib.suppress(UnicodeDecodeError):
                s = s.decode()
            return s, j + 1 + n
        raise ValueError(f"bad bencode at {i}: {data[i : i + 20]!r}")

    return dec(0)[0]


class NG:
    def __init__(self, host: str = "127.0.0.1", port: int = 22222, timeout: float = 3.0) -> None:
        self.addr = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.bind(("127.0.0.1", 0))

    def cmd(self, command: str, **kw: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"command": command}
        for k, v in kw.items():
            d[k.replace("_", "-")] = v
        cookie = os.urandom(6).hex().encode()
        self.sock.sendto(cookie + b" " + bencode(d), self.addr)
        while True:
            data, _ = self.sock.recvfrom(65535)
            c, _, body = data.partition(b" ")
            if c == cookie:
                break
        r: dict[str, Any] = bdecode(body)
        if r.get("result") not in ("ok", "pong"):
            raise RuntimeError(f"ng {command} failed: {r}")
        return r

    def close(self) -> None:
        self.sock.close()


def rtpengine_binary() -> str | None:
    """The rtpengine daemon (Debian ``rtpengine-daemon``), or None."""
    exe = shutil.which("rtpengine") or "/usr/bin/rtpengine"
    return exe if os.access(exe, os.X_OK) else None


@dataclass
class Rtpengine:
    """A running rtpengine of a test: its ng client and its media ports."""

    ng: NG
    ports: tuple[int, int]
    log: Path


def start_rtpengine(procs: Processes, workdir: Path, ports: int = 40) -> Rtpengine:
    """Start one (see the module docstring); AssertionError if it does not come up."""
    exe = rtpengine_binary()
    assert exe is not None, "rtpengine is not installed"
    ng_port = free_port()
    port_min, port_max = free_port_range(ports)
    log = workdir / "rtpengine.log"
    argv = [exe, "--config-file=none", "--table=-1", f"--interface={HOST}",
            f"--listen-ng={HOST}:{ng_port}", f"--port-min={port_min}", f"--port-max={port_max}",
            "--foreground", "--log-stderr", "--log-level=6"]  # fmt: skip
    proc = procs.start(argv, log)
    ng = NG(HOST, ng_port, timeout=0.3)
    deadline = time.monotonic() + 10
    while True:
        try:
            ng.cmd("ping")
            break
        except OSError:
            assert proc.poll() is None, f"rtpengine exited: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "rtpengine did not answer an ng ping in 10 s"
            time.sleep(0.1)
    ng.sock.settimeout(3.0)
    return Rtpengine(ng, (port_min, port_max), log)
