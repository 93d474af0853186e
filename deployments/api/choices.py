"""The `n` choices of an answer as the HTTP API reads them: one engine request each (the
frontend's streams), read one after the other."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from pdserve.errors import EngineFailure
from pdserve.prefill.requests import GenerateChunk


async def until_each_began(chunks: AsyncIterator[tuple[int, GenerateChunk]], n: int) -> list[tuple[int, GenerateChunk]]:
    """The chunks that arrive until each of `n` choices has sent one."""
    arrived: list[tuple[int, GenerateChunk]] = []
    began: set[int] = set()
    while len(began) < n:
        try:
            i, chunk = await anext(chunks)
        except StopAsyncIteration:
            raise EngineFailure("The engine ended the answer without any output") from None
        arrived.append((i, chunk))
        began.add(i)
    return arrived


async def chain(first: list[tuple[int, GenerateChunk]],
                rest: AsyncGenerator[tuple[int, GenerateChunk], None]) -> AsyncGenerator[tuple[int, GenerateChunk], None]:
    """`first`, then `rest`, which is closed when this is."""
    async with aclosing(rest):
        for item in first:
            yield item
        async for item in rest:
            yield item


async def merged(streams: list[AsyncIterator[GenerateChunk]]) -> AsyncGenerator[tuple[int, GenerateChunk], None]:
    """Each choice's chunks with its index, one choice after the other; a failure ends them all,
    and closing this closes the stream being read (the frontend then aborts its engine calls).
    Choices run in turn, not at once: the engine calls of one HTTP request's choices placed
    concurrently were seen to hang in `make test` (two prefills done, the second decode call never
    reaching the decode replica), the same calls of separate requests did not."""
    for i, stream in enumerate(streams):
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                yield i, chunk
