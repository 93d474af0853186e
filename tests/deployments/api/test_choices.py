"""An answer's choices merged: each stream read by one task from start to end, every stream
closed when the merge ends or fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pdserve.deployments.api.choices import chain, merged, until_each_began
from pdserve.errors import EngineFailure
from pdserve.prefill.requests import GenerateChunk


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


async def test_each_choice_is_read_by_one_task_from_its_first_chunk_to_its_last():
    fakes = [FakeStream(4) for _ in range(3)]
    chunks = merged([f.run() for f in fakes])
    opening = await until_each_began(chunks, 3)
    assert sorted(i for i, _ in opening) == [0, 1, 2]
    rest = [item async for item in chain(opening, chunks)]
    assert sorted((i, c.text) for i, c in rest) == [(i, str(k)) for i in range(3) for k in range(4)]
    for fake in fakes:
        assert len(set(fake.tasks)) == 1 and fake.closed  # the same task throughout


async def test_one_failed_choice_ends_the_merge_and_closes_every_stream():
    fakes = [FakeStream(50), FakeStream(50, fail_after=2), FakeStream(50)]
    with pytest.raises(EngineFailure):
        async for _ in merged([f.run() for f in fakes]):
            pass
    assert all(f.closed for f in fakes)


async def test_a_choice_without_any_chunk_is_an_engine_failure_and_closing_the_chain_closes_the_streams():
    with pytest.raises(EngineFailure, match="without any output"):
        await until_each_began(merged([FakeStream(0).run(), FakeStream(3).run()]), 2)
    fakes = [FakeStream(50), FakeStream(50)]
    chunks = merged([f.run() for f in fakes])
    stream = chain(await until_each_began(chunks, 2), chunks)
    await anext(stream)
    await stream.aclose()  # a client gone mid-answer
    assert all(f.closed for f in fakes)
