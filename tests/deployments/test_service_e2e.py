"""A whole disaggregated pdserve service on real engines (one prefill, one decode,
float32), driven through its public HTTP and gRPC APIs."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from pdserve.deployments import service
from pdserve.model_store import resolve_model
from pdserve.ports import free_port
from tests.deployments.sampling_cases import sampling_requests, streamed_calls
from tests.deployments.service_fixtures import running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def svc():
    # Two requests per replica at most, so a small burst shows the overload path.
    cfg = service_config(prefill={"max_ongoing_requests": 2}, decode={"max_ongoing_requests": 2})
    with running_service(cfg, str(resolve_model(None)), num_cpus=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_health_and_openapi(svc, model):
    assert model == "SmolLM2-135M-Instruct"
    deadline = time.monotonic() + 30  # a probe may see "unavailable" until the engines' first reports land
    while True:
        try:
            with urllib.request.urlopen(f"{svc.http_url}/health") as r:
                body = json.loads(r.read())
            break
        except urllib.error.HTTPError as err:
            assert err.code == 503 and time.monotonic() < deadline, err
            time.sleep(0.5)
    assert body["status"] == "ok" and body["live_instances"] == {"prefill": 1, "decode": 1}
    with urllib.request.urlopen(f"{svc.http_url}/openapi.json") as r:
        paths = json.loads(r.read())["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"} <= set(paths)


def test_chat_completion_answers_with_usage(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_tokenize_counts_the_prompt_a_chat_is_charged_for_and_detokenize_reads_an_answer(svc, client, model):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    status, body = _post(f"{svc.http_url}/tokenize", json.dumps({"model": model, "messages": messages}).encode())
    assert status == 200 and body["count"] == r.usage.prompt_tokens == len(body["tokens"])
    status, answer = _post(f"{svc.http_url}/tokenize", json.dumps({"prompt": r.choices[0].message.content,
                                                                   "add_special_tokens": False}).encode())
    status, text = _post(f"{svc.http_url}/detokenize", json.dumps({"tokens": answer["tokens"]}).encode())
    assert status == 200 and text["prompt"] == r.choices[0].message.content and "Paris" in text["prompt"]


def test_streamed_chat_equals_unstreamed(client, model):
    kw = {"model": model, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_streamed_and_not_with_length_limit(client, model):
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    streamed = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_sequence_ends_the_answer_before_it(client, model):
    free = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert "," in text, f"the test needs a comma in the free answer: {text!r}"
    r = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(",")]


def test_bad_requests_get_clear_4xx_and_service_keeps_serving(svc, client, model):
    url = f"{svc.http_url}/v1/chat/completions"
    status, body = _post(url, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    ok_msgs = [{"role": "user", "content": "hi"}]
    status, body = _post(url, json.dumps({"model": model, "messages": ok_msgs, "max_tokens": "many"}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(url, json.dumps({"model": model, "messages": ok_msgs, "max_tokens": -3}).encode())
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = _post(url, json.dumps({"model": "gpt-none", "messages": ok_msgs}).encode())
    assert status == 404 and body["error"]["code"] == "model_not_found"
    long_prompt = "hello " * 3000
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=model, prompt=long_prompt, max_tokens=4)
    r = client.chat.completions.create(model=model, messages=ok_msgs, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens > 0


def test_a_burst_beyond_capacity_is_rejected_at_once_with_429_and_retry_after(svc, client, model):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    def one(i: int):
        t0 = time.perf_counter()
        try:
            r = client.completions.create(model=model, prompt=f"Story number {i}:", max_tokens=24, temperature=0)
            return "ok", r, time.perf_counter() - t0
        except openai.RateLimitError as err:
            return "429", err, time.perf_counter() - t0

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    ok = [r for kind, r, _ in results if kind == "ok"]
    rejected = [(err, s) for kind, err, s in results if kind == "429"]
    assert len(ok) == 2 and len(rejected) == 4, [kind for kind, _, _ in results]
    assert all(err.response.headers.get("retry-after") == "1" for err, _ in rejected)
    assert all(r.usage.completion_tokens == 24 for r in ok)
    assert max(s for _, s in rejected) < min(s for kind, _, s in results if kind == "ok")
    controller = serve.get_deployment_handle("controller", svc.cfg.app_name)
    deadline = time.monotonic() + 5
    while any(i["load"] for i in controller.snapshot.remote().result()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(i["load"] == 0 for i in controller.snapshot.remote().result())
    assert client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0).usage.completion_tokens


def test_grpc_streams_a_generation_and_answers_health_and_reflection(svc, client, model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from pdserve.proto import pdserve_pb2 as pb

    expected = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    with grpc.insecure_channel(svc.grpc_addr) as ch:
        gen = ch.unary_stream("/pdserve.v1.Generation/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)
        msgs = list(gen(pb.GenerateRequest(model=model, prompt="Once upon a time", max_tokens=10, temperature=0),
                        timeout=120))
        assert len(msgs) > 1 and msgs[-1].finish_reason == "length" and msgs[-1].usage.completion_tokens == 10
        assert "".join(m.text for m in msgs) == expected.choices[0].text
        # Logprobs as the HTTP API reports them, one per token of each message.
        http = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                         logprobs=2).choices[0].logprobs
        msgs = list(gen(pb.GenerateRequest(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                           logprobs=2), timeout=120))
        assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
        sent = [t for m in msgs for t in m.logprobs]
        assert [t.token for t in sent] == http.tokens and all(len(t.top) == 2 for t in sent)
        assert [t.logprob for t in sent] == pytest.approx(http.token_logprobs, abs=1e-3)
        with pytest.raises(grpc.RpcError) as err:
            list(gen(pb.GenerateRequest(model=model, prompt="x", max_tokens=-1), timeout=30))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "pdserve.v1.Generation" in {s.name for s in resp.list_services_response.service}


def test_one_trace_spans_ingress_routing_prefill_kv_transfer_and_decode_across_processes(svc, client, model):
    from ray import serve

    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[2]}],
                                       max_tokens=8, temperature=0)
    request_id = r.id.removeprefix("chatcmpl-")
    spans = []
    for name in ("ingress", "prefill", "decode"):
        spans += serve.get_deployment_handle(name, svc.cfg.app_name).finished_spans.remote().result()
    (root,) = [s for s in spans if s["name"] == "ingress" and s["attributes"].get("pdserve.request_id") == request_id]
    mine = {s["name"]: s for s in spans if s["trace_id"] == root["trace_id"]}
    assert set(mine) == {"ingress", "routing", "prefill", "kv_transfer", "decode"}
    for child in ("routing", "prefill", "decode"):
        assert mine[child]["parent_id"] == root["span_id"], child
    assert mine["kv_transfer"]["parent_id"] == mine["prefill"]["span_id"]
    assert mine["kv_transfer"]["attributes"]["pdserve.kv_state"] == "DONE"
    procs = {mine[n]["process"].split(":")[0] for n in ("ingress", "prefill", "decode")}
    assert procs == {"ingress", "prefill", "decode"}


def test_a_short_prompt_is_prefilled_on_the_decode_replica_while_the_prefill_replica_is_busy(svc, client, model):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    controller = serve.get_deployment_handle("controller", svc.cfg.app_name)

    def prefill_queue() -> int:
        return sum(i["queued_prefill_tokens"] for i in controller.snapshot.remote().result() if i["pool"] == "prefill")

    # A 1,000-token prompt keeps the prefill replica busy for a second or two: long enough that its
    # queue is still predicted longer than a local prefill when the short prompt is routed. (Tokens
    # no prompt before had: a cached one would be predicted, rightly, to take no time.)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.completions.create, model=model, prompt=list(range(3000, 4000)), max_tokens=1,
                           temperature=0, extra_body={"ttft_ms": 60_000, "tpot_ms": 60_000})
        deadline = time.monotonic() + 30
        while prefill_queue() < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.completions.create(model=model, prompt=[1, 2, 3, 4], max_tokens=6, temperature=0)
        assert busy.result().usage.completion_tokens == 1
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    spans = []
    for name in ("ingress", "prefill", "decode"):
        spans += serve.get_deployment_handle(name, svc.cfg.app_name).finished_spans.remote().result()
    (root,) = [s for s in spans if s["name"] == "ingress"
               and s["attributes"].get("pdserve.request_id") == r.id.removeprefix("cmpl-")]
    mine = {s["name"]: s for s in spans if s["trace_id"] == root["trace_id"]}
    assert set(mine) == {"ingress", "routing", "decode"}, mine["routing"]["attributes"]["pdserve.decision"]
    assert "local prefill" in mine["routing"]["attributes"]["pdserve.decision"]
    assert mine["decode"]["attributes"]["pdserve.local_prefill"] is True


def test_every_answer_reports_its_objectives_and_an_unmeetable_one_is_refused_at_once(svc, client, model):
    import time

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=4, temperature=0,
        extra_body={"ttft_ms": 120_000, "tpot_ms": 60_000, "priority": 1})
    slo = raw.parse().usage.model_extra["slo"]
    assert slo["ttft_objective_ms"] == 120_000 and slo["tpot_objective_ms"] == 60_000 and slo["priority"] == 1
    assert slo["ttft_met"] is True and slo["tpot_met"] is True and 0 < slo["ttft_ms"] < 120_000
    assert float(raw.headers["x-pdserve-ttft-ms"]) == pytest.approx(slo["ttft_ms"], abs=0.1)
    assert raw.headers["x-pdserve-ttft-met"] == "true"
    start = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=4, extra_headers={"x-pdserve-tpot-ms": "0.01"})
    assert time.perf_counter() - start < 2.0
    assert "cannot meet its objectives" in err.value.message and err.value.response.headers["retry-after"]


def test_metrics_report_latencies_outcomes_and_kv_bytes(svc, client, model):
    client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="Hello", max_tokens=10_000)
    with urllib.request.urlopen(f"{svc.http_url}/metrics") as r:
        text = r.read().decode()
    for needle in ('pdserve_ttft_seconds_count{pool="prefill"}', 'pdserve_tpot_seconds_count{pool="decode"}',
                   'pdserve_e2e_latency_seconds_count{pool="decode"}', 'pdserve_requests_total{outcome="ok"}',
                   'pdserve_requests_total{outcome="invalid"}', 'pdserve_kv_transfers_total{state="DONE"}',
                   "pdserve_kv_transfer_bytes_total", 'pdserve_queue_depth{pool="decode"',
                   "pdserve_slo_met_requests_total", "pdserve_goodput_rps"):
        assert needle in text, needle
    kv_bytes = next(line for line in text.splitlines() if line.startswith("pdserve_kv_transfer_bytes_total"))
    assert float(kv_bytes.split()[-1]) > 0
    # Routes come over the controller's routing channel (through Serve's handle only before it opened).
    routes = {s.labels["path"]: s.value for f in text_string_to_metric_families(text) if f.name == "pdserve_route_calls"
              for s in f.samples if s.name.endswith("_total")}
    assert routes["socket"] > routes.get("serve_handle", 0), routes
    # The engines' own vLLM metrics, one family each, every sample labelled with its pool and replica.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens"):
        assert {s.labels["pool"] for s in families[name].samples} == {"prefill", "decode"}, name
        assert all(s.labels["replica"] for s in families[name].samples)
    prompt = {s.labels["pool"]: s.value for s in families["vllm:prompt_tokens"].samples if s.name.endswith("_total")}
    assert prompt["prefill"] > 0  # the prompts were computed there


# Last in this file: it replaces the disaggregated application with a colocated one, so
# that only two engines share the two cores.
def test_disaggregated_output_equals_colocated_through_the_whole_stack(svc, client, model):
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    requests, sampled = sampling_requests(model, PROMPTS, tokenizer)

    def answers(c) -> list[tuple[str, str, int]]:
        vllms = ("top_k", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens",
                 "structured_outputs", "skip_special_tokens")  # extra_body for the client
        out = [c.chat.completions.create(**{k: v for k, v in kw.items() if k not in vllms},
                                         extra_body={k: v for k, v in kw.items() if k in vllms})
               for kw in requests]
        logprobs.append([r.choices[0].logprobs.content if r.choices[0].logprobs else None for r in out])
        calls.append([[(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
                      for r in out])
        streamed.append(streamed_calls(c, {**requests[21], "stream": True}))
        # n choices (2: the service takes 2 requests per replica): choice i is sampled as a request
        # seeded with seed + i is (vLLM's convention).
        several = c.chat.completions.create(**{**sampled, "n": 2})
        singles = [c.chat.completions.create(**{**sampled, "seed": sampled["seed"] + i}).choices[0].message.content
                   for i in (0, 1)]
        choices.append(([ch.message.content for ch in several.choices], singles, several.usage.completion_tokens))
        return [(r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) for r in out]

    logprobs: list[list] = []
    choices: list[tuple] = []
    calls: list[list] = []
    streamed: list[tuple] = []
    disagg = answers(client)
    svc.delete()
    colo_cfg = service_config(mode="colocated", app_name="colocated", colocated={"replicas": 1, "cpu_binds": ["0"]},
                           ingress={"http_port": svc.cfg.ingress.http_port, "grpc_port": free_port(),
                                    "route_prefix": "/colocated"})
    colo = service.deploy(colo_cfg, str(resolve_model(None)))
    try:
        colocated = answers(openai.OpenAI(base_url=f"{colo.http_url}/v1", api_key="unused", max_retries=0, timeout=120))
    finally:
        colo.delete()
    assert disagg == colocated
    assert choices[0] == choices[1]
    several, singles, completion_tokens = choices[0]
    assert several == singles and several[0] != several[1] and completion_tokens > 24
    texts = [text for text, _, _ in disagg]
    assert all(texts[:5]) and texts[3:5] != texts[:2]  # the seeded answers are sampled, not greedy
    assert texts[5] == texts[6] == texts[0][:len(texts[5])] and len(texts[5]) > 10  # top_k 1, min_p 1: greedy
    assert texts[7] not in texts[:7]
    assert disagg[8] == (" blue" * 6, "length", 6)
    assert disagg[9][:2] == ("", "stop")
    assert disagg[10][1] == "stop" and disagg[10][2] >= 5
    assert texts[11].startswith(" blue blue") and not texts[11].endswith(" blue")
    greedy, seeded = logprobs[0][13], logprobs[0][14]
    assert disagg[13][1] == "stop" and greedy[-1].token == tokenizer.eos_token  # the end of sequence has one too
    assert "".join(t.token for t in greedy[:-1]) == texts[13] and len(greedy) == disagg[13][2]
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in greedy)  # greedy: the likeliest
    assert all(t.top_logprobs == [] for t in seeded) and any(t.logprob < -1 for t in seeded)  # sampled, not greedy
    assert json.loads(texts[15]) == {"country": "FRANCE", "capital": "Paris"} and disagg[15][1] == "stop"
    assert texts[16].startswith("{") and texts[16] not in texts[:16]  # sampled JSON, cut at max_tokens
    assert texts[17] in ("red", "green", "blue") and disagg[17][1] == "stop"
    assert calls[0] == calls[1]
    for i, finish_reason in ((18, "stop"), (19, "tool_calls")):  # OpenAI's: "stop" for a call forced by name
        (name, arguments), = calls[0][i]
        assert name == "get_weather" and isinstance(json.loads(arguments)["city"], str)
        assert disagg[i][:2] == (None, finish_reason)
    assert calls[0][20] == [] and texts[20] and disagg[20][1] in ("stop", "length")
    assert calls[0][21] == [("get_weather", '{"city": "Paris"}')] and disagg[21][:2] == (None, "tool_calls")
    assert streamed[0] == streamed[1] == ({0: ("get_weather", '{"city": "Paris"}')}, "tool_calls")
    assert disagg[22] == (tokenizer.bos_token * 3, "length", 3)
    for d_answer, c_answer in zip(logprobs[0], logprobs[1], strict=True):  # computed alike in both modes
        assert [t.token for t in d_answer or []] == [t.token for t in c_answer or []]
        assert [t.logprob for t in d_answer or []] == pytest.approx([t.logprob for t in c_answer or []], abs=1e-3)
