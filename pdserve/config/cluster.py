"""The cluster configuration: one YAML file, validated here, read by `pdserve serve`.

Errors name the field and the problem (`pools.decode.replicas: Input should be
greater than or equal to 1`) so an operator can fix a file without reading code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pdserve.config.autoscaling import AutoscalingConfig
from pdserve.config.autoscaling_policy import PolicyError
from pdserve.config.files import describe, read_mapping
from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.config.pool import UNSPLIT_ENGINE_ARGS, PoolConfig
from pdserve.config.routing import RoutingConfig


class SLOConfig(BaseModel):
    """The served model's latency objectives: defaults for requests that do not state
    their own, and what happens to a request none of whose routes is predicted to meet them.
    (A service serves one model, so this section is that model's.)"""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(2000.0, gt=0)
    """Time to first token."""
    tpot_ms: float = Field(200.0, gt=0)
    """Time per output token after the first."""
    priority: int = Field(0, ge=0, le=9)
    """Priority of requests that state none; 0 is the most important."""
    on_unmeetable: Literal["reject", "best_effort"] = "reject"
    """"reject": refuse at once (429 + Retry-After, gRPC RESOURCE_EXHAUSTED) instead of
    queueing a request predicted to miss its objectives; "best_effort": serve it anyway on
    the best route (requests still get 429 when every instance is full)."""


class IngressConfig(BaseModel):
    """Where clients reach the service."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    """Address the HTTP and gRPC ingresses bind."""
    http_port: int = Field(8000, ge=1, le=65535)
    """Ray Serve's HTTP proxy: the OpenAI API, several applications side by side under their
    route prefixes."""
    direct_http_port: int | None = Field(8001, ge=1, le=65535)
    """The same OpenAI API served by the ingress replica itself, without the proxy's hop (10-18 ms
    less TTFT on the project's machine); null: only through the proxy. Like `grpc_port`, one
    ingress replica per node can bind it."""
    grpc_port: int = Field(50051, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9_\-/]*$")
    """HTTP path prefix of this application, so several can share one Serve proxy."""
    replicas: int = Field(1, ge=1)
    """Ingress replicas (tokenize, route, stream); each is light."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources an ingress replica needs, e.g. {pdserve_ingress: 1} to pin it to the
    node clients reach (on Kubernetes the head, whose Service carries the gRPC port)."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Longest a request may run end to end, retries included, before it is cancelled."""
    replica_loss_retries: int = Field(2, ge=0)
    """How many times a request whose replica died moves to another one: before its first
    token it is prefilled again; mid-stream the new decode replica prefills the prompt plus the
    tokens already sent and goes on from there. 0: end it at once with a retriable 503
    (gRPC UNAVAILABLE)."""
    route_wait_s: float = Field(5.0, ge=0)
    """How long a request waits for a pool to have a live instance again (a replica being
    replaced, the controller restarting) before it fails with 503. Overload is refused at once."""
    max_body_bytes: int = Field(8 << 20, ge=1 << 10)
    """Largest HTTP request body read; a larger one is answered 413 before it is read (a 128k-token
    prompt at about 4 characters a token is about 0.5 MiB of text)."""
    api_keys: list[SecretStr] = Field(default_factory=list)
    """Keys clients must present (`Authorization: Bearer <key>`, over HTTP and gRPC), on top of
    those in PDSERVE_API_KEYS (comma-separated; the Helm chart sets it from a Secret). None
    anywhere: no key needed. Prefer the environment: a config file is easily shared."""
    grpc_tls_cert_file: Path | None = None
    """PEM certificate of the gRPC API; with grpc_tls_key_file the gRPC port serves TLS only."""
    grpc_tls_key_file: Path | None = None
    """PEM private key of the gRPC API's certificate."""
    grpc_tls_client_ca_file: Path | None = None
    """PEM CA bundle gRPC clients' certificates are checked against; setting it refuses any client
    without a certificate it signed (mutual TLS)."""

    @model_validator(mode="after")
    def _grpc_tls_files(self) -> "IngressConfig":
        if (self.grpc_tls_cert_file is None) != (self.grpc_tls_key_file is None):
            raise ValueError("grpc_tls_cert_file and grpc_tls_key_file must be set together")
        if self.grpc_tls_client_ca_file is not None and self.grpc_tls_cert_file is None:
            raise ValueError("grpc_tls_client_ca_file (mutual TLS) needs grpc_tls_cert_file and grpc_tls_key_file")
        return self


class TracingConfig(BaseModel):
    """OpenTelemetry traces: one per request."""

    model_config = ConfigDict(extra="forbid")

    exporter: Literal["none", "otlp", "memory"] = "none"
    """"otlp" sends spans to `otlp_endpoint`; "memory" keeps them in each process,
    readable through the deployments' `finished_spans()` (tests)."""
    otlp_endpoint: str = "http://127.0.0.1:4317"
    """OTLP/gRPC collector address."""
    service_name: str = "pdserve"


# Per-role pool defaults for one 2-core machine: each engine on its own core.
_POOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "prefill": {"cpu_binds": ["0"]},
    "decode": {"cpu_binds": ["1"]},
    "colocated": {"replicas": 2, "cpu_binds": ["0", "1"], "engine_args": {"max_num_batched_tokens": 256}},
    "adaptive": {"replicas": 2, "cpu_binds": ["0", "1"], "engine_args": {"max_num_batched_tokens": 256}},
}


ADAPTIVE_PREFIX = "adaptive-"
"""Deployment name of an `adaptive_pools` entry: this and its name."""
POOL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$"
"""An `adaptive_pools` name: lowercase letters, digits and inner hyphens, as Kubernetes and Serve
accept in a name."""


DEFAULT_MODEL_TOOL_PARSER = "xlam"
"""vLLM's tool-call parser for the default model's family (SmolLM2)."""


class ClusterConfig(BaseModel):
    """Everything `pdserve serve` deploys."""

    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    """Checkpoint directory, or "default" for the embedded SmolLM2-135M-Instruct."""
    served_model_name: str = ""
    """Name clients put in `model`; empty uses the checkpoint directory's name."""
    tool_call_parser: str | None = None
    """vLLM's tool-call parser for the model family (its `--tool-call-parser`: "hermes",
    "llama3_json", "xlam", ...), which reads the calls of `tool_choice: "auto"` answers; None:
    "auto" is refused. Left out with the default model, it is that model family's, "xlam" (SmolLM2
    calls tools as `<tool_call>[{"name": ..., "arguments": ...}]</tool_call>`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV cache dtype; prefill and decode must agree for KV to move. "auto": float32
    on CPUs (see `resolve_dtype`), vLLM's own choice (the checkpoint's dtype) on GPUs."""
    max_model_len: int = Field(2048, ge=16)
    """Context length: prompt plus generated tokens."""
    enforce_eager: bool | None = None
    """Run engines without graph capture/compilation; None: eager on CPUs (where vLLM's
    compiled mode starts minutes slower and is no faster), compiled on GPUs. A pool's
    engine_args may still set it."""
    mode: Literal["disaggregated", "colocated", "adaptive"] = "disaggregated"
    """disaggregated: prefill and decode pools with KV moving between them;
    colocated: one pool of plain engines doing both (baseline and fallback);
    adaptive: one pool of engines that can each prefill, decode and move KV, the controller
    choosing per request where its prompt is prefilled and where it decodes."""
    ray_address: str | None = None
    """Join this Ray cluster ("auto" or host:port); None starts a local one."""
    app_name: str = "pdserve"
    """Ray Serve application name."""
    prefill: PoolConfig = Field(default_factory=lambda: PoolConfig(**_POOL_DEFAULTS["prefill"]))
    """The prefill pool (disaggregated mode)."""
    decode: PoolConfig = Field(default_factory=lambda: PoolConfig(**_POOL_DEFAULTS["decode"]))
    """The decode pool (disaggregated mode)."""
    colocated: PoolConfig = Field(default_factory=lambda: PoolConfig(**_POOL_DEFAULTS["colocated"]))
    """The plain engine pool (colocated mode); a small prefill chunk keeps decode steps short."""
    adaptive: PoolConfig = Field(default_factory=lambda: PoolConfig(**_POOL_DEFAULTS["adaptive"]))
    """The engine pool of adaptive mode: chunked prefill (a small chunk keeps the steps of the
    requests decoding there short) and KV both sent and received."""
    adaptive_pools: dict[str, PoolConfig] = Field(default_factory=dict)
    """Adaptive mode only: further adaptive pools by name, each on its own hardware, e.g. `{l4:
    {accelerator_type: L4, replicas: 4, num_gpus: 1}}` beside H100s in `adaptive`. Each is
    deployed as `adaptive-<name>` (engine_args default to `adaptive`'s chunked prefill); the
    controller routes over every adaptive engine as one pool, predicting each by its accelerator
    type's profile, and moves KV between any two of them."""
    kv_transfer: KVTransferSettings = Field(default_factory=KVTransferSettings)
    """KV channel between the pools (secret, chunking, lease). An empty secret makes
    `pdserve serve` generate one for the run; set it (or PDSERVE_KV_SECRET) to share one."""
    kv_receiver_port: int = Field(0, ge=0, le=65535)
    """First port a decode replica's KV receiver may bind on its node's address; 0 picks any free
    port. Fixed ports let a Kubernetes NetworkPolicy name them."""
    kv_receiver_port_count: int = Field(1, ge=1, le=256)
    """With a fixed `kv_receiver_port`: how many consecutive ports from it the decode replicas of
    one node (pod) may take, one per tensor-parallel rank each; a replica that finds no run of its
    ranks' ports free fails to start."""
    slo: SLOConfig = Field(default_factory=SLOConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    """How the controller routes requests and predicts their latencies."""
    autoscaling: AutoscalingConfig | None = None
    """Size the prefill and decode pools from a policy file (disaggregated mode); None keeps
    each pool at its `replicas`."""
    external_scaler_enabled: bool | None = None
    """Let something outside Serve set the pools' replica counts through Serve's external-scaler
    API (an operator through Serve's REST API, a test); None: on exactly when `autoscaling` is set,
    whose autoscaler uses it."""
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    log_level: str = "INFO"
    """pdserve's and vLLM's log level inside the replicas."""

    @model_validator(mode="before")
    @classmethod
    def _default_model_tool_parser(cls, data: Any) -> Any:
        """The default model comes with its family's tool-call parser; another model has none
        unless the config names one."""
        if isinstance(data, dict) and data.get("model", "default") == "default":
            return {"tool_call_parser": DEFAULT_MODEL_TOOL_PARSER, **data}
        return data

    @model_validator(mode="before")
    @classmethod
    def _pool_defaults_per_field(cls, data: Any) -> Any:
        """A pool section overrides the role's defaults field by field (and engine_args key by
        key): `decode: {replicas: 2}` keeps the decode pool's default cores."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for role, defaults in _POOL_DEFAULTS.items():
            given = data.get(role)
            if isinstance(given, dict):
                merged = {**defaults, **given}
                if isinstance(given.get("engine_args"), dict):
                    merged["engine_args"] = {**defaults.get("engine_args", {}), **given["engine_args"]}
                data[role] = merged
        extra = data.get("adaptive_pools")
        if isinstance(extra, dict):
            chunked = _POOL_DEFAULTS["adaptive"]["engine_args"]
            data["adaptive_pools"] = {
                name: {**given, "engine_args": {**chunked, **given.get("engine_args", {})}}
                if isinstance(given, dict) and isinstance(given.get("engine_args", {}), dict) else given
                for name, given in extra.items()}
        return data

    @field_validator("adaptive_pools")
    @classmethod
    def _pool_names(cls, v: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        bad = sorted(n for n in v if not re.fullmatch(POOL_NAME_PATTERN, n))
        if bad:
            raise ValueError(f"pool names {bad} must be 1-24 lowercase letters, digits and inner hyphens")
        return v

    @model_validator(mode="after")
    def _pools_fit_mode(self) -> "ClusterConfig":
        if self.kv_transfer.listen_addr != "127.0.0.1:0":
            raise ValueError("kv_transfer.listen_addr is chosen per decode replica; leave it unset")
        if self.kv_receiver_port and self.kv_receiver_port + self.kv_receiver_port_count > 65536:
            raise ValueError("kv_receiver_port + kv_receiver_port_count runs past port 65535")
        ports = [self.ingress.http_port, self.ingress.grpc_port, self.ingress.direct_http_port]
        if len(set(ports) - {None}) != len([p for p in ports if p is not None]):
            raise ValueError("ingress.http_port, grpc_port and direct_http_port must differ")
        if self.dtype == "auto" and len({pool.on_cpu for pool in self.pools().values()}) > 1:
            raise ValueError("dtype auto is float32 on CPU pools and the checkpoint's dtype on GPU pools, so "
                             "engines that move KV between them would hold it in different dtypes: set dtype "
                             "explicitly")
        if self.autoscaling is not None and self.external_scaler_enabled is False:
            raise ValueError("autoscaling sets the pools' sizes through Serve's external-scaler API: "
                             "external_scaler_enabled may not be false")
        if self.adaptive_pools and self.mode != "adaptive":
            raise ValueError(f"adaptive_pools deploys only in mode adaptive, not {self.mode}")
        if self.autoscaling is not None and self.mode != "disaggregated":
            raise ValueError("autoscaling sizes the prefill and decode pools: it needs mode disaggregated")
        if self.mode != "colocated":
            for name, pool in self.pools().items():
                if split := {a: n for a in UNSPLIT_ENGINE_ARGS if (n := pool.engine_args.get(a, 1)) != 1}:
                    raise ValueError(
                        f"{name}.engine_args {split}: in mode {self.mode} engines move KV, and the KV connector "
                        "moves each tensor-parallel rank's share of it, not a pipeline stage's or a data-parallel "
                        "rank's. Run such engines in mode colocated, and scale a pool with `replicas`")
        receivers = {n: p.tp_size for n, p in self.pools().items() if pool_role(n) in ("decode", "adaptive")}
        if self.kv_receiver_port and (short := {n: tp for n, tp in receivers.items()
                                                if tp > self.kv_receiver_port_count}):
            raise ValueError(f"pools {short} run that many tensor-parallel ranks, each with its own KV receiver port, "
                             f"but kv_receiver_port_count is {self.kv_receiver_port_count}")
        return self

    @property
    def engine_dtype(self) -> str:
        """The dtype every engine of this service is built with, "auto" resolved (the validator keeps
        "auto" from resolving differently for two pools that move KV)."""
        return resolve_dtype(self.dtype, on_cpu=all(pool.on_cpu for pool in self.pools().values()))

    def pools(self) -> dict[str, PoolConfig]:
        """The pools this mode deploys, by role."""
        if self.mode == "colocated":
            return {"colocated": self.colocated}
        if self.mode == "adaptive":
            return {"adaptive": self.adaptive, **{ADAPTIVE_PREFIX + n: p for n, p in self.adaptive_pools.items()}}
        return {"prefill": self.prefill, "decode": self.decode}


def pool_role(pool_name: str) -> str:
    """The role of a pool's engines: "adaptive" for every adaptive pool, else the pool's name."""
    return "adaptive" if pool_name.startswith(ADAPTIVE_PREFIX) else pool_name


def resolve_dtype(dtype: str, on_cpu: bool) -> str:
    """The dtype an engine is built with. "auto" is float32 on CPUs: vLLM's CPU bfloat16 path
    answers the default model's "What is the capital of France?" with "L'Étoile, la Marseillaise,
    ..." on Intel Xeon machines with AMX (right on AMD EPYC), while float32 is right on both, and
    CPUs without native bfloat16 run float32 faster. On GPUs "auto" is left to vLLM."""
    return "float32" if dtype == "auto" and on_cpu else dtype


class ConfigError(ValueError):
    """A config file that cannot be used; the message lists every problem."""


def parse_config(data: dict[str, Any] | None, source: str = "config") -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(f"{source} is invalid:\n{describe(err)}") from None


def load_config(path: str | Path | None) -> ClusterConfig:
    """The config in `path` (YAML), or the defaults when `path` is None. A relative policy
    file is relative to the config's directory, and is checked here too."""
    if path is None:
        return parse_config({}, "default config")
    p = Path(path)
    data = read_mapping(p, "config", ConfigError)
    cfg = parse_config(data, str(p))
    if cfg.autoscaling is not None:
        policy = Path(cfg.autoscaling.policy_file)
        cfg.autoscaling.policy_file = str(policy if policy.is_absolute() else (p.parent / policy).resolve())
        try:
            cfg.autoscaling.policy()
        except PolicyError as err:
            raise ConfigError(f"{p}: autoscaling.policy_file: {err}") from None
    return cfg
