"""`pdserve bench serve`: goodput of colocated against disaggregated serving (or of a running
service) over a grid of objectives; its arguments and the command."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pdserve.cli.config_args import config_or_exit, model_path_or_exit


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _objectives_ms(text: str) -> list[dict]:
    """`--objectives`: TTFT_MS:TPOT_MS pairs, each optionally NAME=TTFT_MS:TPOT_MS, comma separated."""
    pairs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, both = item.rpartition("=")
        ttft, _, tpot = both.partition(":")
        try:  # without the colon tpot is "", which no float reads
            pairs.append({"name": name or None, "ttft_ms": float(ttft), "tpot_ms": float(tpot)})
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TTFT_MS:TPOT_MS pairs, each optionally NAME=TTFT_MS:TPOT_MS, comma separated "
                f"(e.g. summarization=15000:160,1000:200), got {item!r}") from None
    return pairs


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pydantic import ValidationError
    from tqdm import tqdm

    from pdserve.bench import plots, serve_bench, serve_report, serve_settings, sweep_report
    from pdserve.bench.conversations import load

    # Only the objective options given: without --slo-scale, a grid or --objectives replace its default.
    objectives = {field: value for field, value in (("slo_scales", args.slo_scale), ("ttft_scales", args.ttft_scales),
                                                    ("tpot_scales", args.tpot_scales), ("objectives_ms", args.objectives))
                  if value is not None}
    names = [w.strip() for w in args.workloads.split(",") if w.strip()] if args.workloads else [args.workload or "chat"]
    try:
        if args.workloads and args.workload:
            raise ValueError("give --workload or --workloads, not both")
        if args.workloads and args.url:
            raise ValueError("--workloads sweeps deployments it makes: measure a running service (--url) one "
                             "--workload at a time")
        workloads = [load(name) for name in names]
        if len({w.name for w in workloads}) < len(workloads) or not workloads:
            raise ValueError(f"--workloads names no workload, or one name twice: {args.workloads!r}")
        settings = serve_settings.ServeBenchSettings(
            requests_per_rate=args.requests, arrival=args.arrival, burstiness=args.burstiness,
            rates_rps=args.rates or ([args.rate] if args.rate else []), start_rps=args.start_rate,
            reference_ttft_ms=args.ttft_ms, reference_tpot_ms=args.tpot_ms, **objectives,
            send_objectives=args.send_objectives,
            max_runs=args.max_runs, calibration_requests=args.calibration_requests,
            probe_prompt_tokens=args.probe_prompt_tokens, seed=args.seed)
    except (ValueError, ValidationError) as err:
        print(f"pdserve bench serve: {err}", file=sys.stderr)
        return 2
    bar: dict[str, tqdm] = {}  # the current run's bar, by label (a disabled tqdm keeps no desc)

    def progress(label: str, done: int, total: int) -> None:
        if label not in bar:
            for old in bar.values():
                old.close()
            bar.clear()
            bar[label] = tqdm(total=total, desc=label, file=sys.stderr, disable=args.quiet)
        bar[label].update(done - bar[label].n)

    cfg = config_or_exit(args.config, "bench serve")
    model_path = model_path_or_exit(cfg, "bench serve")
    if args.url:
        report = serve_bench.bench_url(args.url, model_path, workloads[0], settings, progress)
    else:
        modes = [m.strip() for m in args.compare.split(",") if m.strip()]
        try:
            if not modes:
                raise ValueError("--compare names no configuration")
            for name in modes:
                serve_settings.parse_configuration(name)
            if len(set(modes)) < len(modes):
                raise ValueError(f"--compare names a configuration twice: {args.compare!r}")
        except ValueError as err:
            print(f"pdserve bench serve: {err}", file=sys.stderr)
            return 2
        report = serve_bench.bench_configs(cfg, model_path, modes, workloads, settings, progress)
    for b in bar.values():
        b.close()
    out = Path(args.out)
    path = serve_report.write(report, out)
    if "sweep" in report:  # each workload's plots and summary in turn, then the sweep's table
        pngs = [png for name, rep in report["workloads"].items() for png in plots.write_all(rep, out / name)]
        for name, rep in report["workloads"].items():
            print(f"== {name}\n" + "\n".join(serve_report.summary(rep)))
        print("\n".join(sweep_report.summary(report)))
    else:
        pngs = plots.write_all(report, out)
        print("\n".join(serve_report.summary(report)))
    print(f"report: {path}; plots: {', '.join(str(p) for p in pngs)}")
    return 0


def add_bench_serve_parser(bench: Any) -> None:
    """`serve` under `pdserve bench`."""
    sv = bench.add_parser("serve", help="goodput: colocated vs disaggregated (or a running service), SLO-scale sweep")
    sv.add_argument("--config", help="cluster YAML both configurations start from (default: the built-in one)")
    sv.add_argument("--compare", default="colocated,disaggregated",
                    help="configurations to deploy and run, in order: colocated, disaggregated, adaptive, each "
                         "optionally /cache-aware or /cache-blind (routing.prefix_aware on or off)")
    sv.add_argument("--url", help="measure this running service instead of deploying (e.g. http://127.0.0.1:8000)")
    sv.add_argument("--workload",
                    help="chat, summarization, code, azure-conversation, multi-turn, shared-prefix, or a .yaml/.json/.jsonl file "
                         "(multi-turn and shared-prefix send conversations: rates are conversations per second); default chat")
    sv.add_argument("--workloads",
                    help="a sweep: these workloads, comma separated, each run in every configuration on the same "
                         "deployments and judged by objectives of its own (scales of its own unloaded latencies; "
                         "--objectives apply to every workload); one table of goodput per workload, setting and "
                         "configuration with its uncertainty")
    sv.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    sv.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: squared CV of the gaps")
    sv.add_argument("--rate", type=float, help="run this one rate (req/s) instead of searching")
    sv.add_argument("--rates", type=_floats, help="run these rates (req/s, comma separated) instead of searching")
    sv.add_argument("--start-rate", type=float, help="search start (req/s); default from the unloaded latency")
    sv.add_argument("--slo-scale", type=_floats,
                    help="objectives as multiples of both the unloaded p90 TTFT and TPOT, comma separated "
                         "(default 1,1.5,2,3,5 unless --ttft-scales or --objectives are given)")
    sv.add_argument("--ttft-scales", type=_floats,
                    help="multiples of the unloaded p90 TTFT, comma separated; with --tpot-scales, a grid "
                         "whose every pair is judged")
    sv.add_argument("--tpot-scales", type=_floats, help="the grid's multiples of the unloaded p90 TPOT")
    sv.add_argument("--objectives", type=_objectives_ms,
                    help="absolute objectives, TTFT_MS:TPOT_MS pairs, each optionally named "
                         "(e.g. summarization=15000:160,code=1000:200)")
    sv.add_argument("--send-objectives", action="store_true",
                    help="requests carry the objectives of the setting they are judged at, so the router serves "
                         "what it is judged by: a search (or the --rates) per setting")
    sv.add_argument("--ttft-ms", type=float, help="reference TTFT objective (scale 1) instead of the measured one")
    sv.add_argument("--tpot-ms", type=float, help="reference TPOT objective (scale 1) instead of the measured one")
    sv.add_argument("--requests", type=int, default=40, help="requests (or conversations) per rate")
    sv.add_argument("--max-runs", type=int, default=8,
                    help="runs per configuration at most (per configuration and setting with --send-objectives)")
    sv.add_argument("--calibration-requests", type=int, default=10, help="unloaded requests, and as many pairs")
    sv.add_argument("--probe-prompt-tokens", type=int, default=16, help="prompt length of the added-latency pairs")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--out", default="bench-serve", help="directory for serve.json and the PNG plots")
    sv.add_argument("--quiet", action="store_true", help="no progress bar")
    sv.set_defaults(func=_cmd_bench_serve)
