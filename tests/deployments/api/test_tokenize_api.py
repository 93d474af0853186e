"""/tokenize and /detokenize over HTTP, with the default model's real tokenizer: the ids a
generation request would be given, and their text back."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pdserve.config.cluster import parse_config
from pdserve.deployments.api.http_api import build_http_app
from pdserve.deployments.frontend import Frontend
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import Sampling

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model)


@pytest.fixture(scope="module")
def frontend():
    return Frontend(parse_config({"max_model_len": 256}), str(resolve_model(None)), controller=None, pools={})


@pytest.fixture(scope="module")
def client(frontend):
    return TestClient(build_http_app(lambda: frontend))


async def test_a_chat_tokenizes_to_the_prompt_a_chat_request_is_given(frontend, client):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = client.post("/tokenize", json={"model": frontend.model_name, "messages": messages,
                                          "return_token_strs": True}).json()
    req = await frontend.chat_request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                      Sampling(max_tokens=1))
    assert body["tokens"] == req.prompt_token_ids and body["count"] == len(req.prompt_token_ids)
    assert body["max_model_len"] == 256 and "".join(body["token_strs"]).endswith("assistant\u010a")
    open_turn = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert body["tokens"][:open_turn["count"]] == open_turn["tokens"] and open_turn["count"] < body["count"]
    assert open_turn["token_strs"] is None


async def test_a_prompt_round_trips_through_tokenize_and_detokenize(frontend, client):
    body = client.post("/tokenize", json={"prompt": "The capital of France is"}).json()
    assert body["tokens"] == (await frontend.completion_request("The capital of France is", Sampling())).prompt_token_ids
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "The capital of France is"}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"prompt": "hi", "tools": [{"type": "function"}]}, "tools"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),  # JSON's escape of a lone surrogate: not text
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
])
def test_bad_bodies_are_400_naming_the_field(client, path, body, param):
    if isinstance(body, str):  # JSON text as sent
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = client.post(path, json=body)
    assert resp.status_code == (404 if param == "model" else 400), resp.text
    assert resp.json()["error"]["param"] == param
