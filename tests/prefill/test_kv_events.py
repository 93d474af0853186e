"""An engine replica's feed of its prefix cache's changes: a real vLLM engine's KV cache events
become an index the ingress's prompt hashes find; a publisher that skips batches or sends
garbage (a fake peer) makes the controller forget the cache rather than trust a partial view."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from pdserve.controller.prefix_index import CacheEvents, Cleared, PrefixIndex, Removed, Stored, block_hashes
from pdserve.model_store import resolve_model
from pdserve.prefill.kv_events import KVEventFeed, events_endpoint, kv_events_config

ENGINE = 7
"""The engine's instance number in the index."""


def _until(check, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


class FakePublisher:
    """The engine core's side of the socket, publishing what a test tells it to."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.bind(endpoint)
        self.encoder = msgspec.msgpack.Encoder()

    def send(self, seq: int, payload: bytes | list) -> None:
        if isinstance(payload, list):
            payload = self.encoder.encode(KVEventBatch(ts=time.time(), events=payload))
        self.sock.send_multipart((b"kv", seq.to_bytes(8, "big"), payload))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def feed_and_publisher():
    feed = KVEventFeed(events_endpoint(uuid.uuid4().hex))
    publisher = FakePublisher(feed.endpoint)
    yield feed, publisher
    publisher.close()
    feed.close()


def _stored(k: int) -> BlockStored:
    return BlockStored(block_hashes=[k], parent_block_hash=None, token_ids=list(range(16)), block_size=16,
                       lora_id=None, medium="GPU", lora_name=None)


def _delivered(feed: KVEventFeed, publisher: FakePublisher, seq: int, events: list) -> list:
    """Publish until the subscriber is connected (ZMQ drops what a PUB sends before that)."""
    taken: list = []

    def arrived():
        publisher.send(seq, events)
        time.sleep(0.05)
        got = feed.take()
        taken.append(got)
        return got if got.events else None

    _until(arrived)
    return taken


def _next(feed: KVEventFeed) -> CacheEvents:
    """The next report's events, once there are some (or a loss)."""
    def ready() -> CacheEvents | None:
        taken = feed.take()
        return taken if taken.events or taken.lost else None

    return _until(ready)


def test_the_feed_hands_over_vllms_events_once_each_in_order(feed_and_publisher) -> None:
    feed, publisher = feed_and_publisher
    _delivered(feed, publisher, 0, [_stored(1)])
    publisher.send(1, [BlockRemoved(block_hashes=[1], medium="GPU"), AllBlocksCleared(),
                       BlockRemoved(block_hashes=[2], medium="GPU", group_idx=1)])  # a sliding-window group
    got = _next(feed)
    assert got.events == (Removed((1,)), Cleared()) and not got.lost
    assert feed.take().events == ()


def test_a_gap_in_the_publishers_sequence_or_garbage_makes_the_controller_forget(feed_and_publisher) -> None:
    feed, publisher = feed_and_publisher
    _delivered(feed, publisher, 0, [_stored(1)])
    publisher.send(5, [_stored(2)])  # batches 1-4 never arrived
    got = _next(feed)
    assert got.lost and got.events == (Stored(None, (2,), tuple(range(16)), 16),)
    publisher.send(6, b"\xc1 not msgpack")
    assert _next(feed) == CacheEvents((), lost=True)


def test_undelivered_events_make_the_next_report_forget_first(feed_and_publisher) -> None:
    feed, _ = feed_and_publisher
    feed.lose()
    assert feed.take().lost and not feed.take().lost


def test_a_closed_feed_leaves_no_socket_file_behind() -> None:
    feed = KVEventFeed(events_endpoint(uuid.uuid4().hex))
    publisher = FakePublisher(feed.endpoint)
    path = feed.endpoint.removeprefix("ipc://")
    assert os.path.exists(path)
    feed.close()
    publisher.close()
    assert not os.path.exists(path)


@pytest.mark.slow
def test_a_real_engines_cached_prompt_is_found_by_the_ingress_hashes_of_its_next_turn() -> None:
    """vLLM's own events, on the engine's own block size (128 tokens on a CPU)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cached_first, found, cached_next, block = asyncio.run(_two_turns([100 + (7 * k) % 5000 for k in range(300)]))
    assert cached_first == 0 and found == {ENGINE: 300 // block * block}
    assert cached_next == found[ENGINE]  # the engine reuses exactly what the index says it holds


async def _two_turns(prompt: list[int]) -> tuple[int, dict[str, int], int, int]:
    """A prompt, then the index built from the events it caused, then the next turn's prompt:
    what the engine had cached each time, what the index finds for the next turn, the block size."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    feed = KVEventFeed(events_endpoint(uuid.uuid4().hex))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(resolve_model(None)), dtype="float32", max_model_len=1024, enforce_eager=True,
        kv_events_config=kv_events_config(feed.endpoint)))

    async def answer(tokens: list[int], request_id: str) -> int:
        async for out in engine.generate({"prompt_token_ids": tokens}, SamplingParams(max_tokens=2, temperature=0),
                                         request_id):
            last = out
        return last.num_cached_tokens

    try:
        first = await answer(prompt, "first")
        index, following = PrefixIndex(), prompt + [5, 6, 7]
        deadline = time.monotonic() + 10
        found: dict[int, int] = {}
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            index.apply(ENGINE, feed.take())
            instances, tokens = index.cached_tokens(block_hashes(following))
            found = dict(zip(instances.tolist(), tokens.tolist(), strict=True))
        return first, found, await answer(following, "second"), engine.vllm_config.cache_config.block_size
    finally:
        engine.shutdown()
        feed.close()
