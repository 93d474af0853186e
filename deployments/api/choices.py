"""The `n` choices of an answer as the HTTP API reads them: one engine request each (the
frontend's streams), their chunks merged as they come, each stream read from start to end by one
task."""

from __future__ import annotations

import asyncio
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
    """Each choice's chunks with its index, as they come; the first failure ends them all, and
    closing this closes every stream (the frontend then aborts its engine calls). A choice's
    stream is read from start to end by one task (one choice in the caller's, several each in
    its own, alive until its stream ends): a disaggregated stream resumed in another task after
    the task that began it had ended was seen to hang, its decode call never reaching the decode
    replica."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerateChunk | None, Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[GenerateChunk]) -> None:
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((i, chunk, None))
        except Exception as exc:
            queue.put_nowait((i, None, exc))
        else:
            queue.put_nowait((i, None, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            i, chunk, exc = await queue.get()
            if exc is not None:
                raise exc
            if chunk is None:
                running -= 1
            else:
                yield i, chunk
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
