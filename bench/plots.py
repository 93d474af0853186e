"""PNG plots of `pdserve bench serve`, `bench overload` and `bench experts` reports (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def attainment_vs_rate(report: dict, path: Path) -> Path:
    """One panel per SLO scale: attainment against rate, a line per configuration."""
    scales = [f"{s:g}" for s in report["slo"]["scales"]]
    cols = min(3, len(scales))
    rows = math.ceil(len(scales) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    target = report["slo"]["target_attainment"]
    for ax, scale in zip(axes.flat, scales, strict=False):
        for name, cfg in report["configs"].items():
            runs = [r for r in cfg["runs"] if scale in r["attainment"]]  # runs that sent other objectives are not judged here
            ax.plot([r["rate_rps"] for r in runs], [r["attainment"][scale] for r in runs], marker="o", label=name)
            goodput = cfg["goodput"][scale]["goodput_rps"]
            if goodput:
                ax.axvline(goodput, linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ref = report["slo"]["reference"]
        ax.set_title(f"scale {scale}: TTFT {ref['ttft_ms'] * float(scale):.0f} ms, "
                     f"TPOT {ref['tpot_ms'] * float(scale):.0f} ms", fontsize=9)
        ax.set_xlabel(f"rate ({report['workload']['rate_unit']})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(scales):]:
        ax.axis("off")
    axes[0][0].set_ylabel("SLO attainment")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report['workload']['name']}: SLO attainment against rate (dotted: goodput)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def goodput_vs_scale(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in report["comparison"] if r["slo_scale"] is not None]
    for name, cfg in report["configs"].items():
        line, = ax.plot([r["slo_scale"] for r in rows], [r["goodput_rps"][name] for r in rows], marker="o", label=name)
        # No failing rate found above it: the search stopped (budget or ceiling), goodput is at least this.
        open_ended = [(r["slo_scale"], r["goodput_rps"][name]) for r in rows
                      if r["goodput_rps"][name] and cfg["goodput"][f"{r['slo_scale']:g}"]["upper_rps"] is None]
        if open_ended:
            ax.scatter(*zip(*open_ended, strict=True), s=140, marker="^", facecolors="none",
                       edgecolors=line.get_color(), label=f"{name}: lower bound (no failing rate found)")
    ax.set_xlabel("SLO scale (x unloaded p90 TTFT and TPOT)")
    ax.set_ylabel(f"goodput ({report['workload']['rate_unit']}, {report['slo']['target_attainment']:.0%} attainment)")
    ax.set_title(f"{report['workload']['name']}: goodput against SLO scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def goodput_by_setting(report: dict, path: Path) -> Path:
    """Grid and absolute settings: a group of bars per setting, a bar per configuration (they have
    no one axis from tight to loose to draw a line along)."""
    rows = [r for r in report["comparison"] if r["slo_scale"] is None]
    names = list(report["configs"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * len(names) + 2), 4.4))
    x = np.arange(len(rows))
    for i, (name, cfg) in enumerate(report["configs"].items()):
        goodput = [r["goodput_rps"][name] for r in rows]
        # No failing rate found above it: the search stopped (budget or ceiling), goodput is at least this.
        open_ended = [bool(g) and cfg["goodput"][r["key"]]["upper_rps"] is None
                      for r, g in zip(rows, goodput, strict=True)]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, goodput, width, label=name)
        for bar, lower_bound in zip(bars, open_ended, strict=True):
            bar.set_hatch("//" if lower_bound else "")
    ax.set_xticks(x, [f"{r['key']}\nTTFT {r['ttft_ms']:.0f} ms\nTPOT {r['tpot_ms']:.0f} ms" for r in rows], fontsize=7)
    ax.set_ylabel(f"goodput ({report['workload']['rate_unit']}, {report['slo']['target_attainment']:.0%} attainment)")
    ax.set_title(f"{report['workload']['name']}: goodput per objective setting (hatched: lower bound, "
                 f"no failing rate found)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(report: dict, path: Path) -> Path:
    """TTFT and TPOT distributions of every configuration at the highest rate all of them ran (the first
    setting's run there, when each setting sent its objectives)."""
    rate_sets = [{r["rate_rps"] for r in cfg["runs"]} for cfg in report["configs"].values()]
    common = set.intersection(*rate_sets) if rate_sets else set()
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(10, 4))
    for name, cfg in report["configs"].items():
        rate = max(common) if common else max((r["rate_rps"] for r in cfg["runs"]), default=None)
        run = next((r for r in cfg["runs"] if r["rate_rps"] == rate), None)
        if run is None:
            continue
        for ax, key in ((ax_ttft, "ttft_ms"), (ax_tpot, "tpot_ms")):
            values = np.sort([q[key] for q in run["per_request"] if q[key] is not None])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), drawstyle="steps-post",
                        label=f"{name} @ {rate:.3g} {report['workload']['rate_unit']}"
                              + (f", objectives {run['objectives_sent']}" if run.get("objectives_sent") else ""))
    ax_ttft.set_xscale("log")  # queueing stretches TTFT over orders of magnitude; TPOT stays within a few x
    for ax, label in ((ax_ttft, "TTFT (ms)"), (ax_tpot, "TPOT (ms)")):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['workload']['name']}: latency distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overload_timeline(report: dict, path: Path) -> Path:
    """Three panels against time since the overload began: TTFT of what was served (log scale: queueing
    stretches it over orders of magnitude), refusals and admissions per second, and RSS."""
    rows, duration_s = report["timeline"]["requests"], report["settings"]["duration_s"]
    probes = report["recovery"]["probes"]
    fig, (ax_ttft, ax_rate, ax_mem) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for kind, color in (("chat", "tab:blue"), ("long", "tab:orange")):
        served = [(r["t_s"], r["ttft_ms"]) for r in rows if r["kind"] == kind and r["ttft_ms"] is not None]
        if served:
            ax_ttft.scatter(*zip(*served, strict=True), s=10, color=color, label=f"{kind}: served")
        ax_ttft.axhline(report["objectives_ms"][kind]["ttft_ms"], color=color, linestyle=":", linewidth=1,
                        label=f"{kind}: TTFT objective")
    served = [(duration_s + p["sent_after_s"], p["ttft_ms"]) for p in probes if p["ttft_ms"] is not None]
    if served:
        ax_ttft.scatter(*zip(*served, strict=True), s=16, marker="x", color="black", label="recovery probe")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.legend(fontsize=7, ncol=2)
    sent = [(r["t_s"], r["outcome"]) for r in rows] + [(duration_s + p["sent_after_s"], p["outcome"]) for p in probes]
    start_s = math.floor(min((t for t, _ in sent), default=0.0)) - 2.0  # from the baseline: deployment is not of interest
    bins = np.arange(start_s, math.ceil(max((t for t, _ in sent), default=duration_s)) + 2.0)
    ax_rate.hist([[t for t, o in sent if o != "rejected"], [t for t, o in sent if o == "rejected"]], bins=bins,
                 stacked=True, label=["admitted", "refused (429)"])
    ax_rate.set_ylabel("requests and probes per second")
    ax_rate.legend(fontsize=7)
    memory = [m for m in report["timeline"]["memory"] if m["t_s"] >= start_s]
    ax_mem.plot([m["t_s"] for m in memory], [m["rss_mib"] / 1024 for m in memory])
    ax_mem.set_ylabel("RSS of the process tree (GiB)" if memory else "RSS not sampled (--url)")
    ax_mem.set_xlabel("seconds since the overload began")
    for ax in (ax_ttft, ax_rate, ax_mem):
        ax.axvspan(0.0, duration_s, color="red", alpha=0.06)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['settings']['overload']:g}x capacity for {duration_s:g} s (shaded), then recovery probes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_buffering(report: dict, path: Path) -> Path:
    """Throughput against all-resident and hit rate, by share of experts resident, a line per policy."""
    fig, (tput, hits) = plt.subplots(1, 2, figsize=(10, 3.8))
    for policy in dict.fromkeys(r["policy"] for r in report["results"]):
        rows = [r for r in report["results"] if r["policy"] == policy]
        pct = [r["resident_pct"] for r in rows]
        tput.plot(pct, [r["throughput_vs_all_resident"] for r in rows], marker="o", label=policy)
        hits.plot(pct, [r["hit_rate"] for r in rows], marker="o", label=policy)
    tput.axhline(0.8, color="grey", linestyle="--", linewidth=1)
    hits.axhline(0.9, color="grey", linestyle="--", linewidth=1)
    tput.set_ylabel(f"tokens/s ÷ all resident ({report['all_resident_tokens_per_s']:.0f} tok/s)")
    hits.set_ylabel("expert hit rate")
    for ax in (tput, hits):
        ax.set_xlabel("experts resident per layer (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hits.set_ylim(0, 1.02)
    fig.suptitle(f"{report['model']}: {report['num_experts']} experts, top-{report['top_k']}, "
                 f"batch {report['settings']['batch']}; copies {report['copies']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict, out_dir: Path) -> list[Path]:
    """The SLO-scale plots when scales were judged, the bars when grid or absolute settings were."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if report["slo"]["scales"]:
        paths += [attainment_vs_rate(report, out_dir / "attainment.png"),
                  goodput_vs_scale(report, out_dir / "goodput.png")]
    if any(r["slo_scale"] is None for r in report["comparison"]):
        paths.append(goodput_by_setting(report, out_dir / "goodput_settings.png"))
    return [*paths, latency_cdfs(report, out_dir / "latency.png")]
