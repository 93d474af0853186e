"""PNG of a `pdserve autoscale --replay` report: how the pools followed the load, and what the
requests were predicted to get (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

POOL_COLORS = {"prefill": "tab:blue", "decode": "tab:orange"}


def replay_plot(report: dict, path: Path) -> Path:
    """Top: replicas per pool, wanted (solid) and ready (dashed), with the arrival rate on a
    second axis. Bottom: predicted attainment of the requests arriving in each interval."""
    rows = report["timeline"]
    t_min = [row["t_s"] / 60.0 for row in rows]
    fig, (ax, ax_att) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for pool, color in POOL_COLORS.items():
        ax.plot(t_min, [row["wanted"][pool] for row in rows], drawstyle="steps-post", color=color,
                label=f"{pool} wanted")
        ax.plot(t_min, [row["ready"][pool] for row in rows], drawstyle="steps-post", color=color, linestyle="--",
                label=f"{pool} ready")
    ax.set_ylabel("replicas")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax_rate = ax.twinx()
    ax_rate.plot(t_min, [row["arrival_rps"] for row in rows], color="grey", alpha=0.6, linewidth=1,
                 label="arrival rate (window average)")
    ax_rate.set_ylabel("arrival rate (req/s)")
    ax_rate.set_ylim(bottom=0)
    lines, labels = ax.get_legend_handles_labels()
    rate_lines, rate_labels = ax_rate.get_legend_handles_labels()
    ax.legend(lines + rate_lines, labels + rate_labels, fontsize=8, loc="upper left")
    with_requests = [(t, row["attainment"]) for t, row in zip(t_min, rows, strict=True) if row["attainment"] is not None]
    if with_requests:
        ax_att.plot(*zip(*with_requests, strict=True), drawstyle="steps-post", color="tab:green")
    summary = report["summary"]
    ax_att.axhline(summary["attainment"], color="grey", linestyle="--", linewidth=1,
                   label=f"overall {summary['attainment']:.1%}")
    ax_att.set_ylim(-0.02, 1.02)
    ax_att.set_ylabel("predicted attainment")
    ax_att.set_xlabel("time (min)")
    ax_att.grid(alpha=0.3)
    ax_att.legend(fontsize=8, loc="lower left")
    gpu_hours = ", ".join(f"{gpu} {h:.2f}" for gpu, h in summary["gpu_hours"].items())
    fig.suptitle(f"autoscaling replay: {summary['requests']} requests, GPU-hours {gpu_hours}, cost {summary['cost']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
