"""pdserve's KV connector against vLLM's NixlConnector on the same real engines, prompts of the
same lengths and text (each with a first sentence of its own, which keeps prefix caches out) and
the same cores: the side by side of `pdserve bench kv`.

Each connector runs a prefill engine on core 0 and a decode engine on core 1; a plain engine
(no connector) on core 0 gives the prefill time both are compared with. Per prompt length:
- the prefill engine's time for the request (its forward with the connector loaded), and its
  slowdown against the plain engine;
- the decode engine's first token after the prefill ended, on one clock for both connectors:
  pdserve's decode request waits for the push, NIXL's is sent once the prefill answered (as
  its proxy does) and pulls; either way the KV must land and one decode step run;
- the bytes moved, with each connector's own timing: pdserve's exposed transfer (end of the
  prefill forward to KV in the decode cache), NIXL's transfer telemetry (the read alone).
Both decode engines must answer the prefill's own first token, or the run fails: a transfer
that moved the wrong bytes is not a fast transfer.
"""

from __future__ import annotations

import os
import statistics
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Protocol

from pdserve.bench.engine_process import DisaggregatedPair, EnginePair, EngineProcess, EngineSpec
from pdserve.bench.kv_exposed import prompt_ids
from pdserve.kvtransfer import params
from pdserve.ports import free_port

Connector = Literal["pdserve", "nixl"]
CONNECTORS: tuple[Connector, ...] = ("pdserve", "nixl")
NIXL_INSTALL = "pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1 (make venv installs them)"


@dataclass
class ConnectorResult:
    connector: str  # "plain" for the engine without a connector
    prompt_tokens: int
    runs: int
    prefill_ms: float  # medians over runs, each with its range
    prefill_ms_range: tuple[float, float]
    prefill_slowdown: float  # prefill_ms / the plain engine's
    decode_first_token_ms: float | None
    decode_first_token_ms_range: tuple[float, float] | None
    kv_mib: float | None
    transfer_ms: float | None  # pdserve: exposed transfer; nixl: NIXL's own transfer time
    transfer_mib_s: float | None  # nixl only: bytes over its transfer time


class _Pair(Protocol):
    def split(self, ids: list[int]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]: ...

    def stop(self) -> None: ...


def nixl_available() -> bool:
    # NIXL logs to stdout, where `bench kv --json` keeps its report; processes started later inherit this.
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        import nixl  # noqa: F401
    except ImportError:
        return False
    return True


class NixlPair(EnginePair):
    """A prefill engine (core 0) whose KV a decode engine (core 1) reads with vLLM's NixlConnector."""

    def __init__(self, model: str, max_model_len: int, log_level: str = "WARNING"):
        common = {"connector": "nixl", "max_model_len": max_model_len, "log_level": log_level}
        super().__init__(EngineSpec(model, "prefill", cpu_bind="0", nixl_side_channel_port=free_port(), **common),
                         EngineSpec(model, "decode", cpu_bind="1", nixl_side_channel_port=free_port(), **common))

    def split(self, ids: list[int]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
        # The producer keeps the blocks until the consumer's read: draining it here would wait for a
        # read that comes only after this call returns.
        pre = self.prefill.generate({"prompt_token_ids": ids, "max_tokens": 1, "drain": False,
                                     "kv_transfer_params": {"do_remote_decode": True}})
        dec = self.decode.generate({"prompt_token_ids": ids, "max_tokens": 1, "drain": False,
                                    "kv_transfer_params": pre["kv_transfer_params"]})
        timed = self.decode.call("nixl_transfers")
        seconds = sum(sum(t["transfer_duration"]) for t in timed)
        moved = sum(sum(t["bytes_transferred"]) for t in timed)
        if not moved:
            raise RuntimeError("NIXL reported no transfer for the request")
        return pre, dec, {"bytes": moved, "transfer_ms": seconds * 1e3}


class PdservePair(DisaggregatedPair):
    """pdserve's connector between the same two cores."""

    def split(self, ids: list[int]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
        tid = uuid.uuid4().hex
        self.decode.send_generate({"prompt_token_ids": ids, "max_tokens": 1,
                                   "kv_transfer_params": params.for_decode(tid)})
        pre = self.prefill.generate({"prompt_token_ids": ids, "max_tokens": 1,
                                     "kv_transfer_params": params.for_prefill(tid, self.addr)})
        dec = self.decode.result()
        rep = dec["kv_transfer_params"][params.KEY]
        if rep["state"] != "DONE":
            raise RuntimeError(f"pdserve transfer failed: {rep['error']}")
        return pre, dec, {"bytes": rep["bytes"], "transfer_ms": rep["exposed_ms"]}


def _range(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def _plain_prefills(model: str, lengths: list[int], runs: int, max_model_len: int,
                    tick: Callable[[], None]) -> dict[int, list[float]]:
    engine = EngineProcess(EngineSpec(model, cpu_bind="0", max_model_len=max_model_len, log_level="WARNING"))
    try:
        engine.generate({"prompt_token_ids": prompt_ids(model, -1, 16), "max_tokens": 1})  # warm-up
        times: dict[int, list[float]] = {}
        for n in lengths:
            times[n] = [engine.generate({"prompt_token_ids": prompt_ids(model, run, n), "max_tokens": 1})["generate_ms"]
                        for run in range(runs)]
            tick()
        return times
    finally:
        engine.stop()


def _pair(connector: Connector, model: str, secret: str, max_model_len: int) -> _Pair:
    if connector == "nixl":
        return NixlPair(model, max_model_len)
    return PdservePair(model, secret, log_level="WARNING", max_model_len=max_model_len)


def run(model: str, secret: str, connectors: list[Connector], lengths: list[int], runs: int = 3,
        progress: Callable[[int], None] | None = None) -> list[ConnectorResult]:
    """Every connector in turn (one pair of engines at a time), each on the same prompts."""
    if "nixl" in connectors and not nixl_available():
        raise RuntimeError(f"the NIXL comparison needs nixl: {NIXL_INSTALL}")

    def tick() -> None:
        if progress:
            progress(1)

    max_model_len = max(lengths) + 16
    plain = _plain_prefills(model, lengths, runs, max_model_len, tick)
    results = [ConnectorResult("plain", n, runs, statistics.median(t), _range(t), 1.0, None, None, None, None, None)
               for n, t in plain.items()]
    for connector in connectors:
        pair = _pair(connector, model, secret, max_model_len)
        try:
            pair.split(prompt_ids(model, -1, 16))  # warm-up: handshakes, first allocations
            for n in lengths:
                rows = [_timed(connector, pair, prompt_ids(model, run, n)) for run in range(runs)]
                results.append(_summarize(connector, n, rows, statistics.median(plain[n])))
                tick()
        finally:
            pair.stop()
    return results


def _timed(connector: str, pair: _Pair, ids: list[int]) -> dict[str, float]:
    pre, dec, moved = pair.split(ids)
    if dec["token_ids"][:1] != pre["token_ids"][:1]:
        raise RuntimeError(f"{connector}: the decode engine's first token {dec['token_ids'][:1]} is not the "
                           f"prefill's {pre['token_ids'][:1]}: the KV it read was wrong")
    return {"prefill_ms": pre["generate_ms"], "first_token_ms": (dec["finished_at_s"] - pre["finished_at_s"]) * 1e3,
            **moved}


def _summarize(connector: str, n: int, rows: list[dict[str, float]], plain_prefill_ms: float) -> ConnectorResult:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    prefill = [r["prefill_ms"] for r in rows]
    first = [r["first_token_ms"] for r in rows]
    mib = med("bytes") / 2**20
    transfer_ms = med("transfer_ms")
    rate = mib / (transfer_ms / 1e3) if connector == "nixl" and transfer_ms > 0 else None
    return ConnectorResult(connector, n, len(rows), statistics.median(prefill), _range(prefill),
                           statistics.median(prefill) / plain_prefill_ms, statistics.median(first), _range(first),
                           mib, transfer_ms, rate)


def as_dicts(results: list[ConnectorResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The side by side as a table: medians, ranges over the runs in brackets."""
    def ms(value: float | None, bounds: tuple[float, float] | None = None) -> str:
        if value is None:
            return "-"
        return f"{value:.0f}" + (f" [{bounds[0]:.0f}-{bounds[1]:.0f}]" if bounds else "")

    lines = [f"{'connector':>9} {'prompt':>6} {'prefill ms':>18} {'slowdown':>8} {'decode 1st token ms':>20} "
             f"{'KV MiB':>7} {'transfer ms':>11} {'MiB/s':>6}"]
    for r in rows:
        lines.append(f"{r['connector']:>9} {r['prompt_tokens']:>6} {ms(r['prefill_ms'], r['prefill_ms_range']):>18} "
                     f"{r['prefill_slowdown']:>8.2f} "
                     f"{ms(r['decode_first_token_ms'], r['decode_first_token_ms_range']):>20} "
                     f"{'-' if r['kv_mib'] is None else format(r['kv_mib'], '.1f'):>7} {ms(r['transfer_ms']):>11} "
                     f"{ms(r['transfer_mib_s']):>6}")
    lines.append("transfer ms: pdserve's exposed transfer (end of the prefill forward to KV in the decode cache); "
                 "NIXL's own transfer time (the read alone, after the decode request arrived)")
    return lines
