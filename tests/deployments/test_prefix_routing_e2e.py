"""Prefix-aware routing on real engines: two colocated float32 engines, two conversations whose
first turns land one on each; their second turns go to the engine that holds their history, which
computes only the new tokens (the answers' usage says how many were cached). Disaggregated, the
second turn's KV transfer leaves out the history its decode engine holds. The answers are always
those of an engine that caches nothing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.model_store import resolve_model
from tests.deployments.service_fixtures import routing_decisions, running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

SYSTEM = {
    "trains": " ".join(f"Rule {i}: trains to Lyon leave from platform {i % 7} and need a ticket." for i in range(25)),
    "gardens": " ".join(f"Note {i}: the roses in bed {i % 5} want water every {i % 3 + 1} days." for i in range(25)),
}
"""Two system prompts of about 400 tokens: three of the CPU engines' 128-token blocks each."""
QUESTIONS = {"trains": ("Where do trains to Lyon leave from?", "And do I need a ticket?"),
             "gardens": ("How often do the roses want water?", "Which bed needs the most?")}


def turn(system: str, question: str, earlier: list[dict] = ()) -> list[dict]:
    return [{"role": "system", "content": system}, *earlier, {"role": "user", "content": question}]


def ask(client, model: str, messages: list[dict]):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                          extra_body={"ttft_ms": 120_000, "tpot_ms": 60_000})


def conversations(svc, concurrently: bool) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Each conversation's two turns (first turns together when `concurrently`, so they land on
    both engines), and the id of each answer."""
    client = openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="unused", max_retries=0, timeout=180)
    model = client.models.list().data[0].id
    firsts = {name: turn(SYSTEM[name], QUESTIONS[name][0]) for name in SYSTEM}
    with ThreadPoolExecutor(2 if concurrently else 1) as pool:
        first = dict(zip(firsts, pool.map(lambda m: ask(client, model, m), firsts.values()), strict=True))
    time.sleep(2.0)  # the engines' cache events reach the controller with their next load reports
    answers = {name: [first[name]] for name in SYSTEM}
    for name in SYSTEM:
        earlier = [{"role": "user", "content": QUESTIONS[name][0]},
                   {"role": "assistant", "content": first[name].choices[0].message.content}]
        answers[name].append(ask(client, model, turn(SYSTEM[name], QUESTIONS[name][1], earlier)))
    return answers, {name: [a.id.removeprefix("chatcmpl-") for a in pair] for name, pair in answers.items()}


def engine(decision: str) -> str:
    """The colocated replica a routing decision named."""
    return decision.split(" -> ")[1].split(" ")[0]


@pytest.fixture(scope="module")
def reference() -> dict[str, list]:
    """The conversations' answers from one engine that caches nothing."""
    nothing_cached = service_config(mode="colocated", colocated={
        "replicas": 1, "cpu_binds": ["0"], "engine_args": {"enable_prefix_caching": False}},
        routing={"prefix_aware": False})
    with running_service(nothing_cached, str(resolve_model(None)), num_cpus=4) as svc:
        answers, _ = conversations(svc, concurrently=False)
    for name in SYSTEM:
        assert answers[name][1].usage.prompt_tokens_details.cached_tokens == 0
    return answers


def same_answers(answers: dict[str, list], reference: dict[str, list]) -> None:
    for name in SYSTEM:
        assert [a.choices[0].message.content for a in answers[name]] == \
               [a.choices[0].message.content for a in reference[name]]


def test_later_turns_go_to_the_engine_holding_their_history_and_answer_as_an_engine_caching_nothing(reference):
    cached_cfg = service_config(mode="colocated", colocated={"replicas": 2, "cpu_binds": ["0", "1"]})
    with running_service(cached_cfg, str(resolve_model(None)), num_cpus=4) as svc:
        answers, ids = conversations(svc, concurrently=True)
        routed = routing_decisions(svc)
    chosen = {name: [engine(routed[i]) for i in pair] for name, pair in ids.items()}
    assert chosen["trains"][0] != chosen["gardens"][0], chosen  # the first turns landed one on each engine
    for name, (first, second) in chosen.items():
        assert second == first, (name, routed[ids[name][1]])
        assert "prompt tokens cached" in routed[ids[name][1]]
        later = answers[name][1].usage
        assert later.prompt_tokens_details.cached_tokens >= 256, later  # its history, in whole 128-token blocks
        assert answers[name][0].usage.prompt_tokens_details.cached_tokens == 0
    same_answers(answers, reference)


def test_a_later_turns_transfer_leaves_out_the_history_its_decode_engine_holds(reference):
    """Disaggregated (one prefill, one decode engine): the decode engine holds the first turn with its
    answer, so the second turn's KV transfer carries only the rest, and the answers stay the same."""
    with running_service(service_config(), str(resolve_model(None)), num_cpus=4) as svc:
        answers, ids = conversations(svc, concurrently=False)
        routed = routing_decisions(svc)
    for name, (first, second) in ids.items():
        assert "held by the decode instance" not in routed[first]
        assert "held by the decode instance are not moved" in routed[second], routed[second]
        held = int(routed[second].split(" held by the decode instance")[0].rsplit(" ", 1)[1])
        assert held >= 384, routed[second]  # the system prompt's three 128-token blocks at least
        assert answers[name][1].usage.model_extra["kv_transfer"]["state"] == "DONE"  # loaded, not recomputed
    same_answers(answers, reference)
