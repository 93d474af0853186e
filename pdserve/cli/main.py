"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pdserve.bench.hardware import hardware
from pdserve.cli.autoscale import add_autoscale_parsers, add_bench_trace_parser
from pdserve.cli.bench_kv import add_bench_kv_parser
from pdserve.cli.bench_serve import add_bench_serve_parser
from pdserve.cli.config_args import config_or_exit, model_path_or_exit
from pdserve.cli.experts import add_bench_experts_parser

# Models come from local checkpoint directories only; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    if args.moe:
        from pdserve.moe_checkpoint import prepare_moe_model

        print(prepare_moe_model(force=args.force))
        return 0
    from pdserve.model_store import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pdserve.cli import demo
    from pdserve.model_store import resolve_model

    demo.run(str(resolve_model(args.model)), args.prompt or demo.DEMO_PROMPTS, max_tokens=args.max_tokens)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pdserve.deployments import service

    cfg = config_or_exit(args.config, "serve")
    if args.ray_address:
        cfg = cfg.model_copy(update={"ray_address": args.ray_address})
    model_path = model_path_or_exit(cfg, "serve")
    print(f"starting pdserve ({cfg.mode}, model {model_path}); engines take about a minute to load", file=sys.stderr)
    svc = service.start(cfg, model_path)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pools = ", ".join(f"{role} x{pool.replicas}" for role, pool in cfg.pools().items())
    print(f"pdserve is serving {os.path.basename(model_path)} ({cfg.mode}: {pools}; {cfg.engine_dtype})\n"
          f"  OpenAI HTTP API: {svc.http_url}/v1  (docs {svc.http_url}/docs, health {svc.http_url}/health, "
          f"metrics {svc.http_url}/metrics)\n"
          + (f"                   {svc.direct_http_url}/v1  (the same API without Serve's proxy: lower latency)\n"
             if svc.direct_http_url else "") +
          f"  gRPC API:        {svc.grpc_addr}  (pdserve.v1.Generation, health, reflection)\n"
          "Press Ctrl-C to stop.", flush=True)
    stop.wait()
    svc.stop()
    print("pdserve stopped", file=sys.stderr)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    cfg = config_or_exit(args.config, "config show")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _cmd_bench_route(args: argparse.Namespace) -> int:
    from pdserve.bench import route_bench

    report = {"hardware": hardware(), **route_bench.run(args.instances, args.decisions, args.seed)}
    if not args.json:
        print(f"{args.instances} instances, {args.decisions} decisions each (goal: p99 < 100 us)")
        for name in ("slo", "slo_slow_links_between_nodes", "least_load", "slo_decision_and_booking",
                     "slo_prefix_aware"):
            r = report[name]
            print(f"  {name:32s} p50 {r['p50_us']:7.1f} us   p99 {r['p99_us']:7.1f} us   mean {r['mean_us']:7.1f} us")
        index = report["slo_prefix_aware"]
        print(f"  prefix index: {index['indexed_tokens_per_instance']} tokens per instance, built in "
              f"{index['index_build_s']} s, {index['index_rss_mib']} MiB")
    print(json.dumps(report))
    return 0


def _cmd_bench_route_call(args: argparse.Namespace) -> int:
    from pdserve.bench import route_call_bench

    report = {"hardware": hardware(), **route_call_bench.run(args.calls, args.rounds, args.instances)}
    if not args.json:
        print(f"route calls to the controller ({args.instances} instances), {args.calls} per path in each of "
              f"{args.rounds} rounds, the two paths alternating:")
        for path in ("serve_handle", "socket"):
            r = report[path]
            print(f"  {path:12s} p50 {r['p50_ms']:6.2f} ms   p90 {r['p90_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms   "
                  f"p50 by round {r['p50_ms_by_round']}")
        print(f"  the routing channel saves {report['p50_saved_ms']:.2f} ms at the median")
    print(json.dumps(report))
    return 0


def _cmd_bench_slo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pdserve.bench import slo_compare

    cfg = config_or_exit(args.config, "bench slo")
    w = slo_compare.Workload(requests=args.requests, load=args.load, overload=args.overload,
                             overload_s=args.overload_s, burstiness=args.burstiness, long_fraction=args.long_fraction,
                             long_tokens=args.long_tokens, max_tokens=args.max_tokens, slo_scale=args.slo_scale,
                             seed=args.seed)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.setdefault(phase, tqdm(total=total, desc=f"bench slo: {phase}", file=sys.stderr))
        bar.update(done - bar.n)

    report = slo_compare.run(cfg, model_path_or_exit(cfg, "bench slo"), w, progress)
    for bar in bars.values():
        bar.close()
    report["hardware"] = hardware()
    for name in ("least_load", "slo", "overload"):
        r = report[name]
        print(f"{name:10s} goodput {r['goodput_rps']:.3f} req/s  met {r['met']}/{r['requests']}  ok {r['ok']}  "
              f"rejected {r['rejected']}  errors {r['error']}  admitted attainment {r['attainment_admitted']}  "
              f"reject p99 {(r['reject_ms'] or {}).get('p99')} ms")
    print(json.dumps(report))
    return 0


def _cmd_bench_overload(args: argparse.Namespace) -> int:
    from pathlib import Path

    import httpx
    from tqdm import tqdm

    from pdserve.bench import overload, overload_report, overload_settings

    try:
        settings = overload_settings.OverloadSettings(overload=args.overload, duration_s=args.duration_s,
                                             recovery_s=args.recovery_s, slo_scale=args.slo_scale, seed=args.seed)
        calibration = overload.load_calibration(args.calibration) if args.calibration else None
    except ValueError as err:
        print(f"pdserve bench overload: {err}", file=sys.stderr)
        return 2
    cfg = config_or_exit(args.config, "bench overload")
    model_path = None if args.url else model_path_or_exit(cfg, "bench overload")
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=f"bench overload: {phase}", file=sys.stderr, disable=args.quiet)
        bars[phase].update(done - bars[phase].n)

    try:
        report = overload.run(cfg, model_path, settings, args.url, progress, calibration)
    except (httpx.HTTPError, RuntimeError) as err:  # --url unreachable, or calibration failed
        print(f"pdserve bench overload: {err}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    json_path, png_path = overload_report.write({**report, "hardware": hardware()}, Path(args.out))
    print("\n".join(overload_report.summary_lines(report)))
    print(f"report: {json_path}; plot: {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the default model").add_subparsers(dest="model_cmd", required=True)
    prep = model.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into an HF checkpoint (once)")
    prep.add_argument("--force", action="store_true", help="convert again even if the checkpoint exists")
    prep.add_argument("--moe", action="store_true", help="the generated test MoE model (a small Mixtral) instead")
    prep.set_defaults(func=_cmd_model_prepare)

    demo = sub.add_parser("demo", help="answer prompts with one prefill and one decode engine process")
    demo.add_argument("--model", help="HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--prompt", action="append", help="a prompt (repeatable; default: three examples)")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser("serve", help="serve a model: prefill and decode pools on Ray Serve, HTTP and gRPC APIs")
    serve.add_argument("--config", help="cluster YAML (default: the built-in config for one machine)")
    serve.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    serve.set_defaults(func=_cmd_serve)

    config = sub.add_parser("config", help="cluster configuration").add_subparsers(dest="config_cmd", required=True)
    show = config.add_parser("show", help="validate a config and print it with every default filled in")
    show.add_argument("--config", help="cluster YAML (default: the built-in config)")
    show.set_defaults(func=_cmd_config_show)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    add_bench_kv_parser(bench)
    route = bench.add_parser("route", help="routing decision latency with many registered instances")
    route.add_argument("--instances", type=int, default=1000)
    route.add_argument("--decisions", type=int, default=5000)
    route.add_argument("--seed", type=int, default=0)
    route.add_argument("--json", action="store_true", help="print only the JSON report (one line)")
    route.set_defaults(func=_cmd_bench_route)
    route_call = bench.add_parser("route-call", help="a route call's round trip to the controller: Serve's handle "
                                  "against the routing channel")
    route_call.add_argument("--calls", type=int, default=300, help="timed calls per path in each round")
    route_call.add_argument("--rounds", type=int, default=3)
    route_call.add_argument("--instances", type=int, default=16, help="instances reporting to the controller")
    route_call.add_argument("--json", action="store_true", help="print only the JSON report (one line)")
    route_call.set_defaults(func=_cmd_bench_route_call)
    slo = bench.add_parser("slo", help="SLO-aware routing vs least-load on a real service, then 3x overload")
    slo.add_argument("--config", help="cluster YAML (default: the built-in config for one machine)")
    slo.add_argument("--requests", type=int, default=60, help="requests in each policy's trace")
    slo.add_argument("--load", type=float, default=1.0, help="arrival rate as a multiple of the estimated capacity")
    slo.add_argument("--overload", type=float, default=3.0, help="overload phase rate, x capacity")
    slo.add_argument("--overload-s", type=float, default=40.0, help="overload phase length")
    slo.add_argument("--burstiness", type=float, default=4.0, help="gamma arrivals: squared CV of gaps (1 = Poisson)")
    slo.add_argument("--long-fraction", type=float, default=0.3, help="share of long prompts")
    slo.add_argument("--long-tokens", type=int, default=1000)
    slo.add_argument("--max-tokens", type=int, default=32)
    slo.add_argument("--slo-scale", type=float, default=3.0, help="objectives = this x unloaded latency, per kind")
    slo.add_argument("--seed", type=int, default=0)
    slo.set_defaults(func=_cmd_bench_slo)
    ov = bench.add_parser("overload", help="several times capacity for a minute: errors, attainment of the admitted, "
                          "refusal latency, memory, recovery")
    ov.add_argument("--config", help="cluster YAML (default: the built-in config for one machine)")
    ov.add_argument("--url", help="drive this running service instead of deploying one (memory is then not sampled)")
    ov.add_argument("--overload", type=float, default=3.0, help="overload arrival rate, x the estimated capacity")
    ov.add_argument("--duration-s", type=float, default=60.0, help="length of the overload")
    ov.add_argument("--recovery-s", type=float, default=20.0, help="probing for normal latency after the overload")
    ov.add_argument("--slo-scale", type=float, default=3.0, help="objectives = this x unloaded latency, per kind")
    ov.add_argument("--seed", type=int, default=0)
    ov.add_argument("--calibration", metavar="OVERLOAD_JSON",
                    help="use this earlier report's calibration instead of the one measured: the same objectives "
                         "and, with the same settings, the same trace (to compare configurations on one load)")
    ov.add_argument("--out", default="bench-overload", help="directory for overload.json and overload.png")
    ov.add_argument("--quiet", action="store_true", help="no progress bars")
    ov.set_defaults(func=_cmd_bench_overload)
    add_bench_serve_parser(bench)
    add_bench_trace_parser(bench)
    add_bench_experts_parser(bench)
    add_autoscale_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would drown the decisions
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
