"""A whole adaptive pdserve service on real engines (two float32 engines, each prefilling,
decoding and moving KV either way), driven through its HTTP API: the controller serves a
request on one engine when that is soonest, and has another engine prefill it when the
engine it decodes on is busy with answers that a prefill there would slow past their TPOT;
the answers are the same either way. The two engines are two pools (`adaptive` and an
`adaptive_pools` entry) of two accelerator types, which the local Ray node declares as custom
resources: the controller routes them as one pool and KV moves between the pools."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from pdserve.model_store import resolve_model
from tests.deployments.fault_helpers import snapshot, wait_until
from tests.deployments.service_fixtures import routing_decisions, running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

STORY = "Tell the story of the fox who learned to sing."
REPORT = " ".join(f"Line {i} of the report: the numbers are steady." for i in range(30))  # about 330 tokens
LOOSE_TTFT = {"ttft_ms": 120_000}


@pytest.fixture(scope="module")
def svc():
    # Cache-blind: the reference answers below must be one engine's alone, which a prompt cached on
    # the other engine (its KV moved there before) would not be (test_prefix_routing_e2e.py).
    # Each step within the objective (no amortized room): the story's 160 tokens would absorb the
    # report's chunks, and the report would then be served whole on the idle engine, moving no KV
    # (the amortized rule is test_adaptive_routing.py's subject).
    cfg = service_config(mode="adaptive", routing={"local_prefill_max_tokens": None, "prefix_aware": False,
                                                   "tpot_amortize_max_tokens": 0},
                         adaptive={"replicas": 1, "cpu_binds": ["0"], "accelerator_type": "CPUA"},
                         adaptive_pools={"b": {"cpu_binds": ["1"], "accelerator_type": "CPUB"}}, log_level="INFO")
    types = {"accelerator_type:CPUA": 1, "accelerator_type:CPUB": 1}
    with running_service(cfg, str(resolve_model(None)), num_cpus=4, resources=types) as s:
        yield s


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def kv_transfers_done(svc) -> float:
    with urllib.request.urlopen(f"{svc.http_url}/metrics") as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith('pdserve_kv_transfers_total{state="DONE"}'))


def engines(svc) -> list[dict]:
    return [i for i in snapshot(svc) if i["pool"] in ("adaptive", "adaptive-b")]


def test_the_two_pools_each_run_one_engine_of_their_own_accelerator_type(svc):
    assert sorted((i["pool"], i["accelerator_type"]) for i in engines(svc)) == [("adaptive", "CPUA"),
                                                                              ("adaptive-b", "CPUB")]


def idle(svc) -> bool:
    """Both engines have nothing running or queued, by their own reports too."""
    engines_now = engines(svc)
    return len(engines_now) == 2 and all(i["load"] == 0 and i["running"] == 0 and i["queued_prefill_tokens"] == 0
                                         for i in engines_now)


def test_a_prompt_is_prefilled_on_the_other_engine_while_its_decode_engine_serves_a_tight_tpot_and_answers_alike(
        svc, client, model):
    # The reference answers first, while neither engine has latency observations of its own (both
    # predict with their type's): an idle engine prefilling where it decodes is then soonest by the
    # transfer it saves, so each is one engine's alone. Later, the engines' own corrections, learned
    # under load, may rightly predict the other engine's prefill plus the transfer sooner.
    alone = []
    for sampling in ({"temperature": 0}, {"temperature": 2.0, "seed": 7}):
        wait_until(lambda: idle(svc), 60, "both engines idle")
        alone.append(client.completions.create(model=model, prompt=REPORT, max_tokens=24, extra_body=LOOSE_TTFT,
                                               **sampling))
    long_answer: dict = {"chunks": 0}

    def stream_story() -> None:  # decodes for seconds with a TPOT objective no prefill chunk fits within
        for event in client.completions.create(model=model, prompt=STORY, max_tokens=160, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True, "tpot_ms": 180, **LOOSE_TTFT}):
            long_answer["id"] = event.id
            long_answer["chunks"] += 1

    story = threading.Thread(target=stream_story)
    story.start()
    wait_until(lambda: long_answer["chunks"] >= 3, 120, "the story to stream")
    busy = [i["replica_id"] for i in engines(svc) if i["load"]]
    kv_before = kv_transfers_done(svc)
    greedy = client.completions.create(model=model, prompt=REPORT, max_tokens=24, temperature=0, extra_body=LOOSE_TTFT)
    seeded = client.completions.create(model=model, prompt=REPORT, max_tokens=24, temperature=2.0, seed=7,
                                       extra_body=LOOSE_TTFT)
    kv_moved = kv_transfers_done(svc) - kv_before
    still_streaming = story.is_alive()
    story.join(timeout=120)
    routed = {f"cmpl-{request_id}": d for request_id, d in routing_decisions(svc).items()}
    print("routing: " + "; ".join(routed[r.id] for r in (greedy, seeded, *alone)))
    assert still_streaming and long_answer["chunks"] >= 100 and busy
    assert "local prefill" in routed[long_answer["id"]] and f"-> {busy[0]}" in routed[long_answer["id"]]
    for r in (greedy, seeded):  # prefilled on the idle engine, decoded on the busy one
        other = next(i["replica_id"] for i in engines(svc) if i["replica_id"] != busy[0])
        assert f"routed: prefill {other} " in routed[r.id] and f"-> {busy[0]}" in routed[r.id], routed[r.id]
    assert kv_moved == 2
    assert all("local prefill" in routed[r.id] for r in alone)
    assert [r.choices[0].text for r in (greedy, seeded)] == [r.choices[0].text for r in alone]
    assert greedy.choices[0].text != seeded.choices[0].text  # the seeded answer is sampled, not greedy
