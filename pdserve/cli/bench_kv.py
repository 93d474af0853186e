"""`pdserve bench kv`: KV transfer throughput per payload size (pdserve's paths, NIXL, bare grpcio,
TCP), then real engines: the exposed transfer time and the connectors side by side."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from typing import Any

from pdserve.bench.hardware import hardware


def _connectors_or_error(args: argparse.Namespace) -> tuple[list[str], str | None]:
    from pdserve.bench import kv_connectors

    connectors = [c.strip() for c in args.connectors.split(",") if c.strip()]
    unknown = sorted(set(connectors) - set(kv_connectors.CONNECTORS))
    if unknown:
        return connectors, f"unknown connector(s) {', '.join(unknown)}; known: {', '.join(kv_connectors.CONNECTORS)}"
    if "nixl" in connectors and not kv_connectors.nixl_available():
        return connectors, f"the NIXL comparison needs nixl: {kv_connectors.NIXL_INSTALL}; or --connectors pdserve"
    return connectors, None


def _size_table(sizes: list[dict[str, Any]]) -> list[str]:
    nixl = all("nixl_mib_s" in s for s in sizes)
    lines = [f"{'MiB':>5} {'gRPC MiB/s':>11} {'TCP MiB/s':>10} {'ratio':>6} {'bare grpcio MiB/s':>18} "
             f"{'same-node MiB/s':>16} {'same-node, fresh memory':>24}"
             + (f" {'NIXL MiB/s':>11} {'same-node / NIXL':>17}" if nixl else "")]
    for s in sizes:
        lines.append(f"{s['size_mib']:>5} {s['grpc_mib_s']:>11.0f} {s['tcp_mib_s']:>10.0f} {s['ratio']:>6.2f} "
                     f"{s['grpcio_raw_mib_s']:>18.0f} {s['same_node_mib_s']:>16.0f} {s['same_node_fresh_mib_s']:>24.0f}"
                     + (f" {s['nixl_mib_s']:>11.0f} {s['same_node_mib_s'] / s['nixl_mib_s']:>17.2f}" if nixl else ""))
    return lines


def _cmd_bench_kv(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pdserve.bench import kv_transfer
    from pdserve.config.kvtransfer import KVTransferSettings

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        lengths = [int(n) for n in args.connector_prompts.split(",") if n.strip()]
        if min(sizes) < 1 or (lengths and min(lengths) < 1):
            raise ValueError
    except ValueError:
        print(f"pdserve bench kv: --sizes and --connector-prompts take positive whole numbers, comma separated "
              f"(got {args.sizes!r} and {args.connector_prompts!r})", file=sys.stderr)
        return 2
    connectors, error = _connectors_or_error(args)
    if error:
        print(f"pdserve bench kv: {error}", file=sys.stderr)
        return 2
    settings = KVTransferSettings(
        secret=secrets.token_hex(16),
        chunk_bytes=args.chunk_mib << 20,
        num_streams=args.streams,
        max_frame_bytes=(args.chunk_mib + 1) << 20,
    )
    total = len(sizes) * args.repeats * (2 if "nixl" in connectors else 1)
    if not args.no_engines:
        total += args.engine_runs + 1 + (len(lengths) * (1 + len(connectors)) if connectors else 0)
    bar = tqdm(total=total, desc="bench kv", file=sys.stderr, disable=args.quiet)
    results = kv_transfer.run(sizes, args.repeats, settings, progress=bar.update)
    report: dict = {
        "hardware": hardware(),
        "settings": {"chunk_mib": args.chunk_mib, "streams": args.streams, "repeats": args.repeats},
        "sizes": [r.__dict__ for r in results],
    }
    if "nixl" in connectors:
        from pdserve.bench import kv_nixl_raw

        rates = kv_nixl_raw.run(sizes, args.repeats, bar.update)
        for row in report["sizes"]:
            row["nixl_mib_s"] = rates[row["size_mib"]]
    big = [r.ratio for r in results if r.size_mib >= 64]
    report["goal_ratio_at_64mib_plus"] = {"target": 0.8, "worst": min(big) if big else None,
                                          "met": bool(big) and min(big) >= 0.8}
    if not args.no_engines:
        from pdserve.bench import kv_connectors, kv_exposed
        from pdserve.model_store import resolve_model

        model = str(resolve_model(args.model))
        ex = kv_exposed.run(model, settings.secret_value, args.prompt_tokens, args.engine_runs, progress=bar.update)
        report["exposed"] = {**ex.__dict__, "exposed_fraction": ex.exposed_fraction,
                             "goal": {"target_fraction": 0.1, "met": ex.exposed_fraction <= 0.1}}
        if connectors:
            side = kv_connectors.run(model, settings.secret_value, connectors, lengths, args.engine_runs,
                                     progress=bar.update)
            report["connectors"] = kv_connectors.as_dicts(side)
    bar.close()
    if not args.json:
        print("\n".join(_size_table(report["sizes"])))
        if "exposed" in report:
            e = report["exposed"]
            print(f"{e['prompt_tokens']}-token prompt: prefill {e['prefill_compute_ms']:.0f} ms, exposed transfer "
                  f"{e['exposed_transfer_ms']:.1f} ms ({100 * e['exposed_fraction']:.1f}%), {e['kv_mib']:.1f} MiB KV")
        if "connectors" in report:
            from pdserve.bench import kv_connectors

            print("\n".join(kv_connectors.summary(report["connectors"])))
    print(json.dumps(report))
    return 0


def add_bench_kv_parser(bench: Any) -> None:
    """`kv` under `pdserve bench`."""
    kv = bench.add_parser("kv", help="KV transfer: pdserve's paths against NIXL, bare grpcio and TCP; exposed "
                                     "transfer time; pdserve's connector and NIXL's on real engines")
    kv.add_argument("--json", action="store_true", help="print only the JSON report (one line)")
    kv.add_argument("--sizes", default="1,4,16,64,256", help="payload sizes in MiB, comma separated")
    kv.add_argument("--repeats", type=int, default=5, help="timed runs per size and transport (median)")
    kv.add_argument("--chunk-mib", type=int, default=8, help="payload MiB per chunk")
    kv.add_argument("--streams", type=int, default=2, help="gRPC streams (connections) per transfer")
    kv.add_argument("--no-engines", action="store_true",
                    help="skip the real-engine measurements (exposed time, connectors)")
    kv.add_argument("--prompt-tokens", type=int, default=1000, help="prompt length of the exposed-time measurement")
    kv.add_argument("--engine-runs", type=int, default=3, help="timed requests per engine measurement (median)")
    kv.add_argument("--connectors", default="pdserve,nixl",
                    help="connectors side by side, comma separated: pdserve, nixl (vLLM's NixlConnector, also "
                         "read bare in the size table); empty for pdserve's paths only")
    kv.add_argument("--connector-prompts", default="1000,4000", help="prompt lengths (tokens) of the side by side")
    kv.add_argument("--model", help="HF checkpoint directory (default: the embedded model)")
    kv.add_argument("--quiet", action="store_true", help="no progress bar")
    kv.set_defaults(func=_cmd_bench_kv)
