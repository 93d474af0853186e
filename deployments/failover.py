"""How the ingress follows one answer across attempts and engines: the client's view of its tokens
and timings (`AnswerRun`), stop strings across a seam between engines (`ResumedText`), and an
engine call's failure told apart as a lost replica (retried elsewhere) or a failing engine (not)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from pdserve.controller.decision import Decision, Outcome
from pdserve.errors import EngineFailure, Overloaded, ReplicaGone, ReplicaLost, ServeError, Unavailable
from pdserve.prefill.requests import GenerateChunk

log = logging.getLogger("pdserve.ingress")


@dataclass
class AnswerRun:
    """A request's tokens and their timings as the client sees them, from its arrival at the
    ingress, over every attempt at serving it."""

    start_s: float
    first_s: float = 0.0
    last_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    """Every token sent to the client so far."""
    text: str = ""
    """Every character sent to the client so far: with stop strings, vLLM holds back the text
    of the latest tokens, so this may end before `token_ids` does."""
    finished: bool = False
    """The answer's last chunk (with its finish_reason) has been sent."""
    cached_tokens: int | None = None
    """Prompt tokens the engine that first prefilled it had in its prefix cache (a later attempt's
    prompt holds the answer so far: not the client's prompt)."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def tokens_arrived(self, token_ids: list[int]) -> bool:
        """Record a chunk's tokens; True for the answer's first ones."""
        now = time.perf_counter()
        first = not self.first_s
        if first:
            self.first_s = now
        self.last_s = now
        self.token_ids.extend(token_ids)
        return first

    def ttft_ms(self) -> float:
        return (self.first_s - self.start_s) * 1e3

    def tpot_ms(self) -> float | None:
        if self.tokens < 2:
            return None
        return (self.last_s - self.first_s) * 1e3 / (self.tokens - 1)


class ResumedText:
    """The text of an answer going on on a new replica after its first one died.

    vLLM holds back the last `len(longest stop) - 1` characters of a streamed answer until it
    knows no stop string starts there, so the client may hold tokens whose text it was never
    sent (`carried`); and on the new replica those tokens are prompt, where vLLM looks for no
    stop string. This sends the carried text ahead of the new replica's, and looks for the stop
    strings across the seam, holding back as vLLM does, until the new replica's text is long
    enough that no stop string can span the seam (then the engine's own holdback suffices)."""

    def __init__(self, carried: str, stop: list[str]):
        self.pending = carried
        self.stop = stop
        self.hold_chars = max((len(s) for s in stop), default=1) - 1
        self._seam_chars_left = self.hold_chars
        """New text still to see before a stop string starting in the carried text must have shown."""

    def feed(self, text: str, last: bool) -> tuple[str, bool]:
        """The text to send for a chunk carrying `text`, and whether a stop string ends the answer
        there (the text stops before it; the new replica's stream is to be dropped)."""
        buf = self.pending + text
        hits = [at for s in self.stop if (at := buf.find(s)) >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        self._seam_chars_left -= len(text)
        keep = 0 if last or self._seam_chars_left <= 0 else min(self.hold_chars, len(buf))
        self.pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False


def refusal(decision: Decision) -> ServeError:
    if decision.outcome is Outcome.REJECTED:
        return Overloaded(f"the request cannot meet its objectives now: {decision.reason}", decision.retry_after_s)
    if decision.outcome is Outcome.OVERLOADED:
        return Overloaded(f"all instances are busy: {decision.reason}", decision.retry_after_s)
    return Unavailable(f"no instance can serve the request: {decision.reason}", decision.retry_after_s)


async def decode_stream(stream: Any, decision: Decision) -> AsyncIterator[GenerateChunk]:
    """An engine call's streamed chunks, its failures told apart (`as_serve_error`); a stream
    given up on is cancelled, freeing its engine slot."""
    assert decision.decode is not None
    ended = False
    try:
        it = stream.__aiter__()
        while True:
            try:
                yield await it.__anext__()
            except StopAsyncIteration:
                ended = True
                return
            except Exception as exc:
                ended = True
                raise as_serve_error(exc, "decode", decision.decode.replica_id) from None
    finally:
        if not ended:  # given up on (a client gone, a stop string): free its engine slot
            # Serve's cancel waits, blocking, until the call is routed: never on the event loop.
            asyncio.get_running_loop().run_in_executor(None, _cancel, stream, decision.decode.replica_id)


def _cancel(stream: Any, replica_id: str) -> None:
    try:
        stream.cancel()
    except Exception as exc:  # Serve re-raises the call's routing failure here
        log.debug("cancelling the decode call of %s: %r", replica_id, exc)


def as_serve_error(exc: BaseException, phase: str, replica_id: str) -> ServeError:
    """What the client is told of an engine call's failure; a dead replica (its actor gone,
    possibly reported inside a task error, or missing from the router's list) is a ReplicaLost,
    which the ingress may retry."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, (RayActorError, ReplicaGone)) or isinstance(cause, (RayActorError, ReplicaGone)):
        gone = exc if isinstance(exc, ReplicaGone) else cause
        return ReplicaLost(phase, replica_id, departed=gone.departed if isinstance(gone, ReplicaGone) else True)
    if isinstance(exc, ServeError):
        return exc
    if isinstance(cause, ServeError):
        return cause
    log.warning("%s failed: %s", phase, exc)
    return EngineFailure(f"the {phase} engine failed ({type(cause or exc).__name__})")
