"""Fakes of the Ray Serve handles through which the ingress calls its remote peers (the
controller and the engine pools): a method called with `.remote(...)`, and a streamed answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pdserve.prefill.requests import GenerateChunk


class FakeRemoteMethod:
    """One method of a Ray Serve handle: `.remote(...)` returns `answer(...)`."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.answer(*args, **kwargs)


class FakeEngineStream:
    """A streaming Serve response: async-iterable chunks, and `cancel()`, which it records. As with
    a real one, an engine's failure comes out of the iteration, not out of `.remote()`."""

    def __init__(self, chunks: AsyncIterator[GenerateChunk], routing_error: Exception | None = None) -> None:
        self._chunks = chunks
        self.routing_error = routing_error
        """The router could not place the call: iterating raises it, and so does `cancel()`, as
        Serve's does (it waits for the call's replica before cancelling)."""
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        return self._chunks

    def cancel(self) -> None:
        self.cancelled = True
        if self.routing_error is not None:
            raise self.routing_error
