"""An answer's choices merged: one after the other, each read whole by one task, the one being
read closed when the merge ends or fails; and `n` choices through the HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pdserve.deployments.api.choices import chain, merged, until_each_began
from pdserve.errors import EngineFailure
from pdserve.prefill.requests import SLO, GenerateChunk, GenerateRequest, SLOReport
from tests.deployments.api.fake_http_frontends import HI, MODEL, FakeAnsweringFrontend, http_client, sse_events


class FakeStream:
    """A frontend stream's stand-in: `n` chunks, a turn for the others between them; records the
    task that reads each step, and whether it was closed."""

    def __init__(self, n: int, fail_after: int | None = None) -> None:
        self.n, self.fail_after = n, fail_after
        self.tasks: list[asyncio.Task | None] = []
        self.closed = False

    async def run(self) -> AsyncIterator[GenerateChunk]:
        try:
            for k in range(self.n):
                self.tasks.append(asyncio.current_task())
                if k == self.fail_after:
                    raise EngineFailure("lost")
                yield GenerateChunk(str(k), [k], 1, k + 1, "stop" if k == self.n - 1 else None)
                await asyncio.sleep(0.001)
        finally:
            self.closed = True


async def test_choices_are_read_one_after_the_other_each_by_one_task():
    fakes = [FakeStream(4) for _ in range(3)]
    chunks = merged([f.run() for f in fakes])
    opening = await until_each_began(chunks, 3)
    assert [i for i, _ in opening] == [0] * 4 + [1] * 4 + [2]
    rest = [item async for item in chain(opening, chunks)]
    assert [(i, c.text) for i, c in rest] == [(i, str(k)) for i in range(3) for k in range(4)]
    for fake in fakes:
        assert len(set(fake.tasks)) == 1 and fake.closed  # the same task throughout


async def test_one_failed_choice_ends_the_merge_and_the_next_never_starts():
    fakes = [FakeStream(50), FakeStream(50, fail_after=2), FakeStream(50)]
    with pytest.raises(EngineFailure):
        async for _ in merged([f.run() for f in fakes]):
            pass
    assert fakes[0].closed and fakes[1].closed and fakes[2].tasks == []  # no engine call for the third


async def test_a_choice_without_any_chunk_is_an_engine_failure_and_closing_the_chain_closes_the_streams():
    with pytest.raises(EngineFailure, match="without any output"):
        await until_each_began(merged([FakeStream(0).run(), FakeStream(3).run()]), 2)
    fakes = [FakeStream(3), FakeStream(50)]
    chunks = merged([f.run() for f in fakes])
    stream = chain(await until_each_began(chunks, 2), chunks)
    await anext(stream)
    await stream.aclose()  # a client gone mid-answer
    assert all(f.closed for f in fakes)


class FakeChoosingFrontend(FakeAnsweringFrontend):
    """Answers each request with its own seed in the text, in two chunks; the request for choice
    `failing` (by id suffix) fails after its first. Records which requests it saw and closed."""

    def __init__(self, failing: int | None = None) -> None:
        super().__init__()
        self.failing = failing
        self.routed: list[GenerateRequest] = []
        self.closed: list[str] = []

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.routed.append(req)
        try:
            yield GenerateChunk(f"seed {req.sampling.seed}", [10], 3, 1)
            await asyncio.sleep(0.01)
            if self.failing is not None and req.request_id.endswith(f"-{self.failing}"):
                raise EngineFailure("the replica serving this choice failed")
            yield GenerateChunk(".", [11], 3, 2, "stop", slo=SLOReport(400.0 + len(self.routed), 30.0,
                                                                        SLO(500.0, 50.0, 0)))
        finally:
            self.closed.append(req.request_id)


def test_n_choices_are_requests_of_their_own_seeded_as_vllm_seeds_them() -> None:
    frontend = FakeChoosingFrontend()
    body = {"model": MODEL, "messages": HI, "n": 3, "seed": 5}
    whole = http_client(frontend).post("/v1/chat/completions", json=body).json()
    assert [(c["index"], c["message"]["content"]) for c in whole["choices"]] == [
        (0, "seed 5."), (1, "seed 6."), (2, "seed 7.")]
    assert (whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"]) == (3, 6)  # the prompt once
    assert len({r.request_id for r in frontend.routed}) == 3 and sorted(frontend.closed) == sorted(
        r.request_id for r in frontend.routed)
    completion = http_client(FakeChoosingFrontend()).post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                                               "n": 2}).json()
    assert [(c["index"], c["text"]) for c in completion["choices"]] == [(0, "seed None."), (1, "seed None.")]


def test_n_choices_stream_one_after_the_other_each_under_its_index() -> None:
    body = {"model": MODEL, "messages": HI, "n": 2, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(http_client(FakeChoosingFrontend()).post("/v1/chat/completions", json=body))
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events if e["choices"]]
    assert [i for i, d in deltas if d.get("role") == "assistant"] == [0, 1]
    assert {i: "".join(d.get("content") or "" for j, d in deltas if j == i) for i in (0, 1)} == {0: "seed 5.",
                                                                                                1: "seed 6."}
    assert [i for i, d in deltas if d.get("content")] == [0, 0, 1, 1]  # choice 0 whole, then choice 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    # The request's SLO report is its slowest choice's.
    assert events[-1]["usage"]["slo"]["ttft_ms"] == 402.0


def test_one_failed_choice_fails_the_request_and_ends_the_others() -> None:
    frontend = FakeChoosingFrontend(failing=1)
    body = {"model": MODEL, "messages": HI, "n": 3}
    resp = http_client(frontend).post("/v1/chat/completions", json=body)
    assert resp.status_code == 500 and "failed" in resp.json()["error"]["message"]
    assert sorted(frontend.closed) == sorted(r.request_id for r in frontend.routed)
    frontend = FakeChoosingFrontend(failing=2)
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    assert "failed" in events[-1]["error"]["message"]
    assert sorted(frontend.closed) == sorted(r.request_id for r in frontend.routed)
