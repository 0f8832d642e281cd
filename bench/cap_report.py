"""The capacity bench's report: the machine, the summary figures (the JSON contract in
bench/README.md), the table on stdout and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import loop_forward as lf
from cap_common import LOSS_LIMIT_PCT, P99_LIMIT_MS
from cap_rtpengine import rtpengine_version


def machine() -> dict[str, Any]:
    info = lf.machine_info()
    info.pop("trio", None)
    info["rtpengine"] = rtpengine_version()
    return info


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    med = (report.get("per_packet") or {}).get("medians") or {}

    def r2(x: Any) -> Any:
        return round(x, 2) if isinstance(x, float) else x

    report["cpu_us_per_packet"] = {
        "python_floor": r2(med.get("python_floor")),
        "plain_relay": r2(med.get("plain_relay")),
        "srtp_relay": r2(med.get("srtp_relay")),
        "rtpengine_srtp": r2(med.get("rtpengine_srtp")),
    }
    best = (report.get("capacity") or {}).get("best") or {}
    report["capacity_calls"] = best.get("calls", 0)
    report["capacity_loss_pct"] = best.get("loss_pct")
    report["capacity_p50_added_ms"] = best.get("added_p50_ms")
    report["capacity_p99_added_ms"] = best.get("added_p99_ms")
    report["capacity_proxy_cores"] = best.get("proxy_cores")
    report["capacity_calls_per_proxy_core"] = (
        round(best["calls"] / best["proxy_cores"]) if best.get("proxy_cores") else None
    )
    setup = report.get("call_setup") or {}
    report["secured_calls_per_s"] = (setup.get("secured") or {}).get("calls_per_s")
    report["plain_calls_per_s"] = (setup.get("plain") or {}).get("calls_per_s")
    cpu = report["cpu_us_per_packet"]
    ratio = (
        cpu["srtp_relay"] / cpu["rtpengine_srtp"]
        if cpu["srtp_relay"] and cpu["rtpengine_srtp"]
        else None
    )
    report["srtp_vs_rtpengine"] = r2(ratio)
    report["goals"] = {
        "srtp_relay_le_1_5x_rtpengine": None if ratio is None else ratio <= 1.5,
        "capacity_ge_500_calls": report["capacity_calls"] >= 500,
        "capacity_ge_1000_calls": report["capacity_calls"] >= 1000,
    }
    side_by_side(report)
    return report


def paced_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON contract's ``paced``: each step's two engines in one flat row."""
    out = []
    for s in steps:
        r = s.get("rtpengine") or {}
        out.append(
            {
                "calls": s["calls"],
                "proxy_cores": s.get("proxy_cores"),
                "rtpengine_cores": r.get("rtpengine_cores"),
                "proxy_added_p50_ms": s.get("added_p50_ms"),
                "proxy_added_p99_ms": s.get("added_p99_ms"),
                "rtpengine_added_p50_ms": r.get("added_p50_ms"),
                "rtpengine_added_p99_ms": r.get("added_p99_ms"),
                "proxy_loss_pct": s.get("loss_pct"),
                "rtpengine_loss_pct": r.get("loss_pct"),
                "proxy_pass": bool(s.get("pass")),
                "rtpengine_pass": r.get("pass") if r else None,
                "cores_ratio": (
                    round(s["proxy_cores"] / r["rtpengine_cores"], 2)
                    if s.get("proxy_cores") and r.get("rtpengine_cores")
                    else None
                ),
            }
        )
    return out


def side_by_side(report: dict[str, Any]) -> None:
    """``paced``, ``paced_cores_ratio`` (proxy cores / rtpengine cores at the largest
    step both passed, ``paced_ratio_calls``) and calls per core of each engine at the
    largest step it passed."""
    paced = paced_steps((report.get("capacity") or {}).get("steps") or [])
    report["paced"] = paced
    both = [p for p in paced if p["proxy_pass"] and p["rtpengine_pass"] and p["rtpengine_cores"]]
    top = both[-1] if both else None
    ratio = top["proxy_cores"] / top["rtpengine_cores"] if top else None
    report["paced_cores_ratio"] = round(ratio, 2) if ratio is not None else None
    report["paced_ratio_calls"] = top["calls"] if top else None

    def per_core(engine: str) -> int | None:
        passed = [p for p in paced if p[f"{engine}_pass"] and p[f"{engine}_cores"]]
        return round(passed[-1]["calls"] / passed[-1][f"{engine}_cores"]) if passed else None

    report["calls_per_proxy_core"] = per_core("proxy")
    report["calls_per_rtpengine_core"] = per_core("rtpengine")
    report["goals"]["paced_cores_ratio_le_1_0"] = None if ratio is None else ratio <= 1.0
    cpc = report["calls_per_proxy_core"]
    report["goals"]["calls_per_proxy_core_ge_1000"] = None if cpc is None else cpc >= 1000


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"machine: {m['cpu_model']} | {m['cpu_count']} cpus | {m['implementation']} "
        f"{m['python']} | uvloop {m['uvloop']} | kernel {m['kernel']} | rtpengine "
        f"{m['rtpengine'] or 'not installed'} | generator: {report['generator']}"
    )
    w = report.get("proxy") or {}
    print(
        f"proxy media workers: per-packet config 1 -> {len(w.get('per_packet_workers') or [])} "
        f"worker process(es); capacity config {w.get('capacity_workers_config')} -> "
        f"{len(w.get('capacity_workers') or [])} (0 = relaying in the proxy process)"
    )
    cpu = report["cpu_us_per_packet"]
    print("\n1. CPU per packet, closed loop, relaying process pinned (median of runs)")
    print(f"{'case':<16} {'us/packet':>10}")
    for name in ("python_floor", "plain_relay", "srtp_relay", "rtpengine_srtp"):
        v = cpu.get(name)
        print(f"{name:<16} {'-' if v is None else f'{v:.2f}':>10}")
    if report.get("srtp_vs_rtpengine") is not None:
        print(f"srtp_relay / rtpengine_srtp = {report['srtp_vs_rtpengine']:.2f}x (goal <= 1.5x)")
    _print_capacity((report.get("capacity") or {}).get("steps") or [])
    _print_side_by_side(report)
    _print_setup(report.get("call_setup") or {})
    print(
        f"\nRESULT capacity_calls={report['capacity_calls']} "
        f"loss={report['capacity_loss_pct']}% added_p99={report['capacity_p99_added_ms']} ms "
        f"secured_calls_per_s={report['secured_calls_per_s']} "
        f"srtp_relay={cpu['srtp_relay']} us/pkt rtpengine={cpu['rtpengine_srtp']} us/pkt "
        f"paced_cores_ratio={report['paced_cores_ratio']} "
        f"(at {report['paced_ratio_calls']} calls) "
        f"calls_per_proxy_core={report['calls_per_proxy_core']}; goals {report['goals']}"
    )
    for note in report.get("notes", []):
        print(f"note: {note}")


def _print_capacity(steps: list[dict[str, Any]]) -> None:
    if not steps:
        return
    print("\n2. Simultaneous secured G.711 calls, 50 pps each way (added = minus baseline)")
    print(
        f"{'calls':>6} {'up':>5} {'loss %':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
        f"{'base p99':>8} {'proxy cores':>11} {'us/pkt':>7} {'box':>5} {'setup s':>7}  verdict"
    )
    for s in steps:
        if "loss_pct" not in s:
            print(f"{s['calls']:>6} set-up failed")
            continue
        print(
            f"{s['calls']:>6} {s['calls_up']:>5} {s['loss_pct']:>8.4f} "
            f"{s['added_p50_ms']:>8.2f} {s['added_p99_ms']:>8.2f} "
            f"{s['baseline_p99_ms']:>8.2f} {s['proxy_cores'] or 0:>11.2f} "
            f"{s['proxy_cpu_us_per_packet'] or 0:>7.2f} {s['box_busy_cores'] or 0:>5.2f} "
            f"{s['setup_s']:>7.1f}  {'PASS' if s['pass'] else 'FAIL'}"
        )


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_side_by_side(report: dict[str, Any]) -> None:
    paced = report.get("paced") or []
    if not any(p["rtpengine_pass"] is not None for p in paced):
        return
    threads = (report.get("capacity") or {}).get("rtpengine_threads")
    print(
        f"\n2b. Side by side at the same paced load: proxy vs rtpengine userspace "
        f"RTP <-> SDES-SRTP ({threads} worker threads)"
    )
    print(
        f"{'calls':>6} {'proxy cores':>11} {'rtpe cores':>10} {'ratio':>6} "
        f"{'proxy +p50/+p99 ms':>19} {'rtpe +p50/+p99 ms':>18} {'loss % proxy/rtpe':>18}"
    )
    for p in paced:
        ratio = p["cores_ratio"]
        proxy_lat = f"{_fmt(p['proxy_added_p50_ms'], '.2f')}/{_fmt(p['proxy_added_p99_ms'], '.2f')}"
        rtpe_lat = (
            f"{_fmt(p['rtpengine_added_p50_ms'], '.2f')}/{_fmt(p['rtpengine_added_p99_ms'], '.2f')}"
        )
        loss = f"{_fmt(p['proxy_loss_pct'], '.3f')}/{_fmt(p['rtpengine_loss_pct'], '.3f')}"
        verdict = "/".join(
            "-" if v is None else "PASS" if v else "FAIL"
            for v in (p["proxy_pass"], p["rtpengine_pass"])
        )
        print(
            f"{p['calls']:>6} {_fmt(p['proxy_cores'], '.2f'):>11} "
            f"{_fmt(p['rtpengine_cores'], '.2f'):>10} {_fmt(ratio, '.2f'):>6} "
            f"{proxy_lat:>19} {rtpe_lat:>18} {loss:>18}  {verdict}"
        )
    print(
        f"paced_cores_ratio = {report['paced_cores_ratio']} at {report['paced_ratio_calls']} "
        f"calls (the largest step both passed); calls per core: proxy "
        f"{report['calls_per_proxy_core']}, rtpengine {report['calls_per_rtpengine_core']}"
    )


def _print_setup(setup: dict[str, Any]) -> None:
    if not setup:
        return
    print("\n3. Call set-up through one proxy (closed loop)")
    for kind in ("secured", "plain"):
        s = setup.get(kind) or {}
        print(
            f"{kind:<8} {s.get('calls_per_s')} calls/s ({s.get('completed')}/"
            f"{s.get('calls')} completed, {s.get('failed')} failed, window "
            f"{s.get('window')}), proxy {s.get('proxy_cores')} cores = "
            f"{s.get('proxy_ms_per_call')} ms CPU/call (SIP process "
            f"{s.get('proxy_sip_process_cores')} cores), bench UA "
            f"{s.get('bench_ua_cores')} cores; limit: {s.get('limit')}"
        )


ENGINES = (("proxy", "sipura-proxy", "tab:blue"), ("rtpengine", "rtpengine", "tab:orange"))


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Added p50/p99 (top) and cores and loss (bottom) against calls, both engines."""
    paced = [p for p in report.get("paced") or [] if p["proxy_loss_pct"] is not None]
    if not paced:
        return "no capacity steps to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no PNG"
    fig, (lat, cores) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    loss = cores.twinx()
    top_ms, top_loss = 2 * P99_LIMIT_MS, 2 * LOSS_LIMIT_PCT
    for key, label, color in ENGINES:
        rows = [p for p in paced if p[f"{key}_loss_pct"] is not None]
        if not rows:
            continue
        n = [p["calls"] for p in rows]
        p99 = [p[f"{key}_added_p99_ms"] for p in rows]
        lat.plot(n, p99, "o-", color=color, label=f"{label} added p99")
        p50 = [p[f"{key}_added_p50_ms"] for p in rows]
        lat.plot(n, p50, "s--", color=color, alpha=0.6, label=f"{label} added p50")
        cores.plot(n, [p[f"{key}_cores"] for p in rows], "o-", color=color, label=f"{label} cores")
        losses = [p[f"{key}_loss_pct"] for p in rows]
        loss.plot(n, losses, "^:", color=color, alpha=0.7, label=f"{label} loss %")
        top_ms, top_loss = max(top_ms, 1.1 * max(p99)), max(top_loss, 1.2 * max(losses))
    lat.axhline(P99_LIMIT_MS, color="grey", linestyle=":", linewidth=1)
    # linear below 1 ms, logarithmic above: a failing step's tail (tens or hundreds of ms)
    # must not flatten the passing ones against the 5 ms limit
    lat.set_yscale("symlog", linthresh=1.0)
    lat.set_ylim(0, top_ms * 1.5)
    ticks = [t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= top_ms * 1.5]
    lat.set_yticks(ticks, [f"{t:g}" for t in ticks])
    lat.set_ylabel("added latency, ms (log above 1)")
    lat.legend(loc="upper left", fontsize=7)
    loss.axhline(LOSS_LIMIT_PCT, color="grey", linestyle="-.", linewidth=1)
    loss.set_ylim(0, top_loss)
    loss.set_ylabel("loss, %")
    cores.set_ylim(bottom=0)
    cores.set_ylabel("CPU cores (relaying processes)")
    cores.set_xlabel("simultaneous secured G.711 calls (50 pps each way)")
    handles = cores.get_legend_handles_labels()
    more = loss.get_legend_handles_labels()
    cores.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=7)
    m = report["machine"]
    lat.set_title(
        f"sipura-proxy vs rtpengine userspace at the same paced load, {m['cpu_count']} x "
        f"{m['cpu_model']} (generator on the same box)\nlimits: added p99 "
        f"{P99_LIMIT_MS:g} ms (dotted), loss {LOSS_LIMIT_PCT} % (dash-dot)",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
