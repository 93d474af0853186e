"""Faults on a whole service of real engines (two prefill and two decode replicas, float32),
with requests in flight: a decode replica killed mid-stream, a prefill replica killed with
prompts queued on it, the controller killed while requests stream and arrive, then both pools
scaled 2 -> 1 -> 2 and the ingress killed under steady traffic. After each, every request is
accounted for (completed, token for token what an unbroken run answers, or ended with a clear
error), no stream hangs, and every engine's KV blocks are free again. One service for all: each
test starts once the one before it is over and every pool is full again.

The service also requires an API key, and the last test reads every log line the cluster
wrote, the spans and the refusals for the key and the KV channel's secret.

KV transfers that stall or whose receiver restarts are covered where the transfer lives:
tests/kvtransfer/test_transport.py (leases, epochs) and test_connector_e2e.py (a prefill
engine killed mid-transfer, the decode engine recomputing within the lease)."""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pdserve.model_store import resolve_model
from tests.deployments.fault_helpers import (
    Traffic,
    assert_kv_idle,
    kill_replica,
    live_replicas,
    snapshot,
    wait_for_full_pools,
    wait_until,
)
from tests.deployments.service_fixtures import running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

API_KEY = "pdserve-test-key-4f1c9a7be2d3"
KV_SECRET = "kv-secret-0b8e5d2a91c7f364"
WRONG_KEY = "not-the-key-77d2e91f0a"
MAX_TOKENS = 40
REQUEST_TIMEOUT_S = 300
FULL = {"prefill": 2, "decode": 2}
PROMPTS = [f"Tell the story of the {animal} who learned to sing." for animal in ("fox", "owl", "bear", "crow")]
LONG_PROMPTS = [" ".join(f"Line {i} of report {k}: the numbers are steady." for i in range(50)) for k in range(6)]


@pytest.fixture(scope="module")
def svc():
    cfg = service_config(
        prefill={"replicas": FULL["prefill"]}, decode={"replicas": FULL["decode"]}, log_level="INFO",
        kv_transfer={"secret": KV_SECRET}, slo={"on_unmeetable": "best_effort"},
        ingress={"api_keys": [API_KEY], "route_wait_s": 30, "request_timeout_s": REQUEST_TIMEOUT_S},
        external_scaler_enabled=True)
    with running_service(cfg, str(resolve_model(None)), num_cpus=6) as s:
        yield s


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(client, model):
    """What each prompt streams with no fault: greedy float32 is deterministic."""
    return {p: complete(client, model, p, MAX_TOKENS) for p in PROMPTS + LONG_PROMPTS}


def complete(client, model: str, prompt: str, max_tokens: int) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].text


@dataclass
class Stream:
    """One streamed request on its own thread: its text so far and how it ended."""

    prompt: str
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    error: str = ""
    thread: threading.Thread = field(init=False)

    def start(self, client, model: str) -> Stream:
        def run() -> None:
            try:
                for event in client.completions.create(model=model, prompt=self.prompt, max_tokens=MAX_TOKENS,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    self.text += event.choices[0].text
                    self.chunks += 1
                    self.finish_reason = event.choices[0].finish_reason or self.finish_reason
            except Exception as exc:
                self.error = repr(exc)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        return self


def finish(streams: list[Stream], reference: dict[str, str], scenario: str) -> None:
    """Every stream ended within the deadline and answered exactly what an unbroken run does."""
    for s in streams:
        s.thread.join(timeout=300)
    hung = sum(s.thread.is_alive() for s in streams)
    completed = sum(s.finish_reason == "length" and s.text == reference[s.prompt] for s in streams)
    failed = [s.error for s in streams if s.error]
    print(f"{scenario}: {len(streams)} requests, {completed} completed identical to the unbroken run, "
          f"{len(failed)} failed, {hung} hung")
    assert hung == 0 and not failed and completed == len(streams), [
        (s.finish_reason, s.error, s.text, reference[s.prompt]) for s in streams]


def losses(svc, phase: str) -> float:
    with urllib.request.urlopen(f"{svc.http_url}/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    prefix = f'pdserve_replica_losses_total{{phase="{phase}",result="retried"}} '
    return sum(float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix))


def test_a_decode_replica_killed_mid_stream_hands_its_streams_over_token_for_token(svc, client, model, reference):
    wait_for_full_pools(svc, FULL)
    before = losses(svc, "decode")
    streams = [Stream(p).start(client, model) for p in PROMPTS]
    wait_until(lambda: all(s.chunks >= 3 for s in streams), 120, "every stream to be under way")
    busy = [i for i in snapshot(svc) if i["pool"] == "decode" and i["live"] and i["load"]]
    victim = max(busy, key=lambda i: i["load"])
    kill_replica(svc, "decode", victim["replica_id"])
    finish(streams, reference, f"decode replica killed with {victim['load']} streams on it")
    assert losses(svc, "decode") - before >= 1
    assert_kv_idle(svc, "decode kill")


@dataclass
class GrpcStream:
    """One request streamed over gRPC on its own thread, with stop strings: its text and token ids
    so far (gRPC sends every chunk, also those whose text vLLM holds back) and how it ended."""

    prompt: str
    stop: list[str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""
    thread: threading.Thread = field(init=False)

    def run(self, svc, model: str) -> GrpcStream:
        from pdserve.proto import pdserve_pb2 as pb

        with grpc.insecure_channel(svc.grpc_addr) as ch:
            gen = ch.unary_stream("/pdserve.v1.Generation/Generate",
                                  request_serializer=pb.GenerateRequest.SerializeToString,
                                  response_deserializer=pb.GenerateResponse.FromString)
            request = pb.GenerateRequest(model=model, prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         stop=self.stop)
            try:
                for msg in gen(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=300):
                    self.text += msg.text
                    self.token_ids += msg.token_ids
                    self.finish_reason = msg.finish_reason or self.finish_reason
            except grpc.RpcError as exc:
                self.error = f"{exc.code()}: {exc.details()}"
        return self

    def start(self, svc, model: str) -> GrpcStream:
        self.thread = threading.Thread(target=self.run, args=(svc, model))
        self.thread.start()
        return self


def test_a_decode_replica_killed_with_stop_strings_in_play_answers_as_an_unbroken_run(svc, model):
    """vLLM holds back the text of an answer's last tokens while a stop string might start there:
    the text of tokens streamed before the kill still arrives, and a stop string that began before
    the kill still ends the answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    never = ["a stop string that no story of a singing animal contains, whatever it sings"]
    plain = {p: GrpcStream(p, []).run(svc, model).text for p in PROMPTS[2:]}
    stops = {p: never for p in PROMPTS[:2]} | {p: [plain[p][8:68]] for p in PROMPTS[2:]}
    unbroken = {p: GrpcStream(p, stops[p]).run(svc, model) for p in PROMPTS}
    assert all(unbroken[p].text == plain[p][:8] and unbroken[p].finish_reason == "stop" for p in PROMPTS[2:])
    wait_for_full_pools(svc, FULL)
    before = losses(svc, "decode")
    streams = [GrpcStream(p, stops[p]).start(svc, model) for p in PROMPTS]
    wait_until(lambda: all(len(s.token_ids) >= 3 for s in streams), 120, "every stream to be under way")
    busy = [i for i in snapshot(svc) if i["pool"] == "decode" and i["live"] and i["load"]]
    victim = max(busy, key=lambda i: i["load"])
    kill_replica(svc, "decode", victim["replica_id"])
    for s in streams:
        s.thread.join(timeout=300)
    print("stop strings across a kill: " + "; ".join(f"{len(s.token_ids)} tokens, {s.finish_reason or s.error}"
                                                     for s in streams))
    assert not [s for s in streams if s.thread.is_alive() or s.error]
    assert [(s.text, s.finish_reason) for s in streams] == [(unbroken[p].text, unbroken[p].finish_reason)
                                                           for p in PROMPTS]
    assert all(s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in streams[:2])
    assert losses(svc, "decode") - before >= 1
    assert_kv_idle(svc, "decode kill with stop strings")


def test_a_prefill_replica_killed_with_prompts_queued_serves_them_on_the_other(svc, client, model, reference):
    wait_for_full_pools(svc, FULL)
    before = losses(svc, "prefill")
    streams = [Stream(p).start(client, model) for p in LONG_PROMPTS]
    queued = lambda: [i for i in snapshot(svc) if i["pool"] == "prefill" and i["live"] and i["queued_prefill_tokens"]]  # noqa: E731
    wait_until(lambda: bool(queued()), 60, "prompts queued on a prefill replica")
    victim = max(queued(), key=lambda i: i["queued_prefill_tokens"])
    kill_replica(svc, "prefill", victim["replica_id"])
    finish(streams, reference, f"prefill replica killed with {victim['queued_prefill_tokens']} prompt tokens queued")
    assert losses(svc, "prefill") - before >= 1
    assert_kv_idle(svc, "prefill kill")


def test_the_controller_killed_while_requests_stream_and_arrive_loses_none(svc, client, model, reference):
    streams = [Stream(p).start(client, model) for p in PROMPTS[:2]]
    wait_until(lambda: all(s.chunks >= 3 for s in streams), 120, "streams under way")
    kill_replica(svc, "controller")
    # Requests arriving while no controller answers wait for the new one, then route from fresh reports.
    streams += [Stream(p).start(client, model) for p in PROMPTS[2:]]
    finish(streams, reference, "controller killed")
    assert {i["pool"] for i in snapshot(svc) if i["live"]} == {"prefill", "decode"}
    assert_kv_idle(svc, "controller kill")


def test_pools_scaled_down_and_up_and_the_ingress_killed_under_steady_traffic_lose_no_request(
        svc, client, model, reference):
    """Each pool goes 2 -> 1 -> 2 through the Serve actuator (the autoscaler's), and the ingress
    replica is killed once, with requests streaming all along: each one ends with the unbroken
    run's answer or a retriable error within its deadline (those on the killed ingress get what
    Serve's proxy says, a 500 or a cut connection), and afterwards every instance's load in the
    controller's ledger is 0 again."""
    from pdserve.controller.autoscaling.serve_actuator import ServeActuator

    wait_for_full_pools(svc, FULL)
    actuator = ServeActuator(svc.cfg.app_name)
    with Traffic(client, model, {p: reference[p] for p in PROMPTS}, MAX_TOKENS) as traffic:
        wait_until(lambda: traffic.count() >= 3, 300, "traffic to flow")
        for step, sizes in enumerate(({"decode": 1}, {"prefill": 1}, FULL)):
            before = traffic.count()
            actuator.apply(sizes)
            for pool, n in sizes.items():
                wait_until(lambda pool=pool, n=n: live_replicas(svc, pool) == n, 300, f"{pool} at {n} replicas")
            wait_until(lambda before=before: traffic.count() >= before + 3, 300, f"traffic after step {step}")
        before, killed_at = traffic.count(), time.monotonic()
        kill_replica(svc, "ingress")
        wait_until(lambda: traffic.count() >= before + 6, 300, "answers through the new ingress replica")
        answered_again_at = time.monotonic()
    kinds = {k: traffic.count(k) for k in ("ok", "retriable", "proxy", "wrong")}
    slowest_s = max(o[1] for o in traffic.outcomes)
    print(f"scale 2->1->2 and an ingress kill: {len(traffic.outcomes)} requests, {kinds}, slowest {slowest_s:.1f} s; "
          f"retriable: {[o[2] for o in traffic.outcomes if o[0] in ('retriable', 'proxy')]}")
    assert kinds["wrong"] == 0, [o for o in traffic.outcomes if o[0] == "wrong"]
    # Serve's proxy answers 500 for requests on the ingress replica it lost, and only then.
    assert all(killed_at <= o[3] <= answered_again_at for o in traffic.outcomes if o[0] == "proxy")
    assert slowest_s < REQUEST_TIMEOUT_S + 10  # ended by its deadline at the latest (then with a 503), plus HTTP
    assert_kv_idle(svc, "scaling and an ingress kill")


def test_requests_without_a_valid_key_are_refused_over_http_and_grpc(svc, model):
    from pdserve.proto import pdserve_pb2 as pb

    for key in (WRONG_KEY, None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(f"{svc.http_url}/v1/completions", headers=headers,
                                     data=f'{{"model": "{model}", "prompt": "hi"}}'.encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401 and err.value.headers["WWW-Authenticate"] == "Bearer"
        assert WRONG_KEY not in err.value.read().decode()
    with urllib.request.urlopen(f"{svc.http_url}/health", timeout=30) as r:  # probes need no key
        assert r.status == 200
    with grpc.insecure_channel(svc.grpc_addr) as ch:
        gen = ch.unary_stream("/pdserve.v1.Generation/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)
        request = pb.GenerateRequest(model=model, prompt="Once upon a time", max_tokens=3, temperature=0)
        with pytest.raises(grpc.RpcError) as rpc_err:
            list(gen(request, metadata=(("authorization", f"Bearer {WRONG_KEY}"),), timeout=60))
        assert rpc_err.value.code() is grpc.StatusCode.UNAUTHENTICATED and WRONG_KEY not in rpc_err.value.details()
        msgs = list(gen(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=120))
        assert msgs[-1].usage.completion_tokens == 3


def test_no_secret_appears_in_any_log_span_or_error(svc, client, model):
    import ray
    from ray import serve

    complete(client, model, PROMPTS[0], 4)  # one more full request through every process, logging at INFO
    spans = []
    for name in ("ingress", "prefill", "decode"):
        spans += serve.get_deployment_handle(name, svc.cfg.app_name).finished_spans.remote().result()
    assert spans and not [s for s in spans if any(x in repr(s) for x in (API_KEY, KV_SECRET, WRONG_KEY))]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert files and sum(f.stat().st_size for f in files) > 0
    leaks = {f.name: [x for x in (API_KEY, KV_SECRET, WRONG_KEY) if x.encode() in f.read_bytes()] for f in files}
    leaks = {name: found for name, found in leaks.items() if found}
    print(f"searched {len(files)} log files ({sum(f.stat().st_size for f in files)} bytes) for the secrets")
    assert not leaks, leaks
