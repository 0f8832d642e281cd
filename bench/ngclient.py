"""Minimal rtpengine ng-protocol client: bencode over UDP with a cookie prefix.

Copied from the rtpengine peer kit's ngclient.py (shared/peers/rtpengine), typed and linted.
Wire format (rtpengine docs/ng_control_protocol.md): ``b"<cookie> <bencoded dict>"``; the
reply carries the same cookie.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any


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
