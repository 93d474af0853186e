"""A disaggregated answer as the ingress serves it.

The prefill engine computes the prompt, pushes its KV to the decode engine and samples the
first token with the request's own sampling; the client has that token as soon as the prompt is
done, and the decode engine goes on from the prompt and that token with the KV moved. So TTFT is
the prefill's alone: neither the transfer nor a step of the decode engine's batch is in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

from pdserve.controller.decision import Decision
from pdserve.deployments.failover import ResumedText, as_serve_error, decode_stream
from pdserve.errors import ReplicaLost
from pdserve.prefill.requests import GenerateChunk, GenerateRequest

log = logging.getLogger("pdserve.ingress")

PREFILL_CHECK_S = 1.0
"""How often a request waiting for its prefill looks whether the prefill replica is still live."""


async def disaggregated_answer(pools: dict[str, Any], req: GenerateRequest, decision: Decision, lease_ms: int,
                               background: set[asyncio.Future], on_prefill_done: Callable[[asyncio.Future], None],
                               gone: Callable[[str], bool]) -> AsyncIterator[GenerateChunk]:
    """The chunks of `req` served by the decided prefill and decode replicas, each called through
    its pool's handle in `pools`. A prefill still running when the answer is given up is added to
    `background` and left to finish; `gone` says whether a replica has left the live ones."""
    assert decision.prefill is not None and decision.decode is not None and req.sampling.max_tokens is not None
    n = len(req.prompt_token_ids)
    dest = decision.decode.kv_addr if req.sampling.max_tokens > 1 else None  # a one-token answer moves no KV
    prefill_pool, decode_pool = pools[decision.prefill.pool], pools[decision.decode.pool]
    dispatched_s = time.perf_counter()
    task = asyncio.ensure_future(_timed(prefill_pool.prefill.remote(req, dest, lease_ms, decision.decode_cached_tokens,
                                                                    decision.decode.tp_size,
                                                                    replica_id=decision.prefill.replica_id),
                                        dispatched_s))
    try:
        first = await _prefill_answer(task, decision.prefill.replica_id, gone)
    finally:
        # Left to finish, not cancelled: it is one prompt's work, and cancelling a call Serve already
        # placed stalled this whole replica for seconds when its prefill replica was stopping
        # (the scale-down test in tests/deployments/test_faults_e2e.py).
        if not task.done():
            background.add(task)
            task.add_done_callback(background.discard)
            task.add_done_callback(on_prefill_done)
    ids, text, logprobs = list(first["token_ids"]), str(first["text"]), first.get("logprobs")
    cached = first.get("cached_tokens")
    ended = "stop" if first["finish_reason"] == "stop" else "length" if len(ids) >= req.sampling.max_tokens else None
    if ended is not None:
        if dest is not None:
            _discard_kv(decode_pool, req.request_id, decision.prefill.tp_size, decision.decode.replica_id, background)
        with _then(on_prefill_done, task):
            yield GenerateChunk(text, ids, n, len(ids), ended, logprobs=logprobs, cached_tokens=cached)
        return
    # vLLM holds back the text a stop string may start in; the decode engine sees this token as
    # prompt, where it looks for none, so the stop strings are looked for across the seam here.
    hold = min(len(text), max((len(s) for s in req.sampling.stop), default=1) - 1)
    seam = ResumedText(text[len(text) - hold:], req.sampling.stop)
    with _then(on_prefill_done, task):
        yield GenerateChunk(text[:len(text) - hold], ids, n, len(ids), logprobs=logprobs, cached_tokens=cached)
    cont = req.continued(ids)
    stream = decode_pool.options(stream=True).generate.remote(cont, cont.sampling.max_tokens, lease_ms,
                                                              replica_id=decision.decode.replica_id,
                                                              skip_tokens=decision.decode_cached_tokens,
                                                              src_tp=decision.prefill.tp_size)
    async with aclosing(decode_stream(stream, decision)) as chunks:
        async for chunk in chunks:
            chunk.text, stopped = seam.feed(chunk.text, last=chunk.finish_reason is not None)
            chunk.finish_reason = "stop" if stopped else chunk.finish_reason
            yield chunk
            if stopped:  # closing the stream stops the decode engine's generation
                return


async def _timed(call: Awaitable[dict], dispatched_s: float) -> dict:
    """The prefill call's answer with its `call_ms`: from its dispatch to its answer at the ingress.
    The controller learns a prefill's time from it, as it learns a local prefill's from the engine
    call to its first token here, so that it sets the two paths against each other alike: the
    engine's own `prefill_ms` leaves out the hops, and a local prefill's TTFT since the request
    arrived adds tokenizing and routing."""
    answer = await call
    return {**answer, "call_ms": (time.perf_counter() - dispatched_s) * 1e3}


@contextmanager
def _then(on_prefill_done: Callable[[asyncio.Future], None], task: asyncio.Future) -> Iterator[None]:
    """Report the prefill once its first token is on its way to the client (or the client left):
    a call to the controller made before then delays that token."""
    try:
        yield
    finally:
        on_prefill_done(task)


async def _prefill_answer(task: asyncio.Future, replica_id: str, gone: Callable[[str], bool]) -> dict:
    """The prefill call's answer. Given up as a lost replica once its replica has left the live
    ones: a call Serve placed on a replica that is going away may wait in Serve's router for
    minutes (the call itself is left to finish)."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=PREFILL_CHECK_S)
        if done:
            try:
                return task.result()
            except Exception as exc:
                raise as_serve_error(exc, "prefill", replica_id) from None
        if gone(replica_id):
            raise ReplicaLost("prefill", replica_id, departed=False)


def _discard_kv(decode_pool: Any, transfer_id: str, src_tp: int, replica_id: str,
                background: set[asyncio.Future]) -> None:
    """Free, on the decode replica, the KV of an answer that ended at its first token (each of the
    `src_tp` parts; else they wait out their lease there)."""
    call = asyncio.ensure_future(decode_pool.discard_kv.remote(transfer_id, src_tp, replica_id=replica_id))
    background.add(call)

    def done(f: asyncio.Future) -> None:
        background.discard(f)
        if not f.cancelled() and f.exception() is not None:
            log.debug("discarding the KV of %s on %s: %r", transfer_id, replica_id, f.exception())

    call.add_done_callback(done)
