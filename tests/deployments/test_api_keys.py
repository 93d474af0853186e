"""API keys of the ingress: which keys are admitted, how HTTP asks for one (and which routes
stay open to probes), and that no answer repeats the key a client sent."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pdserve.deployments.api.http_api import build_http_app
from pdserve.deployments.api_keys import ApiKeys, bearer_token
from pdserve.errors import Unauthenticated
from tests.deployments.api.test_http_api import FakeAnsweringFrontend

KEY = "sk-team-a-6c1d0e"


def test_only_configured_or_environment_keys_are_admitted():
    keys = ApiKeys.from_sources([KEY], " sk-team-b , ,sk-team-c")
    assert keys.enabled
    assert [keys.admits(k) for k in (KEY, "sk-team-b", "sk-team-c")] == [True, True, True]
    assert [keys.admits(k) for k in (None, "", "sk-team", KEY + " ", KEY.upper())] == [False] * 5


def test_no_keys_anywhere_admits_every_client():
    keys = ApiKeys.from_sources([], "")
    assert not keys.enabled and keys.admits(None) and keys.admits("anything")


def test_keys_are_not_kept_or_shown_in_clear():
    keys = ApiKeys([KEY])
    assert KEY not in repr(keys) and KEY.encode() not in repr(vars(keys)).encode()


@pytest.mark.parametrize(("header", "token"), [
    (f"Bearer {KEY}", KEY), (f"bearer  {KEY} ", KEY), ("Basic dXNlcg==", None), ("Bearer", None), ("", None),
    (None, None)])
def test_bearer_token_reads_only_the_bearer_scheme(header, token):
    assert bearer_token(header) == token


class FakeKeyedFrontend(FakeAnsweringFrontend):
    """Answers like FakeAnsweringFrontend, behind the real key check."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = ApiKeys([KEY])

    def authorize(self, api_key: str | None) -> None:
        if not self.keys.admits(api_key):
            raise Unauthenticated()


@pytest.fixture
def client() -> TestClient:
    return TestClient(build_http_app(FakeKeyedFrontend), raise_server_exceptions=False)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong-123"}, {"Authorization": KEY}])
@pytest.mark.parametrize(("method", "path"), [("post", "/v1/chat/completions"), ("post", "/v1/completions"),
                                              ("get", "/v1/models")])
def test_api_routes_without_a_valid_key_are_401_before_the_body_is_read(client, headers, method, path):
    r = client.request(method, path, headers=headers, json={"not": "a valid body"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key" and "sk-wrong-123" not in r.text


def test_a_valid_key_is_served(client):
    body = {"model": "served-model", "messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"


def test_probes_metrics_and_the_api_document_need_no_key(client):
    assert client.get("/health").status_code == 503  # answered (this fake has no live instance), not refused
    assert client.get("/metrics").status_code == 200
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "401" in doc["paths"]["/v1/completions"]["post"]["responses"]
