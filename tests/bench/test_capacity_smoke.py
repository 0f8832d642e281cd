"""Smoke test of ``bench/capacity.py --quick --json`` (about 30-45 s).

It checks the report's structure and that real calls were set up and carried media,
never a speed: the figures of a quick run on a shared CI box are not meant to pass the
capacity goals, so no assertion depends on them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the bench reads /proc and pins CPUs"
)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        str(ROOT / "bench" / "capacity.py"),
        "--quick",
        "--json",
        "--cache",
        str(tmp_path / "cache"),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)

    for key in (
        "machine",
        "cpu_us_per_packet",
        "capacity_calls",
        "capacity_loss_pct",
        "capacity_p99_added_ms",
        "secured_calls_per_s",
    ):
        assert key in report, key
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["kernel"]

    cpu = report["cpu_us_per_packet"]
    assert set(cpu) >= {"python_floor", "plain_relay", "srtp_relay", "rtpengine_srtp"}
    for name in ("python_floor", "plain_relay", "srtp_relay"):
        assert _number(cpu[name]) and cpu[name] > 0, (name, cpu[name])
    if shutil.which("rtpengine") or Path("/usr/bin/rtpengine").exists():
        assert _number(cpu["rtpengine_srtp"]) and cpu["rtpengine_srtp"] > 0
    else:
        assert cpu["rtpengine_srtp"] is None

    steps = report["capacity"]["steps"]
    assert steps, "no capacity step ran"
    first = steps[0]
    assert first["calls_up"] == first["calls"], first  # every call set up and secured
    assert first["secured_by_proxy"] >= first["calls"]
    for key in ("loss_pct", "added_p50_ms", "added_p99_ms", "baseline_p99_ms"):
        assert _number(first[key]) and first[key] >= 0, (key, first[key])
    assert first["detail"]["up"]["recv"] > 0 and first["detail"]["down"]["recv"] > 0
    assert isinstance(report["capacity_calls"], int) and report["capacity_calls"] >= 0
    if report["capacity_calls"]:
        assert _number(report["capacity_loss_pct"]) and _number(report["capacity_p99_added_ms"])

    setup = report["call_setup"]
    for kind in ("secured", "plain"):
        assert setup[kind]["completed"] > 0 and setup[kind]["failed"] == 0, setup[kind]
    assert _number(report["secured_calls_per_s"]) and report["secured_calls_per_s"] > 0
