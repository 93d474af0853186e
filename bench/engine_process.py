"""A real vLLM engine in its own OS process, driven over a pipe.

The demo, the benchmark and the end-to-end tests run a prefill engine and a
decode engine as two processes, the way they run on two machines. The engine
core runs in-process inside that child (no further engine-core process), so the
child can also report the scheduler's free KV blocks and the connector's state.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pdserve.kvtransfer.vllm_config import kv_transfer_config
from pdserve.ports import free_port
from pdserve.prefill.engine_watchdog import WATCHDOG_ENV

Role = Literal["prefill", "decode", "plain"]


@dataclass
class EngineSpec:
    """How to start one engine process."""

    model: str
    role: Role = "plain"
    kv_settings: dict[str, Any] = field(default_factory=dict)  # KVTransferSettings fields
    dtype: str = "float32"
    cpu_bind: str = "0-1"  # VLLM_CPU_OMP_THREADS_BIND: cores for this engine's compute
    kv_cache_gib: int = 1
    max_model_len: int = 2048
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    log_level: str = "INFO"  # vLLM's logging level inside the engine process
    expert_buffers: str | None = None  # ExpertBufferConfig JSON: run the MoE layers buffered
    connector: Literal["pdserve", "nixl"] = "pdserve"  # nixl: vLLM's NixlConnector, for `bench kv`'s side by side
    nixl_side_channel_port: int | None = None  # the NIXL handshake port a producer listens on
    tensor_parallel_size: int = 1  # ranks in worker processes; cpu_bind gives each its cores ("0|1")


def cpu_list(bind: str) -> set[int]:
    """The cores a VLLM_CPU_OMP_THREADS_BIND value names ("0", "0-1", "0,2", "0|1" for TP ranks)."""
    cores: set[int] = set()
    for part in bind.replace("|", ",").split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def _engine_main(spec: EngineSpec, conn) -> None:  # runs in the child process
    # vLLM binds its CPU engines through the multiprocessing executor's OpenMP settings; this
    # engine runs in-process, where vLLM binds nothing. The process is confined to its cores
    # instead, as a container's CPU set would confine it, before any thread starts.
    cores = cpu_list(spec.cpu_bind)
    os.sched_setaffinity(0, cores)
    os.environ.update(
        {WATCHDOG_ENV: "1"},  # ends with its parent (a test, a benchmark) however that ends
        OMP_NUM_THREADS=str(len(cores)),
        VLLM_CPU_KVCACHE_SPACE=str(spec.kv_cache_gib),
        VLLM_CPU_OMP_THREADS_BIND=spec.cpu_bind,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        VLLM_LOGGING_LEVEL=spec.log_level,
        VLLM_LOGGING_STREAM="ext://sys.stderr",  # stdout is for results (answers, JSON reports)
    )
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    kv_cfg = None
    if spec.connector == "nixl" and spec.role != "plain":
        kv_cfg = _nixl_config(spec)
    elif spec.role != "plain":
        kv_cfg = kv_transfer_config(spec.role, spec.kv_settings, spec.kv_load_failure_policy)
    extra: dict[str, Any] = {}
    if spec.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if spec.block_size:
        extra["block_size"] = spec.block_size
    if spec.tensor_parallel_size > 1:
        extra["tensor_parallel_size"] = spec.tensor_parallel_size
    from pdserve.config.experts import CONFIG_ENV
    from pdserve.prefill.worker_extension import EXTENSION

    if spec.expert_buffers:  # buffered from the model's load on (worker_extension.py)
        os.environ[CONFIG_ENV] = spec.expert_buffers

    llm = LLM(
        model=spec.model,
        worker_extension_cls=EXTENSION,  # expert buffering ("rpc" commands), seeded continuations
        dtype=spec.dtype,
        enforce_eager=True,
        max_model_len=spec.max_model_len,
        kv_transfer_config=kv_cfg,
        **extra,
    )
    if spec.expert_buffers:
        llm.collective_rpc("pdserve_require_expert_buffers")
    core = llm.llm_engine.engine_core.engine_core
    block_pool = core.scheduler.kv_cache_manager.block_pool
    nixl_transfers: list[dict[str, list[float]]] = []
    if spec.connector == "nixl" and has_kv_transfer_group():
        _keep_nixl_stats(get_kv_transfer_group(), nixl_transfers)
    worker = get_kv_transfer_group().worker if has_kv_transfer_group() and spec.connector == "pdserve" else None
    send_lock = threading.Lock()

    def reply(seq: int, msg: dict[str, Any]) -> None:
        with send_lock:
            conn.send((seq, msg))

    # Generation runs on its own thread so that control calls (free blocks,
    # connector state) are answered while a request is in flight.
    jobs: queue.Queue = queue.Queue()

    def generate_loop() -> None:
        # The forward runs on this thread: on the engine's cores, whatever a connector did to the
        # thread that built the engine (NIXL moves it to the machine's last core).
        os.sched_setaffinity(0, cores)
        while (job := jobs.get()) is not None:
            seq, req = job
            try:
                out = _generate(llm, SamplingParams, req)
                if req.get("drain", True):
                    _drain(llm, core)
                reply(seq, {"ok": out})
            except Exception as exc:  # reported to the parent, which raises it
                reply(seq, {"error": f"{type(exc).__name__}: {exc}"})

    gen_thread = threading.Thread(target=generate_loop, name="pdserve-generate", daemon=True)
    gen_thread.start()
    reply(0, {"ok": {"free_blocks": block_pool.get_num_free_blocks()}})
    while True:
        try:
            seq, cmd, arg = conn.recv()
        except EOFError:
            break
        if cmd == "generate":
            jobs.put((seq, arg))
            continue
        if cmd == "stop":
            jobs.put(None)
            gen_thread.join()
            llm.llm_engine.engine_core.shutdown()
            reply(seq, {"ok": "stopped"})
            break
        try:
            if cmd == "free_blocks":
                out: Any = block_pool.get_num_free_blocks()
            elif cmd == "rpc":  # a worker method by name, e.g. the expert buffer's (worker_extension.py)
                out = llm.collective_rpc(arg["method"], args=tuple(arg.get("args", ())))[0]
            elif cmd == "nixl_transfers":  # what NIXL timed since the last call
                out, nixl_transfers[:] = list(nixl_transfers), []
            elif cmd == "connector":
                out = {
                    "counters": dict(worker.counters) if worker else {},
                    "receiver": worker.receiver.stats() if worker and worker.receiver else {},
                    "fingerprint": asdict(worker.fingerprint) if worker and worker.fingerprint else {},
                }
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply(seq, {"ok": out})
        except Exception as exc:
            reply(seq, {"error": f"{type(exc).__name__}: {exc}"})


def _nixl_config(spec: EngineSpec):
    """vLLM's NixlConnector as its docs deploy it on the CPU: KV in host memory, UCX."""
    from vllm.config import KVTransferConfig

    if spec.nixl_side_channel_port is not None:
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.nixl_side_channel_port)
    return KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_producer" if spec.role == "prefill" else "kv_consumer",
                            kv_buffer_device="cpu", kv_load_failure_policy=spec.kv_load_failure_policy)


def _keep_nixl_stats(connector, into: list[dict[str, list[float]]]) -> None:
    """NIXL times its own transfers but hands the figures only to the engine's stat loggers,
    which `LLM` does not run: a copy of each step's figures is kept here for `bench kv`."""
    own = connector.get_kv_connector_stats

    def keep():
        stats = own()
        if stats is not None and not stats.is_empty():
            into.append({key: list(values) for key, values in stats.data.items()})
        return stats

    connector.get_kv_connector_stats = keep


def _drain(llm, core, timeout_s: float = 60.0) -> None:
    """Step until finished requests have released their blocks (a producer keeps
    them until its push is acknowledged), as a serving loop would keep stepping."""
    deadline = time.monotonic() + timeout_s
    while core.scheduler.has_finished_requests() and time.monotonic() < deadline:
        llm.llm_engine.step()
        time.sleep(0.001)


def _generate(llm, sampling_cls, req: dict[str, Any]) -> dict[str, Any]:
    from pdserve.prefill.requests import SAMPLED_TOKENS_KEY
    from pdserve.prefill.structured import StructuredOutput

    extra = {"kv_transfer_params": req["kv_transfer_params"]} if req.get("kv_transfer_params") else {}
    if req.get("sampled_tokens"):  # the answer's tokens sampled elsewhere before this call (worker_extension.py)
        extra[SAMPLED_TOKENS_KEY] = req["sampled_tokens"]
    structured = req.get("structured_outputs")  # StructuredOutput's fields (prefill/structured.py)
    sp = sampling_cls(
        max_tokens=req.get("max_tokens", 16),
        temperature=req.get("temperature", 0.0),
        seed=req.get("seed"),
        structured_outputs=StructuredOutput(**structured).vllm_params() if structured else None,
        extra_args=extra or None,
    )
    start = time.perf_counter()
    out = llm.generate({"prompt_token_ids": req["prompt_token_ids"]}, sp, use_tqdm=False)[0]
    finished = time.perf_counter()
    comp = out.outputs[0]
    return {
        "generate_ms": (finished - start) * 1e3,
        "finished_at_s": finished,  # perf_counter: one clock for every process on the host
        "token_ids": list(comp.token_ids),
        "text": comp.text,
        "finish_reason": comp.finish_reason,
        "num_cached_tokens": out.num_cached_tokens,
        "kv_transfer_params": out.kv_transfer_params,
    }


class EngineProcess:
    """Parent-side handle. `send_generate` returns a ticket so that two engines
    (or a request and control calls) can be in flight at once."""

    def __init__(self, spec: EngineSpec, wait: bool = True, start_timeout_s: float = 300.0):
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(spec, child), name=f"pdserve-{spec.role}", daemon=False)
        self.proc.start()
        child.close()
        self._seq = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._pending_generates: list[int] = []
        self.idle_free_blocks = -1
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "EngineProcess":
        """Block until the engine has loaded the model (start several, then wait for each)."""
        if self.idle_free_blocks < 0:
            self.idle_free_blocks = self._wait(0, self.start_timeout_s)["free_blocks"]
        return self

    def _submit(self, cmd: str, arg: Any) -> int:
        self._seq += 1
        self._conn.send((self._seq, cmd, arg))
        return self._seq

    def _wait(self, seq: int, timeout_s: float | None) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while seq not in self._replies:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not self._conn.poll(remaining):
                raise TimeoutError(f"{self.spec.role} engine did not answer within {timeout_s} s")
            try:
                got, msg = self._conn.recv()
            except EOFError:
                raise RuntimeError(f"{self.spec.role} engine process exited (code {self.proc.exitcode})") from None
            self._replies[got] = msg
        msg = self._replies.pop(seq)
        if "error" in msg:
            raise RuntimeError(f"{self.spec.role} engine: {msg['error']}")
        return msg["ok"]

    def call(self, cmd: str, arg: Any = None, timeout_s: float | None = 600) -> Any:
        return self._wait(self._submit(cmd, arg), timeout_s)

    def send_generate(self, req: dict[str, Any]) -> int:
        ticket = self._submit("generate", req)
        self._pending_generates.append(ticket)
        return ticket

    def result(self, ticket: int | None = None, timeout_s: float | None = 600) -> dict[str, Any]:
        """The reply to `ticket`, or to the oldest generate still unanswered."""
        ticket = self._pending_generates[0] if ticket is None else ticket
        self._pending_generates.remove(ticket)
        return self._wait(ticket, timeout_s)

    def generate(self, req: dict[str, Any], timeout_s: float | None = 600) -> dict[str, Any]:
        return self.result(self.send_generate(req), timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would die: no cleanup runs in the child."""
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop", timeout_s=60)
            except (RuntimeError, TimeoutError, BrokenPipeError, OSError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.kill()
        self._conn.close()


class EnginePair:
    """A prefill engine and a decode engine started together, each on its own cores; both stop
    when either fails to start."""

    def __init__(self, prefill: EngineSpec, decode: EngineSpec):
        self.decode = EngineProcess(decode, wait=False)
        self.prefill = EngineProcess(prefill, wait=False)
        try:
            self.decode.wait_ready()
            self.prefill.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()

    def __enter__(self) -> "EnginePair":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class DisaggregatedPair(EnginePair):
    """A prefill engine (core 0) pushing KV to a decode engine (core 1) over pdserve's
    gRPC layer: one request is prefilled on one and continued on the other."""

    def __init__(self, model: str, secret: str, dtype: str = "float32", log_level: str = "INFO",
                 decode_expert_buffers: str | None = None, max_model_len: int = 2048):
        self.model, self.secret = model, secret
        self.addr = f"127.0.0.1:{free_port()}"
        common = {"dtype": dtype, "log_level": log_level, "max_model_len": max_model_len}
        super().__init__(
            EngineSpec(model, "prefill", {"secret": secret}, cpu_bind="0", **common),
            EngineSpec(model, "decode", {"secret": secret, "listen_addr": self.addr}, cpu_bind="1",
                       expert_buffers=decode_expert_buffers, **common),
        )

    def generate(self, prompt_token_ids: list[int], max_tokens: int) -> dict[str, Any]:
        """The decode engine's result; its `kv_transfer_params` say how the KV travelled."""
        from pdserve.kvtransfer import params

        tid = uuid.uuid4().hex
        self.decode.send_generate(
            {"prompt_token_ids": prompt_token_ids, "max_tokens": max_tokens, "kv_transfer_params": params.for_decode(tid)}
        )
        self.prefill.generate(
            {"prompt_token_ids": prompt_token_ids, "max_tokens": 1, "kv_transfer_params": params.for_prefill(tid, self.addr)}
        )
        return self.decode.result()
