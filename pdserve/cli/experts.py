"""The MoE commands of the `pdserve` CLI: `pdserve bench experts` and the test MoE model
(`pdserve model prepare --moe`). Heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _percentages(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole percentages like 25,50,75,100, got {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentages must be in 1..100, got {text!r}")
    return values


def _cmd_bench_experts(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from pdserve.bench import experts_bench, plots
    from pdserve.moe_checkpoint import prepare_moe_model

    try:
        settings = experts_bench.ExpertBenchSettings(
            resident_pct=args.resident_pct, policies=args.policies.split(","), batch=args.batch,
            output_tokens=args.output_tokens, repeats=args.repeats)
    except ValidationError as err:
        print(f"pdserve bench experts: {err}", file=sys.stderr)
        return 2
    if args.model:
        model = Path(args.model).expanduser()
        if not (model / "config.json").is_file():
            print(f"pdserve bench experts: {model} is not a Hugging Face checkpoint directory", file=sys.stderr)
            return 2
    else:
        model = prepare_moe_model()
    total = len(settings.resident_pct) * len(settings.policies)
    with tqdm(total=total, desc="bench experts: settings", file=sys.stderr, disable=args.quiet) as bar:
        report = experts_bench.run(str(model), settings, progress=bar.update)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experts.json").write_text(json.dumps(report, indent=2))
    png = plots.expert_buffering(report, out / "experts.png")
    print(f"all experts resident: {report['all_resident_tokens_per_s']:.0f} tok/s ({report['copies']})")
    for r in report["results"]:
        print(f"{r['resident_pct']:>3}% resident ({r['slots']} slots) {r['policy']:<10} "
              f"{r['tokens_per_s']:7.0f} tok/s = {r['throughput_vs_all_resident']:.2f}x  hit rate {r['hit_rate']:.3f}  "
              f"{r['bytes_moved_per_token'] / 2**20:.2f} MiB/token  identical {r['identical_to_all_resident']}")
    for policy, goal in report["goal_50pct"].items():
        print(f"goal at 50% ({policy}): hit rate {goal['hit_rate']:.3f} >= 0.9, "
              f"throughput {goal['throughput_vs_all_resident']:.2f}x >= 0.8: {'met' if goal['met'] else 'NOT met'}")
    print(f"report: {out / 'experts.json'}; plot: {png}")
    return 0


def add_bench_experts_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`pdserve bench experts`."""
    ex = bench_sub.add_parser("experts", help="MoE expert buffering: tokens/s and hit rate by share resident and policy")
    ex.add_argument("--model", help="MoE checkpoint directory (default: the generated test MoE model)")
    ex.add_argument("--resident-pct", type=_percentages, default=[25, 50, 75, 100],
                    help="shares of each layer's experts resident, comma separated")
    ex.add_argument("--policies", default="lifo,lru,pinned_hot", help="eviction policies, comma separated")
    ex.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    ex.add_argument("--output-tokens", type=int, default=128, help="tokens generated per sequence")
    ex.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median)")
    ex.add_argument("--out", default="bench/results/experts", help="folder for experts.json and experts.png")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=_cmd_bench_experts)
