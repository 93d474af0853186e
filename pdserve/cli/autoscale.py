"""The autoscaling commands of the `pdserve` CLI: the policy dry run (`pdserve autoscale
--replay`), the trace it replays (`pdserve bench trace`) and the policy's JSON Schema
(`pdserve schema autoscaling`). Heavy imports wait until a command runs, so `pdserve --help`
stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMELINE_LINES = 40
"""Longer timelines print a sample: every change of size, then evenly spaced intervals."""


def _replicas_pair(text: str) -> dict[str, int]:
    try:
        prefill, decode = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PREFILL,DECODE replica counts (e.g. 1,2), got {text!r}") from None
    if prefill < 0 or decode < 0:
        raise argparse.ArgumentTypeError(f"replica counts must be >= 0, got {text!r}")
    return {"prefill": prefill, "decode": decode}


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _clock(t_s: float) -> str:
    minutes, seconds = divmod(int(t_s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _sampled(rows: list[dict], limit: int = TIMELINE_LINES) -> list[int]:
    """Indices of the rows to print: all when few; else the changes of size (first, last and
    every row whose wanted or ready replicas differ from the row before), topped up with evenly
    spaced rows, or, when the changes alone are too many, evenly spaced changes."""
    n = len(rows)
    if n <= limit:
        return list(range(n))
    changes = sorted({0, n - 1} | {i for i in range(1, n) if (rows[i]["wanted"], rows[i]["ready"]) != (
        rows[i - 1]["wanted"], rows[i - 1]["ready"])})
    if len(changes) >= limit:
        return [changes[round(j * (len(changes) - 1) / (limit - 1))] for j in range(limit)]
    spare = limit - len(changes)
    evenly = {round(j * (n - 1) / (spare - 1)) for j in range(spare)} if spare > 1 else set()
    return sorted(set(changes) | evenly)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def timeline_lines(report: dict) -> list[str]:
    rows = report["timeline"]
    shown = _sampled(rows)
    lines = [f"{'time':>8} {'req/s':>6} {'prefill':>9} {'decode':>9} {'TTFT ms':>8} {'TPOT ms':>8} {'attained':>8}",
             f"{'':>8} {'':>6} {'want/rdy':>9} {'want/rdy':>9}"]
    for i in shown:
        r = rows[i]
        pools = [f"{r['wanted'][p]}/{r['ready'][p]}" for p in ("prefill", "decode")]
        attained = "-" if r["attainment"] is None else f"{r['attainment']:.0%}"
        lines.append(f"{_clock(r['t_s']):>8} {r['arrival_rps']:>6.2f} {pools[0]:>9} {pools[1]:>9} "
                     f"{_ms(r['ttft_ms']):>8} {_ms(r['tpot_ms']):>8} {attained:>8}")
    if len(shown) < len(rows):
        lines.append(f"({len(shown)} of {len(rows)} intervals shown: every change of size and evenly spaced others; "
                     "all of them in replay.json)")
    return lines


def summary_lines(report: dict) -> list[str]:
    s, o = report["summary"], report["options"]
    gpu_hours = ", ".join(f"{gpu} {h:.2f}" for gpu, h in s["gpu_hours"].items())
    events = ", ".join(f"{pool} {e['up']} up / {e['down']} down" for pool, e in s["scale_events"].items())
    return [
        f"{s['requests']} requests over {_clock(s['duration_s'])}, a decision every {report['policy']['interval_s']:g} s, "
        f"replicas ready {o['startup_s']:g} s after they are requested",
        f"predicted SLO attainment {s['attainment']:.1%} (TTFT {s['ttft_attainment']:.1%}, "
        f"TPOT {s['tpot_attainment']:.1%})",
        f"GPU-hours: {gpu_hours}; cost {s['cost']:.2f} (at the policy's gpu_cost_per_hour)",
        f"peak replicas: prefill {s['peak_replicas']['prefill']}, decode {s['peak_replicas']['decode']}; "
        f"scale events: {events}",
    ]


def _cmd_autoscale(args: argparse.Namespace) -> int:
    from pdserve.bench.autoscale_plot import replay_plot
    from pdserve.config.autoscaling_policy import load_policy
    from pdserve.controller.autoscaling.replay import replay
    from pdserve.controller.autoscaling.trace import load_trace

    try:
        policy = load_policy(args.policy)
        result = replay(load_trace(args.replay), policy, startup_s=args.startup_s,
                        initial_replicas=args.initial_replicas, noise=args.noise, seed=args.seed)
    except ValueError as err:  # PolicyError and TraceError are ValueErrors with readable messages
        print(f"pdserve autoscale: {err}", file=sys.stderr)
        return 2
    report = {"policy_file": args.policy, "trace_file": args.replay,
              "options": {"startup_s": args.startup_s, "initial_replicas": args.initial_replicas,
                          "noise": args.noise, "seed": args.seed},
              "policy": policy.model_dump(mode="json"), **result.to_dict()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(report, indent=1))
    png = replay_plot(report, out / "replay.png")
    if args.json:
        print(json.dumps(report))
        return 0
    print("\n".join([*timeline_lines(report), "", *summary_lines(report)]))
    print(f"report: {out / 'replay.json'}; plot: {png}")
    return 0


def _cmd_schema_autoscaling(args: argparse.Namespace) -> int:
    from pdserve.config.autoscaling_policy import policy_schema

    print(json.dumps(policy_schema(), indent=2))
    return 0


def _cmd_bench_trace(args: argparse.Namespace) -> int:
    from pdserve.bench.trace import make_trace, parse_phases
    from pdserve.bench.workloads import load_workload
    from pdserve.controller.autoscaling.trace import write_trace

    try:
        phases = parse_phases(args.phases)
        trace = make_trace(load_workload(args.workload), phases, args.arrival, args.burstiness, args.seed,
                           args.max_model_len)
    except ValueError as err:
        print(f"pdserve bench trace: {err}", file=sys.stderr)
        return 2
    n = write_trace(args.out, trace)
    duration_s = sum(p.duration_s for p in phases)
    print(f"wrote {n} requests over {duration_s:g} s ({args.workload}, {args.arrival} arrivals) to {args.out}")
    return 0


def add_autoscale_parsers(sub: argparse._SubParsersAction) -> None:
    """`pdserve autoscale` and `pdserve schema autoscaling`."""
    auto = sub.add_parser("autoscale", help="dry-run an autoscaling policy against a request trace",
                          description="Replay a trace through the autoscaling decision: replica timeline, "
                                      "predicted SLO attainment, GPU-hours and cost. No cluster is touched.")
    auto.add_argument("--policy", required=True, help="autoscaling policy YAML (`pdserve schema autoscaling`)")
    auto.add_argument("--replay", required=True, metavar="TRACE",
                      help="JSONL trace, one {arrival_s, prompt_tokens, output_tokens} a line (`pdserve bench trace`)")
    auto.add_argument("--startup-s", type=_non_negative, default=60.0,
                      help="seconds from requesting a replica to it serving (default 60)")
    auto.add_argument("--initial-replicas", type=_replicas_pair, metavar="PREFILL,DECODE",
                      help="replicas at the start (default: the pools' min_replicas)")
    auto.add_argument("--noise", type=_non_negative,
                      help="measured latency = prediction x exp(N(0, NOISE)); default: exactly the prediction")
    auto.add_argument("--seed", type=int, default=0, help="seed of the noise")
    auto.add_argument("--out", default="autoscale-replay", help="directory for replay.json and replay.png")
    auto.add_argument("--json", action="store_true", help="print the JSON report (one line) instead of the summary")
    auto.set_defaults(func=_cmd_autoscale)

    schema = sub.add_parser("schema", help="JSON Schemas of pdserve's files").add_subparsers(
        dest="schema_cmd", required=True)
    schema.add_parser("autoscaling", help="the autoscaling policy file").set_defaults(func=_cmd_schema_autoscaling)


def add_bench_trace_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`pdserve bench trace`."""
    tr = bench_sub.add_parser("trace", help="a request trace on a rate schedule, for `pdserve autoscale --replay`")
    tr.add_argument("--workload", default="chat", help="chat, summarization, code, azure-conversation, or a .yaml/.json/.jsonl file")
    tr.add_argument("--phases", required=True,
                    help="rate schedule RATE:DURATION_S,... in req/s and s, e.g. 0.5:300,2:300,0.5:600")
    tr.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    tr.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: squared CV of the gaps")
    tr.add_argument("--max-model-len", type=int, default=8192, help="prompts are cut to fit this context")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="JSONL file to write")
    tr.set_defaults(func=_cmd_bench_trace)
