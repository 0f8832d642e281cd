"""Smoke test of ``bench/capacity.py --quick --json`` (about 40-50 s).

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
from typing import Any

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
    # every call set up and secured (the bench's progress log says why not)
    assert first.get("calls_up") == first["calls"], (first, result.stderr[-3000:])
    assert first["secured_by_proxy"] >= first["calls"]
    for key in ("loss_pct", "added_p50_ms", "added_p99_ms", "baseline_p99_ms"):
        assert _number(first[key]) and first[key] >= 0, (key, first[key])
    assert first["detail"]["up"]["recv"] > 0 and first["detail"]["down"]["recv"] > 0
    assert isinstance(report["capacity_calls"], int) and report["capacity_calls"] >= 0
    if report["capacity_calls"]:
        assert _number(report["capacity_loss_pct"]) and _number(report["capacity_p99_added_ms"])

    _check_side_by_side(report)

    setup = report["call_setup"]
    for kind in ("secured", "plain"):
        assert setup[kind]["completed"] > 0 and setup[kind]["failed"] == 0, setup[kind]
    assert _number(report["secured_calls_per_s"]) and report["secured_calls_per_s"] > 0


PACED_KEYS = {
    "calls",
    "proxy_cores",
    "rtpengine_cores",
    "proxy_added_p50_ms",
    "proxy_added_p99_ms",
    "rtpengine_added_p50_ms",
    "rtpengine_added_p99_ms",
    "proxy_loss_pct",
    "rtpengine_loss_pct",
}


def _check_side_by_side(report: dict[str, Any]) -> None:
    """The quick run's one paced step (100 calls), through the proxy and, when installed,
    through rtpengine with its SRTP checked; the ratio whenever both passed."""
    for key in ("paced", "paced_cores_ratio", "calls_per_proxy_core"):
        assert key in report, key
    paced = report["paced"]
    assert isinstance(paced, list) and [p["calls"] for p in paced] == [100], paced
    step = paced[0]
    assert set(step) >= PACED_KEYS, set(step)
    for key in ("proxy_cores", "proxy_added_p50_ms", "proxy_added_p99_ms", "proxy_loss_pct"):
        assert _number(step[key]) and step[key] >= 0, (key, step[key])
    assert step["proxy_cores"] > 0
    capacity = report["capacity"]
    assert isinstance(capacity, dict)
    if not (shutil.which("rtpengine") or Path("/usr/bin/rtpengine").exists()):
        assert step["rtpengine_cores"] is None and report["paced_cores_ratio"] is None
        return
    rtpe = capacity["steps"][0]["rtpengine"]
    assert rtpe["calls_up"] == 100 and rtpe["threads"] >= 1, rtpe
    check = rtpe["srtp_check"]  # rtpengine's SRTP authenticates under the key it offered
    assert check["ok"] and check["sampled_calls"] > 0, check
    assert check["to_callee_wrong_key_rejected"] == check["sampled_calls"], check
    assert rtpe["detail"]["up"]["recv"] > 0 and rtpe["detail"]["down"]["recv"] > 0
    for key in ("rtpengine_cores", "rtpengine_added_p50_ms", "rtpengine_added_p99_ms"):
        assert _number(step[key]) and step[key] >= 0, (key, step[key])
    assert step["rtpengine_cores"] > 0 and _number(step["rtpengine_loss_pct"])
    ratio = report["paced_cores_ratio"]
    if step["proxy_pass"] and step["rtpengine_pass"]:
        assert ratio == round(step["proxy_cores"] / step["rtpengine_cores"], 2), ratio
        assert report["paced_ratio_calls"] == 100
    else:
        assert ratio is None
    if step["proxy_pass"]:
        assert report["calls_per_proxy_core"] == round(100 / step["proxy_cores"])
