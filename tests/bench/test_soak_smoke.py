"""Smoke test of ``bench/soak.py --quick --json`` (about 10-20 s).

Real calls, secured and plain, with media both ways through a real proxy with its media
workers; the soak's own verdict (no failed call, nothing left allocated, bounded growth)
must hold, and the report must carry every figure the README quotes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the soak reads /proc")


def test_quick_soak_passes_and_reports_every_process(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    report = json.loads(result.stdout)

    assert report["pass"] is True and report["problems"] == []
    outcome = report["outcome"]
    calls = report["args"]["calls"]
    assert outcome["completed"] == calls and outcome["failures"] == {}
    assert 0 < outcome["secured"] < calls  # both kinds of call ran
    sent = outcome["packets_sent"]
    assert sent >= calls * report["args"]["packets"]
    assert outcome["to_phone"] >= 0.8 * sent and outcome["to_peer"] >= 0.8 * sent
    assert outcome["bad_at_peer"] == 0

    labels = [snap["label"] for snap in report["snapshots"]]
    assert labels == ["start", "warm", "half", "after", "settled"]
    for snap in report["snapshots"]:
        names = set(snap["processes"])
        assert "sip" in names and any(name.startswith("worker") for name in names), names
        for use in snap["processes"].values():
            assert use["rss_kib"] > 0 and use["fds"] > 0, use
    warm, settled = report["snapshots"][1], report["snapshots"][-1]
    assert settled["calls"] == 0 and settled["sessions"] == 0
    assert settled["ports_free"] == warm["ports_free"] > 0
    assert report["machine"]


def test_the_verdict_names_every_leak() -> None:
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
    try:
        import soak
    finally:
        del sys.path[:2]
    args = soak.parse_args(["--quick"])
    pids = {"worker 0": 11}

    def snap(label: str, rss: int, fds: int, calls: int, sessions: int, free: int,
             workers: dict[str, int] = pids) -> soak.Snapshot:  # fmt: skip
        processes = {"sip": soak.Usage(10, rss, fds), "worker 0": soak.Usage(11, 9000, 12)}
        return soak.Snapshot(label, processes, calls, sessions, free, workers)

    warm = snap("warm", 50_000, 19, 0, 0, 100)
    half = snap("half", 120_000, 19, 0, 0, 100)  # a load's peak stays resident: allowed
    clean = soak.Outcome(placed=5, completed=5)
    settled = snap("settled", 130_000, 21, 0, 0, 100)
    assert soak.judge(args, warm, half, settled, clean, "") == []
    leaky = soak.Outcome(placed=5, completed=4)
    leaky.failures["timeout: no answer"] += 1
    problems = soak.judge(
        args, warm, half, snap("settled", 225_000, 40, 2, 1, 97, {"worker 0": 12}), leaky,
        "ERROR internal error handling a message\nTraceback (most recent call last):",
    )  # fmt: skip
    assert problems == [
        "1 calls failed",
        "2 calls left",
        "1 media sessions left",
        "3 port pairs left allocated",
        "media workers replaced: {'worker 0': 11} -> {'worker 0': 12}",
        "sip: RSS grew 102.5 MB in the second half (> 30)",
        "sip: RSS 220 MB (> 200)",
        "sip: 21 more open descriptors",
        "2 internal errors in the proxy log",
    ]
