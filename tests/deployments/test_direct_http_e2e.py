"""The ingress replica's own HTTP server (`ingress.direct_http_port`) on a real engine: it serves
the proxy's API under the same route prefix and gives the same answers, refuses what the proxy
refuses, and a client that goes away frees its engine request there too."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from pdserve.model_store import resolve_model
from tests.deployments.service_fixtures import running_service, service_config

pytestmark = pytest.mark.slow

API_KEY = "pdserve-direct-test-key-3b9d1e"
PREFIX = "/pd"
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
        "temperature": 0}


@pytest.fixture(scope="module")
def svc():
    cfg = service_config(mode="colocated", colocated={"replicas": 1, "cpu_binds": ["0"]},
                         ingress={"api_keys": [API_KEY], "route_prefix": PREFIX})
    with running_service(cfg, str(resolve_model(None)), num_cpus=3) as s:
        yield s


@pytest.fixture(scope="module")
def model(svc) -> str:
    return _get(svc.direct_http_url, "/v1/models").json()["data"][0]["id"]


def _headers(key: str | None = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get(base: str, path: str) -> httpx.Response:
    return httpx.get(base + path, headers=_headers(), timeout=60).raise_for_status()


def _streamed_text(base: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, headers=_headers(),
                      timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
    return text


def _running_requests(svc) -> float:
    metrics = _get(svc.direct_http_url, "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running{"))


def test_the_ingress_serves_the_proxys_api_under_the_same_prefix_with_the_same_answers(svc, model):
    assert svc.direct_http_url.endswith(f":{svc.cfg.ingress.direct_http_port}{PREFIX}")
    body = {**CHAT, "model": model}
    whole = {base: httpx.post(base + "/v1/chat/completions", json=body, headers=_headers(), timeout=120)
             for base in (svc.http_url, svc.direct_http_url)}
    answers = {base: r.raise_for_status().json()["choices"][0]["message"]["content"] for base, r in whole.items()}
    assert set(answers.values()) == {"The capital of France is Paris."}
    assert whole[svc.direct_http_url].headers["x-pdserve-ttft-met"] in ("true", "false")
    assert _streamed_text(svc.direct_http_url, body) == "The capital of France is Paris."
    unprefixed = svc.direct_http_url.removesuffix(PREFIX)
    assert httpx.get(unprefixed + "/v1/models", headers=_headers(), timeout=30).status_code == 404


@pytest.mark.parametrize("key, content, status", [
    (None, b"{not json", 401),  # a malformed body from a caller without a key: refused on the key, unread
    ("wrong-key", json.dumps(CHAT).encode(), 401),
    (API_KEY, b"{not json", 400),
    (API_KEY, json.dumps({**CHAT, "no_such_field": 3}).encode(), 400),
], ids=["malformed_without_key", "wrong_key", "malformed_with_key", "unknown_field"])
def test_the_ingress_refuses_what_the_proxy_refuses_with_the_same_body(svc, model, key, content, status):
    got = [httpx.post(base + "/v1/chat/completions", content=content, timeout=60,
                      headers={**_headers(key), "Content-Type": "application/json"})
           for base in (svc.http_url, svc.direct_http_url)]
    assert [r.status_code for r in got] == [status, status]
    assert got[0].json() == got[1].json() and got[1].json()["error"]["message"]


def test_a_client_that_goes_away_mid_answer_frees_its_engine_request(svc, model):
    body = json.dumps({**CHAT, "model": model, "max_tokens": 800, "ignore_eos": True}).encode()
    host, port = svc.cfg.ingress.host, svc.cfg.ingress.direct_http_port
    head = (f"POST {PREFIX}/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, port)) as conn:  # a whole (not streamed) answer, 800 tokens long
        conn.sendall(head + body)
        deadline = time.monotonic() + 60
        while _running_requests(svc) < 1:
            assert time.monotonic() < deadline, "the engine never ran the request"
            time.sleep(0.2)
    deadline = time.monotonic() + 20  # 800 tokens take a minute on one core; the abort a moment
    while _running_requests(svc) > 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that went away"
        time.sleep(0.2)
