#!/usr/bin/env python3
"""Pure-Python fallback for the C load generators (used only when there is no gcc).

``pygen.py rtpgen ...`` takes rtpgen.c's arguments and speaks its stdin/stdout protocol
(closed loop only); ``pygen.py capgen ...`` takes capgen.c's and speaks its protocol.
Both are far slower than the C versions (a Python sender tops out near 100-150k
packets/s and its own jitter shows in the latency figures): results obtained with them
are marked as such by bench/capacity.py and are not comparable with C-generator runs.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import sys
import time

PAYLOAD = bytes((j * 7 + 3) & 0xFF for j in range(160))
RING = 2048


def _sock(fd: str) -> socket.socket:
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return sock


def rtpgen(argv: list[str]) -> int:
    tx, rx = _sock(argv[0]), _sock(argv[1])
    window = int(argv[2])
    warmup, duration = float(argv[5]), float(argv[6])
    ssrc_base, expect_len = int(argv[7], 0), int(argv[8])
    ports = [int(p) for p in argv[11:]]
    n = len(ports)
    packets = [
        bytearray(struct.pack("!BBHII", 0x80, 0, 0, 0, ssrc_base + i) + PAYLOAD) for i in range(n)
    ]
    seqs = [0] * n
    sent = recvd = written_off = badlen = stalls = 0
    nxt = 0

    def receive(timeout: float) -> int:
        nonlocal recvd, badlen
        ready, _, _ = select.select([rx], [], [], max(0.0, timeout))
        got = 0
        if ready:
            while True:
                try:
                    data = rx.recv(2048)
                except BlockingIOError:
                    break
                got += 1
                if len(data) != expect_len:
                    badlen += 1
        recvd += got
        return got

    phase, t_next, gt0 = 0, time.monotonic() + warmup, 0.0
    while True:
        now = time.monotonic()
        if now >= t_next:
            deadline = now + 0.2
            while recvd + written_off < sent and time.monotonic() < deadline:
                receive(deadline - time.monotonic())
            written_off = sent - recvd
            if phase == 0:
                print(f"READY0 {recvd}", flush=True)
                sys.stdin.readline()
                gt0 = time.monotonic()
                t_next, phase = gt0 + duration, 1
                continue
            print(f"READY1 {recvd} {time.monotonic() - gt0:.6f}", flush=True)
            sys.stdin.readline()
            break
        for _ in range(window - (sent - recvd - written_off)):
            i, nxt = nxt, (nxt + 1) % n
            struct.pack_into("!HI", packets[i], 2, seqs[i] & 0xFFFF, (seqs[i] * 160) & 0xFFFFFFFF)
            seqs[i] += 1
            with contextlib.suppress(OSError):
                tx.sendto(packets[i], ("127.0.0.1", ports[i]))
            sent += 1
        if not receive(min(0.05, t_next - time.monotonic())) and recvd + written_off < sent:
            stalls += 1
            written_off = sent - recvd
    print(
        f"END sent={sent} recvd={recvd} badlen={badlen} stalls={stalls} senderr=0 kept=0",
        flush=True,
    )
    return 0


def capgen(argv: list[str]) -> int:
    phone, peer = _sock(argv[0]), _sock(argv[1])
    warmup, duration, rate, keymode = float(argv[4]), float(argv[5]), float(argv[6]), int(argv[7])
    with open(argv[2]) as f:
        n, k, srtp_len = (int(x) for x in f.readline().split())
        rows = [[int(x) for x in f.readline().split()] for _ in range(n)]
    with open(argv[3], "rb") as f:
        srtp = f.read()
    maps = {"up": {}, "down": {}}  # rx key -> call
    for i, row in enumerate(rows):
        maps["down"][row[4]] = i
        maps["up"][row[5]] = i
    sent_at = {"up": {}, "down": {}}  # (call, seq) -> (time, in window)
    stats = {leg: {"sent": 0, "recv": 0, "lat": []} for leg in ("up", "down")}
    win = [None, None]

    def note_sent(leg: str, call: int, seq: int, t: float) -> None:
        inside = win[0] is not None and win[1] is None
        sent_at[leg][(call, seq)] = (t, inside)
        if inside:
            stats[leg]["sent"] += 1

    def drain(sock: socket.socket, leg: str) -> None:
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                return
            t = time.monotonic()
            if len(data) < 12:
                continue
            seq, ssrc = struct.unpack_from("!H", data, 2)[0], struct.unpack_from("!I", data, 8)[0]
            call = maps[leg].get(addr[1] if keymode == 0 else ssrc)
            entry = sent_at[leg].pop((call, seq), None)
            if entry is not None and entry[1]:
                stats[leg]["recv"] += 1
                stats[leg]["lat"].append((t - entry[0]) * 1e6)

    total_rate = rate * n
    t0 = time.monotonic() + 0.01
    slot = 0
    header = struct.Struct("!BBHII")
    while True:
        now = time.monotonic()
        if win[0] is None and now >= t0 + warmup:
            win[0] = now
            print("WIN0", flush=True)
        if win[0] is not None and win[1] is None and now >= t0 + warmup + duration:
            win[1] = now
            print("WIN1", flush=True)
            break
        due = int((now - t0) * total_rate) + 1 if now > t0 else 0
        while slot < due:
            i, j = slot % n, slot // n
            row = rows[i]
            seq = (row[3] + j) & 0xFFFF
            pkt = header.pack(0x80, 0, seq, ((row[3] + j) * 160) & 0xFFFFFFFF, row[2]) + PAYLOAD
            with contextlib.suppress(OSError):
                phone.sendto(pkt, ("127.0.0.1", row[0]))
            note_sent("up", i, seq, now)
            if j < k:
                off = (i * k + j) * srtp_len
                e = srtp[off : off + srtp_len]
                with contextlib.suppress(OSError):
                    peer.sendto(e, ("127.0.0.1", row[1]))
                note_sent("down", i, (e[2] << 8) | e[3], now)
            slot += 1
        drain(phone, "down")
        drain(peer, "up")
        select.select([phone, peer], [], [], max(0.0, t0 + slot / total_rate - time.monotonic()))
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        select.select([phone, peer], [], [], 0.02)
        drain(phone, "down")
        drain(peer, "up")

    def pct(values: list[float], q: float) -> float:
        if not values:
            return -1.0
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    out = [f"END calls={n} window_s={win[1] - win[0]:.3f} senderr=0 late_sends=0 worst_lag_ms=0"]
    for leg in ("up", "down"):
        s = stats[leg]
        lat = s["lat"]
        out.append(
            f"{leg}_sent={s['sent']} {leg}_recv={s['recv']} {leg}_recv_all={s['recv']} "
            f"{leg}_unmatched=0 {leg}_late=0 {leg}_p50_us={pct(lat, 0.5):.1f} "
            f"{leg}_p90_us={pct(lat, 0.9):.1f} {leg}_p99_us={pct(lat, 0.99):.1f} "
            f"{leg}_p999_us={pct(lat, 0.999):.1f} {leg}_max_us={max(lat, default=-1):.1f}"
        )
    both = stats["up"]["lat"] + stats["down"]["lat"]
    out.append(f"all_p50_us={pct(both, 0.5):.1f} all_p99_us={pct(both, 0.99):.1f}")
    print(" ".join(out), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("rtpgen", "capgen"):
        print("usage: pygen.py rtpgen|capgen ARGS (see rtpgen.c / capgen.c)", file=sys.stderr)
        sys.exit(2)
    sys.exit((rtpgen if sys.argv[1] == "rtpgen" else capgen)(sys.argv[2:]))
